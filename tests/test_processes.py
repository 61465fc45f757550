"""Processes and sockets (issue 11, reqs 8-9): single-node runs listen on loopback only; no child
(a training worker, `grpolab ui`'s MLflow server) outlives the grpolab process that started it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil

from conftest import BIN, REPO, free_port, project_env

LISTENING = """
import json, os, sys, psutil
def listening(pid):
    return sorted({c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
"""


def _python(code: str, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=project_env(), **kw)


def test_a_single_process_run_listens_on_loopback_only(tmp_path):
    proc = _python(LISTENING + """
from grpolab.runtime import distributed
distributed.init()
print(json.dumps(listening(os.getpid())))
""", tmp_path, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert set(eval(out.strip().splitlines()[-1])) <= {"127.0.0.1", "::1"}  # the TCPStore listened on "::" before


def test_local_workers_use_a_loopback_store_and_die_with_their_launcher(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(LISTENING + """
import time, torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
rank = os.environ["RANK"]
with open(f"rank{rank}.json", "w") as f:
    json.dump({"pid": os.getpid(), "worker": listening(os.getpid()), "launcher": listening(os.getppid())}, f)
time.sleep(600)
""")
    launcher = _python(f"""
import sys
from grpolab.runtime.distributed import launch_local
launch_local([sys.executable, {str(worker)!r}], 2)
""", tmp_path)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"rank{r}.json").is_file() for r in (0, 1)):
        assert launcher.poll() is None and time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.5)
    time.sleep(0.5)
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert set(r["worker"]) <= {"127.0.0.1", "::1"} and r["launcher"] == ["127.0.0.1"]
    launcher.kill()  # kill -9 the launcher (what a killed stage is)
    launcher.wait()
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(r["pid"]) and psutil.Process(r["pid"]).status() != psutil.STATUS_ZOMBIE for r in ranks):
        assert time.monotonic() < deadline, "a worker outlived its launcher"
        time.sleep(0.2)


def _server_processes(port: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if str(port) in cmdline or any(f":{port}" in part for part in cmdline):
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def test_stopping_grpolab_ui_stops_the_mlflow_server(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for how in (signal.SIGTERM,):  # Ctrl-C (SIGINT) goes through the same handler
        port = free_port()
        ui = subprocess.Popen([f"{BIN}/grpolab", "ui", "--port", str(port)], cwd=tmp_path, env=project_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "grpolab ui did not come up"
                time.sleep(1)
        assert _server_processes(port)
        served = [" ".join(p.cmdline()) for p in psutil.Process(ui.pid).children(recursive=True)]
        assert not [c for c in served if "huey" in c or "_job_runner" in c], served  # MLflow's job runner is off
        ui.send_signal(how)
        assert ui.wait(60) != 0
        deadline = time.monotonic() + 30
        while _server_processes(port):
            assert time.monotonic() < deadline, f"the MLflow server kept serving after {how.name} to grpolab ui"
            time.sleep(0.5)


def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on(tmp_path):
    check = "import grpolab.cli; from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY as t; print(t.get())"
    env = {k: v for k, v in project_env().items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_load_lock_left_by_a_killed_run_does_not_hang_the_next(tmp_path):
    """torch marks each JIT load of a DeepSpeed op with a bare `lock` file, which a process killed mid-load
    leaves behind (a stage killed as it starts); every later load used to wait on it forever."""
    from torch.utils.cpp_extension import _get_build_directory

    left = [Path(_get_build_directory(name, verbose=False)) / "lock" for name in ("deepspeed_shm_comm", "cpu_adam")]
    try:
        for lock in left:
            lock.touch()
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import torch
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            from grpolab.runtime import distributed
            distributed.init()
            distributed.load_native_ops("CPUAdamBuilder")
            DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(2))])
            print("loaded")
        """)], cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip().endswith("loaded"), proc.stderr[-3000:]
        assert not [lock for lock in left if lock.exists()]
    finally:
        for lock in left:
            lock.unlink(missing_ok=True)


def test_a_killed_grpolab_run_leaves_nothing_running_and_the_next_takes_the_lock(project):
    """kill -9 of `grpolab run` in the middle of a stage (issue 23, req 6): its `dvc repro`, the stage and
    Prefect's temporary server go with it, and the next command takes the pipeline lock at once."""
    from conftest import MARKER, TINY, grpolab, marked_processes

    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    log = project / "run.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([f"{BIN}/grpolab", "run", *[f"-S{o}" for o in TINY]], cwd=project,
                                  env={**project_env(), MARKER: marker}, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "==> grpolab stage prepare" not in log.read_text():
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    running = marked_processes(marker)
    assert [c for c in running.values() if "uvicorn" in c and "prefect" in c], running  # its temporary server
    assert [c for c in running.values() if c.endswith("stage prepare")] and [c for c in running.values() if "dvc repro" in c], running
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 30
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    proc = grpolab("stage", "prepare", "-S", "seed=x", cwd=project, check=False)  # the lock is free: it fails on the value
    assert proc.returncode == 2 and "seed: Input should be a valid integer" in proc.stderr, proc.stderr
