"""Training checkpoints: DeepSpeed's own format (model, optimizer, scheduler) plus our client
state (step, RNG, fingerprint, MLflow run id) and every step's metrics so far, written under a
temporary name and renamed, with `latest` naming the newest. The per-step logs (credit, TracIn)
are kept beside them (`logs/`, hard links), because `dvc repro` deletes a stage's outputs before
it runs it: a resumed training puts curve and logs back and its outputs equal an uninterrupted one's.

A checkpoint is resumed only by a training that would produce the same model: same train params,
same seed, and the same content of the base model and the train data (the fingerprint).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from grpolab.runtime import distributed as dist
from grpolab.config import Params
from grpolab.runtime.fsutil import atomic_write_text, content_digest, link_or_copy
from grpolab.paths import CHECKPOINT_DIR

LOGS = "logs"  # CHECKPOINT_DIR/logs/<folder name>/step_*.parquet
TABLES = "completions"  # CHECKPOINT_DIR/completions/step_*.json: the completion tables, which a resume sends if its run lacks them
STATE_FILE = "grpolab_state.json"
HISTORY = "metrics.csv"  # every metric of every step so far: the curve, and what MLflow got


def fingerprint(params: Params, inputs: list[Path]) -> str:
    """What determines the trained model: the train params, the seed, the model's working dtype and LoRA
    adapters, and the content of `inputs` (the base model, the train data, ...). eval.*, tracking.* and the
    rest do not enter. The content is hashed once per process while no file under `inputs` changes (6 GB for
    a 1.5B model in fp32: seconds), and says so in the terminal."""
    model = params.model.model_dump(mode="json", include={"dtype", "lora"})
    knobs = json.dumps({"seed": params.seed, "train": params.train.model_dump(mode="json"), "model": model}, sort_keys=True)
    return f"{hashlib.sha256(knobs.encode()).hexdigest()}-{_content(inputs)}"


_digests: dict[tuple, str] = {}  # content digests by the stamps of the files hashed


def _content(inputs: list[Path]) -> str:
    began = time.time_ns()
    files = [(str(p), p.stat()) for root in map(Path, inputs)
             for p in (sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root])]
    # any write, rename or replacement of a file changes its stamp
    stamp = (tuple(map(str, inputs)), tuple((p, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for p, s in files))
    if stamp in _digests:
        return _digests[stamp]
    digest = content_digest(inputs)
    print(f"train: rank {dist.rank()} hashed {', '.join(map(str, inputs))} for the checkpoint fingerprint in "
          f"{(time.time_ns() - began) / 1e9:.1f} s", flush=True)
    # a write within the file system's clock tick of the stamp would leave it as it was: such a stamp is not trusted
    if all(s.st_ctime_ns < began - 10**9 for _, s in files):
        _digests[stamp] = digest
    return digest


def broadcast_fingerprint(params: Params, inputs: list[Path]) -> str:
    """`fingerprint`, hashed by rank 0 alone and sent to the others (the files are the same for all)."""
    return dist.broadcast_object(fingerprint(params, inputs) if dist.is_rank0() else None)


def rng_state() -> dict:
    """This process's generators' states, as JSON: the CPU's and, with CUDA, every visible GPU's."""
    state = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict, where: str) -> None:
    """Restore what `rng_state` saved (`where` names it in a warning). A checkpoint written without CUDA leaves
    the GPUs' generators as seeded; one written with another GPU count restores the GPUs both have."""
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if not torch.cuda.is_available():
        return  # a GPU run's checkpoint resumed on CPU: no generator of its to restore
    saved, count = state.get("cuda", []), torch.cuda.device_count()
    if len(saved) != count:
        print(f"warning: {where} holds the RNG states of {len(saved)} GPUs but this process sees {count}: "
              f"the resumed run is not bit-for-bit the uninterrupted one", file=sys.stderr, flush=True)
    for device, s in enumerate(saved[:count]):
        torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), device)


@dataclass
class Checkpoint:
    tag: str
    step: int
    run_id: str | None

    @property
    def path(self) -> Path:
        return CHECKPOINT_DIR / self.tag


def _latest() -> str | None:
    latest = CHECKPOINT_DIR / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def left_behind() -> bool:
    """Whether a training left a checkpoint here (of whichever params: `resumable` says whether it is this one's)."""
    return _latest() is not None


