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
- On a Prefect work pool (`--pool NAME`) every cell is a flow run of the `cell` deployment, which runs the
  same `dvc exp run --temp` in the clone of the project of whichever worker picks it up (`run_pool_cell`).
  The driver learns a cell's stage from the MLflow server every cell logs to, and its end from Prefect; the
  workers' clones share one DVC cache, so a seed's shared stages run once in all. A killed driver's cells
  still queued or running are cancelled by the next run of the study.
- A worker that dies mid-cell takes the cell's processes with it (`dying_with_worker`); the cell's flow run, silent,
  is marked Crashed by a Prefect automation on its heartbeats (`crash_silent_cells`), and the driver marks the
  cell's unfinished MLflow runs KILLED and runs the cell once more, on whichever worker is free (`StudyRun._on_pool`).
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from mlflow import MlflowClient

from grpolab import tracking
from grpolab.config import flatten
from grpolab.errors import ConfigError
from grpolab.runtime.fsutil import take_lock
from grpolab.runtime.procs import bound, die_with_parent
from grpolab.study.spec import Cell, Study, load_study

STATE_DIR = Path(".grpolab/studies")  # per study: the lock and one log per cell
SHARED_STAGES = ("inputs", "prepare", "sft", "mia")  # identical for every variant of a seed (the study checks nothing else)
STAGE_LINE = re.compile(r"[Ss]tage '([\w-]+)'")  # dvc's "Running stage 'x'" and "Stage 'x' is cached"
STEP_LINE = re.compile(r"^\w+:\s+\d+%\|.*\| (\d+/\d+) ")  # a stage's progress bar: "train:  45%|███▌ | 90/200 [..."
CELL_MARKER = "GRPOLAB_STUDY_CELL"  # in the environment of every process of a cell: `<project>::<study>/<cell>`
MAX_JOBS = 32
CELL_FLOW = "grpolab-study-cell"  # the flow of prefect.yaml's `cell` deployment (flows/study.py)
PROJECT_ENV = "GRPOLAB_PROJECT"  # a worker's clone of the project, where it is not the deployment's folder
POLL_S = 2.0  # how often a pool cell's flow run and MLflow record are read
CELL_ATTEMPTS = 2  # a pool cell whose flow run crashed (its worker died) runs once more; a second crash fails it
WORKER_WATCH_S = 1.0  # how often a pool cell checks that its worker is alive
HEARTBEAT_GRACE_S = 15  # a cell's flow run is silent after 2 heartbeat intervals and this: one heartbeat may be lost or late
HEARTBEAT_TAG = "grpolab-heartbeat:{}s"  # on every pool cell's flow run: the automation of its heartbeat interval watches it
USER_PATHS = (  # params that name the user's files and checkpoints
    "data.train_files", "data.eval_files", "data.sft_files", "data.val_files", "model.name_or_path", "mia.reference_model",
    "train.rewards.judge_model",
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


def _experiments(project: Path, *args: str) -> list[str]:
    """Names of the project's DVC experiments (of the current commit; `--all-commits`: of any)."""
    proc = subprocess.run(_dvc("exp", "ls", "--name-only", *args), cwd=project, capture_output=True, text=True, env=cell_env())
    return proc.stdout.split()


def free_experiment_name(project: Path, name: str) -> None:
    """A cell about to run whose DVC experiment exists on this commit (its MLflow record is not complete):
    the old experiment goes, DVC would refuse the name."""
    if name in _experiments(project):
        subprocess.run(_dvc("--wait-for-lock", "exp", "remove", name), cwd=project, check=True, capture_output=True, env=cell_env())


def remove_experiment_copies(project: Path, names: set[str]) -> None:
    """Remove the temporary workspaces that killed `dvc exp run --temp` runs named in `names` left in `project`
    (a finished run's copy is gone already): DVC keeps a record of each run, its name and its copy's folder."""
    copies = (project / ".dvc" / "tmp" / "exps").resolve()
    for info in (copies / "run").glob("*/*.run"):
        try:
            record = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        root = Path(record.get("root_dir") or "/")
        if record.get("name") in names and copies in root.parents and root.is_dir():
            shutil.rmtree(root, ignore_errors=True)


def run_experiment(project: Path, cell: Cell, copy_paths: list[str], env: dict[str, str], log: Path, on_line=None, on_start=None) -> int:
    """`cell` as one DVC experiment in a temporary copy of `project`'s workspace, its output in `log` (and
    each line to `on_line`); returns its exit status. It runs in a process group of its own (given to
    `on_start`, for a driver to stop), which dies with the caller."""
    args = [a for o in cell.overrides for a in ("-S", o)] + [a for p in copy_paths for a in ("-C", p)]
    cmd = _dvc("--wait-for-lock", "exp", "run", "--temp", "--name", cell.experiment_name, *args)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=env, start_new_session=True, preexec_fn=die_with_parent,
        )
        if on_start:
            on_start(proc)
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if on_line:
                    on_line(line)
            status = proc.wait()
        finally:
            if proc.poll() is None:  # the caller was interrupted
                os.killpg(proc.pid, signal.SIGTERM)
        if status != 0:
            out.write(f"(exit status {status}: {f'killed by signal {-status}' if status < 0 else 'failed'})\n")
    return status


