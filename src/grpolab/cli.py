"""`grpolab run | stage NAME | study FILE | report STUDY | ui | analyze-credit RUN_ID... | clean | params-reference`."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from grpolab import config
from grpolab.errors import ConfigError, StudyError, TrackingError
from grpolab.runtime.failures import USER_ERRORS, report

FLOWS = Path("flows")
# Quiet, offline-friendly defaults; the user's settings win (MLFLOW_DISABLE_TELEMETRY=false turns MLflow's
# usage telemetry back on, as PREFECT_SERVER_ANALYTICS_ENABLED=true does Prefect's).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file drowns the output


def _temporary_prefect_server() -> None:
    """With no PREFECT_API_URL, Prefect starts a temporary server on first use, which a killed grpolab would leave
    serving: started here, and stopped when this process ends, however it ends."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    from grpolab.runtime.procs import stop_with_me

    if PREFECT_API_URL.value():
        return
    server = SubprocessASGIServer()  # the instance Prefect's client uses
    server.start()
    stop_with_me(server.server_process.pid)
    # Prefect stops it at exit (after draining the logs it sends it) and logs that after grpolab's last line
    # (the pipeline's summary, a stage's error), which is to stay the last: that one record is dropped.
    logging.getLogger("prefect").addFilter(lambda record: not record.getMessage().startswith("Stopping temporary server"))


