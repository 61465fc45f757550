"""`grpolab clean [--all]`: delete what the pipeline wrote, naming each path, and nothing else.

The pipeline's outputs are read from dvc.yaml (every stage's outs, metrics and plots), so a user's
own files beside them (say `data/my_train.parquet`) are never touched. The MLflow store, DVC's cache
and the reports hold results of past runs: only `--all` deletes them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ruamel.yaml import YAML

from grpolab.paths import CHECKPOINT_DIR, DEFAULT_ARTIFACTS, DEFAULT_DB

PIPELINE_FILE = Path("dvc.yaml")
RESULTS = [Path(DEFAULT_DB), Path(DEFAULT_ARTIFACTS), Path("mlartifacts"), Path(".dvc/cache"), Path(".dvc/tmp"),
           Path("reports"), Path(".grpolab")]


def pipeline_outputs(pipeline: Path = PIPELINE_FILE) -> list[Path]:
    """Every path a stage of `pipeline` writes, in the file's order."""
    stages = (YAML(typ="safe").load(pipeline.read_text()) or {}).get("stages", {})
    paths: list[Path] = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.append(Path(next(iter(entry)) if isinstance(entry, dict) else entry))
    return list(dict.fromkeys(paths))


def clean(everything: bool = False) -> list[Path]:
    """Delete the pipeline's outputs, its lock file and the training checkpoints (with `everything`,
    also the MLflow store, DVC's cache and the reports); returns the paths deleted."""
    if not PIPELINE_FILE.is_file():
        raise FileNotFoundError(f"{PIPELINE_FILE}: not found (run grpolab from the project root)")
    targets = [*pipeline_outputs(), Path("dvc.lock"), CHECKPOINT_DIR, *(RESULTS if everything else [])]
    deleted = []
    for path in targets:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        deleted.append(path)
    return deleted
