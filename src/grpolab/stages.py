"""The pipeline's stages in order: `grpolab stage NAME` runs one, `dvc.yaml` and the Prefect flow
chain them. Each stage reads params and files and writes files; nothing else drives it.

What a stage returns is its headline: written to its file in `report.HEADLINES` and logged to its
own MLflow child run and to the pipeline's parent run. The last stage, `summary`, logs into the
parent itself, so the parent holds every stage's record also when DVC restored a stage from its cache.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from grpolab import distributed, tracking
from grpolab.checkpoints import resumable
from grpolab.config import ConfigError, Params
from grpolab.data.prepare import prepare
from grpolab.evaluate import evaluate
from grpolab.fsutil import atomic_write_text
from grpolab.inputs import inputs
from grpolab.membership import mia
from grpolab.report import HEADLINES, summary
from grpolab.sft import sft
from grpolab.train import train, train_inputs

STAGES: dict[str, Callable[..., dict]] = {
    "inputs": inputs,
    "prepare": prepare,
    "sft": sft,
    "mia": mia,
    "train": train,
    "evaluate": evaluate,
    "summary": summary,
}


def _launch_workers(name: str, processes: int) -> dict:
    """Start `processes` copies of this stage on this machine; each joins the process group."""
    distributed.launch_local([sys.executable, "-m", "grpolab.cli", "stage", name], processes)
    return {}


def run_stage(name: str, params: Params) -> dict:
    if distributed.is_rank0():
        tracking.check_store(params)
    if name == "train" and distributed.launched() and distributed.world_size() != params.train.num_processes:
        raise ConfigError(f"train.num_processes is {params.train.num_processes} but the launcher started "
                          f"{distributed.world_size()} processes (WORLD_SIZE): set it to the job's total")
    if name == "train" and params.train.num_processes > 1 and not distributed.launched():
        return _launch_workers(name, params.train.num_processes)
    if not distributed.is_rank0():  # rank 0 alone talks to MLflow
        return STAGES[name](params, None)
    checkpoint = resumable(params, train_inputs(params)) if name == "train" else None
    resume = checkpoint.run_id if checkpoint else None
    with tracking.stage_run(params, name, run_id=resume, own_run=name in HEADLINES) as tracker:
        headline = STAGES[name](params, tracker)
        if name in HEADLINES:
            atomic_write_text(HEADLINES[name], json.dumps(headline, indent=2, sort_keys=True) + "\n")
            tracker.metrics(headline, parent=True)
    return headline
