"""MLflow: one run tree per pipeline, one child run per stage execution.

The parent run is keyed by a hash of the params (tracking settings aside), so the stages of one
configuration land under one parent whichever driver ran them: `dvc repro` (each stage its own
process) or the Prefect flow (which calls `dvc repro STAGE`). The parent holds the flattened
params, the datasets and the headline metrics, which is what MLflow's compare view lines up;
each child holds its stage's per-step metrics and artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from grpolab.config import Params, flatten

DEFAULT_DB = "mlflow.db"  # in the project root
DEFAULT_ARTIFACTS = "mlruns"  # beside it
PARAMS_HASH_TAG = "grpolab.params_hash"
STAGE_TAG = "grpolab.stage"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


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


def params_hash(params: Params) -> str:
    flat = {k: v for k, v in flatten(params).items() if not k.startswith("tracking.")}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Tracker:
    """Logs to one stage's child run and, where the compare view needs it, to the parent."""

    def __init__(self, client: MlflowClient, run_id: str, parent_id: str):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id

    def metrics(self, values: dict[str, float], step: int | None = None, parent: bool = False) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items()]
        for run_id in (self.run_id, self.parent_id) if parent else (self.run_id,):
            self.client.log_batch(run_id, metrics=batch)

    def dataset(self, df: pd.DataFrame, name: str, path: str | Path, context: str) -> None:
        """Record a dataset as an `mlflow.data` input of the stage run and of the pipeline run."""
        table = df.assign(extra_info=df["extra_info"].map(lambda d: json.dumps(d, sort_keys=True, default=str))) if "extra_info" in df else df
        with warnings.catch_warnings():  # a local path matches two equivalent MLflow source types
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=str(Path(path).resolve()), name=name)
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        for run_id in (self.run_id, self.parent_id):
            self.client.log_inputs(run_id, datasets=[entity])

    def artifacts(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        local_path = Path(local_path)
        if local_path.is_dir():
            self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def table(self, df: pd.DataFrame, artifact_file: str) -> None:
        self.client.log_table(self.run_id, df, artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)


def _experiment_id(client: MlflowClient, params: Params) -> str:
    name = params.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    # MLflow puts a new experiment's artifacts under the *working directory*'s mlruns/; beside the
    # default store they belong in the project's, also when a DVC experiment's copy creates it.
    local = params.tracking.uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
    location = (project_root() / DEFAULT_ARTIFACTS / hashlib.sha256(name.encode()).hexdigest()[:16]).as_uri() if local else None
    return client.create_experiment(name, artifact_location=location)


def pipeline_run_id(client: MlflowClient, params: Params) -> str:
    """The parent run of this params set: found by its hash tag, created (with all params) if new."""
    experiment_id = _experiment_id(client, params)
    key = params_hash(params)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARAMS_HASH_TAG}` = '{key}' and tags.`{STAGE_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=f"pipeline-{key}", tags={**params.tracking.tags, PARAMS_HASH_TAG: key, STAGE_TAG: "pipeline"}
    )
    flat = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextmanager
def stage_run(params: Params, stage: str, run_id: str | None = None) -> Iterator[Tracker]:
    """A child run for one stage execution; FAILED if the stage raises, FINISHED otherwise.

    `run_id` continues an earlier child run (a training resumed from its checkpoint).
    """
    client = MlflowClient(tracking_uri(params))
    parent_id = pipeline_run_id(client, params)
    experiment_id = client.get_run(parent_id).info.experiment_id
    if run_id is None:
        run_id = client.create_run(
            experiment_id,
            run_name=stage,
            tags={**params.tracking.tags, MLFLOW_PARENT_RUN_ID: parent_id, STAGE_TAG: stage, PARAMS_HASH_TAG: params_hash(params)},
        ).info.run_id
    client.update_run(run_id, status="RUNNING")
    client.update_run(parent_id, status="RUNNING")
    status = "FAILED"
    try:
        yield Tracker(client, run_id, parent_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
        client.set_terminated(parent_id, status)
