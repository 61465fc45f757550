"""One cell of a study as one DVC experiment: `dvc exp run --temp` of the whole pipeline in a temporary copy of
the project's workspace, named `<study>-<variant>-s<seed>`, the same wherever it runs (here, for `LocalRunner`;
in a worker's clone, for `run_pool_cell`). Also where a study keeps its state in the project (`StudyPlace`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from grpolab.config import flatten
from grpolab.paths import USER_FILES
from grpolab.runtime.procs import die_with_parent, dvc_env
from grpolab.study.spec import Cell, Study

STATE_DIR = Path(".grpolab/studies")  # per study: the lock and one log per cell
STAGE_LINE = re.compile(r"[Ss]tage '([\w-]+)'")  # dvc's "Running stage 'x'" and "Stage 'x' is cached"
STEP_LINE = re.compile(r"^\w+:\s+\d+%\|.*\| (\d+/\d+) ")  # a stage's progress bar: "train:  45%|███▌ | 90/200 [..."
CELL_MARKER = "GRPOLAB_STUDY_CELL"  # in the environment of every process of a cell: `<project>::<study>/<cell>`
USER_PATH_KEYS = tuple(key for keys in USER_FILES.values() for key in keys)  # params that name the user's files


@dataclass(frozen=True)
class StudyPlace:
    """A study in a project: where its lock and cell logs are, and how its cells' processes are marked."""

    project: Path
    study: Study

    @property
    def state_dir(self) -> Path:
        return self.project / STATE_DIR / self.study.name

    def marker(self, cell: str) -> str:
        """The value of CELL_MARKER in the processes of this project's `cell` of this study."""
        return f"{self.project.resolve()}::{self.study.name}/{cell}"

    def log_file(self, cell: Cell) -> Path:
        return self.state_dir / "logs" / f"{cell.name}.log"

    def relative_source(self) -> str:
        """The study file, relative to the project (as a worker's clone has it)."""
        return os.path.relpath(self.study.source.resolve(), self.project.resolve())


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def untracked_paths(project: Path, cells: list[Cell]) -> list[str]:
    """The user's relative files and checkpoints (the params of USER_FILES) that git does not track: a DVC
    experiment's copy of the workspace holds tracked files only, so they are copied in (`dvc exp run -C`)."""
    named = {v for cell in cells for key in USER_PATH_KEYS for v in _as_list(flatten(cell.params)[key])}
    relative = sorted(p for p in named if not Path(p).is_absolute() and (project / p).exists())
    return [p for p in relative if not subprocess.run(["git", "ls-files", "--", p], cwd=project, capture_output=True, text=True).stdout]


def _as_list(value) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def git_head(project: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=project, capture_output=True, text=True)
    return proc.stdout.strip() or None


def experiment_names(project: Path, *args: str) -> list[str]:
    """Names of the project's DVC experiments (of the current commit; `--all-commits`: of any)."""
    proc = subprocess.run(_dvc("exp", "ls", "--name-only", *args), cwd=project, capture_output=True, text=True, env=dvc_env())
    return proc.stdout.split()


def free_experiment_name(project: Path, name: str) -> None:
    """A cell about to run whose DVC experiment exists on this commit (its MLflow record is not complete):
    the old experiment goes, DVC would refuse the name."""
    if name in experiment_names(project):
        subprocess.run(_dvc("--wait-for-lock", "exp", "remove", name), cwd=project, check=True, capture_output=True, env=dvc_env())


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
