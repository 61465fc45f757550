"""End to end: the real CLI, Prefect's temporary server, DVC in a git repo, an MLflow sqlite store."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient
from scipy.stats import mannwhitneyu, rankdata
from transformers import AutoConfig

from grpolab import config
from grpolab.runtime.fsutil import is_temporary

from conftest import BIN, REPO, TINY, free_port, grpolab, make_project, project_env, run
from lab import POLL_EVERY_SECOND, assert_no_secret_logged, flow_run_logs, prefect, prefect_api, runs_stage
from servers import postgres_bin, serving

EVAL_KEYS = {
    "success_rate", "format_rate", "completion_length",
    "sampled/success_rate", "sampled/format_rate", "sampled/completion_length", "sampled/pass_at_2",
}
MIA_METHODS = tuple(config.Params().eval.mia_methods)  # the default run's
MIA_KEYS = {f"mia/{m}/{k}" for m in MIA_METHODS for k in ("auc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.05")}
OUTPUT_FILES = [
    "data/train.parquet", "data/eval.parquet", "data/sft.parquet", "data/val.parquet", "data/train_weighted.parquet", "data/mia_scores.parquet",
    "metrics/eval.json", "metrics/eval_samples.jsonl", "metrics/sft_loss.csv", "models/trained/model.safetensors",
    *[f"metrics/mia_roc/{m}.csv" for m in MIA_METHODS],
]


def digests(root: Path) -> dict[str, str]:
    files = [root / f for f in OUTPUT_FILES] + sorted((root / "data/tokenizer").iterdir())
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def kill_during(project: Path, stage: str) -> bool:
    """Run `dvc repro` and kill -9 its whole process group a moment after `grpolab stage <stage>` starts its
    work (it prints its banner once its imports are done); whether the stage was still running then."""
    log = project / f"repro-{stage}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([f"{BIN}/dvc", "repro"], cwd=project, env=project_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while f"==> grpolab stage {stage}" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, f"dvc repro ended before stage {stage} began"
        time.sleep(0.1)
    time.sleep(0.5)
    running = any(runs_stage(p, stage) for p in psutil.Process(proc.pid).children(recursive=True))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.unlink()
    return running


def test_pipeline_as_a_deployment_on_a_worker_then_dvc(tmp_path, servers):
    """What a lab runs: the pipeline deployed from prefect.yaml on a `process` work pool and picked up by
    a worker, tracking into the MLflow server; then plain `dvc repro` of the same params in another checkout."""
    a = make_project(tmp_path / "a")
    shutil.copy(REPO / "prefect.yaml", a)
    pg, uri, prefect_env, folder = servers
    _pipeline_then_dvc(tmp_path, a, pg, uri, prefect_env, folder)


def _pipeline_then_dvc(tmp_path: Path, a: Path, pg: str, uri: str, prefect_env: dict[str, str], folder: Path) -> None:
    # What `make deploy` runs.
    prefect("work-pool", "create", "grpolab", "--type", "process", "--overwrite", env=prefect_env, cwd=a)
    prefect("--no-prompt", "deploy", "--all", env=prefect_env, cwd=a)
    deployments = {d["name"]: d for d in prefect_api(prefect_env, "deployments/filter", {})}
    assert set(deployments) == {"pipeline", "study", "cell"} and {d["work_pool_name"] for d in deployments.values()} == {"grpolab"}
    assert set(deployments["study"]["parameter_openapi_schema"]["properties"]) == {"study_file", "jobs", "gpus_per_cell", "pool"}
    assert deployments["pipeline"]["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(a)

    # With a mitigation whose weights need an extra model pass and TracIn on a separate validation
    # set: the flow runs them like any other (tests/test_train.py trains each variant stage by stage).
    tracin = ["train.tracin.use_tracin=true", "train.tracin.validation.name=separate", "train.tracin.validation.val_batch_size=8",
              "train.tracin.validation.val_pool_size=16", "train.tracin.validation.val_selection=balanced"]
    reference = tmp_path / "reference_model"  # a user's file the pipeline names but (with these methods) never loads
    AutoConfig.for_model("llama", hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(reference)
    overrides = [*TINY, *tracin, "train.mitigation.name=attention_credit", f"mia.reference_model={reference}", f"tracking.uri={uri}"]
    worker = tmp_path / "worker.log"
    with serving([f"{BIN}/prefect", "worker", "start", "--pool", "grpolab", "--type", "process"], worker, lambda: True, "prefect worker",
                 {**prefect_env, **POLL_EVERY_SECOND}):
        prefect("deployment", "run", "grpolab-pipeline/pipeline", "--params", json.dumps({"overrides": overrides}),
                "--watch", "--watch-interval", "1", "--watch-timeout", "900", env=prefect_env, cwd=a)
    [flow_run] = prefect_api(prefect_env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployments["pipeline"]["id"]]}}})
    out = worker.read_text()
    assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], out[-4000:])
    for stage in ("prepare", "sft", "mia", "train", "evaluate"):
        assert f"==> stage {stage}" in out and f"Running stage '{stage}'" in out
    # Prefect's logs of the flow run hold each stage's own output (issue 31): its banner, its progress at a sane
    # rate (12 sft steps: a line per 10 % at most, and the last), its headline
    logged = [(log["name"], log["level"], log["message"]) for log in flow_run_logs(prefect_env, flow_run["id"])]
    train = [m for name, _, m in logged if name == "grpolab.stage.train"]
    assert "==> grpolab stage train" in train and any(m.startswith("train: 100%|") and "3/3" in m for m in train), train
    assert any(m.startswith("    train/steps=3, ") for m in train), train
    sft_bar = [m for name, _, m in logged if name == "grpolab.stage.sft" and m.startswith("sft:")]
    assert 2 <= len(sft_bar) <= 12 and "12/12" in sft_bar[-1], sft_bar
    assert not [entry for entry in logged if entry[1] >= 40], [entry for entry in logged if entry[1] >= 40]  # no ERROR
    [summary] = prefect_api(prefect_env, "artifacts/filter", {"artifacts": {"key": {"any_": ["eval-summary"]}}})
    assert summary["flow_run_id"] == flow_run["id"] and summary["data"].startswith("# grpolab pipeline summary")

    # Outputs and metrics keys.
    metrics = json.loads((a / "metrics/eval.json").read_text())
    assert set(metrics) == {f"{m}/{k}" for m in ("base", "trained") for k in EVAL_KEYS | MIA_KEYS}
    for m in ("base", "trained"):
        # rates count the 16 eval prompts (greedy) and their 16 x 2 samples
        assert metrics[f"{m}/success_rate"] * 16 == pytest.approx(round(metrics[f"{m}/success_rate"] * 16))
        assert metrics[f"{m}/sampled/success_rate"] * 32 == pytest.approx(round(metrics[f"{m}/sampled/success_rate"] * 32))
        for method in MIA_METHODS:  # the TPRs in eval.json are the ROC tables' values at their FPR
            table = pd.read_csv(a / f"metrics/mia_roc/{method}.csv")
            for fpr in ("0.01", "0.05"):
                at = table.loc[(table["fpr"] - float(fpr)).abs() < 1e-9, m].item()
                assert metrics[f"{m}/mia/{method}/tpr_at_fpr_{fpr}"] == pytest.approx(at, abs=1e-6), (m, method, fpr)
    roc = pd.read_csv(a / "metrics/mia_roc/min_k_plus_plus.csv")
    assert list(roc.columns) == ["fpr", "base", "trained"] and roc["trained"].is_monotonic_increasing
    weighted = pd.read_parquet(a / "data/train_weighted.parquet")
    weights = [x["mia_weight"] for x in weighted["extra_info"]]
    scores = pd.read_parquet(a / "data/mia_scores.parquet")
    train_scores, eval_scores = (scores.loc[scores["split"] == split, "score"].to_numpy() for split in ("train", "eval"))
    assert len(weights) == 40 and len(eval_scores) == 16
    # the weights are the train prompts' score ranks scaled to [0, 1] (scipy's ranks: an independent computation)
    np.testing.assert_allclose(weights, (rankdata(train_scores) - 1) / 39, rtol=0, atol=1e-6)
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

    # MLflow: one run tree, read back through the client from the server.
    client = MlflowClient(uri)
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
    u_statistic = mannwhitneyu(train_scores, eval_scores).statistic  # AUC = U / (n_members n_nonmembers)
    assert children["mia"].data.metrics["mia/base_train_vs_eval_auc"] == pytest.approx(u_statistic / (40 * 16), abs=1e-9)
    history = client.get_metric_history(children["sft"].info.run_id, "sft/loss")
    assert [m.step for m in history] == [4, 8, 12]
    sft_artifacts = {f.path for f in client.list_artifacts(children["sft"].info.run_id, "base_model")}
    assert "base_model/config.json" in sft_artifacts and "base_model/tokenizer.json" in sft_artifacts
    assert "tokenizer/tokenizer.json" in {f.path for f in client.list_artifacts(children["prepare"].info.run_id, "tokenizer")}
    download = tmp_path / "download"
    table = json.loads(Path(client.download_artifacts(children["evaluate"].info.run_id, "eval_samples.json", str(download))).read_text())
    assert len(table["data"]) == 8 and "greedy" in table["columns"]
    assert Path(client.download_artifacts(children["evaluate"].info.run_id, "mia_roc.png", str(download))).read_bytes()[:4] == b"\x89PNG"
    train_run = children["train"].info.run_id
    curve = pd.read_csv(a / "metrics/train_curve.csv")
    history = client.get_metric_history(train_run, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, float(v)) for s, v in zip(curve["step"], curve["train/loss"])]
    model = Path(client.download_artifacts(train_run, "trained_model", str(download)))
    assert (model / "model.safetensors").read_bytes() == (a / "models/trained/model.safetensors").read_bytes()
    completions = pd.read_json(client.download_artifacts(train_run, "completions/step_000002.json", str(download)), orient="split")
    assert len(completions) == 16 and "advantage" in completions.columns
    # the server's own stores hold them: the runs in PostgreSQL, the files under its artifact folder
    host, port = pg.split(":")
    count = subprocess.run([postgres_bin("psql"), "-h", host, "-p", port, "-U", "grpolab", "-At", "-c", "select count(*) from runs", "mlflow"],
                           capture_output=True, text=True, check=True)
    assert int(count.stdout) == len(runs) and children["train"].info.artifact_uri.startswith("mlflow-artifacts:")
    assert len(list((folder / "artifacts").rglob("model.safetensors"))) == 2  # the base model (sft) and the trained one

    # The same params through plain `dvc repro` in another checkout, killed (kill -9) in the middle of the
    # stages that write models and checkpoints (tests/test_files.py has what a kill leaves of the other
    # writes) and run again until it completes: byte-identical outputs, no temporary file left.
    b = make_project(tmp_path / "b")
    (b / "params.yaml").write_text((a / "params.yaml").read_text())
    killed = [stage for stage in ("sft", "train") if kill_during(b, stage)]
    assert killed, killed  # a stage that ended before its kill is simply done
    repro = run(["dvc", "repro"], b)
    assert digests(a) == digests(b)
    left = [p for p in b.rglob(".*") if is_temporary(p) and not {".git", ".dvc", "mlruns"} & set(p.relative_to(b).parts)]
    assert not left, left

    # The tracking store down at start: a clear error before any stage runs, params.yaml untouched.
    before = (a / "params.yaml").read_bytes()
    proc = grpolab("run", "-S", f"tracking.uri=http://127.0.0.1:{free_port()}", "-S", "sft.steps=3", cwd=a, check=False)
    assert proc.returncode == 2 and "grpolab: error: tracking.uri: the MLflow tracking store http://127.0.0.1:" in proc.stderr
    assert "==> stage" not in proc.stdout + proc.stderr and (a / "params.yaml").read_bytes() == before

    # DVC's view of the Prefect run: up to date but for `inputs`, which digests the user's files every time;
    # one param puts out of date only the stages that read it (what `dvc repro` would run: DVC's status, as below,
    # rather than the evaluate stage's minutes again).
    status = run(["dvc", "status"], a).stdout
    assert "inputs:" in status and "always changed" in status
    assert not [s for s in ("prepare", "sft", "mia", "train", "evaluate") if f"{s}:" in status], status
    repro = run(["dvc", "repro"], a).stdout
    assert [line for line in repro.splitlines() if "Running stage" in line] == ["Running stage 'inputs':"]
    params = (a / "params.yaml").read_text()
    assert "num_logged_samples: 4\n" in params
    (a / "params.yaml").write_text(params.replace("num_logged_samples: 4\n", "num_logged_samples: 2\n"))
    status = run(["dvc", "status"], a).stdout
    assert {s for s in ("prepare", "sft", "mia", "train", "evaluate") if f"\n{s}:" in f"\n{status}"} == {"evaluate"}, status
    assert "eval.num_logged_samples" in status, status
    (a / "params.yaml").write_text(params)

    # A user's file (here the reference model, which mia and evaluate read) edited in place, its path
    # unchanged: exactly the stages that read it are out of date (once `inputs` has digested it).
    reference_config = (reference / "config.json").read_text()
    (reference / "config.json").write_text(reference_config.replace("{", '{"edited": true,', 1))
    run(["dvc", "repro", "inputs"], a)
    status = run(["dvc", "status"], a).stdout
    assert {s for s in ("prepare", "sft", "mia", "train", "evaluate") if f"\n{s}:" in f"\n{status}"} == {"mia", "evaluate"}, status
    (reference / "config.json").write_text(reference_config)  # mia up to date again: the run below starts at train

    _a_raising_reward_file_fails_the_flow_run_once(tmp_path, a, deployments["pipeline"]["id"], overrides, uri, prefect_env)
    assert_no_secret_logged(prefect_env, uri, folder / "artifacts", out, repro)


RAISING_REWARD = """def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if extra_info["index"] % 2:  # a user's bug on some rows
        return {}["nope"]
    return float(ground_truth in solution_str)