@contextmanager
def dying_with_worker() -> Iterator[dict[str, subprocess.Popen]]:
    """Inside, in a pool cell's flow run (which its worker started): once the worker is gone (this process has
    another parent), kill the cell's experiment (put in the yielded dict as "experiment": a process group of its
    own) and end this process at once, reporting nothing, so that a worker's death is its machine's: the flow run's
    heartbeats stop and Prefect's automation marks it Crashed (`crash_silent_cells`), whereupon the driver runs the
    cell again. Left alone, the cell would train on unwatched, its flow run Running, until its next print met the
    dead worker's pipe (Prefect's console then ends the flow run Crashed, its experiment stopped mid-stage)."""
    worker, done, experiment = os.getppid(), threading.Event(), {}

    def watch() -> None:
        while os.getppid() == worker:
            if done.wait(WORKER_WATCH_S):
                return  # the cell is over: its flow run reports its own end
        if proc := experiment.get("experiment"):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(128 + signal.SIGKILL)  # no state, no cleanup: what a dead machine reports

    threading.Thread(target=watch, name="dying-with-worker", daemon=True).start()
    try:
        yield experiment
    finally:
        done.set()


def run_pool_cell(study_file: str, cell_name: str, commit: str, tracking: str) -> None:
    """What the `cell` deployment runs on a worker: one cell of a study, in the worker's clone of the project
    (PROJECT_ENV, or the working directory), which must be at the driver's commit. Raises StudyError if it fails.
    What it prints goes to the flow run's logs (the flow's `log_prints`), which the driver keeps as the cell's log."""
    from grpolab.errors import StudyError

    def say(text: str) -> None:
        print(text, flush=True)  # looked up when called: Prefect's log_prints replaces print while the flow runs

    project = Path(os.environ.get(PROJECT_ENV) or Path.cwd()).resolve()
    head = _git_head(project)
    if head != commit:
        raise ConfigError(f"{project}: at commit {head}, the study's driver at {commit}: a worker runs the driver's commit "
                          f"(git fetch && git checkout {commit} in this clone)")
    study = load_study(project / study_file, project / "params.yaml")
    cell = next((c for c in study.cells if c.name == cell_name), None)
    if cell is None:
        raise ConfigError(f"{study_file}: no cell {cell_name!r} at commit {commit}")
    say(f"cell {cell.name} of study {study.name} in {project} on {os.uname().nodename}")
    env = cell_env(f"{project}::{study.name}/{cell.name}")
    env["MLFLOW_TRACKING_URI"] = tracking  # the driver's store, also where the clone's params name none
    log = project / STATE_DIR / study.name / "logs" / f"{cell.name}.log"

    def stage_lines(line: str) -> None:  # what the driver's log of the cell shows (Prefect's logs of the flow run)
        if STAGE_LINE.search(line):
            say(f"{cell.name}: {line.strip()}")

    with dying_with_worker() as running:
        remove_experiment_copies(project, {cell.experiment_name})  # an earlier attempt's, killed here with its worker
        free_experiment_name(project, cell.experiment_name)
        status = run_experiment(project, cell, _untracked_paths(project, [cell]), env, log, stage_lines,
                                lambda proc: running.__setitem__("experiment", proc))
    if status != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
        raise StudyError(f"cell {cell.name} failed in {project} (exit status {status}; log: {log}):\n{tail}")
    say(f"cell {cell.name} done in {project}")


