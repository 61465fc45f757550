"""Running a study: every cell is one `dvc exp run --temp` (the whole pipeline in a temporary copy of
the workspace, listed by `dvc exp show` under the name `<study>-<variant>-s<seed>`), at most `jobs` at
once. The user's params.yaml and workspace are never written.

- Shared stages run once per seed: DVC's run cache restores a stage whose command, deps and params a
  finished run had, so the first cell of a seed runs prepare, sft and mia and the seed's other cells
  wait until it has passed them, then reuse them.
- A cell is done when the project's MLflow store holds its complete pipeline run (the summary stage
  tags it) and DVC has its experiment: started again, a study runs only the cells that are not done
  (one killed between the two runs again, from DVC's run cache).
- One study runs at a time per name (a lock the kernel drops with the process, also on kill -9); the
  next one stops what a killed one left running (found by an environment marker) and marks its
  unfinished MLflow runs KILLED.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from mlflow import MlflowClient

from grpolab import tracking
from grpolab.config import flatten
from grpolab.errors import ConfigError
from grpolab.fsutil import take_lock
from grpolab.procs import bound, die_with_parent
from grpolab.study.spec import Cell, Study

STATE_DIR = Path(".grpolab/studies")  # per study: the lock and one log per cell
SHARED_STAGES = ("inputs", "prepare", "sft", "mia")  # identical for every variant of a seed (the study checks nothing else)
STAGE_LINE = re.compile(r"[Ss]tage '([\w-]+)'")  # dvc's "Running stage 'x'" and "Stage 'x' is cached"
STEP_LINE = re.compile(r"^\w+:\s+\d+%\|.*\| (\d+/\d+) ")  # a stage's progress bar: "train:  45%|███▌ | 90/200 [..."
CELL_MARKER = "GRPOLAB_STUDY_CELL"  # in the environment of every process of a cell: `<project>::<study>/<cell>`
MAX_JOBS = 32
USER_PATHS = (  # params that name the user's files and checkpoints
    "data.train_files", "data.eval_files", "data.sft_files", "data.val_files", "model.name_or_path", "mia.reference_model",
    "train.judge_model",
)


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def cell_env(marker: str | None = None) -> dict[str, str]:
    """The environment of a cell: this interpreter's scripts first on PATH (dvc runs `grpolab stage`); a
    cell's stages die with its `dvc exp run`, which dies with the study (`run_cell`)."""
    env = bound({**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    if marker:
        env[CELL_MARKER] = marker
    return env


def visible_gpus() -> tuple[list[str], str]:
    """The GPUs a study may hand out, and where the list comes from: the entries of CUDA_VISIBLE_DEVICES
    when it is set (indices or UUIDs, passed on as given), else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus = [] if listed.strip() in ("", "-1") else [g.strip() for g in listed.split(",") if g.strip()]
        return gpus, f"CUDA_VISIBLE_DEVICES={listed}"
    import torch  # only here: a study's driver otherwise has no use for it

    count = torch.cuda.device_count()
    return [str(i) for i in range(count)], f"{count} GPU{'s' if count != 1 else ''} visible"


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


def _untracked_paths(project: Path, cells: list[Cell]) -> list[str]:
    """The user's relative files and checkpoints that git does not track: a DVC experiment's copy of the
    workspace holds tracked files only, so they are copied in (`dvc exp run -C`)."""
    named = {v for cell in cells for key in USER_PATHS for v in _as_list(flatten(cell.params)[key])}
    relative = sorted(p for p in named if not Path(p).is_absolute() and (project / p).exists())
    return [p for p in relative if not subprocess.run(["git", "ls-files", "--", p], cwd=project, capture_output=True, text=True).stdout]


def _as_list(value) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _git_head(project: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=project, capture_output=True, text=True)
    return proc.stdout.strip() or None


@dataclass
class CellState:
    cell: Cell
    first_of_seed: bool  # builds its seed's shared stages
    status: str = "pending"  # pending | running | done | failed
    stage: str | None = None
    step: str = ""  # the running stage's progress, "90/200"
    started: float | None = None
    seconds: float | None = None
    shared_seconds: float | None = None  # when it had passed the shared stages


class Progress:
    """What every cell of this run is doing, the live line, and the waits of the scheduler."""

    def __init__(self, study: Study, todo: list[Cell], done_before: int, jobs: int, stream=None):
        self.study, self.jobs, self.done_before = study, jobs, done_before
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.changed = threading.Condition()
        seeds_started: set[int] = {c.seed for c in study.cells if c not in todo}  # shared stages already cached
        self.cells: dict[str, CellState] = {}
        for cell in todo:
            self.cells[cell.name] = CellState(cell, first_of_seed=cell.seed not in seeds_started)
            seeds_started.add(cell.seed)

    def ready(self, cell: Cell) -> bool:
        """A cell may start when its seed's shared stages are done (or it is the one that builds them)."""
        state = self.cells[cell.name]
        if state.first_of_seed:
            return True
        first = next((s for s in self.cells.values() if s.first_of_seed and s.cell.seed == cell.seed), None)
        return first is None or first.status in ("done", "failed") or (first.stage is not None and first.stage not in SHARED_STAGES)

    def started(self, cell: Cell) -> None:
        self._update(cell, status="running", started=time.monotonic())

    def stage(self, cell: Cell, stage: str) -> None:
        state = self.cells[cell.name]
        if state.stage != stage:
            past_shared = state.shared_seconds is None and stage not in SHARED_STAGES
            shared = time.monotonic() - state.started if past_shared else state.shared_seconds
            self._update(cell, stage=stage, step="", shared_seconds=shared)

    def step(self, cell: Cell, step: str) -> None:
        self.cells[cell.name].step = step  # shown at the next redraw

    def tick(self) -> None:
        """Redraw the live line in a terminal (elapsed times and steps move on between events)."""
        if self.tty:
            self._draw()

    def finished(self, cell: Cell, ok: bool, log: Path) -> None:
        state = self.cells[cell.name]
        seconds = time.monotonic() - (state.started or time.monotonic())
        if ok:
            self._say(f"  done   {cell.name} in {_clock(seconds)}")
        else:
            tail = "".join(f"         | {line}" for line in log.read_text(errors="replace").splitlines(True)[-6:])
            self._say(f"  FAILED {cell.name} after {_clock(seconds)} (log: {log})\n{tail.rstrip()}")
        self._update(cell, status="done" if ok else "failed", seconds=seconds)

    def wait(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)

    @property
    def failed(self) -> list[Cell]:
        return [s.cell for s in self.cells.values() if s.status == "failed"]

    @property
    def running(self) -> int:
        return sum(s.status == "running" for s in self.cells.values())

    def line(self) -> str:
        states = list(self.cells.values())
        done = self.done_before + sum(s.status == "done" for s in states)
        failed = sum(s.status == "failed" for s in states)
        running = [s for s in states if s.status == "running"]
        now = time.monotonic()
        parts = [f"study {self.study.name}: {done}/{len(self.study.cells)} cells done" + (f", {failed} failed" if failed else "")]
        if running:
            parts.append("running " + ", ".join(
                f"{s.cell.name} ({s.stage or 'starting'}{' ' + s.step if s.step else ''}, {_clock(now - s.started)})" for s in running
            ))
        left = self.time_left()
        if any(s.status in ("pending", "running") for s in states):
            parts.append(f"~{_clock(left)} left" if left is not None else "time left: after the first cell")
        return " | ".join(parts)

    def time_left(self) -> float | None:
        """Seconds, from the finished cells' times: a seed's first cell, which builds the shared stages, apart
        (until another cell has finished, the others are guessed as a first cell without its shared stages)."""
        finished = [s for s in self.cells.values() if s.status == "done"]
        if not finished:
            return None
        firsts = [s.seconds for s in finished if s.first_of_seed]
        others = [s.seconds for s in finished if not s.first_of_seed] or [
            s.seconds - (s.shared_seconds or 0.0) for s in finished if s.first_of_seed
        ]
        expected = {True: mean(firsts) if firsts else mean(others), False: mean(others)}
        now = time.monotonic()
        work = sum(
            expected[s.first_of_seed] if s.status == "pending" else max(expected[s.first_of_seed] - (now - s.started), 0.0)
            for s in self.cells.values()
            if s.status in ("pending", "running")
        )
        return work / self.jobs

    def _update(self, cell: Cell, **changes) -> None:
        with self.changed:
            for key, value in changes.items():
                setattr(self.cells[cell.name], key, value)
            self.changed.notify_all()
        self._draw()

    def _say(self, text: str) -> None:
        with self.changed:
            self.stream.write(f"\r\x1b[K{text}\n" if self.tty else f"{text}\n")
            self.stream.flush()

    def _draw(self) -> None:
        with self.changed:
            self.stream.write(f"\r\x1b[K{self.line()}" if self.tty else f"{self.line()}\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class StudyRun:
    """One run of a study in a project: its lock, what is done, the cells to run and how they go."""

    study: Study
    jobs: int = 1
    project: Path = field(default_factory=Path.cwd)
    gpus_per_cell: int | None = None  # None: 1 where GPUs are visible

    def __post_init__(self) -> None:
        if not 1 <= self.jobs <= MAX_JOBS:
            raise ConfigError(f"--jobs: {self.jobs} is not between 1 and {MAX_JOBS}")
        self.gpus = study_gpus(self.study, self.jobs, self.gpus_per_cell)
        self._free_gpus = list(self.gpus)  # held by no running cell
        self.cell_gpus: dict[str, list[str]] = {}  # running cell -> its GPUs
        self._gpu_lock = threading.Lock()
        self.state_dir = self.project / STATE_DIR / self.study.name
        self.client = MlflowClient(tracking.tracking_uri(self.study.cells[0].params))
        self._lock = None
        self.study_run_id: str | None = None
        self.copy_paths: list[str] = []
        self.running: dict[str, subprocess.Popen] = {}  # cell name -> its `dvc exp run`, a process group of its own
        self.todo: list[Cell] = []
        self.progress: Progress | None = None

    # -- before any cell ------------------------------------------------------------------------

    def take_gpus(self, cell: Cell) -> None:
        """A starting cell's own GPUs, from those no running cell holds (there are enough: `_check_gpus`)."""
        if self.gpus:
            need = gpus_needed(cell, self.gpus_per_cell)
            with self._gpu_lock:
                self.cell_gpus[cell.name], self._free_gpus = self._free_gpus[:need], self._free_gpus[need:]

    def _give_back_gpus(self, cell: Cell) -> None:
        with self._gpu_lock:
            free = set(self._free_gpus) | set(self.cell_gpus.pop(cell.name, []))
            self._free_gpus = [g for g in self.gpus if g in free]  # in the machine's order

    def open(self, stream=None) -> StudyRun:
        """Check the project, take the lock, clean up after a killed run, find the cells left to run."""
        if not (self.project / ".dvc").is_dir():
            raise ConfigError(f"{self.project}: not a DVC project (no .dvc/): run `dvc init` in its git repo")
        if _git_head(self.project) is None:
            raise ConfigError(
                f"{self.project}: no git commit: every cell runs as a DVC experiment, which starts from one "
                "(git add -A && git commit -m 'project')"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._stop_leftovers()
        params = self.study.cells[0].params
        self.study_run_id = tracking.record_study(self.client, params, self.study.source, [_cell_record(c) for c in self.study.cells], self.jobs)
        complete = tracking.complete_pipelines(self.client, params.tracking.experiment)
        recorded = set(self._experiments("--all-commits"))
        self.todo = [c for c in self.study.cells if not (c.params_hash in complete and c.experiment_name in recorded)]
        for cell in self.todo:  # a killed run's stages stay RUNNING in MLflow otherwise
            tracking.end_unfinished(self.client, params.tracking.experiment, cell.params_hash)
        self._free_experiment_names()
        self.copy_paths = _untracked_paths(self.project, self.todo)
        self.progress = Progress(self.study, self.todo, len(self.study.cells) - len(self.todo), self.jobs, stream)
        return self

    def _take_lock(self) -> None:
        try:
            self._lock = take_lock(self.state_dir / "lock", f"study {self.study.name!r} is already running in this project")
        except FileExistsError as exc:
            raise ConfigError(str(exc)) from None

    def _stop_leftovers(self) -> None:
        """What a killed run of this study left (we hold its lock, so nothing of it runs on): a cell's processes
        die with the study, but one started by an older grpolab may not (stopped here); DVC's temporary
        workspaces of its cells stay behind (removed)."""
        prefix = f"{CELL_MARKER}={self.marker('')}".encode()  # this project's study only: a namesake elsewhere runs on
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if not any(v.startswith(prefix) for v in (proc / "environ").read_bytes().split(b"\0")):
                    continue
                os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue  # gone, or not ours to read
            print(f"stopped process {proc.name}, left running by an interrupted run of study {self.study.name}", file=sys.stderr)
        copies = (self.project / ".dvc" / "tmp" / "exps").resolve()
        names = {c.experiment_name for c in self.study.cells}
        for info in (copies / "run").glob("*/*.run"):  # DVC's record of each `exp run --temp`: its name and copy
            try:
                record = json.loads(info.read_text())
            except (OSError, ValueError):
                continue
            root = Path(record.get("root_dir") or "/")
            if record.get("name") in names and copies in root.parents and root.is_dir():  # a finished one's is gone
                shutil.rmtree(root, ignore_errors=True)

    def _experiments(self, *args: str) -> list[str]:
        """Names of the project's DVC experiments (of the current commit; `--all-commits`: of any)."""
        proc = subprocess.run(_dvc("exp", "ls", "--name-only", *args), cwd=self.project, capture_output=True, text=True, env=cell_env())
        return proc.stdout.split()

    def _free_experiment_names(self) -> None:
        """A cell to run whose DVC experiment exists on this commit (its MLflow record is not complete):
        the old experiment goes, DVC would refuse the name."""
        existing = set(self._experiments())
        for cell in self.todo:
            if cell.experiment_name in existing:
                subprocess.run(_dvc("exp", "remove", cell.experiment_name), cwd=self.project, check=True, capture_output=True, env=cell_env())

    # -- the cells ------------------------------------------------------------------------------

    def marker(self, cell: str) -> str:
        """The value of CELL_MARKER in the processes of this project's `cell` of this study."""
        return f"{self.project.resolve()}::{self.study.name}/{cell}"

    def log_file(self, cell: Cell) -> Path:
        return self.state_dir / "logs" / f"{cell.name}.log"

    def run_cell(self, cell: Cell) -> bool:
        """One cell as one DVC experiment in a temporary copy of the workspace; True if it finished."""
        args = [a for o in cell.overrides for a in ("-S", o)] + [a for p in self.copy_paths for a in ("-C", p)]
        cmd = _dvc("--wait-for-lock", "exp", "run", "--temp", "--name", cell.experiment_name, *args)
        log = self.log_file(cell)
        log.parent.mkdir(parents=True, exist_ok=True)
        ok = False
        try:
            with open(log, "w") as out:
                out.write(f"$ {' '.join(cmd)}\n")
                env = cell_env(self.marker(cell.name))
                if cell.name in self.cell_gpus:  # its own GPUs: every process of the cell sees those only
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(self.cell_gpus[cell.name])
                proc = subprocess.Popen(
                    cmd, cwd=self.project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                    env=env, start_new_session=True, preexec_fn=die_with_parent,
                )
                self.running[cell.name] = proc
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    if match := STAGE_LINE.search(line):
                        self.progress.stage(cell, match.group(1))
                    elif match := STEP_LINE.match(line):
                        self.progress.step(cell, match.group(1))
                status = proc.wait()
                ok = status == 0
                if not ok:
                    out.write(f"(exit status {status}: {f'killed by signal {-status}' if status < 0 else 'failed'})\n")
        finally:
            self.running.pop(cell.name, None)
            self._give_back_gpus(cell)
            self.progress.finished(cell, ok, log)
        return ok

    def schedule(self, submit) -> list:
        """Start every cell to run through `submit(cell)` (a Prefect task's `.submit`), at most `jobs` at a
        time, each once its seed's shared stages allow; returns the futures when every cell has finished."""
        pending, futures = list(self.todo), []
        while pending or self.progress.running:
            for cell in [c for c in pending if self.progress.ready(c)][: self.jobs - self.progress.running]:
                pending.remove(cell)
                self.take_gpus(cell)
                self.progress.started(cell)
                futures.append(submit(cell))
            self.progress.wait(timeout=1.0)
            self.progress.tick()
        return futures

    def close(self, ok: bool) -> None:
        """Cells still running (the study was interrupted: Ctrl-C) are stopped; the study's MLflow run
        ends FINISHED when every cell did; the lock goes."""
        for proc in list(self.running.values()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.study_run_id:
            self.client.set_terminated(self.study_run_id, "FINISHED" if ok else "FAILED")
        if self._lock:
            self._lock.close()
            self._lock = None


def _cell_record(cell: Cell) -> dict:
    return {"variant": cell.variant, "seed": cell.seed, "params_hash": cell.params_hash, "overrides": list(cell.overrides)}
