"""A study's cells as processes on this machine (`grpolab study FILE`, no `--pool`): each cell one `dvc exp run
--temp` in a process group of its own, which dies with the study, given GPUs of its own where GPUs are visible."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from mlflow import MlflowClient

from grpolab.errors import ConfigError
from grpolab.runtime.device import visible_gpus
from grpolab.runtime.procs import dvc_env
from grpolab.study.experiments import (
    CELL_MARKER, STAGE_LINE, STEP_LINE, StudyPlace, experiment_names, free_experiment_name, run_experiment, untracked_paths,
)
from grpolab.study.progress import Progress
from grpolab.study.spec import Cell, Study


def gpus_needed(cell: Cell, gpus_per_cell: int | None) -> int:
    """GPUs a cell is given: --gpus-per-cell (1 by default), or its train.num_processes if more."""
    return max(gpus_per_cell or 1, cell.params.train.num_processes)


def study_gpus(study: Study, jobs: int, gpus_per_cell: int | None) -> list[str]:
    """The GPUs a study hands out to its cells; refused before any cell when `jobs` cells at once would
    have to share one. No GPU visible: none (the cells run as anywhere else)."""
    if gpus_per_cell is not None and gpus_per_cell < 1:
        raise ConfigError(f"--gpus-per-cell: {gpus_per_cell} is not at least 1")
    gpus, source = visible_gpus()
    if not gpus:
        if gpus_per_cell is not None:
            raise ConfigError(f"--gpus-per-cell {gpus_per_cell}: no GPU is visible ({source})")
        return []
    need = max(gpus_needed(c, gpus_per_cell) for c in study.cells)
    if jobs * need > len(gpus):
        raise ConfigError(f"--jobs {jobs} cells at once with {need} GPU{'s' if need > 1 else ''} each need {jobs * need} GPUs, "
                          f"and {len(gpus)} are visible ({source}): lower --jobs or --gpus-per-cell")
    return gpus


class GpuShare:
    """The study's GPUs, each held by at most one running cell (`study_gpus` checked that there are enough)."""

    def __init__(self, gpus: list[str], gpus_per_cell: int | None):
        self.gpus, self.gpus_per_cell = gpus, gpus_per_cell
        self.free = list(gpus)  # held by no running cell
        self.held: dict[str, list[str]] = {}  # running cell -> its GPUs
        self._lock = threading.Lock()

    def take(self, cell: Cell) -> list[str]:
        """A starting cell's own GPUs (none where the study has none)."""
        if self.gpus:
            need = gpus_needed(cell, self.gpus_per_cell)
            with self._lock:
                self.held[cell.name], self.free = self.free[:need], self.free[need:]
        return self.held.get(cell.name, [])

    def give_back(self, cell: Cell) -> None:
        with self._lock:
            free = set(self.free) | set(self.held.pop(cell.name, []))
            self.free = [g for g in self.gpus if g in free]  # in the machine's order


class LocalRunner:
    """The cells of one study run as processes here, each in a temporary copy of the project's workspace."""

    def __init__(self, place: StudyPlace, gpus: list[str], gpus_per_cell: int | None):
        self.place = place
        self.gpu_share = GpuShare(gpus, gpus_per_cell)
        self.copy_paths: list[str] = []  # the user's untracked files, copied into every cell's workspace
        self.running: dict[str, subprocess.Popen] = {}  # cell name -> its `dvc exp run`, a process group of its own

    def check(self, commit: str) -> None:
        """Nothing more than the driver checks: the cells run in this checkout."""

    def stop_leftovers(self) -> None:
        """Nothing more than the driver stops: a killed run's cells were processes here."""

    def recorded_experiments(self) -> set[str]:
        """The project's DVC experiments: a cell is done when it has one (and its MLflow record is complete)."""
        return set(experiment_names(self.place.project, "--all-commits"))

    def prepare(self, todo: list[Cell]) -> None:
        self.copy_paths = untracked_paths(self.place.project, todo)

    def run(self, cell: Cell, progress: Progress, store: MlflowClient) -> bool:
        """The cell's experiment, its GPUs its own while it runs; True if it finished."""
        gpus = self.gpu_share.take(cell)
        try:
            return self._run(cell, gpus, progress)
        finally:
            self.gpu_share.give_back(cell)

    def _run(self, cell: Cell, gpus: list[str], progress: Progress) -> bool:
        project = self.place.project
        free_experiment_name(project, cell.experiment_name)
        env = dvc_env({CELL_MARKER: self.place.marker(cell.name)})
        if gpus:  # its own GPUs: every process of the cell sees those only
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)

        def on_line(line: str) -> None:
            if match := STAGE_LINE.search(line):
                progress.stage(cell, match.group(1))
            elif match := STEP_LINE.match(line):
                progress.step(cell, match.group(1))

        try:
            return run_experiment(project, cell, self.copy_paths, env, self.place.log_file(cell), on_line,
                                  lambda proc: self.running.__setitem__(cell.name, proc)) == 0
        finally:
            self.running.pop(cell.name, None)

    def stop(self) -> None:
        """The study was interrupted (Ctrl-C): its running cells are stopped."""
        for proc in list(self.running.values()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
