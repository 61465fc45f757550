"""End to end: the real CLI, Prefect's temporary server, DVC in a git repo, an MLflow sqlite store."""

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient
from scipy.stats import mannwhitneyu, rankdata
from transformers import AutoConfig

from grpolab import config
from grpolab.fsutil import is_temporary

from conftest import BIN, MARKER, REPO, TINY, free_port, grpolab, make_project, marked_processes, project_env, run
from servers import mlflow_server, postgres, postgres_bin, prefect_server, serving

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


def _runs_stage(process: psutil.Process, stage: str) -> bool:
    try:
        return process.cmdline()[-2:] == ["stage", stage] and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
    running = any(_runs_stage(p, stage) for p in psutil.Process(proc.pid).children(recursive=True))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.unlink()
    return running


def prefect(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([f"{BIN}/prefect", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"prefect {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def basic_auth(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def prefect_api(env: dict[str, str], path: str, body: dict) -> list | dict:
    """POST to the Prefect server's API with the client's credentials (PREFECT_API_AUTH_STRING) when it has them."""
    auth = basic_auth(env["PREFECT_API_AUTH_STRING"]) if env.get("PREFECT_API_AUTH_STRING") else {}
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}/{path}", json.dumps(body).encode(), {"Content-Type": "application/json", **auth})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


LAB_USER = "grpolab"
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def lab_auth(pg: str) -> tuple[dict[str, str], str, str]:
    """The settings docker/compose.yaml gives the MLflow server (from docker/.env), a Prefect auth string, and the
    MLflow password: fresh secrets, as `openssl rand` would make them."""
    password = secrets.token_hex(16)
    mlflow = {"MLFLOW_AUTH_ADMIN_USERNAME": LAB_USER, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
              "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16), "GRPOLAB_MLFLOW_AUTH_DATABASE_URI": f"postgresql://grpolab@{pg}/mlflow_auth"}
    return mlflow, f"{LAB_USER}:{secrets.token_hex(16)}", password


def flow_run_logs(env: dict[str, str], flow_run_id: str) -> list[dict]:
    """Every log of a flow run in Prefect, oldest first (the API answers 200 at a time)."""
    logs: list[dict] = []
    while page := prefect_api(env, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
                                                   "offset": len(logs), "limit": 200}):
        logs += page
    return logs


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """What a lab runs beside its nodes, each a real server on 127.0.0.1 (tests/servers.py), both on PostgreSQL
    and both asking for credentials, as docker/compose.yaml serves them: an MLflow tracking server with basic
    authentication and a served artifact store, and a Prefect server with an auth string; shared by this file's
    deployment tests. Yields (PostgreSQL's host:port, the MLflow URI, the clients' environment: Prefect's URL and
    auth string, MLflow's user name and password, the MLflow server's folder). This process's own MLflow client
    has the credentials too, while the servers run."""
    folder = tmp_path_factory.mktemp("servers")
    with postgres(["mlflow", "mlflow_auth", "prefect"]) as pg:
        mlflow_settings, auth_string, password = lab_auth(pg)
        with (mlflow_server(f"postgresql://grpolab@{pg}/mlflow", folder, mlflow_settings) as uri,
              prefect_server(folder, f"postgresql+asyncpg://grpolab@{pg}/prefect", auth_string) as prefect_env):
            credentials = dict(zip(MLFLOW_CREDENTIALS, (LAB_USER, password)))
            before = {k: os.environ.get(k) for k in credentials}
            os.environ.update(credentials)
            try:
                yield pg, uri, {**prefect_env, **credentials}, folder
            finally:
                for key, value in before.items():
                    os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def assert_no_secret_logged(env: dict[str, str], uri: str, artifacts: Path, *outputs: str) -> None:
    """Neither the MLflow password nor the Prefect auth string's password is in anything logged: MLflow's params,
    tags and metric names of every run, every file of its artifact store (the DeepSpeed config, tables, logs),
    Prefect's flow runs (parameters, states), their logs, deployments and work pools, and what the commands printed."""
    found = [env["MLFLOW_TRACKING_PASSWORD"], env["PREFECT_API_AUTH_STRING"].split(":", 1)[1]]
    client = MlflowClient(uri)
    texts = list(outputs)
    for experiment in client.search_experiments():
        for r in client.search_runs([experiment.experiment_id], max_results=1000):
            texts.append(json.dumps([r.data.params, r.data.tags, sorted(r.data.metrics)]))
    flow_runs = prefect_api(env, "flow_runs/filter", {})
    texts += [json.dumps(flow_runs), json.dumps(prefect_api(env, "deployments/filter", {})), json.dumps(prefect_api(env, "work_pools/filter", {}))]
    for flow_run in flow_runs:
        texts += [e["message"] for e in prefect_api(env, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})]
    leaks = [(secret[:4] + "…", i) for secret in found for i, text in enumerate(texts) if secret in text]
    files = [f for f in artifacts.rglob("*") if f.is_file()]
    leaks += [(secret[:4] + "…", str(f)) for f in files for secret in found if secret.encode() in f.read_bytes()]
    assert len(files) > 10 and len(texts) > 20 and not leaks, leaks


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
    tracin = ["train.tracin.use_tracin=true", "train.tracin.validation=separate", "train.tracin.val_batch_size=8",
              "train.tracin.val_pool_size=16", "train.tracin.val_selection=balanced"]
    reference = tmp_path / "reference_model"  # a user's file the pipeline names but (with these methods) never loads
    AutoConfig.for_model("llama", hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(reference)
    overrides = [*TINY, *tracin, "train.mitigation.name=attention_credit", f"mia.reference_model={reference}", f"tracking.uri={uri}"]
    worker = tmp_path / "worker.log"
    with serving([f"{BIN}/prefect", "worker", "start", "--pool", "grpolab", "--type", "process"], worker, lambda: True, "prefect worker", prefect_env):
        prefect("deployment", "run", "grpolab-pipeline/pipeline", "--params", json.dumps({"overrides": overrides}),
                "--watch", "--watch-timeout", "900", env=prefect_env, cwd=a)
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
    # one param reruns only the stages that read it.
    status = run(["dvc", "status"], a).stdout
    assert "inputs:" in status and "always changed" in status
    assert not [s for s in ("prepare", "sft", "mia", "train", "evaluate") if f"{s}:" in status], status
    repro = run(["dvc", "repro"], a).stdout
    assert [line for line in repro.splitlines() if "Running stage" in line] == ["Running stage 'inputs':"]
    params = (a / "params.yaml").read_text()
    assert "num_logged_samples: 4\n" in params
    (a / "params.yaml").write_text(params.replace("num_logged_samples: 4\n", "num_logged_samples: 2\n"))
    repro = run(["dvc", "repro"], a).stdout
    assert "Running stage 'evaluate'" in repro
    assert all(f"Running stage '{s}'" not in repro for s in ("prepare", "sft", "mia", "train"))

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
    bad = [*overrides, "train.reward_file=bad_reward.py", "train.rewards={reward_file: 1.0}"]
    before = {r["id"] for r in prefect_api(prefect_env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment]}}})}
    worker = tmp_path / "worker-bad-reward.log"
    with serving([f"{BIN}/prefect", "worker", "start", "--pool", "grpolab", "--type", "process"], worker, lambda: True, "prefect worker", prefect_env):
        watched = subprocess.run([f"{BIN}/prefect", "deployment", "run", "grpolab-pipeline/pipeline", "--params", json.dumps({"overrides": bad}),
                                  "--watch", "--watch-timeout", "600"], cwd=a, env=prefect_env, capture_output=True, text=True)
    [flow_run] = [r for r in prefect_api(prefect_env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment]}}})
                  if r["id"] not in before]
    named = re.compile(r"^train\.reward_file: bad_reward\.py: compute_score raised KeyError: 'nope' on data/\w+\.parquet: row \d+$")
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


