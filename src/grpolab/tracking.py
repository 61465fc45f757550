"""MLflow: one run tree per pipeline, one child run per stage execution.

The parent run is keyed by a hash of the params (tracking settings aside), so the stages of one
configuration land under one parent whichever driver ran them: `dvc repro` (each stage its own
process) or the Prefect flow (which calls `dvc repro STAGE`). The parent holds the flattened
params, the datasets and the headline metrics, which is what MLflow's compare view lines up;
each child holds its stage's per-step metrics and artifacts.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import posixpath
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import requests
import urllib3
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from grpolab.config import Params, flatten, params_hash
from grpolab.errors import ConfigError, TrackingError
from grpolab.runtime.outbox import Outbox, chain, root_cause
from grpolab.paths import DEFAULT_ARTIFACTS, DEFAULT_DB

PARAMS_HASH_TAG = "grpolab.params_hash"
STAGE_TAG = "grpolab.stage"
STUDY_TAG = "grpolab.study"
VARIANT_TAG = "grpolab.variant"
SEED_TAG = "grpolab.seed"
CHANGED_TAG = "grpolab.changed_params"  # the knobs that differ from the defaults
COMPLETE_TAG = "grpolab.complete"  # set by the summary stage: every stage's record is in the parent
REUSED_TAG = "grpolab.reused_stages"  # stages whose outputs DVC restored from its cache: no child run here
ROLLOUT_BACKEND_TAG = "grpolab.rollout_backend"  # what generated the rollouts: train.rollout.backend
GPUS_TAG = "grpolab.gpus"  # the GPUs a stage's processes were given (a study gives each cell its own)
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
MAX_BATCH_METRICS = 1000  # MLflow's limit on metrics per log_batch
MAX_NAME_PARAMS = 60  # characters of changed params in a derived run name

# The runs-table view of MLflow's UI that grpolab puts on every experiment it logs to (an MLflow
# "shared view", opened by `…/#/experiments/<id>/runs?viewStateShareKey=grpolab`; `grpolab ui` opens
# experiments on it): the variant, the seed and the headline metrics of every stage as columns.
RUNS_VIEW = "grpolab"
RUNS_VIEW_COLUMNS = [
    "tags.`grpolab.variant`", "tags.`grpolab.seed`", "metrics.`trained/success_rate`", "metrics.`trained/sampled/success_rate`",
    "metrics.`base/success_rate`", "metrics.`mean/train/reward_mean`", "metrics.`trained/mia/loss/auc`",
    "metrics.`trained/mia/min_k_plus_plus/auc`", "metrics.`mean/credit/answer_share`", "metrics.`mean/train/step_time`",
    "tags.`grpolab.rollout_backend`", "metrics.`mean/sampling/sampling_logp_difference/mean`",
    "metrics.`mean/sampling/importance_sampling_ratio/bounded_share`",
]


DVC_EXPERIMENT_COPIES = (".dvc", "tmp", "exps")  # where `dvc exp run --temp/--queue` copies the workspace


def project_root(cwd: Path | None = None) -> Path:
    """The project's folder: the working directory, or, when a DVC experiment runs in a temporary
    copy of the workspace (`<project>/.dvc/tmp/exps/...`), the project it is a copy of."""
    parts = (cwd or Path.cwd()).resolve().parts
    n = len(DVC_EXPERIMENT_COPIES)
    for i in range(len(parts) - n + 1):
        if parts[i : i + n] == DVC_EXPERIMENT_COPIES:
            return Path(*parts[:i])
    return Path(*parts)


def tracking_uri(params: Params) -> str:
    # Absolute: MLflow caches stores by URI, and a relative one would follow whichever folder came first.
    return params.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DEFAULT_DB}"


STORE_TIMEOUT_S = 10


def store_key(params: Params) -> str:
    """Where the tracking store is set: the param, the environment variable, or neither."""
    return "tracking.uri" if params.tracking.uri else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default store")


def store_name(params: Params) -> str:
    """`<where it is set>: the MLflow tracking store <uri>`, how messages about the store name it."""
    return f"{store_key(params)}: the MLflow tracking store {tracking_uri(params)}"


def check_store(params: Params) -> None:
    """The tracking store answers, or a ConfigError naming it: checked before any stage runs, rather
    than a stage failing after MLflow's retries (minutes) against a server that is down."""

    uri = tracking_uri(params)
    check_uri_has_no_password(uri, store_key(params))
    try:
        if uri.startswith(("http://", "https://")):
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=STORE_TIMEOUT_S) as response:
                if response.status != 200:
                    raise OSError(f"/health answered {response.status}")
        elif uri.startswith("sqlite:///"):
            folder = Path(uri.removeprefix("sqlite:///")).parent
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise OSError(f"{folder} is not a writable folder")
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        if exc.get_http_status_code() in (401, 403):
            raise ConfigError(credentials_refused(uri, exc.get_http_status_code())) from None
        raise ConfigError(f"{store_name(params)} is unavailable ({exc}); nothing was run") from None
    except OSError as exc:
        raise ConfigError(f"{store_name(params)} is unavailable ({exc}); nothing was run") from None


