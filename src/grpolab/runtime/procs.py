"""Child processes that never outlive grpolab: the MLflow server of `grpolab ui`, training workers, and what
a driver (`grpolab run`'s flow, a study) starts: `dvc` and, below it, every `grpolab stage`."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

GRACE_S = 10  # how long a child group gets to stop on SIGTERM before SIGKILL
# Set by a driver in the environment of what it starts: every grpolab process below dies with its parent, so
# a driver killed with -9 leaves no stage running on behind it (DVC, between them, gets `die_with_parent`).
BOUND_ENV = "GRPOLAB_DIES_WITH_PARENT"


# Looked up here, once: a `preexec_fn` runs between fork and exec, where loading a library (taking the dynamic
# loader's lock, which another thread of the parent may have held at the fork) can hang the child.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` of a child: the kernel kills it when its parent dies, even by SIGKILL."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def bound(env: dict[str, str]) -> dict[str, str]:
    """`env` for a driver's child: the grpolab processes it starts die with their parents (`bind_to_parent`)."""
    return {**env, BOUND_ENV: "1"}


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `dvc` that a driver (`grpolab run`'s flow, a study) starts, and `extra`: this interpreter's
    scripts first on PATH (dvc runs `grpolab stage …` through a shell), and every grpolab process below it dies with
    its parent (`bound`): a killed driver leaves nothing running."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return bound({**os.environ, "PATH": path, **(extra or {})})


def bind_to_parent() -> None:
    """In a grpolab process a driver started (`BOUND_ENV` set, say a stage that `dvc repro` runs for
    `grpolab run`): die with the parent. A stage the user's own `dvc repro` runs is left alone (it holds
    the pipeline lock itself, and `nohup` keeps working)."""
    if os.environ.get(BOUND_ENV) != "1":
        return
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent went before the kernel was told
        os._exit(128 + signal.SIGKILL)


# The reaper: reads "pid start-time" lines until its stdin closes, which the kernel does when the process that
# started it ends, however it ends; then stops those of the processes that still run (a pid reused since is
# another start time). Deaf to Ctrl-C and hang-ups: it has to outlive them.
_REAPER = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
watched = dict(line.split() for line in sys.stdin)
for sig, grace in ((signal.SIGTERM, %d), (signal.SIGKILL, 5)):
    deadline = time.monotonic() + grace
    while (alive := [int(p) for p, s in watched.items() if started(p) == s]) and time.monotonic() < deadline:
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(0.2)
""" % GRACE_S


@functools.cache
def _reaper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _REAPER], stdin=subprocess.PIPE, text=True, start_new_session=True)


def stop_with_me(pid: int) -> None:
    """Stop process `pid`, which something else started for this process (Prefect's temporary server), when
    this process ends, also by SIGKILL, where `die_with_parent` cannot reach: a reaper waits for it."""
    with open(f"/proc/{pid}/stat") as f:
        started = f.read().rsplit(")", 1)[1].split()[19]
    reaper = _reaper()
    reaper.stdin.write(f"{pid} {started}\n")
    reaper.stdin.flush()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's whole process group (a server's workers too), SIGKILL after GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(GRACE_S)
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is gone; its workers may not be
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        return


@contextmanager
def signals_stop(forward: Callable[[int], None] = lambda _signum: None) -> Iterator[None]:
    """Inside: Ctrl-C (SIGINT) or SIGTERM calls `forward(signum)` (say, to pass it on to children), then
    unwinds as KeyboardInterrupt or SystemExit(128 + signum), so `finally` blocks clean up."""
    def stop(signum, _frame):
        forward(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_group(argv: list[str]) -> int:
    """Run `argv` in its own process group until it ends; Ctrl-C or SIGTERM to grpolab stops the whole
    group (a plain `subprocess.call` leaves a server's children serving), as does grpolab's death."""
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent)
    try:
        with signals_stop():
            return proc.wait()
    finally:
        stop_group(proc)
