"""A tracking server that refuses, and one that goes away: the outbox that sends what a stage logs (its order, its
retries), and a training through a real `mlflow server` killed and started again. (The pipeline as a Prefect
deployment on a worker, tracking into an MLflow server on PostgreSQL, is the end-to-end test in
tests/test_pipeline.py.)"""

import http.server
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException, RestException

from grpolab.runtime import outbox
from grpolab.runtime.outbox import Outbox
from grpolab.paths import CHECKPOINT_DIR, CURVE_FILE
from grpolab.tracking import store_away

from conftest import BIN, grpolab, project_env
from servers import stoppable_mlflow_server
from training import STEP_METRICS, train_runs


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


WHERE = "tracking.uri: the MLflow tracking store http://127.0.0.1:1"


class Store:
    """A store that takes records in a list, and while `down` refuses connections, as a stopped server does."""

    def __init__(self):
        self.records: list[int] = []
        self.down = threading.Event()
        self.tries = 0

    def send(self, record: int) -> None:
        self.tries += 1
        if self.down.is_set():
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as exc:  # wrapped as MLflow's client wraps it
                raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed") from exc
        self.records.append(record)


def test_the_outbox_keeps_order_and_sends_again_what_a_store_that_went_away_did_not_take(monkeypatch, capsys):
    monkeypatch.setattr(outbox, "FIRST_RETRY_S", 0.02)
    monkeypatch.setattr(outbox, "MAX_RETRY_S", 0.1)
    store, box = Store(), Outbox(WHERE, store_away)
    for record in range(3):
        box.put(partial(store.send, record), f"record {record}")
    assert box.settle(10) and store.records == [0, 1, 2]
    store.down.set()
    for record in range(3, 10):
        box.put(partial(store.send, record), f"record {record}")  # the caller never waits
    while store.tries < 3 + 4:  # sent again, with a backoff
        time.sleep(0.01)
    assert not box.settle(0.2) and box.unsent == 7 and box.down_for > 0  # given up waiting; nothing dropped
    store.down.clear()
    assert box.settle(10) and store.records == list(range(10)) and box.down_for is None
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == [f"{WHERE} does not answer", f"{WHERE} answers again after 0 s: sending the 6 records that waited"]
    assert "ConnectionRefusedError: [Errno 111] Connection refused; sending record 3" in err[0]

    refused = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "no such run"})
    box.put(partial(_raise, refused), "a record the store refuses")
    with pytest.raises(RestException, match="no such run"):  # not sent again: raised, and nothing after it is sent
        box.settle(10)
    with pytest.raises(RestException):
        box.put(partial(store.send, 10), "record 10")
    box.close()
    assert store.records == list(range(10))


def _raise(exc: BaseException) -> None:
    raise exc


