"""Process-group helpers (which rank this process is comes from `grpolab.runtime.ranks`, re-exported here).

In-process runs (the default) are a world of one; `torchrun` workers read their rank from the
environment it sets. Either way the group has a backend per device type (`backend()`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from grpolab.runtime import failures
from grpolab.errors import StageError
from grpolab.runtime.procs import die_with_parent, signals_stop
from grpolab.runtime.ranks import is_rank0, launched, rank, world_size  # noqa: F401  (callers ask distributed.*)

LOOPBACK_INTERFACE = "lo"  # Linux's name for it
# Seconds a collective may wait for the slowest rank before the group fails it (torch's default: 30 minutes).
# grpolab creates the group itself, so DeepSpeed's own DEEPSPEED_TIMEOUT never reaches it.
TIMEOUT_ENV = "GRPOLAB_PROCESS_GROUP_TIMEOUT_S"


def backend(cuda: bool | None = None) -> str:
    """The process group's backend for each device type: gloo for CPU tensors (grpolab's own collectives pass
    the CPU tensors the trainer holds), nccl for CUDA tensors (DeepSpeed's, TracIn's gradients) when CUDA is
    available (`cuda`, default: whether it is)."""
    return "cpu:gloo,cuda:nccl" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu:gloo"


def init() -> None:
    """Join (or, alone, create) the process group DeepSpeed and grpolab's collectives use (`backend()`).

    Alone, the group's store is an in-process HashStore and gloo binds the loopback interface, so a
    single-node run listens on no network interface (torch's default TCPStore listens on all of them)."""
    import deepspeed

    if dist.is_initialized():
        return
    load_native_ops("ShareMemCommBuilder")  # DeepSpeed's comm loads it on CPU
    options = {}
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process on a node
        if world_size() > 1:  # nccl's communicator set up eagerly on this GPU, as DeepSpeed's own init does
            options["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if os.environ.get(TIMEOUT_ENV):
        options["timeout"] = timedelta(seconds=float(os.environ[TIMEOUT_ENV]))
    if not launched():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)
        dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=options.get("timeout"))
    else:
        dist.init_process_group(backend(), init_method="env://", rank=rank(), world_size=world_size(), **options)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False,
                               verbose=False)


def close() -> None:
    """Leave this process's process group, if it joined one, while the interpreter is still whole. Left to the
    interpreter's exit, gloo's worker threads may still hold work whose tensors then abort the process ("terminate
    called without an active exception", SIGABRT) after a training that succeeded, and the other ranks' launchers
    wait out their exit barrier (torch issue 190489). For a stage that succeeded only: after a failure another rank
    may be inside a collective, which the group's teardown would wait on."""
    if dist.is_initialized():
        dist.destroy_process_group()


def describe() -> str:
    """`N processes on <device>, process group <backend per device>`: what a run prints as it starts."""
    from grpolab.runtime.device import device

    n = world_size()
    return f"{n} process{'es' if n > 1 else ''} on {device().type}, process group {dist.get_backend_config()}"


def load_native_ops(*builders: str) -> None:
    """Load DeepSpeed's C++ ops (by op-builder class name) for this process, before DeepSpeed asks for them.

    DeepSpeed loads an op that is not installed prebuilt through torch's JIT extension loader, which marks
    each load with a bare `lock` file in the op's build folder, and every later load, in any process, waits
    for that file to go. A process killed in between (a stage killed as it starts) leaves it for good, and
    every later run hangs. Here loads take a kernel lock, which dies with its holder, and while holding it
    remove such leftovers; DeepSpeed keeps the loaded op, so its own loads later take no file lock."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # where torch builds (and locks) an op

    ops = [op for op in map(get_accelerator().create_op_builder, builders)
           if op is not None and deepspeed.ops.__compatible_ops__.get(op.NAME, False)]  # what DeepSpeed would load
    for op in ops:
        folder = Path(_get_build_directory(op.name, verbose=False))
        with open(folder.parent / "grpolab-loads.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other grpolab processes (ranks, runs) load it one at a time
            (folder / "lock").unlink(missing_ok=True)
            op.load()


def launch_local(argv: list[str], processes: int) -> None:
    """Run `processes` copies of `argv` on this machine as one process group, as torchrun does for one node,
    with these differences: the group's store listens on 127.0.0.1 only, on a port this launcher binds and
    holds (no probe-then-reuse race); the workers die with the launcher: a signal to it (Ctrl-C, SIGTERM, a
    kill -9 of the stage) stops them all; and a user's error in any worker is reported once, by the launcher
    (`failures.report`). When a worker fails the others are stopped, then raises StageError with the user's
    error a worker wrote (the first to fail's, else the lowest rank's), else CalledProcessError."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # the store takes the bound socket over (and closes it)
    store = dist.TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=listener.detach(), wait_for_workers=False)
    env = {**os.environ, "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "GLOO_SOCKET_IFNAME": LOOPBACK_INTERFACE,
           failures.LAUNCHER_REPORTS_ENV: "1"}
    with tempfile.TemporaryDirectory(prefix="grpolab-workers-") as folder:
        error_files = [Path(folder) / f"rank{r}.error" for r in range(processes)]
        workers = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), failures.ERROR_FILE_ENV: str(error_files[r])},
                                    preexec_fn=die_with_parent) for r in range(processes)]

        def forward(signum: int) -> None:
            for w in workers:
                if w.returncode is None:
                    w.send_signal(signum)

        try:
            with signals_stop(forward):
                failed = _wait_first_failure(workers, error_files)
        finally:
            rank0_running = workers[0].poll() is None and not error_files[0].exists()
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
            del store
            if rank0_running:
                print(file=sys.stderr)  # rank 0, stopped mid-run, may have left its progress bar's line open: end it
        if failed is not None:
            first = workers.index(failed)
            if message := next(filter(None, map(failures.read, [error_files[first], *error_files])), None):
                raise StageError(message)
            raise subprocess.CalledProcessError(failed.returncode, argv)


