"""Training checkpoints: DeepSpeed's own format (model, optimizer, scheduler) plus our client
state (step, RNG, params hash, MLflow run id), written under a temporary name and renamed, with
`latest` naming the newest. Re-running the train stage with the same params resumes from it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from grpolab import distributed as dist
from grpolab.config import Params
from grpolab.fsutil import atomic_write_text
from grpolab.tracking import params_hash

CHECKPOINT_DIR = Path("checkpoints/train")



def _latest() -> str | None:
    latest = CHECKPOINT_DIR / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _read_client_state(tag: str) -> dict:
    return json.loads((CHECKPOINT_DIR / tag / "grpolab_state.json").read_text())


def resumable_run_id(params: Params) -> str | None:
    """The MLflow run of an interrupted training of these same params, if a checkpoint of it exists."""
    tag = _latest()
    if tag is None:
        return None
    state = _read_client_state(tag)
    return state["mlflow_run_id"] if state["params_hash"] == params_hash(params) else None


def save_training_checkpoint(engine, params: Params, step: int, run_id: str | None) -> None:
    """Written under a temporary name on every rank, renamed by rank 0, then `latest` points at it."""
    tag = f"step_{step:06d}"
    staging = CHECKPOINT_DIR / ".staging"
    state = {"step": step, "params_hash": params_hash(params), "mlflow_run_id": run_id, "torch_rng": torch.get_rng_state().tolist()}
    engine.save_checkpoint(str(staging), tag=tag, client_state={"grpolab": state}, save_latest=False)
    dist.barrier()
    if dist.is_rank0():
        atomic_write_text(staging / tag / "grpolab_state.json", json.dumps(state))
        shutil.rmtree(CHECKPOINT_DIR / tag, ignore_errors=True)
        os.replace(staging / tag, CHECKPOINT_DIR / tag)
        previous = _latest()
        atomic_write_text(CHECKPOINT_DIR / "latest", tag)
        if previous and previous != tag:
            shutil.rmtree(CHECKPOINT_DIR / previous, ignore_errors=True)
    dist.barrier()


def load_training_checkpoint(engine, params: Params) -> int:
    """Resume from the newest checkpoint of these params: the next step to run (0 if none)."""
    tag = _latest()
    if tag is None or _read_client_state(tag)["params_hash"] != params_hash(params):
        dist.barrier()
        if dist.is_rank0():
            shutil.rmtree(CHECKPOINT_DIR, ignore_errors=True)  # another configuration's: not ours to resume
        dist.barrier()
        return 0
    engine.load_checkpoint(str(CHECKPOINT_DIR), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    state = _read_client_state(tag)
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state["step"]
