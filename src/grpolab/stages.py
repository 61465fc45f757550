"""The pipeline's stages in order: `grpolab stage NAME` runs one, `dvc.yaml` and the Prefect flow
chain them. Each stage reads params and files and writes files; nothing else drives it.

What a stage returns is its headline: written to its file in `HEADLINES` and logged to its own
MLflow child run and to the pipeline's parent run. The last stage, `summary`, logs into the
parent itself, so the parent holds every stage's record also when DVC restored a stage from its cache.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from grpolab import distributed, tracking
from grpolab.config import ConfigError, Params
from grpolab.fsutil import atomic_write_text

# name -> "module:function". Each stage is a process of its own (DVC runs `grpolab stage NAME`), so
# it imports its own module only: `inputs` needs none of torch's model stack (seconds per stage).
STAGES: dict[str, str] = {
    "inputs": "grpolab.inputs:inputs",
    "prepare": "grpolab.data.prepare:prepare",
    "sft": "grpolab.sft:sft",
    "mia": "grpolab.membership:mia",
    "train": "grpolab.train:train",
    "evaluate": "grpolab.evaluate:evaluate",
    "summary": "grpolab.report:summary",
}
# A stage's headline file (a DVC metrics file, so DVC's cache restores it with the stage's outputs).
HEADLINES = {
    "prepare": Path("metrics/prepare.json"),
    "sft": Path("metrics/sft.json"),
    "mia": Path("metrics/mia.json"),
    "train": Path("metrics/train.json"),
    "evaluate": Path("metrics/eval.json"),
}


def stage_function(name: str) -> Callable[..., dict]:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module, function = STAGES[name].split(":")
    return getattr(importlib.import_module(module), function)


def _launch_workers(name: str, processes: int) -> dict:
    """Start `processes` copies of this stage on this machine; each joins the process group."""
    distributed.launch_local([sys.executable, "-m", "grpolab.cli", "stage", name], processes)
    return {}


def run_stage(name: str, params: Params) -> dict:
    stage = stage_function(name)
    if distributed.is_rank0():
        tracking.check_store(params)
    if name == "train" and distributed.launched() and distributed.world_size() != params.train.num_processes:
        raise ConfigError(f"train.num_processes is {params.train.num_processes} but the launcher started "
                          f"{distributed.world_size()} processes (WORLD_SIZE): set it to the job's total")
    if name == "train":
        from grpolab.device import check_processes_fit

        if distributed.launched():  # the launcher's processes on this node (srun may not say how many: LOCAL_RANK)
            on_node = int(os.environ.get("LOCAL_WORLD_SIZE", int(os.environ["LOCAL_RANK"]) + 1))
            check_processes_fit(on_node, "the launcher's processes on this node (LOCAL_WORLD_SIZE)")
        else:
            check_processes_fit(params.train.num_processes, "train.num_processes")
    if name == "train" and params.train.num_processes > 1 and not distributed.launched():
        return _launch_workers(name, params.train.num_processes)
    if not distributed.is_rank0():  # rank 0 alone talks to MLflow
        return stage(params, None)
    resume = None
    if name == "train":
        from grpolab.checkpoints import resumable
        from grpolab.train import train_inputs

        checkpoint = resumable(params, train_inputs(params))
        resume = checkpoint.run_id if checkpoint else None
    with tracking.stage_run(params, name, run_id=resume, own_run=name in HEADLINES) as tracker:
        headline = stage(params, tracker)
        if name in HEADLINES:
            atomic_write_text(HEADLINES[name], json.dumps(headline, indent=2, sort_keys=True) + "\n")
            tracker.metrics(headline, parent=True)
    return headline