def _check_prefect_api() -> None:
    """PREFECT_API_URL's server, where one is set, answers and takes this process's credentials
    (PREFECT_API_AUTH_STRING): checked before any work."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        _check_prefect_server(PREFECT_API_URL.value())


def _check_prefect_server(url: str) -> None:
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_AUTH_STRING

    try:
        with get_client(sync_client=True) as client:
            client.read_work_pools(limit=1)
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code != 401:
            raise
        if PREFECT_API_AUTH_STRING.value():
            raise ConfigError(f"PREFECT_API_AUTH_STRING: the Prefect server {url} refused it (401 Unauthorized: a wrong user or "
                              "password; it must equal the server's PREFECT_SERVER_API_AUTH_STRING); nothing was run") from None
        raise ConfigError(f"the Prefect server {url} asks for credentials (401 Unauthorized): set PREFECT_API_AUTH_STRING "
                          "(user:password, the server's PREFECT_SERVER_API_AUTH_STRING); nothing was run") from None
    except (httpx.HTTPError, OSError) as exc:
        raise ConfigError(f"PREFECT_API_URL: the Prefect server {url} is unavailable ({exc}); nothing was run") from None


def _load_flow(name: str):
    """The flow `name` of the project's flows/<name>.py (the file a deployment would point at), with the
    Prefect API it reports to up."""
    path = FLOWS / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run grpolab from the project root)")
    _temporary_prefect_server()
    spec = importlib.util.spec_from_file_location(f"grpolab_flows_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def cmd_run(args) -> None:
    from grpolab.tracking import check_store
    from grpolab.workspace import pipeline_lock

    _check_prefect_api()
    with pipeline_lock():
        check_store(config.overridden(args.set)[1])  # before params.yaml changes (the flow checks again, for deployments)
        config.apply_overrides(args.set)  # validated (and written) before Prefect starts
        pipeline = _load_flow("pipeline")
        print(pipeline())  # a stage's user error raises StageError: main prints it, the last line


def cmd_study(args) -> None:
    from grpolab.runtime.fsutil import output_folder
    from grpolab.study.report import REPORTS_DIR
    from grpolab.study.run import check_study_options
    from grpolab.study.spec import load_study
    from grpolab.tracking import check_store

    study = load_study(args.file)  # every cell validated before Prefect starts
    check_study_options(study, args.jobs, args.gpus_per_cell, args.pool)  # and the jobs and GPUs they would need
    check_store(study.cells[0].params)
    _check_prefect_api()
    name = study.name
    output_folder(REPORTS_DIR / name, "the report folder")  # refused now, not after the cells ran
    _load_flow("study")(args.file, args.jobs, args.gpus_per_cell, args.pool)
    print(f"report: reports/{name}/report.md, and the MLflow run study-{name} in experiment {name}")


def cmd_report(args) -> None:
    from mlflow import MlflowClient

    from grpolab.study.report import REPORTS_DIR, report_from_cells, report_from_store
    from grpolab.study.spec import read_spec
    from grpolab.tracking import tracking_uri

    is_file = args.study.endswith((".yaml", ".yml"))
    out = Path(args.out) if args.out else None
    if args.cells:  # a shipped report's cells.csv: no store needed, the study file gives variants and baseline
        if not is_file:
            raise ConfigError(f"--cells {args.cells}: name the study's file (studies/NAME.yaml), not {args.study!r}")
        spec = read_spec(Path(args.study))
        print(report_from_cells(Path(args.cells), spec, out or REPORTS_DIR / spec.name, args.note))
        return
    name = read_spec(Path(args.study)).name if is_file else args.study
    print(report_from_store(MlflowClient(tracking_uri(config.load())), name, out))


def cmd_stage(args) -> None:
    from grpolab.runtime import ranks
    from grpolab.stages import run_stage, stage_function
    from grpolab.workspace import pipeline_lock

    stage_function(args.name)  # its imports done before the banner, which says the stage's work begins
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file load/save bars drown the stage's own progress
    with pipeline_lock():
        # rank 0 alone writes: the other workers of a launched job apply the same overrides in memory
        params = config.apply_overrides(args.set) if ranks.is_rank0() else config.overridden(args.set)[1]
        print(f"==> grpolab stage {args.name}", flush=True)
        summary = run_stage(args.name, params)
    if "torch.distributed" in sys.modules:  # a stage that joined a process group leaves it before the process ends
        from grpolab.runtime import distributed

        distributed.close()
    print("    " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


def cmd_ui(args) -> None:
    from grpolab.runtime.procs import run_group
    from grpolab.ui import ui_command

    cmd, url = ui_command(config.load(), args.port)
    # MLflow's job runner (seven processes polling the store, for its GenAI features) serves nothing grpolab logs
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow UI at {url} (experiments open on their runs table with grpolab's columns)", flush=True)
    try:
        raise SystemExit(run_group(cmd))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def cmd_analyze_credit(args) -> None:
    from grpolab.analyze_credit import analyze_credit

    print(analyze_credit(config.load(), args.run_ids, Path(args.out)), end="")
    print(f"plots and summary: {args.out}/ (and the MLflow run `analyze-credit`)")


def cmd_clean(args) -> None:
    from grpolab.clean import clean

    deleted = clean(args.all)
    for path in deleted:
        print(f"deleted {path}")
    if not deleted:
        print("nothing to delete")
    if not args.all:
        print("kept: the MLflow store, DVC's cache and reports/ (`grpolab clean --all` deletes them too)")


def cmd_params_reference(args) -> None:
    print(config.params_reference(), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpolab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    override = {
        "action": "append",
        "default": [],
        "metavar": "SECTION.KEY=VALUE",
        "help": "set a param in params.yaml before running (same syntax as `dvc exp run -S`)",
    }
    run = sub.add_parser("run", help="run the whole pipeline through the Prefect flow")
    run.add_argument("-S", "--set", **override)
    run.set_defaults(func=cmd_run)
    stage = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name", help="the stage, as dvc.yaml names it (inputs, prepare, sft, mia, train, evaluate, summary)")
    stage.add_argument("-S", "--set", **override)
    stage.set_defaults(func=cmd_stage)
    study = sub.add_parser("study", help="run a study file's variants x seeds (each a DVC experiment) and report")
    study.add_argument("file", help="the study file, e.g. studies/credit.yaml")
    study.add_argument("--jobs", type=int, help="cells run at once (default 1); with --pool, cells sent to the pool at once (default every cell)")
    study.add_argument("--gpus-per-cell", type=int, help="GPUs each running cell is given, from CUDA_VISIBLE_DEVICES or every "
                       "visible GPU (default 1 where GPUs are visible; a cell with more train.num_processes gets that many)")
    study.add_argument("--pool", help="a Prefect work pool: each cell a flow run of its `cell` deployment, on whichever worker is free "
                       "(the project at this commit on every worker, one MLflow server, a shared DVC cache)")
    study.set_defaults(func=cmd_study)
    report = sub.add_parser("report", help="rebuild a study's report from the MLflow store (or its text from a report's cells.csv)")
    report.add_argument("study", help="the study's name or its file")
    report.add_argument("--out", help="folder for the report (default reports/<study>/)")
    report.add_argument("--cells", help="rebuild the text from this cells.csv of an earlier report instead of the store "
                        "(study: its file); writes report.md, summary.csv, paired.csv")
    report.add_argument("--note", default="", help="with --cells: a sentence for the report about the run (e.g. its param names)")
    report.set_defaults(func=cmd_report)
    ui = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    ui.set_defaults(func=cmd_ui)
    credit = sub.add_parser("analyze-credit", help="compare train runs' credit assignment (plots + summary, to MLflow)")
    credit.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="MLflow ids of train runs")
    credit.add_argument("--out", default="reports/credit", help="folder for the PNGs and summary.md")
    credit.set_defaults(func=cmd_analyze_credit)
    cleaner = sub.add_parser("clean", help="delete the pipeline's outputs (named in dvc.yaml), dvc.lock and checkpoints")
    cleaner.add_argument("--all", action="store_true", help="also the MLflow store, DVC's cache and reports/")
    cleaner.set_defaults(func=cmd_clean)
    ref = sub.add_parser("params-reference", help="print the params reference as a markdown table")
    ref.set_defaults(func=cmd_params_reference)
    return parser


def cli_reference() -> str:
    """Markdown of every command with its help and usage: the docs' CLI reference is generated from this."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = []
    for name, command in sub.choices.items():
        command.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        out += [f"## `grpolab {name}`", "", helps[name][0].upper() + helps[name][1:] + ".", "", "```", command.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    from grpolab.runtime.procs import bind_to_parent

    bind_to_parent()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:  # one line, no traceback, in a training process too (and to its runner's file)
        report(str(exc))
        raise SystemExit(2) from None
    except (StudyError, TrackingError) as exc:
        print(f"grpolab: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except subprocess.CalledProcessError as exc:
        print(f"grpolab: error: {' '.join(map(str, exc.cmd))} exited with {exc.returncode}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
