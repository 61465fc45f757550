"""What the train tests share: a tiny project trained up to the base model (prepare, sft, mia, once per
worker), a copy of it per test, and the MLflow searches the tests make."""


import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from grpolab import config
from grpolab.models import load_model
from grpolab.paths import CHECKPOINT_DIR, TRAINED_DIR
from grpolab.stages import run_stage

from conftest import BIN, REPO, TINY, project_env

TINY_TRAIN = [
    "train.steps=4", "train.prompts_per_step=4", "train.group_size=4", "train.micro_batch_size=8",
    "train.max_new_tokens=24", "train.save_every=2", "train.log.log_completions_every=2", "train.optim.warmup_steps=1",
    "train.optim.learning_rate=0.001", "train.rewards.judge_model=judge", "train.rewards.weights={answer_match: 1.0, format: 0.1, judge: 1.0}",
]
STEP_METRICS = [
    "train/loss", "train/pg_loss", "train/kl", "train/reward_mean", "train/reward_std", "train/reward/answer_match",
    "train/reward/format", "train/reward/judge", "train/reward_by_source/arithmetic", "train/advantage_mean", "train/logprob_mean", "train/entropy", "train/clip_ratio",
    "train/grad_norm", "train/lr", "train/completion_length", "train/frac_zero_std_groups", "train/tokens_per_s",
    "train/step_time", "credit/answer_share", "credit/think_share", "credit/high_entropy_share", "credit/gini",
]

TRACIN_KEYS = [
    "tracin/positive_ratio", "tracin/negative_ratio", "tracin/zero_ratio", "tracin/min_ip", "tracin/max_ip", "tracin/mean_ip",
    "tracin/std_ip", "tracin/selected_ratio", "tracin/fallback", "tracin/val_grad_norm",
]
SEPARATE = ["train.tracin.use_tracin=true", "train.tracin.validation.name=separate", "train.tracin.validation.val_batch_size=8",
            "train.tracin.validation.val_pool_size=16", "train.tracin.validation.val_selection=top", "train.tracin.validation.val_loss=contrastive"]
SAME_BATCH = ["train.tracin.use_tracin=true", "train.tracin.validation.name=same_batch"]
TIMINGS = ["train/step_time"]  # the curve's one wall-clock column
ZERO_RUN = ["train.steps=2", "train.loss.kl_beta=0", *SAME_BATCH]  # with TracIn: its influence pass runs on gathered parameters


TIED_REWARD = """def compute_score(data_source, completion, ground_truth, extra_info):
    # every completion of a prompt whose answer is even scores 1: its group is tied
    return 1.0 if int(ground_truth) % 2 == 0 else float(len(completion) % 2)
"""


def tied_reward(project: Path) -> list[str]:
    """The overrides of a reward (saved in `project`) under which about half the groups are tied: what
    dynamic sampling drops."""
    (project / "tied.py").write_text(TIED_REWARD)
    return ["train.rewards.reward_file=tied.py", "train.rewards.weights={reward_file: 1.0}", "train.rewards.judge_model=null"]


def save_judge(path: Path) -> None:
    """A tiny frozen sequence classifier (one logit) as the judge, saved as a HF checkpoint:
    its scores vary from completion to completion, so even a barely trained policy gets a signal."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from grpolab.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("data/tokenizer")
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, intermediate_size=32, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """prepare + sft once (tiny), shared read-only by the tests below."""
    root = tmp_path_factory.mktemp("base")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = config.apply_overrides([*TINY, "train.rewards.judge_model=null", "train.rewards.weights={answer_match: 1.0}", *TINY_TRAIN[:-2]])
        run_stage("prepare", params)
        save_judge(root / "judge")
        params = config.apply_overrides(TINY_TRAIN[-2:])
        run_stage("sft", params)
        run_stage("mia", params)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def trainer(base_project, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(base_project, root)
    monkeypatch.chdir(root)
    return root


@contextmanager
def working_in(folder: Path):
    """Run in-process stages in another copy of the project."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


def trained_weights() -> dict[str, torch.Tensor]:
    return load_model(TRAINED_DIR).state_dict()


def mlflow_client(root: Path = Path(".")) -> MlflowClient:
    """A client of the project's own MLflow store (the default sqlite file in `root`)."""
    return MlflowClient(f"sqlite:///{(root / 'mlflow.db').resolve()}")


def train_runs(client: MlflowClient, **search) -> list:
    """The train stage's runs of the `grpolab` experiment (MlflowClient.search_runs keywords in `search`)."""
    return client.search_runs([client.get_experiment_by_name("grpolab").experiment_id], "tags.`grpolab.stage` = 'train'", **search)


def kill_after_a_checkpoint_and_later_steps(project: Path, client: MlflowClient) -> int:
    """Start the train stage, kill -9 it once a checkpoint exists and MLflow holds steps after it; the
    checkpoint's step."""
    proc = subprocess.Popen([f"{BIN}/grpolab", "stage", "train"], cwd=project, env=project_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None and time.time() < deadline, "training ended before a checkpoint and a step after it"
        latest = project / CHECKPOINT_DIR / "latest"
        if latest.is_file():
            state = json.loads((project / CHECKPOINT_DIR / latest.read_text().strip() / "grpolab_state.json").read_text())
            logged = [m.step for m in client.get_metric_history(state["mlflow_run_id"], "train/loss")]
            if max(logged, default=0) > state["step"]:
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return state["step"]
