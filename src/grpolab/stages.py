"""The pipeline's stages in order: `grpolab stage NAME` runs one, `dvc.yaml` and the Prefect flow
chain them. Each stage reads params and files and writes files; nothing else drives it."""

from __future__ import annotations

from collections.abc import Callable

import subprocess
import sys

from grpolab import distributed, tracking
from grpolab.config import Params
from grpolab.data.prepare import prepare
from grpolab.evaluate import evaluate
from grpolab.membership import mia
from grpolab.sft import sft
from grpolab.checkpoints import resumable_run_id
from grpolab.train import train

STAGES: dict[str, Callable[..., dict]] = {
    "prepare": prepare,
    "sft": sft,
    "mia": mia,
    "train": train,
    "evaluate": evaluate,
}


def _launch_workers(name: str, processes: int) -> dict:
    """Start `processes` copies of this stage under torchrun; each joins the process group."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(distributed.free_port()),
        "-m", "grpolab.cli", "stage", name,
    ]
    subprocess.run(cmd, check=True)
    return {}


def run_stage(name: str, params: Params) -> dict:
    if name == "train" and params.train.num_processes > 1 and not distributed.launched():
        return _launch_workers(name, params.train.num_processes)
    if not distributed.is_rank0():  # rank 0 alone talks to MLflow
        return STAGES[name](params, None)
    resume = resumable_run_id(params) if name == "train" else None
    with tracking.stage_run(params, name, run_id=resume) as tracker:
        return STAGES[name](params, tracker)
