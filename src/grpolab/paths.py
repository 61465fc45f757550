"""The files the stages hand each other, by the stage that writes them, as `dvc.yaml` names them
(a test checks that each is an output of its stage there), and the project's other fixed places.
Paths are relative to the project root, where DVC runs every stage."""

from pathlib import Path

# inputs: a content digest per group of the user's own files (see stages/inputs.py)
INPUTS_DIR = Path("data/inputs")
# The params that name the user's own files and checkpoints, by the digest file of INPUTS_DIR that covers them
# (dvc.yaml's deps name the digest files, stage by stage); also what a study copies into each cell's workspace
# where git does not track it.
USER_FILES: dict[str, tuple[str, ...]] = {
    "data.json": ("data.train_files", "data.eval_files", "data.sft_files", "data.val_files"),  # prepare
    "model.json": ("model.name_or_path",),  # prepare (its tokenizer), sft (its weights)
    "judge_model.json": ("train.rewards.judge_model",),  # train
    "reward_file.json": ("train.rewards.reward_file",),  # train, evaluate
    "reference_model.json": ("mia.reference_model",),  # mia, evaluate
}

# prepare
TRAIN_FILE = Path("data/train.parquet")
EVAL_FILE = Path("data/eval.parquet")
SFT_FILE = Path("data/sft.parquet")
VAL_FILE = Path("data/val.parquet")
TOKENIZER_DIR = Path("data/tokenizer")

# sft
BASE_DIR = Path("models/base")
SFT_LOSS_FILE = Path("metrics/sft_loss.csv")

# mia
WEIGHTED_TRAIN_FILE = Path("data/train_weighted.parquet")
SCORES_FILE = Path("data/mia_scores.parquet")

# train
TRAINED_DIR = Path("models/trained")
CURVE_FILE = Path("metrics/train_curve.csv")
CREDIT_DIR = Path("metrics/credit")  # the credit logs, a parquet file per logged step
TRACIN_DIR = Path("metrics/tracin")  # TracIn's selections, a parquet file per influence step

# evaluate
SAMPLES_FILE = Path("metrics/eval_samples.jsonl")
ROC_DIR = Path("metrics/mia_roc")  # a CSV per membership attack: TPR of base and trained on one FPR grid

# A stage's headline file (a DVC metrics file, so DVC's cache restores it with the stage's outputs).
HEADLINES = {
    "prepare": Path("metrics/prepare.json"),
    "sft": Path("metrics/sft.json"),
    "mia": Path("metrics/mia.json"),
    "train": Path("metrics/train.json"),
    "evaluate": Path("metrics/eval.json"),
}

# Not outputs of a stage: the training checkpoints (resumed by a killed train stage), and where the
# MLflow store lives unless `tracking.uri` names one.
CHECKPOINT_DIR = Path("checkpoints/train")
DEFAULT_DB = "mlflow.db"  # in the project root
DEFAULT_ARTIFACTS = "mlruns"  # beside it
