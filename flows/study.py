"""Prefect flows: a study's cells as tasks (each one `dvc exp run --temp` of the whole pipeline, here or,
with a work pool, as a flow run of `cell` on one of its workers), then its report as a Prefect markdown
artifact; and `cell`, one cell on the worker that picks it up. Thin: `grpolab.study` runs the cells and builds
the report; `grpolab study FILE` runs `study`, and so can a deployment (parameters: the study file, jobs,
GPUs per cell, pool).
"""

from __future__ import annotations

import sys

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from grpolab.errors import StudyError
from grpolab.study.report import report_from_store
from grpolab.study.pool import CELL_FLOW, run_pool_cell
from grpolab.study.run import MAX_JOBS, StudyRun, check_study_options
from grpolab.study.spec import Cell, load_study


@task(task_run_name="{cell.name}", cache_policy=NO_CACHE)
def run_cell(cell: Cell, run: StudyRun) -> bool:
    return run.run_cell(cell)


@task(cache_policy=NO_CACHE)
def report(run: StudyRun) -> str:
    text = report_from_store(run.client, run.study.name)  # from the store, as `grpolab report` rebuilds it
    create_markdown_artifact(text, key=f"study-{run.study.name.lower().replace('_', '-')}", description=f"Report of study {run.study.name}")
    return text


@flow(name="grpolab-study", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_JOBS))
def study(study_file: str, jobs: int | None = None, gpus_per_cell: int | None = None, pool: str | None = None) -> str:
    spec = load_study(study_file)
    run = StudyRun(spec, check_study_options(spec, jobs, gpus_per_cell, pool)).open()
    ok = False
    try:
        wait(run.schedule(lambda cell: run_cell.submit(cell, run)))
        text = report(run)
        ok = not run.progress.failed
    finally:
        run.close(ok)
    if run.progress.failed:
        names = ", ".join(c.name for c in run.progress.failed)
        raise StudyError(f"study {run.study.name}: {len(run.progress.failed)} cell(s) failed ({names}); report: reports/{run.study.name}/report.md")
    return text


@flow(name=CELL_FLOW, log_prints=True)
def cell(study_file: str, cell: str, commit: str, tracking: str) -> None:
    """One cell of a study sent to a work pool (`grpolab study FILE --pool NAME` creates these flow runs)."""
    run_pool_cell(study_file, cell, commit, tracking)


if __name__ == "__main__":
    print(study(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None, int(sys.argv[3]) if len(sys.argv) > 3 else None))
