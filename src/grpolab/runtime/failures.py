"""How a grpolab process reports the user's error it stops with (bad params, data, a reward file that raises),
and how whoever ran it reads it back. The error is one `grpolab: error: …` line, no traceback; and since what
runs a stage passes on only an exit status (`dvc repro` exits 255 whatever the stage's was, a launcher its
worker's), its message also goes to the file its runner named in ERROR_FILE_ENV: the pipeline's task raises
it as the stage's error, grpolab's own launcher as the training processes' one."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from grpolab.runtime import ranks
from grpolab.errors import ConfigError, DataError, RewardError, StageError

# A user's errors: a retry fails the same way, so the pipeline does not retry them; exit status 2.
USER_ERRORS = (ConfigError, DataError, RewardError, StageError, FileNotFoundError, FileExistsError)
ERROR_FILE_ENV = "GRPOLAB_ERROR_FILE"  # where the process given it writes the message of the user's error it stops with
# Set by `distributed.launch_local` for its workers: it prints the error itself, once, whichever rank had it, and
# stops every worker as soon as one has written its error file (see `report`).
LAUNCHER_REPORTS_ENV = "GRPOLAB_LAUNCHER_REPORTS"
LAUNCHER_WAIT_S = 60  # how long a worker waits for its launcher to stop it (it exits on its own after)


def report(message: str) -> None:
    """Report the user's error this process stops with: its file (if a runner named one), and the line.

    In a launched training process, rank 0 prints the line; the other ranks print it only where no launcher
    collects it (torchrun's error file, TORCHELASTIC_ERROR_FILE, which its final summary shows): a config or
    data error is the same on every rank, and N copies of it drown it. Under grpolab's own launcher no worker
    prints: the launcher does, once. Its workers then wait to be stopped rather than exit: a worker's exit
    fails the other ranks' collectives at once, and each would print a traceback of that before the launcher
    could stop it."""
    line = f"grpolab: error: {message}"
    _write(os.environ.get(ERROR_FILE_ENV), message)
    _end_progress_bars()
    if ranks.launched():
        torch_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        _write(torch_file, json.dumps({"message": line, "timestamp": int(time.time())}))  # the format torchrun reads
        if os.environ.get(LAUNCHER_REPORTS_ENV) == "1":
            time.sleep(LAUNCHER_WAIT_S)
            return
        if not ranks.is_rank0() and torch_file:
            return
    print(line, file=sys.stderr, flush=True)


def _end_progress_bars() -> None:
    """Close the progress bars the error left open: each ends its line, so the error's line is one of its own
    (in the terminal, and in the flow run's logs, which read a bar's line up to its end)."""
    if "tqdm" in sys.modules:  # no bar without it (and no import of it for this)
        from tqdm import tqdm

        for bar in list(tqdm._instances):
            bar.close()


def read(path: str | Path) -> str | None:
    """The message a process wrote to its error file `path`, or None where it wrote none (it succeeded, or
    failed with something else: a crash, a signal)."""
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def _write(path: str | None, text: str) -> None:
    if path:  # whole or not at all: grpolab's launcher acts as soon as the file is there
        partial = Path(f"{path}.partial")
        partial.write_text(text + "\n")
        os.replace(partial, path)