def resumable(key: str) -> Checkpoint | None:
    """The newest checkpoint of the training of fingerprint `key`, if one was left behind."""
    tag = _latest()
    if tag is None or not (CHECKPOINT_DIR / tag / STATE_FILE).is_file():
        return None
    state = json.loads((CHECKPOINT_DIR / tag / STATE_FILE).read_text())
    if state.get("fingerprint") != key:
        return None
    return Checkpoint(tag, state["step"], state["mlflow_run_id"])


def save_training_checkpoint(engine, key: str, step: int, run_id: str | None, history: list[dict],
                             log_dirs: list[Path]) -> None:
    """Written under a temporary name on every rank, renamed by rank 0, then `latest` points at it. `key`:
    the training's fingerprint."""
    tag = f"step_{step:06d}"
    staging = CHECKPOINT_DIR / ".staging"
    # every rank's generators, by rank: each rank draws its own numbers
    state = {"step": step, "fingerprint": key, "mlflow_run_id": run_id, "rng": dist.all_gather_objects([rng_state()])}
    engine.save_checkpoint(str(staging), tag=tag, client_state={"grpolab": state}, save_latest=False)
    dist.barrier()
    if dist.is_rank0():
        for folder in log_dirs:  # before `latest` moves: a checkpoint never lacks its logs
            kept = CHECKPOINT_DIR / LOGS / folder.name
            kept.mkdir(parents=True, exist_ok=True)
            for log in folder.glob("step_*.parquet"):
                if not (kept / log.name).exists() or not os.path.samefile(log, kept / log.name):
                    link_or_copy(log, kept / log.name)
        atomic_write_text(staging / tag / HISTORY, pd.DataFrame(history).to_csv(index=False))
        atomic_write_text(staging / tag / STATE_FILE, json.dumps(state))
        shutil.rmtree(CHECKPOINT_DIR / tag, ignore_errors=True)
        os.replace(staging / tag, CHECKPOINT_DIR / tag)
        shutil.rmtree(staging, ignore_errors=True)  # empty now: one left behind is a checkpoint a killed run was writing
        previous = _latest()
        atomic_write_text(CHECKPOINT_DIR / "latest", tag)
        if previous and previous != tag:
            shutil.rmtree(CHECKPOINT_DIR / previous, ignore_errors=True)
    dist.barrier()


def discard(wait: bool = True) -> None:
    """Drop the checkpoints (rank 0; every rank waits, unless not `wait`)."""
    if wait:
        dist.barrier()
    if dist.is_rank0():
        shutil.rmtree(CHECKPOINT_DIR, ignore_errors=True)
    if wait:
        dist.barrier()


def load_training_checkpoint(engine, checkpoint: Checkpoint, log_dirs: list[Path]) -> list[dict]:
    """Restore `checkpoint` into `engine` and the RNG; put its step logs back into `log_dirs` (those of
    later steps, written after it, go); returns every step's metrics through its step."""
    engine.load_checkpoint(str(CHECKPOINT_DIR), tag=checkpoint.tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    state_file = checkpoint.path / STATE_FILE
    state = json.loads(state_file.read_text())
    # an older checkpoint holds rank 0's CPU state alone, which every rank restored
    states = state["rng"] if "rng" in state else [{"cpu": state["torch_rng"]}] * dist.world_size()
    if len(states) != dist.world_size():
        raise ValueError(f"{state_file}: 'rng' holds the states of {len(states)} processes, this training has {dist.world_size()}")
    set_rng_state(states[dist.rank()], f"{state_file} ('rng', rank {dist.rank()})")
    if dist.is_rank0():
        for folder in log_dirs:
            clear_step_logs(folder, checkpoint.step)
            for log in sorted((CHECKPOINT_DIR / LOGS / folder.name).glob("step_*.parquet")):
                if _log_step(log) <= checkpoint.step:
                    link_or_copy(log, folder / log.name)
    history = pd.read_csv(io.StringIO((checkpoint.path / HISTORY).read_text()))
    return [{k: v for k, v in row.items() if pd.notna(v)} for row in history.to_dict("records")]


def _log_step(path: Path) -> int:
    return int(path.stem.split("_")[1])


def clear_step_logs(folder: Path, after: int) -> None:
    """Per-step logs in `folder` of steps after `after` go (a new training: after 0)."""
    folder.mkdir(parents=True, exist_ok=True)  # DVC outputs even when no step logs to them
    for old in folder.glob("step_*.parquet"):
        if _log_step(old) > after:
            old.unlink()