def _wait_first_failure(workers: list[subprocess.Popen], error_files: list[Path], poll_s: float = 0.1) -> subprocess.Popen | None:
    """Wait for every worker; the first one to fail (exit non-zero, or write its error file: it then waits to be
    stopped), else None."""
    while True:
        for worker, error_file in zip(workers, error_files):
            if worker.poll() not in (None, 0) or error_file.exists():
                return worker
        if all(w.returncode == 0 for w in workers):
            return None
        time.sleep(poll_s)


# The collectives below run in the process group whenever there is one (a world of one included, where they
# cost microseconds), so the single-process run exercises the same backend dispatch as a multi-GPU one.


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every rank along dim 0, in rank order."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_objects(items: list) -> list:
    """Concatenate every rank's list of picklable items, in rank order."""
    if not dist.is_initialized():
        return items
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def deal_groups(chosen: list[int], batches: int, groups_per_batch: int, group_size: int) -> tuple[list[tuple[int, slice]], list[tuple[int, slice]]]:
    """Groups chosen over several batches dealt out to the processes again, as they sampled the batches: each
    process sampled a contiguous share of each batch's `groups_per_batch` groups (`group_size` rows each), and
    gets the same share of `chosen` (indices over every batch's groups in order). -> (this process's: per group,
    the share that holds it, an index into `all_gather_objects` of every process's per-batch list, rank-major,
    and its rows there; every chosen group's: its batch, and its rows in that batch gathered over processes)."""
    per_rank = groups_per_batch // world_size()

    def locate(group: int) -> tuple[tuple[int, slice], tuple[int, slice]]:
        batch, index = divmod(group, groups_per_batch)
        owner, local = divmod(index, per_rank)
        rows = lambda i: slice(i * group_size, (i + 1) * group_size)  # noqa: E731
        return (owner * batches + batch, rows(local)), (batch, rows(index))

    located = [locate(group) for group in chosen]
    return [share for share, _ in located[rank() * per_rank : (rank() + 1) * per_rank]], [whole for _, whole in located]


def broadcast_object(item):
    """Rank 0's picklable `item`, on every rank (what the others pass is ignored)."""
    if not dist.is_initialized():
        return item
    box = [item]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gathered(engine):
    """Under ZeRO-3 a DeepSpeed engine's parameters are partitioned: gather them (to generate, to run TracIn's
    passes, to save) with ZeRO-3's module hooks off meanwhile. With the hooks on, every module call re-gathers
    its parameters (a collective) even inside GatheredParameters, and each forward of the model starts with a
    check that every rank ran the same modules (another): ranks whose loops run a different number of forwards
    (a decode loop stops when this rank's rows finish) would wait on each other for ever."""
    if engine.zero_optimization_stage() != 3:
        return nullcontext()
    return _hooks_off_and_gathered(engine)


@contextmanager
def _hooks_off_and_gathered(engine):
    import deepspeed

    # DeepSpeed's own unwrap_model_for_generation (0.19) leaves the start-of-forward hook (the second collective) on
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    start_of_forward = offload.module._forward_pre_hooks[offload.fwd_pre_hook.id]
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_of_forward)
            offload._register_deepspeed_module(offload.module)  # invalidates its module trace: re-recorded next step
