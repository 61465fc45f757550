"""Which process of a job this is, read from the launcher's environment (grpolab's own launcher, torchrun,
`deepspeed --hostfile`, SLURM's srun with the torch variables set). No torch here: a stage that trains
nothing (`inputs`) asks too, and starts in a second rather than in torch's import time."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a launched worker: grpolab's own (`train.num_processes` on one machine), or an external
    launcher's, on any node."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
