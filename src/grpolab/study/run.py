"""Running a study: every cell is one DVC experiment (`grpolab.study.experiments`: the whole pipeline in a
temporary copy of the workspace, listed by `dvc exp show` under the name `<study>-<variant>-s<seed>`), at most
`jobs` at once. The user's params.yaml and workspace are never written.

Where the cells run is chosen once per study run, a `CellRunner`: processes on this machine (`study.local`), or
flow runs on a Prefect work pool (`study.pool`, `--pool NAME`). What does not depend on it is here, the driver:

- The options are checked before any work (`check_study_options`): a ConfigError naming the flag.
- Shared stages run once per seed: DVC's run cache restores a stage whose command, deps and params a
  finished run had, so the first cell of a seed runs prepare, sft and mia and the seed's other cells
  wait until it has passed them, then reuse them (`study.progress`).
- A cell is done when the project's MLflow store holds its complete pipeline run (the summary stage
  tags it) and DVC has its experiment: started again, a study runs only the cells that are not done
  (one killed between the two runs again, from DVC's run cache).
- One study runs at a time per name (a lock the kernel drops with the process, also on kill -9); the
  next one stops what a killed one left running (found by an environment marker) and marks its
  unfinished MLflow runs KILLED.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mlflow import MlflowClient

from grpolab.errors import ConfigError
from grpolab.runtime.fsutil import take_lock
from grpolab.study import records
from grpolab.study.experiments import CELL_MARKER, StudyPlace, git_head, remove_experiment_copies
from grpolab.study.local import LocalRunner, study_gpus
from grpolab.study.pool import PoolRunner, check_pool_options
from grpolab.study.progress import Progress
from grpolab.study.spec import Cell, Study
from grpolab.tracking import tracking_uri

MAX_JOBS = 32


@dataclass(frozen=True)
class StudyOptions:
    """How a study runs, as `check_study_options` found the flags fit its cells."""

    jobs: int  # cells at once: 1 here by default; on a pool, cells in flight (every cell by default)
    gpus_per_cell: int | None = None  # None: 1 where GPUs are visible
    pool: str | None = None  # a Prefect work pool: its workers run the cells
    gpus: list[str] = field(default_factory=list)  # the GPUs handed out to the cells here (none on a pool)


def check_study_options(study: Study, jobs: int | None, gpus_per_cell: int | None = None, pool: str | None = None) -> StudyOptions:
    """The flags of `grpolab study` checked against the cells of `study`, before any work and with nothing opened
    (the CLI checks them before Prefect starts; the flow again, for a deployment's run): a ConfigError naming the flag."""
    if jobs is None:
        jobs = min(len(study.cells), MAX_JOBS) if pool else 1
    if not 1 <= jobs <= MAX_JOBS:
        raise ConfigError(f"--jobs: {jobs} is not between 1 and {MAX_JOBS}")
    if pool:
        check_pool_options(study, pool, gpus_per_cell)
        return StudyOptions(jobs, gpus_per_cell, pool)
    return StudyOptions(jobs, gpus_per_cell, None, study_gpus(study, jobs, gpus_per_cell))


class CellRunner(Protocol):
    """Where the cells of one study run run: `LocalRunner` (processes here) or `PoolRunner` (flow runs on a work pool)."""

    def check(self, commit: str) -> None:
        """Before the lock: what the cells need where they run (a pool's workers run `commit`), or a ConfigError."""

    def stop_leftovers(self) -> None:
        """What a killed run of the study left running where the cells run, besides processes here: stopped."""

    def recorded_experiments(self) -> set[str] | None:
        """The DVC experiments the project has, or None where the cells' experiments are elsewhere."""

    def prepare(self, todo: list[Cell]) -> None:
        """Before the first cell of `todo` starts."""

    def run(self, cell: Cell, progress: Progress, store: MlflowClient) -> bool:
        """One cell, its progress reported, until it ends; True if it finished. Called from a thread per cell."""

    def stop(self) -> None:
        """The study was interrupted: the running cells are stopped."""


@dataclass
class StudyRun:
    """One run of a study in a project: its lock, what is done, the cells to run and how they go."""

    study: Study
    options: StudyOptions  # `check_study_options`
    project: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        self.place = StudyPlace(self.project, self.study)
        self.runner: CellRunner = (PoolRunner(self.place, self.options.pool) if self.options.pool
                                   else LocalRunner(self.place, self.options.gpus, self.options.gpus_per_cell))
        self.client: MlflowClient | None = None  # the MLflow store of the study's cells
        self._lock = None
        self.study_run_id: str | None = None
        self.todo: list[Cell] = []
        self.progress: Progress | None = None

    def open(self, stream=None) -> StudyRun:
        """Check the project, take the lock, clean up after a killed run, find the cells left to run."""
        if not (self.project / ".dvc").is_dir():
            raise ConfigError(f"{self.project}: not a DVC project (no .dvc/): run `dvc init` in its git repo")
        commit = git_head(self.project)
        if commit is None:
            raise ConfigError(
                f"{self.project}: no git commit: every cell runs as a DVC experiment, which starts from one "
                "(git add -A && git commit -m 'project')"
            )
        self.runner.check(commit)
        self.place.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._stop_leftovers()
        params = self.study.cells[0].params
        self.client = MlflowClient(tracking_uri(params))
        self.study_run_id = records.record_study(self.client, params, self.study.source, [_cell_record(c) for c in self.study.cells],
                                                 self.options.jobs)
        complete = records.complete_pipelines(self.client, params.tracking.experiment)
        recorded = self.runner.recorded_experiments()
        self.todo = [c for c in self.study.cells if not (c.params_hash in complete and (recorded is None or c.experiment_name in recorded))]
        for cell in self.todo:  # a killed run's stages stay RUNNING in MLflow otherwise
            records.end_unfinished(self.client, params.tracking.experiment, cell.params_hash)
        self.runner.prepare(self.todo)
        self.progress = Progress(self.study, self.todo, len(self.study.cells) - len(self.todo), self.options.jobs, stream)
        return self

    def _take_lock(self) -> None:
        try:
            self._lock = take_lock(self.place.state_dir / "lock", f"study {self.study.name!r} is already running in this project")
        except FileExistsError as exc:
            raise ConfigError(str(exc)) from None

    def _stop_leftovers(self) -> None:
        """What a killed run of this study left (we hold its lock, so nothing of it runs on): a cell's processes
        die with the study, but one started by an older grpolab may not (stopped here); DVC's temporary
        workspaces of its cells stay behind (removed); on a pool, its cells' flow runs go on (the runner's)."""
        self.runner.stop_leftovers()
        prefix = f"{CELL_MARKER}={self.place.marker('')}".encode()  # this project's study only: a namesake elsewhere runs on
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if not any(v.startswith(prefix) for v in (proc / "environ").read_bytes().split(b"\0")):
                    continue
                os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue  # gone, or not ours to read
            print(f"stopped process {proc.name}, left running by an interrupted run of study {self.study.name}", file=sys.stderr)
        remove_experiment_copies(self.project, {c.experiment_name for c in self.study.cells})

    def run_cell(self, cell: Cell) -> bool:
        """One cell as one DVC experiment in a temporary copy of the workspace, where the runner runs it; True if it finished."""
        ok = False
        try:
            ok = self.runner.run(cell, self.progress, self.client)
        finally:
            self.progress.finished(cell, ok, self.place.log_file(cell))
        return ok

    def schedule(self, submit) -> list:
        """Start every cell to run through `submit(cell)` (a Prefect task's `.submit`), at most `jobs` at a
        time, each once its seed's shared stages allow; returns the futures when every cell has finished."""
        pending, futures = list(self.todo), []
        while pending or self.progress.running:
            for cell in [c for c in pending if self.progress.ready(c)][: self.options.jobs - self.progress.running]:
                pending.remove(cell)
                self.progress.started(cell)
                futures.append(submit(cell))
            self.progress.wait(timeout=1.0)
            self.progress.tick()
        return futures

    def close(self, ok: bool) -> None:
        """Cells still running (the study was interrupted: Ctrl-C) are stopped; the study's MLflow run
        ends FINISHED when every cell did; the lock goes."""
        self.runner.stop()
        if self.study_run_id:
            self.client.set_terminated(self.study_run_id, "FINISHED" if ok else "FAILED")
        if self._lock:
            self._lock.close()
            self._lock = None


def _cell_record(cell: Cell) -> dict:
    return {"variant": cell.variant, "seed": cell.seed, "params_hash": cell.params_hash, "overrides": list(cell.overrides)}
