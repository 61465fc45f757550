"""Prefect flow: the pipeline's stages as tasks, each one `dvc repro --single-item STAGE`.

DVC stays the one source of truth for what is up to date: a task whose stage's deps and params
did not change is a no-op, and whatever ran is recorded in dvc.lock exactly as a plain
`dvc repro` would record it. The flow runs the stages in order itself, so each task reproduces its
stage alone (`--single-item`): without it every task would first rerun `inputs`, which DVC always
runs. Prefect adds retries, observability, the summary artifact and
deployments (`overrides` takes `-S`-style strings, so a deployment run can change params).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from grpolab import config
from grpolab.procs import bound, die_with_parent
from grpolab.stages import STAGES
from grpolab.stages.summary import summary_markdown
from grpolab.tracking import check_store
from grpolab.workspace import pipeline_lock


def _env() -> dict[str, str]:
    # `dvc` runs `grpolab stage …` through a shell: put this interpreter's scripts first on PATH. The stages
    # die with dvc, and dvc with this flow (`preexec_fn`): a killed flow leaves nothing running.
    bin_dir = str(Path(sys.executable).parent)
    return bound({**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})


@task(task_run_name="{stage}", retries=1, retry_delay_seconds=5)
def run_stage(stage: str) -> None:
    # A retry helps with transient failures (a locked MLflow sqlite store, a killed worker);
    # DVC's run cache means a retried stage redoes only what did not finish.
    print(f"==> stage {stage}")
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], check=True, env=_env(), preexec_fn=die_with_parent)


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
            run_stage(stage)
        return publish_summary(params)


if __name__ == "__main__":
    print(pipeline(sys.argv[1:]))
