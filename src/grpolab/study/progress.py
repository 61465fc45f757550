"""What every cell of a study run is doing: the scheduler's gate on a seed's shared stages, the live line in the
terminal, the estimate of the time left, and the waits of the scheduler."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from grpolab.study.spec import Cell, Study

SHARED_STAGES = ("inputs", "prepare", "sft", "mia")  # identical for every variant of a seed (the study checks nothing else)


@dataclass
class CellState:
    cell: Cell
    first_of_seed: bool  # builds its seed's shared stages
    status: str = "pending"  # pending | running | done | failed
    stage: str | None = None
    step: str = ""  # the running stage's progress, "90/200"
    started: float | None = None
    seconds: float | None = None
    shared_seconds: float | None = None  # when it had passed the shared stages


class Progress:
    """What every cell of this run is doing, the live line, and the waits of the scheduler."""

    def __init__(self, study: Study, todo: list[Cell], done_before: int, jobs: int, stream=None):
        self.study, self.jobs, self.done_before = study, jobs, done_before
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.changed = threading.Condition()
        seeds_started: set[int] = {c.seed for c in study.cells if c not in todo}  # shared stages already cached
        self.cells: dict[str, CellState] = {}
        for cell in todo:
            self.cells[cell.name] = CellState(cell, first_of_seed=cell.seed not in seeds_started)
            seeds_started.add(cell.seed)

    def ready(self, cell: Cell) -> bool:
        """A cell may start when its seed's shared stages are done (or it is the one that builds them)."""
        state = self.cells[cell.name]
        if state.first_of_seed:
            return True
        first = next((s for s in self.cells.values() if s.first_of_seed and s.cell.seed == cell.seed), None)
        return first is None or first.status in ("done", "failed") or (first.stage is not None and first.stage not in SHARED_STAGES)

    def started(self, cell: Cell) -> None:
        self._update(cell, status="running", started=time.monotonic())

    def stage(self, cell: Cell, stage: str) -> None:
        state = self.cells[cell.name]
        if state.stage != stage:
            past_shared = state.shared_seconds is None and stage not in SHARED_STAGES
            shared = time.monotonic() - state.started if past_shared else state.shared_seconds
            self._update(cell, stage=stage, step="", shared_seconds=shared)

    def step(self, cell: Cell, step: str) -> None:
        self.cells[cell.name].step = step  # shown at the next redraw

    def tick(self) -> None:
        """Redraw the live line in a terminal (elapsed times and steps move on between events)."""
        if self.tty:
            self._draw()

    def finished(self, cell: Cell, ok: bool, log: Path) -> None:
        state = self.cells[cell.name]
        seconds = time.monotonic() - (state.started or time.monotonic())
        if ok:
            self._say(f"  done   {cell.name} in {_clock(seconds)}")
        else:
            text = log.read_text(errors="replace") if log.is_file() else ""
            tail = "".join(f"         | {line}" for line in text.splitlines(True)[-6:])
            self._say(f"  FAILED {cell.name} after {_clock(seconds)} (log: {log})\n{tail.rstrip()}")
        self._update(cell, status="done" if ok else "failed", seconds=seconds)

    def rerun(self, cell: Cell, why: str) -> None:
        """A pool cell whose worker died runs again (its time goes on from its first start)."""
        seconds = time.monotonic() - (self.cells[cell.name].started or time.monotonic())
        self._say(f"  worker died: {cell.name} after {_clock(seconds)} ({why}); its unfinished MLflow runs are KILLED; "
                  "running it again on another worker")
        # the live line shows "(train again, 4:10)": the stage stays, so the seed's other cells wait as they did
        self._update(cell, step="again")

    def wait(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)

    @property
    def failed(self) -> list[Cell]:
        return [s.cell for s in self.cells.values() if s.status == "failed"]

    @property
    def running(self) -> int:
        return sum(s.status == "running" for s in self.cells.values())

    def line(self) -> str:
        states = list(self.cells.values())
        done = self.done_before + sum(s.status == "done" for s in states)
        failed = sum(s.status == "failed" for s in states)
        running = [s for s in states if s.status == "running"]
        now = time.monotonic()
        parts = [f"study {self.study.name}: {done}/{len(self.study.cells)} cells done" + (f", {failed} failed" if failed else "")]
        if running:
            parts.append("running " + ", ".join(
                f"{s.cell.name} ({s.stage or 'starting'}{' ' + s.step if s.step else ''}, {_clock(now - s.started)})" for s in running
            ))
        left = self.time_left()
        if any(s.status in ("pending", "running") for s in states):
            parts.append(f"~{_clock(left)} left" if left is not None else "time left: after the first cell")
        return " | ".join(parts)

    def time_left(self) -> float | None:
        """Seconds, from the finished cells' times: a seed's first cell, which builds the shared stages, apart
        (until another cell has finished, the others are guessed as a first cell without its shared stages)."""
        finished = [s for s in self.cells.values() if s.status == "done"]
        if not finished:
            return None
        firsts = [s.seconds for s in finished if s.first_of_seed]
        others = [s.seconds for s in finished if not s.first_of_seed] or [
            s.seconds - (s.shared_seconds or 0.0) for s in finished if s.first_of_seed
        ]
        expected = {True: mean(firsts) if firsts else mean(others), False: mean(others)}
        now = time.monotonic()
        work = sum(
            expected[s.first_of_seed] if s.status == "pending" else max(expected[s.first_of_seed] - (now - s.started), 0.0)
            for s in self.cells.values()
            if s.status in ("pending", "running")
        )
        return work / self.jobs

    def _update(self, cell: Cell, **changes) -> None:
        with self.changed:
            for key, value in changes.items():
                setattr(self.cells[cell.name], key, value)
            self.changed.notify_all()
        self._draw()

    def _say(self, text: str) -> None:
        with self.changed:
            self.stream.write(f"\r\x1b[K{text}\n" if self.tty else f"{text}\n")
            self.stream.flush()

    def _draw(self) -> None:
        with self.changed:
            self.stream.write(f"\r\x1b[K{self.line()}" if self.tty else f"{self.line()}\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
