"""A stage's output relayed to a log (the pipeline's task sends it to the flow run's logs in Prefect): line by
line, each at a level that says what it is, its progress bars at a sane rate; and still to the terminal as the
stage wrote it (bars updating in place).

A progress bar (tqdm) rewrites its line after a `\\r` up to ten times a second: of those updates the log keeps
a bar's first, one per PROGRESS_STEP % more done or per PROGRESS_EVERY_S, and its last (the line tqdm ends with
`\\n`), so a 10-hour run logs a few hundred progress lines, not hundreds of thousands.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TextIO

from grpolab.runtime.procs import die_with_parent

PROGRESS_STEP = 10  # percent done between two logged updates of a bar
PROGRESS_EVERY_S = 30.0  # and at most this long between two, however slow the bar
BAR = re.compile(r"^(?:(.*?):)?\s*(\d+)%\|")  # tqdm's "train:  45%|███▌      | 90/200 [...": its desc, its percent
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # what torch's excepthook puts before each line in a process group
ERROR_LINE = re.compile(r"^(grpolab: error:|ERROR\b|Traceback \(most recent call last\):|The above exception was|"
                        r"During handling of the above exception)")
TRACEBACK = "Traceback (most recent call last):"
WARNING_LINE = re.compile(r"^(WARNING\b|warning:)|\b[A-Z]\w*Warning: ")  # DVC's, logging's; Python's warnings


class LineLevels:
    """The level of each line of one stream, in order: `grpolab: error:`, DVC's `ERROR:` and a traceback (its
    first line to its exception's) are ERROR; a warning (Python's, with the source line under it, DVC's,
    logging's) WARNING; the rest INFO."""

    def __init__(self) -> None:
        self.in_traceback = False
        self.in_warning = False

    def level(self, line: str) -> int:
        text = RANK_PREFIX.sub("", line)
        indented = text[:1].isspace()
        if self.in_traceback:  # its frames are indented; the exception's own line is not, and ends it
            self.in_traceback = indented
            return logging.ERROR
        if self.in_warning and indented:
            return logging.WARNING
        self.in_warning = False
        if ERROR_LINE.match(text):
            self.in_traceback = text.startswith(TRACEBACK)
            return logging.ERROR
        if WARNING_LINE.search(text):
            self.in_warning = True
            return logging.WARNING
        return logging.INFO


class ProgressThrottle:
    """Which updates of the progress bars (by their desc) the log keeps (see the module's doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.logged: dict[str, tuple[int | None, float]] = {}  # a bar's desc: its last logged percent, and when

    def due(self, update: str) -> bool:
        bar, percent = _bar(update)
        now = self.clock()
        if bar in self.logged:
            last_percent, last_time = self.logged[bar]
            more_done = percent is not None and last_percent is not None and percent >= last_percent + PROGRESS_STEP
            if not more_done and now - last_time < PROGRESS_EVERY_S:
                return False
        self.logged[bar] = (percent, now)
        return True

    def finished(self, line: str) -> None:
        """The bar of `line` ended (a bar of the same desc later is a new one)."""
        self.logged.pop(_bar(line)[0], None)


def _bar(text: str) -> tuple[str, int | None]:
    match = BAR.match(text)
    return (match.group(1) or "", int(match.group(2))) if match else ("", None)


class StreamRelay:
    """One output stream of a stage: echoed as it comes, and its lines logged (`feed` it bytes as they arrive)."""

    def __init__(self, echo: TextIO, logger: logging.Logger | logging.LoggerAdapter, clock: Callable[[], float] = time.monotonic):
        self.echo, self.logger = echo, logger
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.levels = LineLevels()
        self.progress = ProgressThrottle(clock)

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final)
        self.echo.write(text)
        self.echo.flush()
        self.pending += text
        while match := re.search(r"\r\n|\r|\n", self.pending):
            if match.group() == "\r" and match.end() == len(self.pending) and not final:
                break  # a "\r\n" may be cut between two reads: wait for what follows
            segment, self.pending = self.pending[: match.start()].rstrip(), self.pending[match.end() :]
            if match.group() == "\r":
                if segment.strip() and self.progress.due(segment):  # tqdm clears a line with spaces: nothing to log
                    self.logger.info(segment.strip())
            elif segment.strip():
                self._line(segment)
        if final and self.pending.strip():
            self._line(self.pending.rstrip())
            self.pending = ""

    def _line(self, line: str) -> None:
        if BAR.match(line):  # a bar's last state, which tqdm ends with "\n"
            self.progress.finished(line)
            self.logger.info(line.strip())
        else:
            self.logger.log(self.levels.level(line), line)


def run_relayed(cmd: list[str], env: dict[str, str], logger: logging.Logger | logging.LoggerAdapter) -> int:
    """Run `cmd` to its end, its stdout and stderr each echoed to ours and logged to `logger`; its exit status.
    It dies with this process, and is killed if this one is interrupted meanwhile (a cancelled flow run)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    relays = {proc.stdout.fileno(): StreamRelay(sys.stdout, logger), proc.stderr.fileno(): StreamRelay(sys.stderr, logger)}
    try:
        with selectors.DefaultSelector() as selector:
            for fd in relays:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                for key, _ in selector.select():
                    data = os.read(key.fd, 1 << 16)
                    relays[key.fd].feed(data, final=not data)
                    if not data:
                        selector.unregister(key.fd)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
