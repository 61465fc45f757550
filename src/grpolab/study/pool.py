"""A study's cells on a Prefect work pool (`grpolab study FILE --pool NAME`): every cell is a flow run of the
`cell` deployment (prefect.yaml, flows/study.py), which runs the same `dvc exp run --temp` in the clone of the
project of whichever worker picks it up (`run_pool_cell`, the worker's side). The driver (`PoolRunner`) learns a
cell's stage from the MLflow server every cell logs to, and its end from Prefect; the workers' clones share one DVC
cache, so a seed's shared stages run once in all. A killed driver's cells still queued or running are cancelled by
the next run of the study.

A worker that dies mid-cell takes the cell's processes with it (`dying_with_worker`); the cell's flow run, silent,
is marked Crashed by a Prefect automation on its heartbeats (`crash_silent_cells`), and the driver marks the cell's
unfinished MLflow runs KILLED and runs the cell once more, on whichever worker is free (`PoolRunner.run`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient

from grpolab.errors import ConfigError, StudyError
from grpolab.runtime.procs import dvc_env
from grpolab.study import records
from grpolab.study.experiments import (
    CELL_MARKER, STAGE_LINE, StudyPlace, free_experiment_name, git_head, remove_experiment_copies, run_experiment, untracked_paths,
)
from grpolab.study.progress import Progress
from grpolab.study.spec import Cell, Study, load_study
from grpolab.tracking import tracking_uri

CELL_FLOW = "grpolab-study-cell"  # the flow of prefect.yaml's `cell` deployment (flows/study.py)
PROJECT_ENV = "GRPOLAB_PROJECT"  # a worker's clone of the project, where it is not the deployment's folder
POLL_S = 2.0  # how often a pool cell's flow run and MLflow record are read
CELL_ATTEMPTS = 2  # a pool cell whose flow run crashed (its worker died) runs once more; a second crash fails it
WORKER_WATCH_S = 1.0  # how often a pool cell checks that its worker is alive
HEARTBEAT_GRACE_S = 15  # a cell's flow run is silent after 2 heartbeat intervals and this: one heartbeat may be lost or late
HEARTBEAT_TAG = "grpolab-heartbeat:{}s"  # on every pool cell's flow run: the automation of its heartbeat interval watches it


def check_pool_options(study: Study, pool: str, gpus_per_cell: int | None) -> None:
    """A ConfigError naming the flag where the cells of `study` could not run on work pool `pool`: checked before
    any work, nothing opened (the server, the deployment and the commit are checked by `PoolRunner.check`)."""
    if gpus_per_cell is not None:
        raise ConfigError(f"--gpus-per-cell {gpus_per_cell} with --pool {pool}: on a pool, a cell has the GPUs of the worker "
                          "that runs it (start one worker per GPU set, each with its CUDA_VISIBLE_DEVICES)")
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError(f"--pool {pool}: PREFECT_API_URL is not set; it names the Prefect server whose workers "
                          "poll the pool (http://HOST:4200/api)")
    uri = tracking_uri(study.cells[0].params)
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"--pool {pool}: the tracking store is {uri}, a file on this machine, which cells on other "
                          "machines cannot write: set tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow server")


class PoolRunner:
    """The cells of one study run as flow runs of the pool's `cell` deployment, followed from here (see the module)."""

    def __init__(self, place: StudyPlace, pool: str):
        self.place, self.pool = place, pool
        self.uri = tracking_uri(place.study.cells[0].params)  # the MLflow server every cell logs to
        self.commit: str | None = None  # the driver's, which every worker runs
        self.deployment_id = None  # of the `cell` deployment on the pool
        self.heartbeat_s: int | None = None  # of the cells' flow runs (`cell_heartbeat_s`)
        self.flow_runs: dict[str, str] = {}  # cell name -> its flow run's id, while it runs

    def check(self, commit: str) -> None:
        """A study on a pool: cells on other machines log to one MLflow server, run the driver's commit (the
        study file and params as committed), and go to the pool's `cell` deployment, their heartbeats watched
        (`crash_silent_cells`)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

        self.commit = commit
        project = self.place.project
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project, capture_output=True, text=True).stdout
        source = self.place.relative_source()
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", source], cwd=project, capture_output=True).returncode == 0
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

    def stop_leftovers(self) -> None:
        """A killed driver's cells go on as flow runs: cancelled."""
        self._cancel_flow_runs()

    def recorded_experiments(self) -> None:
        """None: a cell's DVC experiment is in the clone of the worker that ran it, MLflow's record alone says."""
        return None

    def prepare(self, todo: list[Cell]) -> None:
        """Nothing: each worker copies the user's untracked files of its cell in its own clone (`run_pool_cell`)."""

    def stop(self) -> None:
        """The study was interrupted: its cells' flow runs are cancelled (a worker stops a running one's processes)."""
        if self.flow_runs:
            self._cancel_flow_runs(list(self.flow_runs.values()))

    def run(self, cell: Cell, progress: Progress, store: MlflowClient) -> bool:
        """The cell as a flow run of the pool's `cell` deployment, followed until it ends: its stage from the
        MLflow server its stages log to, its end from Prefect; the flow run's logs become the cell's log here.
        A flow run that ends Crashed (its worker or machine died: `crash_silent_cells`) leaves its cell's MLflow
        runs KILLED, and the cell runs once more on whichever worker is free; one that Failed (a stage's error)
        is not run again."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as prefect:
            for attempt in range(1, CELL_ATTEMPTS + 1):
                state = self._attempt(prefect, store, progress, cell, attempt)
                if not state.is_crashed():
                    break
                records.end_unfinished(store, cell.params.tracking.experiment, cell.params_hash)
                if attempt < CELL_ATTEMPTS:
                    progress.rerun(cell, state.message or "crashed")
        return state.is_completed()

    def _attempt(self, prefect, store: MlflowClient, progress: Progress, cell: Cell, attempt: int):
        """One flow run of the cell, followed until it ends; its final state."""
        params = {"study_file": self.place.relative_source(), "cell": cell.name,
                  "commit": self.commit, "tracking": self.uri}
        since = int(time.time() * 1000)
        run = prefect.create_flow_run_from_deployment(
            self.deployment_id, parameters=params, tags=[self._tag(), HEARTBEAT_TAG.format(self.heartbeat_s)],
            name=f"{self.place.study.name}-{cell.name}" + (f"-attempt-{attempt}" if attempt > 1 else ""),
            # the interval the automation of this tag expects: Prefect's setting here, whatever the worker's
            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(self.heartbeat_s)}},
        )
        self.flow_runs[cell.name] = str(run.id)
        try:
            while not (state := prefect.read_flow_run(run.id).state) or not state.is_final():
                if stage := records.latest_stage(store, cell.params.tracking.experiment, cell.params_hash, since):
                    progress.stage(cell, stage)
                time.sleep(POLL_S)
        finally:
            self.flow_runs.pop(cell.name, None)
        self._write_log(prefect, run.id, cell, state, append=attempt > 1)
        return state

    def _write_log(self, client, flow_run_id, cell: Cell, state, append: bool = False) -> None:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, sort=LogSort.TIMESTAMP_ASC)
        log = self.place.log_file(cell)
        log.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"flow run {flow_run_id} of deployment {self.deployment_id} on pool {self.pool}: {state.type.value}",
                 *(entry.message for entry in logs)]
        if state.is_crashed():  # last, where a failed cell's tail shows it: why nothing of the cell's own says more
            lines.append(f"flow run {flow_run_id}: {state.type.value}: {state.message}")
        with open(log, "a" if append else "w") as out:
            out.write("\n".join(lines) + "\n")

    def _tag(self) -> str:
        """The Prefect tag of this study's cell flow runs (the project's study, as the cell marker names it)."""
        return f"grpolab-study:{self.place.study.name}@{self.commit[:12]}"

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
                        print(f"cancelled flow run {run.name} ({run.id}), left by an interrupted run of study {self.place.study.name}", file=sys.stderr)


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


# -- the worker's side ---------------------------------------------------------------------------

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

    def say(text: str) -> None:
        print(text, flush=True)  # looked up when called: Prefect's log_prints replaces print while the flow runs

    project = Path(os.environ.get(PROJECT_ENV) or Path.cwd()).resolve()
    head = git_head(project)
    if head != commit:
        raise ConfigError(f"{project}: at commit {head}, the study's driver at {commit}: a worker runs the driver's commit "
                          f"(git fetch && git checkout {commit} in this clone)")
    study = load_study(project / study_file, project / "params.yaml")
    cell = next((c for c in study.cells if c.name == cell_name), None)
    if cell is None:
        raise ConfigError(f"{study_file}: no cell {cell_name!r} at commit {commit}")
    say(f"cell {cell.name} of study {study.name} in {project} on {os.uname().nodename}")
    place = StudyPlace(project, study)
    # the driver's store, also where the clone's params name none
    env = dvc_env({CELL_MARKER: place.marker(cell.name), "MLFLOW_TRACKING_URI": tracking})
    log = place.log_file(cell)

    def stage_lines(line: str) -> None:  # what the driver's log of the cell shows (Prefect's logs of the flow run)
        if STAGE_LINE.search(line):
            say(f"{cell.name}: {line.strip()}")

    with dying_with_worker() as running:
        remove_experiment_copies(project, {cell.experiment_name})  # an earlier attempt's, killed here with its worker
        free_experiment_name(project, cell.experiment_name)
        status = run_experiment(project, cell, untracked_paths(project, [cell]), env, log, stage_lines,
                                lambda proc: running.__setitem__("experiment", proc))
    if status != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
        raise StudyError(f"cell {cell.name} failed in {project} (exit status {status}; log: {log}):\n{tail}")
    say(f"cell {cell.name} done in {project}")
