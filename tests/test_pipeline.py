"""End to end: the real CLI, Prefect's temporary server, DVC in a git repo, an MLflow sqlite store."""

import hashlib
import json
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from conftest import BIN, TINY, grpolab, make_project, run

EVAL_KEYS = {
    "success_rate", "format_rate", "completion_length",
    "sampled/success_rate", "sampled/format_rate", "sampled/completion_length", "sampled/pass_at_2",
}
MIA_METHODS = ("loss", "zlib", "min_k", "min_k_plus_plus")
MIA_KEYS = {f"mia/{m}/{k}" for m in MIA_METHODS for k in ("auc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.05")}
OUTPUT_FILES = [
    "data/train.parquet", "data/eval.parquet", "data/sft.parquet", "data/val.parquet", "data/train_weighted.parquet", "data/mia_scores.parquet",
    "metrics/eval.json", "metrics/eval_samples.jsonl", "metrics/sft_loss.csv", "models/trained/model.safetensors",
    *[f"metrics/mia_roc/{m}.csv" for m in MIA_METHODS],
]


def digests(root: Path) -> dict[str, str]:
    files = [root / f for f in OUTPUT_FILES] + sorted((root / "data/tokenizer").iterdir())
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_pipeline_through_prefect_then_dvc(tmp_path):
    a = make_project(tmp_path / "a")
    # With a mitigation whose weights need an extra model pass and TracIn on a separate validation
    # set: the flow runs them like any other (tests/test_train.py trains each variant stage by stage).
    tracin = ["train.tracin.use_tracin=true", "train.tracin.validation=separate", "train.tracin.val_batch_size=8",
              "train.tracin.val_pool_size=16", "train.tracin.val_selection=balanced"]
    proc = grpolab("run", *[f"-S{o}" for o in [*TINY, *tracin]], "-Strain.mitigation.name=attention_credit", cwd=a)
    out = proc.stdout + proc.stderr
    for stage in ("prepare", "sft", "mia", "train", "evaluate"):
        assert f"==> stage {stage}" in out and f"Running stage '{stage}'" in out
    assert "grpolab pipeline summary" in proc.stdout and "make ui" in proc.stdout

    # Outputs and metrics keys.
    metrics = json.loads((a / "metrics/eval.json").read_text())
    assert set(metrics) == {f"{m}/{k}" for m in ("base", "trained") for k in EVAL_KEYS | MIA_KEYS}
    assert all(0 <= metrics[f"{m}/{k}"] <= 1 for m in ("base", "trained") for k in EVAL_KEYS | MIA_KEYS if "rate" in k or "pass" in k or "mia" in k)
    roc = pd.read_csv(a / "metrics/mia_roc/min_k_plus_plus.csv")
    assert list(roc.columns) == ["fpr", "base", "trained"] and roc["trained"].is_monotonic_increasing
    weighted = pd.read_parquet(a / "data/train_weighted.parquet")
    weights = [x["mia_weight"] for x in weighted["extra_info"]]
    assert len(weights) == 40 and min(weights) == 0.0 and max(weights) == 1.0
    assert {x["mia_method"] for x in weighted["extra_info"]} == {"min_k_plus_plus"}
    assert 0 < metrics["base/completion_length"] <= 24
    assert (a / "models/trained/model.safetensors").is_file()
    assert pd.read_csv(a / "metrics/train_curve.csv")["step"].tolist() == [1, 2, 3]
    train, eval_ = pd.read_parquet(a / "data/train.parquet"), pd.read_parquet(a / "data/eval.parquet")
    assert (len(train), len(eval_)) == (40, 16) and not set(train["prompt"]) & set(eval_["prompt"])
    val = pd.read_parquet(a / "data/val.parquet")
    sft = pd.read_parquet(a / "data/sft.parquet")
    assert len(val) == 16 and not set(val["prompt"]) & (set(train["prompt"]) | set(eval_["prompt"]) | set(sft["prompt"]))
    assert len(list((a / "metrics/tracin").glob("step_*.parquet"))) == 3
    assert (a / "models/base/config.json").is_file() and (a / "models/base/tokenizer.json").is_file()
    samples = [json.loads(line) for line in (a / "metrics/eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {s["model"] for s in samples} == {"base", "trained"}
    assert {"prompt", "ground_truth", "greedy", "sampled"} <= set(samples[0])
    loss = pd.read_csv(a / "metrics/sft_loss.csv")
    assert loss["step"].tolist() == list(range(1, 13)) and loss["loss"].iloc[-1] < loss["loss"].iloc[0]

    # MLflow: one run tree, queried through the client on the real sqlite store.
    client = MlflowClient(f"sqlite:///{a / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grpolab")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("grpolab.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["grpolab.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare", "sft", "mia", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.params["sft.steps"] == "12" and parent.data.params["model.hidden_size"] == "32"
    assert parent.data.params["data.operations"] == "['+', '-']"
    assert parent.data.metrics["base/success_rate"] == metrics["base/success_rate"]
    assert parent.data.metrics["trained/success_rate"] == metrics["trained/success_rate"]
    assert len(client.get_metric_history(children["train"].info.run_id, "train/reward_mean")) == 3
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"train", "eval", "sft", "val", "train_weighted"}
    evaluate_artifacts = {f.path for f in client.list_artifacts(children["evaluate"].info.run_id)}
    assert "mia_roc.png" in evaluate_artifacts
    assert 0 <= children["mia"].data.metrics["mia/base_train_vs_eval_auc"] <= 1
    history = client.get_metric_history(children["sft"].info.run_id, "sft/loss")
    assert [m.step for m in history] == [4, 8, 12]
    sft_artifacts = {f.path for f in client.list_artifacts(children["sft"].info.run_id, "base_model")}
    assert "base_model/config.json" in sft_artifacts and "base_model/tokenizer.json" in sft_artifacts
    assert "tokenizer/tokenizer.json" in {f.path for f in client.list_artifacts(children["prepare"].info.run_id, "tokenizer")}
    table = json.loads(Path(client.download_artifacts(children["evaluate"].info.run_id, "eval_samples.json", str(tmp_path))).read_text())
    assert len(table["data"]) == 8 and "greedy" in table["columns"]

    # The same params through plain `dvc repro` in another checkout: byte-identical outputs.
    b = make_project(tmp_path / "b")
    (b / "params.yaml").write_text((a / "params.yaml").read_text())
    run(["dvc", "repro"], b)
    assert digests(a) == digests(b)

    # DVC's view of the Prefect run: up to date; one param rerun only the stages that read it.
    assert "Data and pipelines are up to date" in run(["dvc", "status"], a).stdout
    repro = run(["dvc", "repro"], a).stdout
    assert "Running stage" not in repro
    params = (a / "params.yaml").read_text()
    assert "num_logged_samples: 4\n" in params
    (a / "params.yaml").write_text(params.replace("num_logged_samples: 4\n", "num_logged_samples: 2\n"))
    repro = run(["dvc", "repro"], a).stdout
    assert "Running stage 'evaluate'" in repro
    assert all(f"Running stage '{s}'" not in repro for s in ("prepare", "sft", "mia", "train"))


def test_project_root_sees_through_dvc_experiment_copies(tmp_path):
    from grpolab.tracking import project_root

    assert project_root(tmp_path) == tmp_path.resolve()
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    copy.mkdir(parents=True)
    assert project_root(copy) == tmp_path.resolve()


def test_dvc_queue_experiment_runs_land_in_the_project_store(tmp_path):
    """`dvc exp run --queue` runs in a copy under .dvc/tmp/exps: its runs and artifacts still go to the project's store."""
    from grpolab import config

    project = make_project(tmp_path / "p")
    config.apply_overrides([*TINY, "train.steps=2", "sft.steps=4"], project / "params.yaml")
    identity = ["-c", "user.name=grpolab-test", "-c", "user.email=test@localhost"]
    run(["git", "add", "-A"], project)
    run(["git", *identity, "commit", "-qm", "project"], project)
    run([f"{BIN}/dvc", "exp", "run", "--queue", "-S", "train.learning_rate=0.0002"], project)
    run([f"{BIN}/dvc", "exp", "run", "--run-all", "-j", "1"], project)
    assert len(run([f"{BIN}/dvc", "exp", "ls", "--name-only"], project).stdout.split()) == 1

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grpolab")
    assert experiment.artifact_location.startswith((project / "mlruns").resolve().as_uri())
    runs = client.search_runs([experiment.experiment_id])
    stages = {r.data.tags["grpolab.stage"]: r for r in runs}
    assert set(stages) == {"pipeline", "prepare", "sft", "mia", "train", "evaluate"}
    parent = stages["pipeline"]
    assert parent.data.params["train.learning_rate"] == "0.0002"
    assert parent.info.run_name.endswith(" · seed 0") and all(r.data.tags["grpolab.seed"] == "0" for r in runs)
    assert parent.data.tags["grpolab.complete"] == "true" and "train.learning_rate=0.0002" in parent.data.tags["grpolab.changed_params"]
    assert all(r.info.status == "FINISHED" for r in runs)
    train_artifacts = {f.path for f in client.list_artifacts(stages["train"].info.run_id)}
    assert "train_curve.csv" in train_artifacts
    local = client.download_artifacts(stages["train"].info.run_id, "train_curve.csv", str(tmp_path))
    assert Path(local).read_text().startswith("step,")
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
