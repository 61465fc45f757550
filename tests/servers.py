"""Real servers for the tests, each on 127.0.0.1 with its data in a temporary folder, each in its own
process group (stopped with everything it started): PostgreSQL, an MLflow tracking server on it with a
served artifact store, and a Prefect server with its own sqlite database."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import BIN, free_port, project_env

START_TIMEOUT_S = 120


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_until(ready, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def serving(args: list[str], log: Path, ready, what: str, env: dict[str, str] | None = None, user: str | None = None) -> Iterator[subprocess.Popen]:
    if user:
        args = ["runuser", "-u", user, "--", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env or project_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(ready, proc, log, what)
        yield proc
    finally:
        _stop(proc)


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them off PATH, in /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4])) or [shutil.which(name)]
    if not found[-1]:
        raise AssertionError(f"PostgreSQL's {name} not found: `make postgres` installs Debian's postgresql")
    return found[-1]


@contextmanager
def postgres(databases: list[str]) -> Iterator[str]:
    """A PostgreSQL server with `databases`, user `grpolab` (trust auth on 127.0.0.1); yields `127.0.0.1:PORT`.
    It refuses to run as root: as root it runs as Debian's `postgres` user, in a folder of that user's."""
    user = "postgres" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="grpolab-pg-"))
    try:
        if user:
            shutil.chown(folder, user)
        data = folder / "data"
        init = ["runuser", "-u", user, "--"] if user else []
        subprocess.run([*init, postgres_bin("initdb"), "-D", str(data), "-U", "grpolab", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        port = free_port()
        args = [postgres_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(folder)]
        ready = lambda: subprocess.run([postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode == 0
        with serving(args, folder / "postgres.log", ready, "PostgreSQL", user=user):
            for name in databases:
                subprocess.run([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "grpolab", name],
                               check=True, capture_output=True)
            yield f"127.0.0.1:{port}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on `backend_store_uri`, serving artifacts from `folder/artifacts`, that a test can kill (its
    process group, at once) and start again: on the same port, store and artifacts. With `auth` (the server's
    settings: MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY,
    GRPOLAB_MLFLOW_AUTH_DATABASE_URI), behind basic authentication as docker/compose.yaml serves it
    (`--app-name grpolab-auth`)."""

    def __init__(self, backend_store_uri: str, folder: Path, auth: dict[str, str] | None = None):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.folder, self.auth = folder, auth or {}
        app = ["--app-name", "grpolab-auth"] if auth else []
        self.args = [f"{BIN}/mlflow", "server", "--backend-store-uri", backend_store_uri, "--serve-artifacts", *app,
                     "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                     "--workers", "1"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**project_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.auth}  # as `grpolab ui` starts it: no job runner
        log = self.folder / "mlflow-server.log"
        with open(log, "a") as out:
            self.proc = subprocess.Popen(self.args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_until(lambda: http_ok(f"{self.uri}/health"), self.proc, log, "mlflow server")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc:
            _stop(self.proc)


@contextmanager
def stoppable_mlflow_server(backend_store_uri: str, folder: Path, auth: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    server = MlflowServer(backend_store_uri, folder, auth)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def mlflow_server(backend_store_uri: str, folder: Path, auth: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` on `backend_store_uri`, serving artifacts from `folder/artifacts`; yields its URI. With
    `auth`, behind basic authentication (`MlflowServer`)."""
    with stoppable_mlflow_server(backend_store_uri, folder, auth) as server:
        yield server.uri


@contextmanager
def prefect_server(folder: Path, database: str | None = None, auth_string: str | None = None) -> Iterator[dict[str, str]]:
    """`prefect server start` with its own home in `folder`, on `database` (default a sqlite file there), with
    `auth_string` asked of every client (PREFECT_SERVER_API_AUTH_STRING) if given; yields the environment a
    Prefect client (CLI, worker) needs to talk to it (the auth string too)."""
    port = free_port()
    env = {**project_env(), "PREFECT_HOME": str(folder / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": database or f"sqlite+aiosqlite:///{folder / 'prefect.db'}"}
    server_env = {**env, "PREFECT_SERVER_API_AUTH_STRING": auth_string} if auth_string else env
    args = [f"{BIN}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with serving(args, folder / "prefect-server.log", lambda: http_ok(f"http://127.0.0.1:{port}/api/health"), "prefect server", server_env):
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", **({"PREFECT_API_AUTH_STRING": auth_string} if auth_string else {})}