def test_the_lab_servers_refuse_whoever_has_no_credentials_and_grpolab_names_a_wrong_one(tmp_path, servers):
    """The servers of `servers`, as docker/compose.yaml runs them: a request without credentials, or with a wrong
    password, gets 401 and changes nothing; grpolab refuses a wrong or missing password before any work, naming
    the variable and never printing the password; the MLflow UI keeps grpolab's runs view behind the login; and
    a restart with a new MLFLOW_AUTH_ADMIN_PASSWORD rotates the password."""
    from grpolab.ui import SCRIPT

    pg, uri, env, folder = servers
    body = json.dumps({"name": "intruder"}).encode()
    for credentials in (None, f"{LAB_USER}:wrong-password"):
        auth = basic_auth(credentials) if credentials else {}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/create", body, {"Content-Type": "application/json", **auth}), timeout=30)
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as refused:
            prefect_api({**env, "PREFECT_API_AUTH_STRING": credentials or ""}, "work_pools/", {"name": "intruder", "type": "process"})
        assert refused.value.code == 401
    assert MlflowClient(uri).get_experiment_by_name("intruder") is None
    assert prefect_api(env, "work_pools/filter", {"work_pools": {"name": {"any_": ["intruder"]}}}) == []
    page = urllib.request.urlopen(urllib.request.Request(f"{uri}/", headers=basic_auth(f"{LAB_USER}:{env['MLFLOW_TRACKING_PASSWORD']}")), timeout=30)
    assert SCRIPT in page.read().decode()  # `grpolab ui`'s runs view, behind the login

    project = make_project(tmp_path / "p")
    shutil.copytree(REPO / "studies", project / "studies")
    before = (project / "params.yaml").read_bytes()
    refusals = {
        "MLFLOW_TRACKING_PASSWORD": f"MLFLOW_TRACKING_PASSWORD: the MLflow server {uri} refused user 'grpolab' with this password "
                                    "(401 Unauthorized: a wrong user name or password); nothing was run",
        "MLFLOW_TRACKING_USERNAME": f"the MLflow server {uri} asks for a user name and password (401 Unauthorized): set "
                                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        "PREFECT_API_AUTH_STRING": f"PREFECT_API_AUTH_STRING: the Prefect server {env['PREFECT_API_URL']} refused it (401 Unauthorized: "
                                   "a wrong user or password",
    }
    for key, message in refusals.items():
        wrong = {**project_env(), **env, "MLFLOW_TRACKING_URI": uri, key: "wrong-password"}
        if key == "MLFLOW_TRACKING_USERNAME":
            wrong = {k: v for k, v in wrong.items() if k not in MLFLOW_CREDENTIALS}
        study = [["study", "studies/smoke.yaml", "--pool", "nodes"]] if key == "PREFECT_API_AUTH_STRING" else []  # checked as `run` checks
        for command in (["run", "-S", "sft.steps=3"], *study):
            proc = subprocess.run([f"{BIN}/grpolab", *command], cwd=project, env=wrong, capture_output=True, text=True, timeout=300)
            said = proc.stdout + proc.stderr
            assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], (key, command, said[-3000:])
            assert "==> stage" not in said and "Traceback" not in said and env["MLFLOW_TRACKING_PASSWORD"] not in said
    assert (project / "params.yaml").read_bytes() == before and not (project / "reports").exists()

    # Rotation, on a server of its own: restarted with a new password, the old one is refused and the new one works.
    host, port = pg.split(":")
    for name in ("rotated", "rotated_auth"):
        subprocess.run([postgres_bin("createdb"), "-h", host, "-p", port, "-U", "grpolab", name], check=True, capture_output=True)
    settings, _, old = lab_auth(pg)
    settings["GRPOLAB_MLFLOW_AUTH_DATABASE_URI"] = f"postgresql://grpolab@{pg}/rotated_auth"
    new = secrets.token_hex(16)
    for i, password in enumerate((old, new)):
        (tmp_path / f"rotation-{i}").mkdir()
        with mlflow_server(f"postgresql://grpolab@{pg}/rotated", tmp_path / f"rotation-{i}", {**settings, "MLFLOW_AUTH_ADMIN_PASSWORD": password}) as rotated:
            accepted = {}
            for tried in (old, new):
                try:
                    urllib.request.urlopen(urllib.request.Request(f"{rotated}/api/2.0/mlflow/experiments/search?max_results=1",
                                                                  headers=basic_auth(f"{LAB_USER}:{tried}")), timeout=30)
                    accepted[tried] = True
                except urllib.error.HTTPError as exc:
                    assert exc.code == 401
                    accepted[tried] = False
            assert accepted == {old: password == old, new: password == new}


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
            "train.micro_batch_size=8", "train.max_new_tokens=16", "train.save_every=0", "train.log_completions_every=2",
            "eval.max_new_tokens=16", "eval.num_samples=2", "eval.num_logged_samples=4", "mia.max_new_tokens=16"]
    config.apply_overrides(user, project / "params.yaml")
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
    assert parent.data.params["train.rewards.auto"] == "1.0"  # the default with your own files
    assert parent.info.run_name.endswith(" · seed 0") and all(r.data.tags["grpolab.seed"] == "0" for r in runs)
    assert parent.data.tags["grpolab.complete"] == "true" and "train.learning_rate=0.0002" in parent.data.tags["grpolab.changed_params"]
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