def test_what_is_sent_again_is_what_a_store_did_not_answer():
    assert store_away(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}))  # 503
    assert not store_away(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad key"}))  # 400
    assert not store_away(MlflowException("a metric value must be finite"))
    assert store_away(TimeoutError())
    assert store_away(requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"))  # killed while it answered


def test_mlflow_keeps_a_metric_batch_sent_twice_once(tmp_path):
    """What makes sending again exactly-once: a batch sent again keeps its timestamps, and MLflow's SQL store (behind a
    server too) keeps identical rows once."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    batch = [Metric("train/loss", 0.5, 1_700_000_000_000, 3), Metric("train/kl", 0.1, 1_700_000_000_000, 3)]
    for _ in range(2):
        client.log_batch(run_id, metrics=batch)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(3, 0.5)]


# The MLflow client gives up at once (no retries of its own), so an outage of seconds is longer than its retries.
CLIENT_GIVES_UP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
OUTAGE_S = 3  # at least, and until the training is past a later checkpoint; starting the server again adds ~6 s


def _train(project: Path, uri: str, log: Path, steps: int, save_every: int, *overrides: str) -> subprocess.Popen:
    args = [f"tracking.uri={uri}", f"train.steps={steps}", f"train.save_every={save_every}", "train.log.credit_log_every=1", *overrides]
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([f"{BIN}/grpolab", "stage", "train", *[f"-S{a}" for a in args]], cwd=project,
                                env={**project_env(), **CLIENT_GIVES_UP}, stdout=out, stderr=err, start_new_session=True)


def _logged_through(client: MlflowClient) -> int:
    runs = train_runs(client) if client.get_experiment_by_name("grpolab") else []
    return max((m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")), default=0) if runs else 0


def _checkpointed(project: Path) -> int:
    latest = project / CHECKPOINT_DIR / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else 0


def _wait(condition, proc: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, f"the training ended (exit {proc.poll()}) before {what}"
        time.sleep(0.1)


def _assert_logged_once(client: MlflowClient, project: Path, tmp_path: Path, steps: int) -> str:
    """The train run is FINISHED with every step's metrics once, every completion table's rows once, every step
    log, the curve and the model; its id."""
    (run,) = train_runs(client)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    for key in STEP_METRICS:  # a list, not a set: a step logged twice would show
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, steps + 1)), key
    for step in range(2, steps + 1, 2):  # train.log.log_completions_every=2
        table = client.download_artifacts(run_id, f"completions/step_{step:06d}.json", str(tmp_path))
        assert len(pd.read_json(table, orient="split")) == 16, step
    assert {f.path for f in client.list_artifacts(run_id, "credit")} == {f"credit/step_{s:06d}.parquet" for s in range(1, steps + 1)}
    assert {"train_curve.csv", "reward_curve.png", "trained_model"} <= {f.path for f in client.list_artifacts(run_id)}
    assert pd.read_csv(project / CURVE_FILE)["step"].tolist() == list(range(1, steps + 1))
    assert not (project / CHECKPOINT_DIR).exists()
    return run_id


def test_a_training_goes_on_while_the_tracking_server_is_away_and_logs_every_step_once(trainer, tmp_path):
    steps, save_every = 60, 5
    folder = tmp_path / "server"
    folder.mkdir()
    with stoppable_mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder) as server:
        client = MlflowClient(server.uri)
        proc = _train(trainer, server.uri, tmp_path / "train", steps, save_every)
        _wait(lambda: _logged_through(client) >= 2, proc, "MLflow held step 2")
        server.kill()
        killed_at, stopped = _checkpointed(trainer), time.monotonic()
        later = killed_at + 2 * save_every
        _wait(lambda: _checkpointed(trainer) >= later and time.monotonic() - stopped > OUTAGE_S, proc,
              f"the checkpoint of step {later}")  # trained while MLflow was away
        server.start()
        outage, back_at, back = time.monotonic() - stopped, _checkpointed(trainer), time.monotonic()
        assert proc.wait(timeout=300) == 0, (tmp_path / "train.err").read_text()[-3000:]
        ended = time.monotonic() - back
        err = (tmp_path / "train.err").read_text()
        assert err.count(f"tracking.uri: the MLflow tracking store {server.uri} does not answer") == 1, err[-3000:]
        assert err.count(f"tracking.uri: the MLflow tracking store {server.uri} answers again after") == 1, err[-3000:]
        _assert_logged_once(client, trainer, tmp_path, steps)
    print(f"the server was down {outage:.1f} s, from the checkpoint of step {killed_at} to that of step {back_at} of {steps}; "
          f"the stage ended {ended:.1f} s after it was back")


def test_a_training_stops_naming_a_tracking_server_still_away_at_its_end_and_resumes_logging_every_step_once(trainer, tmp_path):
    steps = 10
    folder = tmp_path / "server"
    folder.mkdir()
    with stoppable_mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder) as server:
        client = MlflowClient(server.uri)
        proc = _train(trainer, server.uri, tmp_path / "stopped", steps, 2, "tracking.outage_timeout_s=2")
        _wait(lambda: _logged_through(client) >= 2, proc, "MLflow held step 2")
        (run,) = train_runs(client)
        server.kill()  # and kept down until the training gave up on it
        assert proc.wait(timeout=300) == 1
        err = (tmp_path / "stopped.err").read_text()
        assert f"grpolab: error: tracking.uri: the MLflow tracking store {server.uri} has not answered for " in err, err[-3000:]
        assert (f"The train stage stops: run it again once the server answers; it resumes from its checkpoint of step "
                f"{steps - 2} in {CHECKPOINT_DIR} and logs every step once") in err
        server.start()
        assert _logged_through(client) < steps - 2  # the checkpoint holds steps that the run lacks

        proc = _train(trainer, server.uri, tmp_path / "resumed", steps, 2, "tracking.outage_timeout_s=2")
        assert proc.wait(timeout=300) == 0, (tmp_path / "resumed.err").read_text()[-3000:]
        out = (tmp_path / "resumed.out").read_text()
        assert f"train: resuming at step {steps - 2} of {steps}" in out and f"MLflow run {run.info.run_id} lacked" in out
        assert _assert_logged_once(client, trainer, tmp_path, steps) == run.info.run_id