def credentials_refused(uri: str, status: int) -> str:
    """What to say when an MLflow server behind authentication refused this process (never the password itself)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 403:
        return f"MLFLOW_TRACKING_USERNAME: the MLflow server {uri} does not let user {user!r} read experiments (403 Forbidden); nothing was run"
    if not (user and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
        return (f"the MLflow server {uri} asks for a user name and password (401 Unauthorized): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD in the environment; nothing was run")
    return (f"MLFLOW_TRACKING_PASSWORD: the MLflow server {uri} refused user {user!r} with this password (401 Unauthorized: "
            "a wrong user name or password); nothing was run")


def check_uri_has_no_password(uri: str, key: str) -> None:
    """A tracking URI names the server only: a password in it would be logged (params, flow-run parameters)."""
    from urllib.parse import urlsplit

    if uri.startswith(("http://", "https://")) and urlsplit(uri).password:
        raise ConfigError(f"{key}: the URI holds a password (user:password@host), which would be logged with the params: "
                          "give it to MLflow as MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")


AWAY_STATUS = {429, 500, 502, 503, 504}  # a server (or the proxy before it) that is busy, restarting or cut off from its database
# a connection refused, reset, timed out, or cut in the middle of an answer (a server killed while it answered)
AWAY_ERRORS = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
               requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError, http.client.HTTPException)


def store_away(exc: BaseException) -> bool:
    """Whether `exc` says that the tracking store did not answer (down, restarting, overloaded, unreachable) rather
    than that it refused what was sent: what the outbox sends again. MLflow wraps the cause, so the chain is read."""
    for e in chain(exc):
        if isinstance(e, AWAY_ERRORS):
            return True
        if isinstance(e, RestException) and e.get_http_status_code() in AWAY_STATUS:
            return True
        if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code in AWAY_STATUS:
            return True
    return False


def changed_params(params: Params) -> dict[str, Any]:
    """The knobs that differ from the defaults (seed and tracking aside): what makes this configuration."""
    defaults = flatten(Params())
    return {
        k: v for k, v in flatten(params).items() if k != "seed" and not k.startswith("tracking.") and v != defaults.get(k)
    }


def run_name(params: Params) -> str:
    """`tracking.run_name`, else `<variant> · seed <seed>`; without a variant, the changed params name it."""
    if params.tracking.run_name:
        return params.tracking.run_name
    variant = params.tracking.variant
    if variant is None:
        changed = ", ".join(f"{k}={v}" for k, v in changed_params(params).items()) or "defaults"
        variant = changed if len(changed) <= MAX_NAME_PARAMS else changed[: MAX_NAME_PARAMS - 1] + "…"
    return f"{variant} · seed {params.seed}"


def run_tags(params: Params) -> dict[str, str]:
    """Tags of every run of the pipeline: the user's, the seed, the rollout backend, and the study and variant when set."""
    t = params.tracking
    named = {STUDY_TAG: t.study, VARIANT_TAG: t.variant}
    return {**t.tags, SEED_TAG: str(params.seed), ROLLOUT_BACKEND_TAG: params.train.rollout.backend,
            **{k: v for k, v in named.items() if v is not None}}


