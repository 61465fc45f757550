"""One pipeline at a time per workspace (the project folder, or one DVC experiment's copy of it).

`grpolab run`, `grpolab stage` and the Prefect flow take the workspace's lock before they touch
params.yaml or an output, so a second one fails at once instead of interleaving params edits. The
processes a holder starts (`dvc repro` -> `grpolab stage`, training workers) find the lock theirs
through the environment. Whoever takes the lock first removes the temporary files a killed stage left.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from grpolab.clean import PIPELINE_FILE, pipeline_outputs
from grpolab.runtime.fsutil import is_temporary, take_lock
from grpolab.paths import CHECKPOINT_DIR
from grpolab.runtime.ranks import is_rank0

LOCK_FILE = Path(".grpolab/pipeline.lock")
HOLDER_ENV = "GRPOLAB_PIPELINE_LOCK"  # set, to the lock's path, in the holder and everything it starts
STAGING = CHECKPOINT_DIR / ".staging"  # a checkpoint being written


@contextmanager
def pipeline_lock() -> Iterator[None]:
    path = LOCK_FILE.resolve()
    if os.environ.get(HOLDER_ENV) == str(path) or not is_rank0():
        yield  # started by the holder, or a training worker of an external launcher, whose rank 0 holds it
        return
    lock = take_lock(path, f"another grpolab pipeline is running in {Path.cwd()}: wait for it to end, or stop it")
    os.environ[HOLDER_ENV] = str(path)
    try:
        remove_temporaries()
        yield
    finally:
        os.environ.pop(HOLDER_ENV, None)
        lock.close()


def temporaries() -> list[Path]:
    """What a killed stage can leave: atomic writes not renamed into place, a checkpoint being saved."""
    outputs = pipeline_outputs() if PIPELINE_FILE.is_file() else []
    folders = {p.parent for p in outputs} | {p for p in outputs if p.is_dir()} | {CHECKPOINT_DIR}
    folders |= {p for p in (CHECKPOINT_DIR / "logs").glob("*") if p.is_dir()}
    found = [child for folder in sorted(folders) if folder.is_dir() for child in folder.iterdir() if is_temporary(child)]
    return found + ([STAGING] if STAGING.exists() else [])


def remove_temporaries() -> None:
    for path in temporaries():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        print(f"removed {path}, left by a killed run", file=sys.stderr, flush=True)
