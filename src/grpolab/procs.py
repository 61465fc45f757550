"""Child processes that never outlive grpolab: the MLflow server of `grpolab ui`, training workers."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager

GRACE_S = 10  # how long a child group gets to stop on SIGTERM before SIGKILL


def die_with_parent() -> None:
    """`preexec_fn` of a child: the kernel kills it when its parent dies, even by SIGKILL."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