def cell_heartbeat_s() -> int:
    """Seconds between the heartbeats of a pool cell's flow run: Prefect's own setting as the driver has it
    (PREFECT_FLOWS_HEARTBEAT_FREQUENCY or the Prefect profile; Prefect's default 180, its minimum 30), handed to
    every cell's flow run so that the automation that watches them knows what to expect."""
    from prefect.settings import get_current_settings

    seconds = get_current_settings().flows.heartbeat_frequency
    if seconds is None:
        raise ConfigError("--pool: PREFECT_FLOWS_HEARTBEAT_FREQUENCY is unset, and without flow run heartbeats a cell whose "
                          "worker dies would be waited for forever: set it (seconds, at least 30)")
    return seconds


def silence_s(heartbeat_s: int) -> int:
    """Seconds without a heartbeat after which a cell's flow run counts as dead: two intervals and a grace."""
    return 2 * heartbeat_s + HEARTBEAT_GRACE_S


def crash_silent_cells(client, heartbeat_s: int) -> str:
    """Prefect's detection of zombie flow runs (docs.prefect.io/v3/advanced/detect-zombie-flows), for the cells
    that beat every `heartbeat_s`: an automation of the Prefect server that marks a flow run tagged
    HEARTBEAT_TAG Crashed once `silence_s` have passed after its last heartbeat (or after it went Pending: a worker
    that dies before the flow starts) with no heartbeat, Running or final state. Created by the first driver that
    needs it, found by its name after that (one per interval: cells beating at another pace are not its to judge);
    returns the name. The server's triggers service, on by default, evaluates it (every 5 s by default)."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    silent = silence_s(heartbeat_s)
    name = f"grpolab: crash study cells silent for {silent} s"
    if client.read_automations_by_name(name):
        return name
    final = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat", "prefect.flow-run.Pending"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Running", *final},
        match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                             "prefect.resource.id": f"prefect.tag.{HEARTBEAT_TAG.format(heartbeat_s)}"}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1, within=timedelta(seconds=silent),
    )
    action = ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {silent} s: its worker (or the worker's machine) died")
    client.create_automation(AutomationCore(
        name=name, trigger=trigger, actions=[action],
        description=f"grpolab study cells (flow runs tagged {HEARTBEAT_TAG.format(heartbeat_s)}) whose worker died: the driver runs them again",
    ))
    return name


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
            text = log.read_text(errors="replace") if log.is_file() else ""
            tail = "".join(f"         | {line}" for line in text.splitlines(True)[-6:])
            self._say(f"  FAILED {cell.name} after {_clock(seconds)} (log: {log})\n{tail.rstrip()}")
        self._update(cell, status="done" if ok else "failed", seconds=seconds)

    def rerun(self, cell: Cell, why: str) -> None:
        """A pool cell whose worker died runs again (its time goes on from its first start)."""
        seconds = time.monotonic() - (self.cells[cell.name].started or time.monotonic())
        self._say(f"  worker died: {cell.name} after {_clock(seconds)} ({why}); its unfinished MLflow runs are KILLED; "
                  "running it again on another worker")
        # the live line shows "(train again, 4:10)": the stage stays, so the seed's other cells wait as they did
        self._update(cell, step="again")

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
    jobs: int | None = None  # cells at once: 1 here by default; on a pool, cells in flight (every cell by default)
    project: Path = field(default_factory=Path.cwd)
    gpus_per_cell: int | None = None  # None: 1 where GPUs are visible
    pool: str | None = None  # a Prefect work pool: its workers run the cells

    def __post_init__(self) -> None:
        if self.jobs is None:
            self.jobs = min(len(self.study.cells), MAX_JOBS) if self.pool else 1
        if not 1 <= self.jobs <= MAX_JOBS:
            raise ConfigError(f"--jobs: {self.jobs} is not between 1 and {MAX_JOBS}")
        if self.pool and self.gpus_per_cell is not None:
            raise ConfigError(f"--gpus-per-cell {self.gpus_per_cell} with --pool {self.pool}: on a pool, a cell has the GPUs of the worker "
                              "that runs it (start one worker per GPU set, each with its CUDA_VISIBLE_DEVICES)")
        if self.pool:
            from prefect.settings import PREFECT_API_URL

            if not PREFECT_API_URL.value():
                raise ConfigError(f"--pool {self.pool}: PREFECT_API_URL is not set; it names the Prefect server whose workers "
                                  "poll the pool (http://HOST:4200/api)")
        self.gpus = [] if self.pool else study_gpus(self.study, self.jobs, self.gpus_per_cell)
        self._free_gpus = list(self.gpus)  # held by no running cell
        self.cell_gpus: dict[str, list[str]] = {}  # running cell -> its GPUs
        self._gpu_lock = threading.Lock()
        self.state_dir = self.project / STATE_DIR / self.study.name
        self.uri = tracking.tracking_uri(self.study.cells[0].params)
        if self.pool and not self.uri.startswith(("http://", "https://")):
            raise ConfigError(f"--pool {self.pool}: the tracking store is {self.uri}, a file on this machine, which cells on other "
                              "machines cannot write: set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow server")
        self.client = MlflowClient(self.uri)
        self._lock = None
        self.study_run_id: str | None = None
        self.copy_paths: list[str] = []
        self.running: dict[str, subprocess.Popen] = {}  # cell name -> its `dvc exp run`, a process group of its own
        self.todo: list[Cell] = []
        self.progress: Progress | None = None
        self.deployment_id = None  # of the `cell` deployment on the pool
        self.commit: str | None = None
        self.flow_runs: dict[str, str] = {}  # pool cell name -> its flow run's id, while it runs
        self.heartbeat_s: int | None = None  # of the pool cells' flow runs (`cell_heartbeat_s`)

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
        self.commit = _git_head(self.project)
        if self.pool:
            self._check_pool()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._stop_leftovers()
        params = self.study.cells[0].params
        self.study_run_id = tracking.record_study(self.client, params, self.study.source, [_cell_record(c) for c in self.study.cells], self.jobs)
        complete = tracking.complete_pipelines(self.client, params.tracking.experiment)
        # on a pool, a cell's DVC experiment is in the clone of the worker that ran it: MLflow's record alone says
        recorded = None if self.pool else set(_experiments(self.project, "--all-commits"))
        self.todo = [c for c in self.study.cells if not (c.params_hash in complete and (recorded is None or c.experiment_name in recorded))]
        for cell in self.todo:  # a killed run's stages stay RUNNING in MLflow otherwise
            tracking.end_unfinished(self.client, params.tracking.experiment, cell.params_hash)
        self.copy_paths = [] if self.pool else _untracked_paths(self.project, self.todo)
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
        workspaces of its cells stay behind (removed); on a pool, its cells' flow runs go on (cancelled)."""
        if self.pool:
            self._cancel_flow_runs()
        prefix = f"{CELL_MARKER}={self.marker('')}".encode()  # this project's study only: a namesake elsewhere runs on
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if not any(v.startswith(prefix) for v in (proc / "environ").read_bytes().split(b"\0")):
                    continue
                os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue  # gone, or not ours to read
            print(f"stopped process {proc.name}, left running by an interrupted run of study {self.study.name}", file=sys.stderr)
        remove_experiment_copies(self.project, {c.experiment_name for c in self.study.cells})

    def _check_pool(self) -> None:
        """A study on a pool: cells on other machines log to one MLflow server, run the driver's commit (the
        study file and params as committed), and go to the pool's `cell` deployment, their heartbeats watched
        (`crash_silent_cells`)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=self.project, capture_output=True, text=True).stdout
        source = os.path.relpath(self.study.source.resolve(), self.project.resolve())
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", source], cwd=self.project, capture_output=True).returncode == 0
        if changed.strip() or not tracked:
            what = changed.strip().replace("\n", "; ") if changed.strip() else f"{source} is not committed"
            raise ConfigError(f"--pool {self.pool}: the workers run commit {self.commit}, and this checkout differs ({what}): commit first")
        with get_client(sync_client=True) as client:
            found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[CELL_FLOW])),
                                            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[self.pool])))
            if not found:
                raise ConfigError(f"--pool {self.pool}: no deployment of flow {CELL_FLOW} on work pool {self.pool!r} "
                                  f"(make deploy POOL={self.pool}, from prefect.yaml)")
            self.deployment_id = found[0].id
            self.heartbeat_s = cell_heartbeat_s()
            automation = crash_silent_cells(client, self.heartbeat_s)
        print(f"every cell's flow run sends a heartbeat every {self.heartbeat_s} s: one whose worker dies is marked Crashed by "
              f"the Prefect automation {automation!r}, and the cell runs again", file=sys.stderr)

    # -- the cells ------------------------------------------------------------------------------

    def marker(self, cell: str) -> str:
        """The value of CELL_MARKER in the processes of this project's `cell` of this study."""
        return f"{self.project.resolve()}::{self.study.name}/{cell}"

    def log_file(self, cell: Cell) -> Path:
        return self.state_dir / "logs" / f"{cell.name}.log"

    def run_cell(self, cell: Cell) -> bool:
        """One cell as one DVC experiment in a temporary copy of the workspace, here or on a worker of the
        pool; True if it finished."""
        ok = False
        try:
            ok = self._on_pool(cell) if self.pool else self._here(cell)
        finally:
            self._give_back_gpus(cell)
            self.progress.finished(cell, ok, self.log_file(cell))
        return ok

    def _here(self, cell: Cell) -> bool:
        free_experiment_name(self.project, cell.experiment_name)
        env = cell_env(self.marker(cell.name))
        if cell.name in self.cell_gpus:  # its own GPUs: every process of the cell sees those only
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.cell_gpus[cell.name])

        def progress(line: str) -> None:
            if match := STAGE_LINE.search(line):
                self.progress.stage(cell, match.group(1))
            elif match := STEP_LINE.match(line):
                self.progress.step(cell, match.group(1))

        try:
            return run_experiment(self.project, cell, self.copy_paths, env, self.log_file(cell), progress,
                                  lambda proc: self.running.__setitem__(cell.name, proc)) == 0
        finally:
            self.running.pop(cell.name, None)

    def _on_pool(self, cell: Cell) -> bool:
        """The cell as a flow run of the pool's `cell` deployment, followed until it ends: its stage from the
        MLflow server its stages log to, its end from Prefect; the flow run's logs become the cell's log here.
        A flow run that ends Crashed (its worker or machine died: `crash_silent_cells`) leaves its cell's MLflow
        runs KILLED, and the cell runs once more on whichever worker is free; one that Failed (a stage's error)
        is not run again."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            for attempt in range(1, CELL_ATTEMPTS + 1):
                state = self._pool_attempt(client, cell, attempt)
                if not state.is_crashed():
                    break
                tracking.end_unfinished(self.client, cell.params.tracking.experiment, cell.params_hash)
                if attempt < CELL_ATTEMPTS:
                    self.progress.rerun(cell, state.message or "crashed")
        return state.is_completed()

    def _pool_attempt(self, client, cell: Cell, attempt: int):
        """One flow run of the cell, followed until it ends; its final state."""
        params = {"study_file": os.path.relpath(self.study.source.resolve(), self.project.resolve()), "cell": cell.name,
                  "commit": self.commit, "tracking": self.uri}
        since = int(time.time() * 1000)
        run = client.create_flow_run_from_deployment(
            self.deployment_id, parameters=params, tags=[self._tag(), HEARTBEAT_TAG.format(self.heartbeat_s)],
            name=f"{self.study.name}-{cell.name}" + (f"-attempt-{attempt}" if attempt > 1 else ""),
            # the interval the automation of this tag expects: Prefect's setting here, whatever the worker's
            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(self.heartbeat_s)}},
        )
        self.flow_runs[cell.name] = str(run.id)
        try:
            while not (state := client.read_flow_run(run.id).state) or not state.is_final():
                if stage := tracking.latest_stage(self.client, cell.params.tracking.experiment, cell.params_hash, since):
                    self.progress.stage(cell, stage)
                time.sleep(POLL_S)
        finally:
            self.flow_runs.pop(cell.name, None)
        self._write_log(client, run.id, cell, state, append=attempt > 1)
        return state

    def _write_log(self, client, flow_run_id, cell: Cell, state, append: bool = False) -> None:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, sort=LogSort.TIMESTAMP_ASC)
        log = self.log_file(cell)
        log.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"flow run {flow_run_id} of deployment {self.deployment_id} on pool {self.pool}: {state.type.value}",
                 *(entry.message for entry in logs)]
        if state.is_crashed():  # last, where a failed cell's tail shows it: why nothing of the cell's own says more
            lines.append(f"flow run {flow_run_id}: {state.type.value}: {state.message}")
        with open(log, "a" if append else "w") as out:
            out.write("\n".join(lines) + "\n")

    def _tag(self) -> str:
        """The Prefect tag of this study's cell flow runs (the project's study, as the cell marker names it)."""
        return f"grpolab-study:{self.study.name}@{self.commit[:12]}"

    def _cancel_flow_runs(self, ids: list[str] | None = None) -> None:
        """Cancel this study's cell flow runs that have not ended (`ids`, or every one with its tag: a killed
        driver's); a worker stops a running one's processes."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
        from prefect.client.schemas.objects import StateType
        from prefect.states import Cancelled, Cancelling

        live = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
        with get_client(sync_client=True) as client:
            if ids is None:
                found = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[self._tag()]),
                                                                            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live))))
            else:
                found = [client.read_flow_run(i) for i in ids]
            for run in found:
                if run.state and not run.state.is_final():
                    started = run.state.type in (StateType.RUNNING, StateType.PENDING)
                    client.set_flow_run_state(run.id, Cancelling() if started else Cancelled(), force=True)
                    if ids is None:
                        print(f"cancelled flow run {run.name} ({run.id}), left by an interrupted run of study {self.study.name}", file=sys.stderr)

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
        if self.flow_runs:
            self._cancel_flow_runs(list(self.flow_runs.values()))
        if self.study_run_id:
            self.client.set_terminated(self.study_run_id, "FINISHED" if ok else "FAILED")
        if self._lock:
            self._lock.close()
            self._lock = None


def _cell_record(cell: Cell) -> dict:
    return {"variant": cell.variant, "seed": cell.seed, "params_hash": cell.params_hash, "overrides": list(cell.overrides)}