def kill_a_worker_mid_train(workers: dict[str, subprocess.Popen], client: MlflowClient, study: subprocess.Popen) -> tuple[str, str, str, list]:
    """Once a cell's train stage is under way on a worker (its MLflow run RUNNING), kill -9 that worker's process
    alone, as a crash of it would; returns the worker's name, the cell's, its train run's id and the processes the
    worker had started."""
    from grpolab.study.run import CELL_MARKER

    deadline = time.monotonic() + 600
    while study.poll() is None and time.monotonic() < deadline:
        for name, worker in workers.items():
            below = psutil.Process(worker.pid).children(recursive=True)
            for proc in [p for p in below if _runs_stage(p, "train")]:
                with contextlib.suppress(psutil.Error, KeyError, ValueError):  # not yet: no RUNNING train run
                    variant, seed = proc.environ()[CELL_MARKER].rsplit("/", 1)[1].rsplit("-s", 1)
                    experiment = client.get_experiment_by_name("smoke").experiment_id
                    [train] = client.search_runs([experiment], f"tags.`grpolab.stage` = 'train' and attributes.status = 'RUNNING' and "
                                                               f"tags.`grpolab.variant` = '{variant}' and tags.`grpolab.seed` = '{seed}'")
                    worker.kill()
                    worker.wait()
                    return name, f"{variant}-s{seed}", train.info.run_id, below
        time.sleep(0.2)
    raise AssertionError("no cell reached its train stage while the study ran")


