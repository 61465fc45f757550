"""Prefect flow: the pipeline's stages as tasks, each one `dvc repro --single-item STAGE`.

DVC stays the one source of truth for what is up to date: a task whose stage's deps and params
did not change is a no-op, and whatever ran is recorded in dvc.lock exactly as a plain
`dvc repro` would record it. The flow runs the stages in order itself, so each task reproduces its
stage alone (`--single-item`): without it every task would first rerun `inputs`, which DVC always
runs. Prefect adds retries, observability, the summary artifact and
deployments (`overrides` takes `-S`-style strings, so a deployment run can change params).

What a stage prints goes to the flow run's logs (`grpolab.runtime.stage_log`), and still to the terminal of whoever
runs the flow (a worker's own output, for a deployment). A stage that stops with a user's error (bad params or
data, a reward file that raises) fails its task with that error (StageError): the flow run's state message,
and the last line `grpolab run` prints. Such a failure is not retried; any other is, once.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.logging.handlers import APILogHandler
from prefect.states import Failed

from grpolab import config
from grpolab.runtime import failures
from grpolab.errors import StageError
from grpolab.runtime.procs import dvc_env
from grpolab.runtime.stage_log import run_relayed
from grpolab.stages import STAGES
from grpolab.stages.summary import summary_markdown
from grpolab.tracking import check_store
from grpolab.workspace import pipeline_lock


def _env(error_file: Path) -> dict[str, str]:
    # Unbuffered: the stages' lines reach the flow run's logs as they are printed, not in blocks. A stage's own
    # error goes to `error_file` (`failures`).
    return dvc_env({"PYTHONUNBUFFERED": "1", failures.ERROR_FILE_ENV: str(error_file)})


def _stage_logger(stage: str) -> logging.Logger:
    """A logger to the flow run's logs only (Prefect's API handler, not its console handler): the stage's
    output reaches the terminal as the stage wrote it, not a second time as Prefect's log lines."""
    logger = logging.getLogger("grpolab.stage")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger.getChild(stage)


def _retry_unless_users_error(task, task_run, state) -> bool:
    """Retry a stage whose failure a retry may fix (a killed process, a locked MLflow sqlite store), not one
    that stopped with a user's error (StageError): that fails the same way again."""
    return not isinstance(state.result(raise_on_failure=False), StageError)


@task(task_run_name="{stage}", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_users_error)
def run_stage(stage: str) -> None:
    # DVC's run cache means a retried stage redoes only what did not finish.
    print(f"==> stage {stage}")
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    with tempfile.TemporaryDirectory(prefix="grpolab-stage-") as folder:
        error_file = Path(folder) / "error"
        status = run_relayed(cmd, _env(error_file), _stage_logger(stage))
        if status != 0:
            if message := failures.read(error_file):  # the stage's own `grpolab: error: …`
                raise StageError(message)
            raise subprocess.CalledProcessError(status, cmd)


@task
def publish_summary(params: config.Params) -> str:
    summary = summary_markdown(params)
    create_markdown_artifact(summary, key="eval-summary", description="Eval metrics of this pipeline run")
    return summary


@flow(name="grpolab-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None) -> str:
    with pipeline_lock():  # `grpolab run` holds it already; a deployment's run takes it here
        check_store(config.overridden(overrides or [])[1])  # before any stage, and before params.yaml changes
        params = config.apply_overrides(overrides or [])
        for stage in STAGES:
            try:
                run_stage(stage)
            except StageError as exc:
                # the flow run's state message is the stage's error in its own words (raised on, it would be
                # "Flow run encountered an exception: StageError: …", and `grpolab run` would print Prefect's
                # traceback of the flow before it); `data`: the flow's caller gets the StageError raised
                return Failed(message=str(exc), data=exc)
        return publish_summary(params)


if __name__ == "__main__":
    print(pipeline(sys.argv[1:]))
