"""The lab's servers for the deployment tests (tests/test_pipeline.py, tests/test_lab.py), as docker/compose.yaml
serves them: PostgreSQL, an MLflow tracking server with basic authentication and a Prefect server with an auth
string, each on 127.0.0.1 (tests/servers.py); and the clients' calls the tests make to them."""

import base64
import json
import secrets
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from conftest import BIN
from servers import mlflow_server, postgres, prefect_server

POLL_EVERY_SECOND = {"PREFECT_WORKER_QUERY_SECONDS": "1"}  # a worker's look for flow runs (Prefect's default: every 10 s)


def runs_stage(process: psutil.Process, stage: str) -> bool:
    try:
        return process.cmdline()[-2:] == ["stage", stage] and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
    authentication and a served artifact store, and a Prefect server with an auth string; shared by a test file's
    deployment tests. Yields (PostgreSQL's host:port, the MLflow URI, the clients' environment: Prefect's URL and
    auth string, MLflow's user name and password, the MLflow server's folder). This process's own MLflow client
    has the credentials too, while the servers run."""
    folder = tmp_path_factory.mktemp("servers")
    with postgres(["mlflow", "mlflow_auth", "prefect"]) as pg:
        mlflow_settings, auth_string, password = lab_auth(pg)
        with (mlflow_server(f"postgresql://grpolab@{pg}/mlflow", folder, mlflow_settings) as uri,
              prefect_server(folder, f"postgresql+asyncpg://grpolab@{pg}/prefect", auth_string) as prefect_env):
            credentials = dict(zip(MLFLOW_CREDENTIALS, (LAB_USER, password)))
            with pytest.MonkeyPatch.context() as patch:  # module-scoped: the function-scoped `monkeypatch` would not do
                for key, value in credentials.items():
                    patch.setenv(key, value)
                yield pg, uri, {**prefect_env, **credentials}, folder


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
