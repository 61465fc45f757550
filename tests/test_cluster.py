"""What a lab runs: the pipeline as a Prefect deployment on a `process` work pool, picked up by a worker,
tracking into an MLflow server on PostgreSQL with a served artifact store. Every part is the real
server, started on 127.0.0.1 in a temporary folder (tests/servers.py)."""

import http.server
import json
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from conftest import BIN, REPO, TINY, grpolab, make_project
from servers import postgres, postgres_bin, mlflow_server, prefect_server, serving

FLOW_RUN_TIMEOUT_S = 900


def prefect(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([f"{BIN}/prefect", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"prefect {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def api(env: dict[str, str], path: str, body: dict) -> list | dict:
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}/{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_pipeline_deployment_on_a_worker_tracks_into_an_mlflow_server_on_postgresql(tmp_path):
    project = make_project(tmp_path / "project")
    shutil.copy(REPO / "prefect.yaml", project)
    with (postgres(["mlflow"]) as pg, mlflow_server(f"postgresql://grpolab@{pg}/mlflow", tmp_path) as uri,
          prefect_server(tmp_path) as env):
        # What `make deploy` runs.
        prefect("work-pool", "create", "grpolab", "--type", "process", "--overwrite", env=env, cwd=project)
        prefect("--no-prompt", "deploy", "--all", env=env, cwd=project)
        deployments = {d["name"]: d for d in api(env, "deployments/filter", {})}
        assert set(deployments) == {"pipeline", "study"}
        assert {d["work_pool_name"] for d in deployments.values()} == {"grpolab"}
        assert set(deployments["study"]["parameter_openapi_schema"]["properties"]) == {"study_file", "jobs"}
        assert deployments["pipeline"]["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(project)

        worker = ["prefect", "worker", "start", "--pool", "grpolab", "--type", "process"]
        with serving([f"{BIN}/{worker[0]}", *worker[1:]], tmp_path / "worker.log", lambda: True, "prefect worker", env):
            overrides = [*TINY, f"tracking.uri={uri}", "tracking.run_name=from-a-deployment"]
            prefect("deployment", "run", "grpolab-pipeline/pipeline", "--params", json.dumps({"overrides": overrides}),
                    "--watch", "--watch-timeout", str(FLOW_RUN_TIMEOUT_S), env=env, cwd=project)
        [flow_run] = api(env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployments["pipeline"]["id"]]}}})
        assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], (tmp_path / "worker.log").read_text()[-4000:])
        artifacts = api(env, "artifacts/filter", {"artifacts": {"key": {"any_": ["eval-summary"]}}})
        assert artifacts and artifacts[0]["flow_run_id"] == flow_run["id"]

        # Everything the pipeline logs, read back through the client from the server.
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("grpolab").experiment_id])
        [parent] = [r for r in runs if r.data.tags.get("grpolab.stage") == "pipeline"]
        assert parent.info.run_name == "from-a-deployment" and parent.data.tags["grpolab.complete"] == "true"
        children = {r.data.tags["grpolab.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == {"prepare", "sft", "mia", "train", "evaluate"}
        assert all(r.info.status == "FINISHED" for r in runs)
        assert parent.data.params["train.steps"] == "3" and parent.data.params["tracking.uri"] == uri
        metrics = json.loads((project / "metrics/eval.json").read_text())
        assert parent.data.metrics["trained/success_rate"] == metrics["trained/success_rate"]
        train_run = children["train"].info.run_id
        curve = pd.read_csv(project / "metrics/train_curve.csv")
        history = client.get_metric_history(train_run, "train/reward_mean")
        assert [(m.step, m.value) for m in history] == [(s, float(v)) for s, v in zip(curve["step"], curve["train/reward_mean"])]
        assert [m.step for m in client.get_metric_history(children["sft"].info.run_id, "sft/loss")] == [4, 8, 12]
        assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"train", "eval", "sft", "val", "train_weighted"}

        download = tmp_path / "download"
        table = json.loads(Path(client.download_artifacts(children["evaluate"].info.run_id, "eval_samples.json", str(download))).read_text())
        assert len(table["data"]) == 8 and "greedy" in table["columns"]
        figure = Path(client.download_artifacts(children["evaluate"].info.run_id, "mia_roc.png", str(download)))
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        model = Path(client.download_artifacts(train_run, "trained_model", str(download)))
        assert (model / "model.safetensors").read_bytes() == (project / "models/trained/model.safetensors").read_bytes()
        assert pd.read_csv(client.download_artifacts(train_run, "train_curve.csv", str(download))).equals(curve)
        completions = pd.read_json(client.download_artifacts(train_run, "completions/step_000002.json", str(download)), orient="split")
        assert len(completions) == 16 and "advantage" in completions.columns

        # The server's own stores hold them: runs in PostgreSQL, files under its artifact folder.
        count = subprocess.run([postgres_bin("psql"), "-h", pg.split(":")[0], "-p", pg.split(":")[1], "-U", "grpolab", "-At",
                                "-c", "select count(*) from runs", "mlflow"], capture_output=True, text=True, check=True)
        assert int(count.stdout) == len(runs)
        assert children["train"].info.artifact_uri.startswith("mlflow-artifacts:")
        assert len(list((tmp_path / "artifacts").rglob("model.safetensors"))) == 2  # the base model (sft) and the trained one


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(503, "maintenance")

    def log_message(self, *args):
        pass


def test_a_tracking_server_that_refuses_fails_the_pipeline_before_any_stage(project):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        before = (project / "params.yaml").read_bytes()
        proc = grpolab("run", "-S", f"tracking.uri={uri}", cwd=project, check=False)
    finally:
        server.shutdown()
    assert proc.returncode == 2
    assert f"grpolab: error: tracking.uri: the MLflow tracking store {uri} is unavailable" in proc.stderr
    assert "503" in proc.stderr and "==> stage" not in proc.stdout + proc.stderr
    assert (project / "params.yaml").read_bytes() == before and not (project / "data").exists()