def test_a_study_on_a_work_pool_with_two_workers_in_their_own_clones(tmp_path, servers):
    """The smoke study sent to a Prefect work pool (`grpolab study --pool`) whose two process workers each run
    in their own clone of the project (two folders for two nodes), every cell logging to the MLflow server and
    the clones sharing one DVC cache: both workers ran cells, each seed's shared stages ran once in all, the
    report is what MLflow holds, and no clone's params.yaml or git tree changed. One worker is killed (-9) while
    a cell trains: the cell's processes die with it, Prefect's heartbeat automation marks its flow run Crashed,
    the driver marks its MLflow runs KILLED and the cell runs again on whichever worker is free (the dead one is
    started again meanwhile, in its clone, where the killed cell left its temporary workspace)."""
    from test_study import committed_project, complete_parents

    _, uri, prefect_env, folder = servers
    origin = committed_project(tmp_path / "origin")  # the driver's checkout
    shutil.copy(REPO / "prefect.yaml", origin)
    identity = ["-c", "user.name=grpolab-test", "-c", "user.email=test@localhost"]
    run(["git", "add", "prefect.yaml"], origin)
    run(["git", *identity, "commit", "-qm", "deployments"], origin)
    cache = tmp_path / "shared-dvc-cache"  # a cache folder on the nodes' shared file system
    clones = {name: tmp_path / name for name in ("node-a", "node-b")}
    for clone in clones.values():
        run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
        run([f"{BIN}/dvc", "cache", "dir", "--local", str(cache)], clone)  # .dvc/config.local: this clone's setting only
    before = {p: (p / "params.yaml").read_bytes() for p in (origin, *clones.values())}

    env = {**prefect_env, "MLFLOW_TRACKING_URI": uri, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    prefect("work-pool", "create", "nodes", "--type", "process", "--overwrite", env=env, cwd=clones["node-a"])
    prefect("--no-prompt", "deploy", "--name", "cell", "--pool", "nodes", env=env, cwd=clones["node-a"])
    marker = f"pool-{os.getpid()}"
    client = MlflowClient(uri)
    with contextlib.ExitStack() as stack:
        def start_worker(name: str, log: Path) -> subprocess.Popen:  # one flow run at a time, as a worker per GPU would run
            worker_env = {**env, "GRPOLAB_PROJECT": str(clones[name]), MARKER: marker}
            return stack.enter_context(serving([f"{BIN}/prefect", "worker", "start", "--pool", "nodes", "--type", "process", "--limit", "1",
                                                "--name", name], log, lambda: True, f"worker {name}", worker_env))

        workers = {name: start_worker(name, tmp_path / f"{name}.log") for name in clones}
        # Prefect's shortest heartbeat interval (the driver hands its own to the cells): a dead worker's cell is
        # marked Crashed 75 s after its last heartbeat
        driver_env = {**env, MARKER: marker, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        with open(tmp_path / "study.out", "w") as out, open(tmp_path / "study.err", "w") as err:
            driver = subprocess.Popen([f"{BIN}/grpolab", "study", "studies/smoke.yaml", "--pool", "nodes"], cwd=origin, env=driver_env,
                                      stdout=out, stderr=err)
        try:
            dead, killed, killed_train, left = kill_a_worker_mid_train(workers, client, driver)
            _, alive = psutil.wait_procs(left, timeout=10)  # the cell's processes died with their worker, at once
            assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [" ".join(p.cmdline()) for p in alive]
            start_worker(dead, tmp_path / f"{dead}-restarted.log")  # the node is back: its clone holds what the killed cell left
            driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                driver.kill()
    study = subprocess.CompletedProcess(driver.args, driver.returncode, (tmp_path / "study.out").read_text(), (tmp_path / "study.err").read_text())
    logs = {log.stem: log.read_text() for log in tmp_path.glob("node-*.log")}
    assert study.returncode == 0, f"{study.stdout[-3000:]}\n{study.stderr[-4000:]}\n" + "\n".join(f"{k}: {v[-2000:]}" for k, v in logs.items())
    assert "4/4 cells done" in study.stderr and f"done   {killed}" in study.stderr
    assert f"worker died: {killed} after " in study.stderr and "no heartbeat for 75 s" in study.stderr, study.stderr[-4000:]

    # Prefect's records: a cell flow run of each cell completed, and the killed cell's first one Crashed by the
    # heartbeat automation, on both workers' clones (each cell says where it ran)
    [deployment] = [d for d in prefect_api(env, "deployments/filter", {}) if d["name"] == "cell"]
    flow_runs = prefect_api(env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
    assert sorted(r["state"]["type"] for r in flow_runs) == ["COMPLETED"] * 4 + ["CRASHED"], [r["state"] for r in flow_runs]
    ran_in, crashed_in = {}, {}
    for flow_run in flow_runs:
        messages = [e["message"] for e in prefect_api(env, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})]
        [where] = [m for m in messages if m.startswith("cell ") and " of study smoke in " in m]
        record = crashed_in if flow_run["state"]["type"] == "CRASHED" else ran_in
        assert where.split()[1] not in record
        record[where.split()[1]] = Path(where.split(" in ")[1].split(" on ")[0])
    assert set(ran_in) == {"plain-s0", "plain-s1", "outcome_conditional-s0", "outcome_conditional-s1"}
    assert set(ran_in.values()) | set(crashed_in.values()) == {c.resolve() for c in clones.values()}, ran_in  # both workers ran cells
    assert crashed_in == {killed: clones[dead].resolve()}, crashed_in  # its second run: in either clone, the dead one's has been cleaned
    [crashed] = [r for r in flow_runs if r["state"]["type"] == "CRASHED"]
    assert crashed["state"]["message"].startswith("no heartbeat for 75 s"), crashed["state"]
    # the killed cell's temporary DVC workspace went when its clone ran the cell again (if another clone did, it waits)
    cleaned = [c for c in clones.values() if c != clones[dead] or ran_in[killed] == clones[dead].resolve()]
    assert not [p for c in cleaned for p in (c / ".dvc" / "tmp" / "exps").glob("standalone/tmp*")]

    # MLflow: the four complete pipelines; the shared stages of each seed ran once in all (restored from the
    # shared cache by the other cell of the seed, wherever it ran)
    parents = {f"{r.data.tags['grpolab.variant']}-s{r.data.tags['grpolab.seed']}": r for r in complete_parents(client, "smoke")}
    assert set(parents) == set(ran_in)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], max_results=1000)
    finished = pd.Series([r.data.tags["grpolab.stage"] for r in runs if r.info.status == "FINISHED"]).value_counts()
    assert {s: finished.get(s, 0) for s in ("prepare", "sft", "mia", "train")} == {"prepare": 2, "sft": 2, "mia": 2, "train": 4}
    for seed in (0, 1):
        assert {"prepare", "sft", "mia"} <= set(parents[f"outcome_conditional-s{seed}"].data.tags["grpolab.reused_stages"].split(", "))
    # the killed cell's first attempt: its train run KILLED by the driver (no orphan of it went on to finish it); no run left RUNNING
    assert client.get_run(killed_train).info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]

    # the report, built by the driver, is what the store holds; each cell's DVC experiment is in its worker's clone
    from grpolab.study.report import report_from_store

    text = (origin / "reports" / "smoke" / "report.md").read_text()
    assert text == report_from_store(client, "smoke", tmp_path / "rebuilt") and "| `outcome_conditional` |" in text
    rows = [[v.strip(" `") for v in line.split("|")[1:-1]] for line in text.split("## Cells\n", 1)[1].split("\n## ")[0].splitlines()
            if line.startswith("| `")]
    assert sorted((f"{variant}-s{seed}", status, run_id) for variant, seed, status, _, run_id in rows) == sorted(
        (c, "finished", parents[c].info.run_id) for c in ran_in), rows  # every cell's row once, the killed one's too
    listed = {c: run([f"{BIN}/dvc", "exp", "ls", "--name-only"], clone).stdout.split() for c, clone in clones.items()}
    assert sorted(n for names in listed.values() for n in names) == sorted(f"smoke-{cell}" for cell in ran_in)
    for checkout in (origin, *clones.values()):
        assert (checkout / "params.yaml").read_bytes() == before[checkout]
        assert run(["git", "status", "--porcelain"], checkout).stdout == ""
    assert not marked_processes(marker)  # the workers' cells ended with them

    # On the local sqlite store, cells on other machines could not log: refused before any cell, naming why
    proc = subprocess.run([f"{BIN}/grpolab", "study", "studies/smoke.yaml", "--pool", "nodes"], cwd=origin, env=prefect_env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--pool nodes: the tracking store is sqlite:///" in proc.stderr, proc.stderr
    assert_no_secret_logged(prefect_env, uri, folder / "artifacts", study.stdout, study.stderr, *logs.values())
