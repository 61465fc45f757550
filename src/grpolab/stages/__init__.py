"""The pipeline's stages in order, one module each, named as in `dvc.yaml`: `grpolab stage NAME` runs one,
`dvc.yaml` and the Prefect flow chain them. Each stage reads params and files (`grpolab.paths`) and writes
files; no stage imports another.

What a tracked stage returns is its headline: written to its file in `paths.HEADLINES` and logged to its own
MLflow child run and to the pipeline's parent run. The last stage, `summary`, logs into the
parent itself, so the parent holds every stage's record also when DVC restored a stage from its cache.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from grpolab.runtime import ranks
from grpolab.config import Params
from grpolab.errors import ConfigError
from grpolab.runtime.fsutil import atomic_write_text
from grpolab.paths import HEADLINES


# (params) -> the MLflow run id of the checkpoint a stage with processes would resume, or None
ResumedRun = Callable[[Params], "str | None"]


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline: its function is `grpolab.stages.<name>.<name>(params, tracker) -> headline`.
    Each stage is a process of its own (DVC runs `grpolab stage NAME`), so it imports its own module only,
    and an untracked stage neither MLflow nor the process group: `inputs`, which DVC runs every time, starts
    in a second or two rather than the 8 s or so a model stage spends importing torch, transformers, MLflow.
    Hence the registry names the functions of a stage's module rather than holding them."""

    name: str
    processes: bool = False  # runs as `train.num_processes` processes, and resumes its checkpoint's MLflow run
    tracked: bool = True  # logs to MLflow (its own child run, or the parent: see HEADLINES)
    # A stage with processes resumes: the function of its module, (params) -> the MLflow run id of the checkpoint
    # it would resume or None (`ResumedRun`), which the stage's run logs into again.
    resumed_run: str | None = None

    def __post_init__(self) -> None:
        if self.processes and not self.resumed_run:
            raise TypeError(f"Stage({self.name!r}, processes=True): name the function of grpolab.stages.{self.name} that gives "
                            "the MLflow run its checkpoint resumes (resumed_run=...)")
        if self.resumed_run and not self.processes:
            raise TypeError(f"Stage({self.name!r}): resumed_run={self.resumed_run!r} is for a stage with processes only")

    def _of_module(self, attribute: str) -> Callable:
        return getattr(importlib.import_module(f"{__name__}.{self.name}"), attribute)

    def function(self) -> Callable[..., dict]:
        return self._of_module(self.name)

    def resumed(self) -> ResumedRun:
        """The stage's `resumed_run` function (a stage with processes only)."""
        assert self.resumed_run, f"stage {self.name}: no resumed_run (it has no processes)"
        return self._of_module(self.resumed_run)

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("inputs", tracked=False), Stage("prepare"), Stage("sft"), Stage("mia"), Stage("train", processes=True, resumed_run="resumed_run"),
    Stage("evaluate"), Stage("summary"),
]}


def stage_function(name: str) -> Callable[..., dict]:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name].function()


def _check_processes(params: Params) -> None:
    """The launcher's processes match `train.num_processes`, and this node has a GPU for each (when it has GPUs)."""
    from grpolab.runtime.device import check_processes_fit  # torch: not for the stages that need none

    if ranks.launched():
        if ranks.world_size() != params.train.num_processes:
            raise ConfigError(f"train.num_processes is {params.train.num_processes} but the launcher started "
                              f"{ranks.world_size()} processes (WORLD_SIZE): set it to the job's total")
        # the launcher's processes on this node (srun may not say how many: LOCAL_RANK)
        on_node = int(os.environ.get("LOCAL_WORLD_SIZE", int(os.environ["LOCAL_RANK"]) + 1))
        check_processes_fit(on_node, "the launcher's processes on this node (LOCAL_WORLD_SIZE)")
    else:
        check_processes_fit(params.train.num_processes, "train.num_processes")


def run_stage(name: str, params: Params) -> dict:
    function = stage_function(name)
    stage = STAGES[name]
    if not stage.tracked:
        return function(params, None)
    from grpolab import tracking  # torch and MLflow: for the tracked stages only
    from grpolab.runtime import distributed

    if ranks.is_rank0():
        tracking.check_store(params)
    if stage.processes:
        _check_processes(params)
        if params.train.num_processes > 1 and not ranks.launched():
            # this machine's copies of the stage, each joining the process group
            distributed.launch_local([sys.executable, "-m", "grpolab.cli", "stage", name], params.train.num_processes)
            return {}
    if not ranks.is_rank0():  # rank 0 alone talks to MLflow
        return function(params, None)
    resume = stage.resumed()(params) if stage.processes else None
    with tracking.stage_run(params, name, run_id=resume, own_run=name in HEADLINES) as tracker:
        headline = function(params, tracker)
        if name in HEADLINES:
            atomic_write_text(HEADLINES[name], json.dumps(headline, indent=2, sort_keys=True) + "\n")
            tracker.metrics(headline, parent=True)
    return headline