"""


def _a_raising_reward_file_fails_the_flow_run_once(tmp_path: Path, a: Path, deployment: str, overrides: list[str], uri: str,
                                                    prefect_env: dict[str, str]) -> None:
    """A deployment run with a reward file that raises on some rows (issue 31): the flow run fails, its state message
    is the train stage's named error, which its logs hold at level ERROR; the stage ran once (a user's error is
    not retried)."""
    (a / "bad_reward.py").write_text(RAISING_REWARD)
    bad = [*overrides, "train.rewards.reward_file=bad_reward.py", "train.rewards.weights={reward_file: 1.0}"]
    before = {r["id"] for r in prefect_api(prefect_env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment]}}})}
    worker = tmp_path / "worker-bad-reward.log"
    with serving([f"{BIN}/prefect", "worker", "start", "--pool", "grpolab", "--type", "process"], worker, lambda: True, "prefect worker",
                 {**prefect_env, **POLL_EVERY_SECOND}):
        watched = subprocess.run([f"{BIN}/prefect", "deployment", "run", "grpolab-pipeline/pipeline", "--params", json.dumps({"overrides": bad}),
                                  "--watch", "--watch-interval", "1", "--watch-timeout", "600"], cwd=a, env=prefect_env, capture_output=True, text=True)
    [flow_run] = [r for r in prefect_api(prefect_env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment]}}})
                  if r["id"] not in before]
    named = re.compile(r"^train\.rewards\.reward_file: bad_reward\.py: compute_score raised KeyError: 'nope' on data/\w+\.parquet: row \d+$")
    state = flow_run["state"]
    assert watched.returncode != 0 and state["type"] == "FAILED" and named.match(state["message"]), (state, worker.read_text()[-4000:])
    logs = flow_run_logs(prefect_env, flow_run["id"])
    assert {(log["level"], log["name"]) for log in logs if log["message"] == f"grpolab: error: {state['message']}"} == {(40, "grpolab.stage.train")}
    messages = [log["message"] for log in logs]
    assert messages.count("==> stage train") == 1 and messages.count("==> grpolab stage train") == 1, messages
    # the train stage printed no traceback (the engine's own log of the failed flow has Prefect's)
    assert "==> stage evaluate" not in messages and not [log for log in logs if log["name"] == "grpolab.stage.train" and "Traceback" in log["message"]]
    [train] = [r for r in prefect_api(prefect_env, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}) if r["name"] == "train"]
    assert train["run_count"] == 1 and train["state"]["type"] == "FAILED"
    client = MlflowClient(uri)
    failed = client.search_runs([client.get_experiment_by_name("grpolab").experiment_id],
                                "tags.`grpolab.stage` = 'train' and attributes.status = 'FAILED'")
    assert len(failed) == 1


def test_project_root_sees_through_dvc_experiment_copies(tmp_path):
    from grpolab.tracking import project_root

    assert project_root(tmp_path) == tmp_path.resolve()
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    copy.mkdir(parents=True)
    assert project_root(copy) == tmp_path.resolve()


def test_a_verl_users_gsm8k_and_qwen2_checkpoint_with_lora_queued_as_a_dvc_experiment(tmp_path):
    """What a verl user brings (GSM8K-style parquet: chat-message prompts, `####` answers, data_source
    openai/gsm8k; a Qwen2-style checkpoint with a chat template), trained with LoRA and no SFT, run as
    `dvc exp run --queue`: the run happens in a copy under .dvc/tmp/exps, and its runs and artifacts
    still go to the project's store."""
    from grpolab import config

    from userfiles import gsm8k_corpus, save_gsm8k, save_qwen2_checkpoint

    project = make_project(tmp_path / "p")
    train, eval_ = save_gsm8k(tmp_path / "gsm8k", long_every=10)
    checkpoint = save_qwen2_checkpoint(tmp_path / "qwen2", gsm8k_corpus(pd.read_parquet(train), pd.read_parquet(eval_)))
    user = [f"data.train_files=[{train}]", f"data.eval_files=[{eval_}]", "data.max_prompt_length=100", f"model.name_or_path={checkpoint}",
            "sft.steps=0", "model.lora.r=4", "model.lora.alpha=8", "train.steps=2", "train.prompts_per_step=4", "train.group_size=4",
            "train.micro_batch_size=8", "train.max_new_tokens=16", "train.save_every=0", "train.log.log_completions_every=2",
            "eval.max_new_tokens=16", "eval.num_samples=2", "eval.num_logged_samples=4", "mia.max_new_tokens=16"]
    config.apply_overrides(user, project / "params.yaml")
    identity = ["-c", "user.name=grpolab-test", "-c", "user.email=test@localhost"]
    run(["git", "add", "-A"], project)
    run(["git", *identity, "commit", "-qm", "project"], project)
    run([f"{BIN}/dvc", "exp", "run", "--queue", "-S", "train.optim.learning_rate=0.0002"], project)
    run([f"{BIN}/dvc", "exp", "run", "--run-all", "-j", "1"], project)
    assert len(run([f"{BIN}/dvc", "exp", "ls", "--name-only"], project).stdout.split()) == 1

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grpolab")
    assert experiment.artifact_location.startswith((project / "mlruns").resolve().as_uri())
    runs = client.search_runs([experiment.experiment_id])
    stages = {r.data.tags["grpolab.stage"]: r for r in runs}
    assert set(stages) == {"pipeline", "prepare", "sft", "mia", "train", "evaluate"}
    parent = stages["pipeline"]
    assert parent.data.params["train.optim.learning_rate"] == "0.0002"
    assert parent.data.params["train.rewards.weights.auto"] == "1.0"  # the default with your own files
    assert parent.info.run_name.endswith(" · seed 0") and all(r.data.tags["grpolab.seed"] == "0" for r in runs)
    assert parent.data.tags["grpolab.complete"] == "true" and "train.optim.learning_rate=0.0002" in parent.data.tags["grpolab.changed_params"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # 4 of 40 train and 2 of 16 eval prompts were padded past data.max_prompt_length
    assert parent.data.metrics["data/num_dropped_long_prompts"] == 6 and parent.data.metrics["data/num_train"] == 36
    assert {"base/success_rate", "trained/success_rate", "trained/mia/min_k_plus_plus/auc"} <= set(parent.data.metrics)
    train_run = stages["train"].info.run_id
    assert [m.step for m in client.get_metric_history(train_run, "train/reward_by_source/openai/gsm8k")] == [1, 2]
    assert [m.step for m in client.get_metric_history(train_run, "train/reward/auto")] == [1, 2]
    assert client.get_metric_history(train_run, "train/kl")[0].value == 0  # LoRA's B starts at 0: the policy is the reference
    train_artifacts = {f.path for f in client.list_artifacts(train_run)}
    assert "train_curve.csv" in train_artifacts
    local = client.download_artifacts(train_run, "train_curve.csv", str(tmp_path))
    assert Path(local).read_text().startswith("step,")
    model = {f.path for f in client.list_artifacts(train_run, "trained_model")} | {f.path for f in client.list_artifacts(train_run, "trained_model/adapter")}
    assert {"trained_model/model.safetensors", "trained_model/adapter/adapter_config.json", "trained_model/adapter/adapter_model.safetensors",
            "trained_model/tokenizer_config.json"} <= model
    completions = pd.read_json(client.download_artifacts(train_run, "completions/step_000002.json", str(tmp_path)), orient="split")
    assert completions["prompt"].str.startswith("<|im_start|>user\nTom has").all()  # the checkpoint's chat template
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
