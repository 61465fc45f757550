"""A study's bookkeeping in the MLflow store: its own run `study-<name>` (the study file and its cells, so that
`grpolab report NAME` rebuilds the report from the store alone), which cells' pipelines are complete, and the
runs a killed cell left RUNNING. The stages' own logging is `grpolab.tracking`'s."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from grpolab import tracking
from grpolab.config import Params


def _find_experiment(client: MlflowClient, name: str) -> str | None:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def complete_pipelines(client: MlflowClient, experiment: str) -> dict[str, Any]:
    """The experiment's parent runs that the summary stage completed, newest first, by params hash."""
    experiment_id = _find_experiment(client, experiment)
    if experiment_id is None:
        return {}
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tracking.STAGE_TAG}` = 'pipeline' and tags.`{tracking.COMPLETE_TAG}` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=50000,
    )
    found: dict[str, Any] = {}
    for run in runs:
        found.setdefault(run.data.tags[tracking.PARAMS_HASH_TAG], run)
    return found


def pipeline_runs(client: MlflowClient, experiment: str, key: str) -> list:
    """Every run (parent and stages) of one params hash in an experiment, newest first."""
    experiment_id = _find_experiment(client, experiment)
    if experiment_id is None:
        return []
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{tracking.PARAMS_HASH_TAG}` = '{key}'", order_by=["attributes.start_time DESC"],
        max_results=50000,
    )


def latest_stage(client: MlflowClient, experiment: str, key: str, since_ms: int) -> str | None:
    """The stage of the newest stage run of this params hash started at `since_ms` or later (a cell that
    runs elsewhere, seen from the store it logs to), or None."""
    experiment_id = _find_experiment(client, experiment)
    if experiment_id is None:
        return None
    runs = client.search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{tracking.PARAMS_HASH_TAG}` = '{key}' and tags.`{tracking.STAGE_TAG}` != 'pipeline' and attributes.start_time >= {since_ms}",
    )
    return runs[0].data.tags.get(tracking.STAGE_TAG) if runs else None


def end_unfinished(client: MlflowClient, experiment: str, key: str) -> None:
    """Runs of this params hash left RUNNING by a killed process: KILLED."""
    for run in pipeline_runs(client, experiment, key):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")


STUDY_RECORD = ("study.yaml", "cells.json")  # artifacts of a study's own run: its file and its cells


def study_run_id(client: MlflowClient, experiment: str, study: str) -> str | None:
    """The run `study-<name>` that holds a study's definition and report."""
    experiment_id = _find_experiment(client, experiment)
    if experiment_id is None:
        return None
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{tracking.STAGE_TAG}` = 'study' and tags.`{tracking.STUDY_TAG}` = '{study}'", max_results=1
    )
    return found[0].info.run_id if found else None


def record_study(client: MlflowClient, params: Params, source: Path, cells: list[dict], jobs: int) -> str:
    """Create (or find) the study's own run and store its file and cells there, so that its report can
    be rebuilt from the store alone (`grpolab report NAME`)."""
    study = params.tracking.study
    run_id = study_run_id(client, params.tracking.experiment, study)
    if run_id is None:
        experiment_id = tracking.open_experiment(client, params)
        run_id = client.create_run(experiment_id, run_name=f"study-{study}", tags={tracking.STAGE_TAG: "study", tracking.STUDY_TAG: study}).info.run_id
    client.log_text(run_id, Path(source).read_text(), STUDY_RECORD[0])
    client.log_dict(run_id, {"cells": cells}, STUDY_RECORD[1])
    client.set_tag(run_id, "grpolab.jobs", str(jobs))
    return run_id


def read_study(client: MlflowClient, experiment: str, study: str) -> tuple[str, str, list[dict]] | None:
    """(the study run's id, the study file's text, its cells) as the study's last run stored them."""
    run_id = study_run_id(client, experiment, study)
    if run_id is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        text, cells = (Path(client.download_artifacts(run_id, name, tmp)).read_text() for name in STUDY_RECORD)
    return run_id, text, json.loads(cells)["cells"]