def given_gpus() -> str:
    """The GPUs this process may use (`visible_gpus`), as the tag GPUS_TAG records them: `0,1`, or `cpu` where it sees none."""
    from grpolab.runtime.device import visible_gpus  # torch: imported already by every stage that logs

    return ",".join(visible_gpus()[0]) or "cpu"


def _description(params: Params) -> str:
    t = params.tracking
    lines = [f"Study `{t.study}`, variant `{t.variant}`, seed {params.seed}." if t.study else f"Seed {params.seed}."]
    changed = changed_params(params)
    lines += ["", "Params that differ from the defaults:", ""] if changed else ["", "Default params."]
    lines += [f"- `{k}`: `{v}`" for k, v in changed.items()]
    return "\n".join(lines)


class Tracker:
    """Logs to one stage's child run and, where the compare view needs it, to the parent.

    What it logs goes out through an outbox, in order, beside the stage's work: a tracking server that goes away
    for a while costs the stage nothing, and what waited is sent when it answers again (each send idempotent, so
    nothing is logged twice). `settle` waits for it; every read settles first, so it sees what was logged.
    """

    def __init__(self, client: MlflowClient, run_id: str, parent_id: str, outbox: Outbox, patience_s: float):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id
        self.outbox = outbox
        self.patience_s = patience_s  # tracking.outage_timeout_s

    def settle(self) -> None:
        """Wait until the store holds everything logged so far; a TrackingError naming the store once it has not
        answered for tracking.outage_timeout_s (a store that answers is waited for however long sending takes)."""
        if self.outbox.settle(self.patience_s):
            return
        cause = root_cause(self.outbox.last_error)
        raise TrackingError(
            f"{self.outbox.where} has not answered for {self.outbox.down_for or 0:.0f} s ({type(cause).__name__}: {cause}); "
            f"the stage waited tracking.outage_timeout_s ({self.patience_s:g} s) for it at its end, and {self.outbox.unsent} "
            f"records of MLflow run {self.run_id} were not sent")

    def _send(self, what: str, send, *args) -> None:
        self.outbox.put(lambda: send(*args), what)

    def metrics(self, values: dict[str, float], step: int | None = None, parent: bool = False) -> None:
        now = int(time.time() * 1000)  # kept with the batch: sent again, it is the same rows, which MLflow does not add twice
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items()]
        for run_id in dict.fromkeys((self.run_id, self.parent_id) if parent else (self.run_id,)):
            self._send("metrics" if step is None else f"metrics of step {step}", self._log, run_id, batch)

    def curve(self, frame: pd.DataFrame) -> None:
        """Every column of a per-step table (a `step` column) as metric histories of this run, each step's metrics
        in one batch, as `metrics` logs them: the run holds a step whole or not at all (a resumed training relies on it)."""
        now = int(time.time() * 1000)
        batch: list[Metric] = []
        for step, row in zip(frame["step"], frame.drop(columns="step").to_dict("records")):
            metrics = [Metric(k, float(v), now, int(step)) for k, v in row.items() if pd.notna(v)]
            if batch and len(batch) + len(metrics) > MAX_BATCH_METRICS:
                self._send(f"metrics up to step {batch[-1].step}", self._log, self.run_id, batch)
                batch = []
            batch += metrics
        if batch:
            self._send(f"metrics up to step {batch[-1].step}", self._log, self.run_id, batch)

    def _log(self, run_id: str, batch: list[Metric]) -> None:
        for i in range(0, len(batch), MAX_BATCH_METRICS):
            self.client.log_batch(run_id, metrics=batch[i : i + MAX_BATCH_METRICS])

    def dataset(self, df: pd.DataFrame, name: str, path: str | Path, context: str) -> None:
        """Record a dataset as an `mlflow.data` input of the stage run and of the pipeline run."""
        table = df.assign(extra_info=df["extra_info"].map(lambda d: json.dumps(d, sort_keys=True, default=str))) if "extra_info" in df else df
        with warnings.catch_warnings():  # a local path matches two equivalent MLflow source types
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=str(Path(path).resolve()), name=name)
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        for run_id in (self.run_id, self.parent_id):  # MLflow finds a dataset input sent again and keeps the first
            self._send(f"dataset {name}", self.client.log_inputs, run_id, [entity])

    def artifacts(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a folder into the run (sent again, its files replace themselves): it must stay as it is until sent."""
        local_path = Path(local_path)
        upload = self.client.log_artifacts if local_path.is_dir() else self.client.log_artifact
        self._send(str(local_path), upload, self.run_id, str(local_path), artifact_path)

    def table(self, df: pd.DataFrame, artifact_file: str) -> None:
        """A table (MLflow's table artifact), logged once: a run that holds `artifact_file` already keeps it as it is."""
        self._send(artifact_file, self._table, df.copy(), artifact_file)

    def _table(self, df: pd.DataFrame, artifact_file: str) -> None:
        folder, name = posixpath.split(artifact_file)
        # MLflow appends to a table the run holds: a send that failed after its upload would hold its rows twice
        if name not in {Path(f.path).name for f in self.client.list_artifacts(self.run_id, folder or None)}:
            self.client.log_table(self.run_id, df, artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        self._send(artifact_file, self.client.log_text, self.run_id, text, artifact_file)

    def figure(self, figure, artifact_file: str) -> None:
        """Log a matplotlib figure, then close it (pyplot keeps every figure alive until it is closed)."""
        self._send(artifact_file, self._figure, figure, artifact_file)

    def _figure(self, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, artifact_file)
        plt.close(figure)

    def tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._send(f"tag {key}", self.client.set_tag, self.run_id, key, value)

    def end(self, runs: list[str], status: str) -> None:
        """Mark `runs` ended with `status` once everything before went through, and wait for it (`settle`)."""
        for run_id in runs:
            self._send(f"the run's status {status}", self.client.set_terminated, run_id, status)
        self.settle()

    def logged_metrics(self) -> dict[str, float]:
        """This run's metrics as logged so far (latest value of each)."""
        self.settle()
        return self.client.get_run(self.run_id).data.metrics

    def has_history(self, key: str) -> bool:
        self.settle()
        return bool(self.client.get_metric_history(self.run_id, key))

    def last_step(self, key: str) -> int:
        """The last step of metric `key` this run holds (0 if none)."""
        self.settle()
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def artifact_names(self, folder: str | None = None) -> set[str]:
        """Names of this run's artifacts (files and folders) at the top or in `folder`."""
        self.settle()
        return {Path(f.path).name for f in self.client.list_artifacts(self.run_id, folder)}

    def child_stages(self) -> set[str]:
        """The stages with a child run under this run's parent: the ones that ran in this run tree."""
        self.settle()
        experiment_id = self.client.get_run(self.parent_id).info.experiment_id
        children = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_id}'", max_results=1000
        )
        return {run.data.tags.get(STAGE_TAG) for run in children}


def _runs_view() -> str:
    now = int(time.time() * 1000)
    state = {"selectedColumns": RUNS_VIEW_COLUMNS}
    return json.dumps({"name": "grpolab: variants and headline metrics", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def open_experiment(client: MlflowClient, params: Params) -> str:
    """The id of the experiment `tracking.experiment`, created if new; it shows grpolab's runs view (RUNS_VIEW)."""
    name = params.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    view = f"mlflow.sharedViewState.{RUNS_VIEW}"
    if experiment:
        if view not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, view, _runs_view())
        return experiment.experiment_id
    # MLflow puts a new experiment's artifacts under the *working directory*'s mlruns/; beside the
    # default store they belong in the project's, also when a DVC experiment's copy creates it.
    local = params.tracking.uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
    location = (project_root() / DEFAULT_ARTIFACTS / hashlib.sha256(name.encode()).hexdigest()[:16]).as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={view: _runs_view()})
    except MlflowException:  # created meanwhile by a process beside this one (cells of a study)
        return client.get_experiment_by_name(name).experiment_id


def pipeline_run_id(client: MlflowClient, params: Params) -> str:
    """The parent run of this params set: found by its hash tag, created (with all params) if new."""
    experiment_id = open_experiment(client, params)
    key = params_hash(params)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARAMS_HASH_TAG}` = '{key}' and tags.`{STAGE_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    changed = "; ".join(f"{k}={v}" for k, v in changed_params(params).items()) or "none"
    tags = {
        **run_tags(params), PARAMS_HASH_TAG: key, STAGE_TAG: "pipeline", CHANGED_TAG: changed[:MAX_PARAM_LENGTH],
        NOTE_TAG: _description(params),
    }
    run = client.create_run(experiment_id, run_name=run_name(params), tags=tags)
    flat = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _continuable(client: MlflowClient, run_id: str, parent_id: str) -> bool:
    """Whether a stage can go on logging into run `run_id` (a resumed training's): it exists, is not
    deleted, and belongs to this params set's parent run (after, say, an eval.* change it does not)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        print(f"warning: the MLflow run {run_id} of the checkpoint is gone from {client.tracking_uri}; "
              "the resumed training logs into a new run", file=sys.stderr, flush=True)
        return False
    return run.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_id


@contextmanager
def stage_run(params: Params, stage: str, run_id: str | None = None, own_run: bool = True) -> Iterator[Tracker]:
    """A child run for one stage execution; FAILED if the stage raises, FINISHED otherwise, once the store holds
    everything the stage logged (see `Tracker`). A store that went away and is not back within
    tracking.outage_timeout_s at the end: a TrackingError naming it (the run stays RUNNING there).

    `run_id` continues an earlier child run (a training resumed from its checkpoint); without
    `own_run` the stage logs into the pipeline's parent run itself (the summary stage).
    """
    client = MlflowClient(tracking_uri(params))
    run_id, parent_id = _open_runs(client, params, stage, run_id, own_run)
    runs = list(dict.fromkeys((run_id, parent_id)))
    tracker = Tracker(client, run_id, parent_id, Outbox(store_name(params), store_away), params.tracking.outage_timeout_s)
    try:
        yield tracker
    except TrackingError:  # the store is away: nothing more reaches it
        raise
    except BaseException:
        try:
            tracker.end(runs, "FAILED")
        except (TrackingError, MlflowException) as exc:  # the stage's own error is the one to see
            print(f"warning: the MLflow run {run_id} could not be marked FAILED: {exc}", file=sys.stderr, flush=True)
        raise
    else:
        tracker.end(runs, "FINISHED")
    finally:
        tracker.outbox.close()


def _open_runs(client: MlflowClient, params: Params, stage: str, run_id: str | None, own_run: bool) -> tuple[str, str]:
    """(the stage's run, the pipeline's parent run), both RUNNING: the same run without `own_run`."""
    parent_id = pipeline_run_id(client, params)
    experiment_id = client.get_run(parent_id).info.experiment_id
    if not own_run:
        run_id = parent_id
    elif run_id is not None and not _continuable(client, run_id, parent_id):
        run_id = None
    if run_id is None:
        tags = {**run_tags(params), MLFLOW_PARENT_RUN_ID: parent_id, STAGE_TAG: stage, PARAMS_HASH_TAG: params_hash(params)}
        run_id = client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id
    gpus = given_gpus()
    for run in dict.fromkeys((run_id, parent_id)):
        client.update_run(run, status="RUNNING")
        client.set_tag(run, GPUS_TAG, gpus)
    return run_id, parent_id
