import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["training", "lab"]  # the train tests' fixtures (tests/training.py) and the lab's servers (tests/lab.py)

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)

# Small enough for seconds per stage on 2 cores, big enough to exercise every code path.
TINY = [
    "data.num_sft=200",
    "data.num_train=40",
    "data.num_eval=16",
    "data.num_val=16",
    "data.max_operand=99",
    "model.vocab_size=128",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.max_length=64",
    "sft.steps=12",
    "sft.batch_size=16",
    "sft.warmup_steps=2",
    "sft.log_every=4",
    "train.steps=3",
    "train.prompts_per_step=4",
    "train.group_size=4",
    "train.micro_batch_size=8",
    "train.max_new_tokens=24",
    "train.save_every=0",
    "train.log.log_completions_every=2",
    "train.optim.warmup_steps=1",
    "eval.max_new_tokens=24",
    "eval.num_samples=2",
    "eval.num_logged_samples=4",
]


def grpolab_modules() -> dict[str, Path]:
    """grpolab's modules by dotted name (a package by its __init__.py)."""
    src = REPO / "src"
    found = {}
    for path in (src / "grpolab").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def free_port() -> int:
    """A port free now, for a server a test starts (which fails loudly if another process took it since)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One thread per process: two pytest workers share CI's two cores, and each test's own processes more of them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every process the suite starts inherits this (the session's pid): pytest_sessionfinish finds those left running.
SESSION_MARKER = "GRPOLAB_TEST_SESSION"
os.environ.setdefault(SESSION_MARKER, str(os.getpid()))  # xdist's workers keep their controller's

MARKER = "GRPOLAB_TEST_MARKER"  # a test puts it in a command's environment: everything the command starts inherits it


def marked_processes(marker: str, key: str = MARKER) -> dict[int, str]:
    """The live processes whose environment holds `key=marker`, by pid (with their command lines)."""
    import psutil

    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(key) == marker:
                found[proc.pid] = " ".join(proc.cmdline())  # whole: a venv's path can push the telling part past any cut
        except psutil.Error:
            pass
    return found


def project_env() -> dict[str, str]:
    # In-process training sets the torch.distributed variables; a child process must not inherit them.
    distributed = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    # MLflow's and Prefect's settings are the test's to give, but for the MLflow credentials that tests/test_pipeline.py's
    # servers ask for (a server without authentication ignores them).
    credentials = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    env = {k: v for k, v in os.environ.items()
           if (k in credentials or not k.startswith(("MLFLOW_", "PREFECT_API"))) and k not in distributed}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=project_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def grpolab(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([f"{BIN}/grpolab", *args], cwd, check)


def make_project(path: Path) -> Path:
    """A fresh copy of the project (code, params.yaml, dvc.yaml, flows) in its own git + DVC repo."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("src", "flows"):
        shutil.copytree(REPO / name, path / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("params.yaml", "dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, path / name)
    run(["git", "init", "-q"], path)
    run([f"{BIN}/dvc", "init", "-q"], path)
    run([f"{BIN}/dvc", "config", "core.analytics", "false"], path)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch) -> Path:
    """cwd = an empty folder with the default params.yaml, for in-process stage calls."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    return tmp_path


def _cmdline(proc) -> str:
    """A process's command line; "" for one that has ended (a zombie child of pytest has none to read)."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def pytest_sessionfinish(session, exitstatus):
    """No process the suite started outlives it (a server, a stage, a worker): those still running a while
    after the last test are named, stopped, and fail the run."""
    import time

    import psutil

    if hasattr(session.config, "workerinput"):  # an xdist worker: its controller checks once all have ended
        return
    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children() if "sys.stdin.readline()" in _cmdline(p)}  # pytest, xdist's workers
    deadline = time.monotonic() + 30
    while (left := {pid: cmd for pid, cmd in marked_processes(os.environ[SESSION_MARKER], SESSION_MARKER).items()
                    if pid not in ours}) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        session.config.get_terminal_writer().line(
            "\nprocesses the suite started outlived it:\n" + "\n".join(f"  {pid}: {cmd}" for pid, cmd in left.items()), red=True)
        session.exitstatus = 1
