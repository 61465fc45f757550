"""What a training records, beside the loop of `stages/train.py`: every step's metrics (MLflow and the
curve file), the completion tables, the credit and TracIn step logs, the reward-curve figure, and, after a
resume, nothing the MLflow run already holds (MLflow appends: a table logged twice would hold its rows twice).

MLflow gets it through the tracker's outbox (tracking.py): the loop never waits for a tracking server that went
away, and what waited goes out when it is back. The end of the training waits for it (tracking.outage_timeout_s)
before the checkpoints go. A training that stopped before its record went out (the server still away at its end,
or the process killed meanwhile) resumes from a checkpoint that keeps that record: every step's metrics, the
step logs and the completion tables; the resumed run sends the part it lacks, and each step is logged once."""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from grpolab.runtime import distributed as dist
from grpolab.trainer.checkpoints import TABLES, clear_step_logs, discard, load_training_checkpoint, resumable, save_training_checkpoint
from grpolab.config import Params
from grpolab.data.schema import write_parquet
from grpolab.errors import TrackingError
from grpolab.runtime.fsutil import atomic_write_text
from grpolab.paths import CHECKPOINT_DIR, CREDIT_DIR, CURVE_FILE, TRACIN_DIR, TRAINED_DIR
from grpolab.trainer.update import Batch, Sampled, credit_log
from grpolab.trainer.loss_weights import LossWeighting

if TYPE_CHECKING:  # MLflow is imported by the stage's driver; the training loop itself runs without it
    from grpolab.trainer.tracin import Selection
    from grpolab.tracking import Tracker

STEP_LOG_DIRS = [CREDIT_DIR, TRACIN_DIR]  # a parquet file per step, kept in a training checkpoint
KEPT_TABLES = CHECKPOINT_DIR / TABLES  # the completion tables in MLflow's table format, kept with the checkpoints
CURVE_KEYS = [
    "train/reward_mean", "train/loss", "train/kl", "train/entropy", "train/completion_length", "train/step_time",
    "train/grad_norm", "credit/answer_share", "credit/think_share", "credit/high_entropy_share", "credit/gini",
]


@dataclass
class Logged:
    """What the MLflow run a training logs into holds already (a resumed run): not logged again."""

    through: int = 0  # the last step of its metrics
    tables: set[str] = field(default_factory=set)  # its completion tables' file names


class Recorder:
    """The record of one training (rank 0 writes files; `tracker` None: no MLflow run)."""

    def __init__(self, params: Params, tracker: Tracker | None, weighting: LossWeighting, curve_keys: list[str]):
        self.params, self.tracker, self.weighting = params, tracker, weighting
        self.curve_keys = CURVE_KEYS + curve_keys
        self.history: list[dict] = []  # {"step": n, **metrics} of every step so far
        self.logged = Logged()
        # Rank 0 writes and uploads the step logs beside the loop: the other ranks would wait for it at the next collective.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-logs")
        self._pending: list[Future] = []
        self.checkpointed = 0  # the step of the newest checkpoint: where a training stopped resumes

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker else None

    def resume(self, engine, key: str) -> int:
        """The last step done: from the checkpoint of this training (fingerprint `key`) if one was left behind (see
        checkpoints.py), with every step's metrics so far, else 0 (from scratch); says so in the terminal."""
        params, tracker = self.params, self.tracker
        checkpoint = resumable(key)
        if checkpoint:
            history = load_training_checkpoint(engine, checkpoint, STEP_LOG_DIRS)
        else:
            if CHECKPOINT_DIR.exists():  # another configuration's, or other base model or data: not ours to resume
                discard()
            history = []
            if dist.is_rank0():
                for folder in STEP_LOG_DIRS:
                    clear_step_logs(folder, 0)
        start = checkpoint.step if checkpoint else 0
        continuing = bool(tracker and checkpoint and tracker.run_id == checkpoint.run_id)
        logged = Logged(tracker.last_step("train/loss"), tracker.artifact_names("completions")) if continuing else Logged()
        if dist.is_rank0() and checkpoint:
            where = f"MLflow run {tracker.run_id}" if tracker else "no MLflow run"
            print(f"train: resuming at step {start} of {params.train.steps} from {checkpoint.path} ({where}; "
                  f"steps 1-{logged.through} already logged there)", flush=True)
        if tracker and not (continuing and logged.through):  # a run that holds a step holds these: they went out first
            first = self.weighting.start_metrics()
            if first and not (continuing and tracker.has_history(next(iter(first)))):
                tracker.metrics(first)
        if tracker and start:
            self._send_what_the_run_lacks(history, start, logged, continuing)
        self.history, self.logged, self.checkpointed = history, logged, start
        return start

    def _send_what_the_run_lacks(self, history: list[dict], start: int, logged: Logged, continuing: bool) -> None:
        """The checkpoint's record that its MLflow run lacks (all of it, for a new run): steps whose metrics never
        reached it (the training stopped while the tracking server was away, or was killed before they went out),
        from the checkpoint's history; completion tables and step logs, from the files kept with it."""
        tracker = self.tracker
        steps = [row for row in history if row["step"] > logged.through]
        if steps:
            tracker.curve(pd.DataFrame(steps))  # a step's metrics in one batch: a run holds a step whole or not at all
        tables = [p for p in sorted(KEPT_TABLES.glob("step_*.json")) if _step(p) <= start and p.name not in logged.tables]
        for path in tables:
            tracker.table(pd.read_json(path, orient="split", dtype=False), f"completions/{path.name}")  # as written
            logged.tables.add(path.name)
        logs = 0
        for folder in STEP_LOG_DIRS:  # as the checkpoint put them back: its steps' only
            present = tracker.artifact_names(folder.name)
            for path in sorted(folder.glob("step_*.parquet")):
                if path.name not in present:
                    tracker.artifacts(path, folder.name)
                    logs += 1
        if continuing and (steps or tables or logs):
            print(f"train: MLflow run {tracker.run_id} lacked {len(steps)} steps, {len(tables)} completion tables and {logs} "
                  "step logs of the checkpoint (its training stopped before they went out): sending them", flush=True)

    def step(self, step: int, metrics: dict[str, float], batch: Batch, sampled: Sampled, selection: Selection | None) -> None:
        t, tracker = self.params.train, self.tracker
        self.history.append({"step": step, **metrics})
        if tracker and step > self.logged.through:
            tracker.metrics(metrics, step=step)
        table = f"step_{step:06d}.json"
        if tracker and step % t.log.log_completions_every == 0 and table not in self.logged.tables:
            frame = completions_table(sampled, batch.advantages)
            tracker.table(frame, f"completions/{table}")
            if t.save_every:  # in MLflow's format, for a resume whose run lacks it
                text = frame.to_json(orient="split", index=False)
                self._pending.append(self._writer.submit(atomic_write_text, KEPT_TABLES / table, text))
        if dist.is_rank0() and t.log.credit_log_every and step % t.log.credit_log_every == 0:
            self._step_log(credit_log(batch, self.weighting, step), CREDIT_DIR, step)
        if dist.is_rank0() and selection:
            self._step_log(selection.log, TRACIN_DIR, step)

    def checkpoint(self, engine, key: str, step: int) -> None:
        """A training checkpoint after `step` (checkpoints.py), with the curve so far; `key`: the training's fingerprint."""
        self.save_curve()
        self.flush()  # a checkpoint keeps the step logs and tables so far
        save_training_checkpoint(engine, key, step, self.run_id, self.history, STEP_LOG_DIRS)
        self.checkpointed = step

    def _step_log(self, frame: pd.DataFrame, folder: Path, step: int) -> None:
        self._pending.append(self._writer.submit(self._write_step_log, frame, folder, step))

    def flush(self) -> None:
        """Wait for the step logs and tables still being written (raising what writing one raised)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _write_step_log(self, frame: pd.DataFrame, folder: Path, step: int) -> None:
        path = folder / f"step_{step:06d}.parquet"
        write_parquet(frame, path)
        if self.tracker:
            self.tracker.artifacts(path, folder.name)

    def curve(self) -> pd.DataFrame:
        """The training curve (metrics/train_curve.csv): the curve keys of every step's metrics."""
        return pd.DataFrame(self.history).reindex(columns=["step", *self.curve_keys])

    def save_curve(self) -> None:
        if dist.is_rank0():
            atomic_write_text(CURVE_FILE, self.curve().to_csv(index=False))

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """The headline: the last step's values and the means over all steps (shares and TracIn ratios are per
        step); the curve file, the reward-curve figure and the trained model into the run, once the run holds
        everything (then the checkpoints can go)."""
        self.flush()
        self._writer.shutdown()
        curve = self.curve()
        summary = {
            "train/steps": float(self.params.train.steps),
            **{f"final/{k}": v for k, v in metrics.items() if k in self.curve_keys and not math.isnan(v)},
            **{f"mean/{k}": v for k, v in curve[self.curve_keys].astype(float).mean().items() if not math.isnan(v)},
        }
        if dist.is_rank0():
            atomic_write_text(CURVE_FILE, curve.to_csv(index=False))
            if self.tracker:
                self.tracker.figure(reward_curve_figure(curve), "reward_curve.png")
                self.tracker.artifacts(CURVE_FILE)
                self.tracker.artifacts(TRAINED_DIR, "trained_model")
                self._settle()
        return summary

    def _settle(self) -> None:
        """Wait for the MLflow run to hold the whole record; a server still away past tracking.outage_timeout_s: a
        TrackingError that says how the training goes on."""
        try:
            self.tracker.settle()
        except TrackingError as exc:
            again = (f"it resumes from its checkpoint of step {self.checkpointed} in {CHECKPOINT_DIR} and logs every step once"
                     if self.checkpointed else "with no checkpoint to resume (train.save_every), it trains from the start into a new run")
            raise TrackingError(f"{exc}. The train stage stops: run it again once the server answers; {again}") from None


def _step(path: Path) -> int:
    return int(path.stem.split("_")[1])


def completions_table(sampled: Sampled, advantages) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt": [r["prompt"] for r in sampled.rows],
            "completion": sampled.texts,
            "ground_truth": [r["ground_truth"] for r in sampled.rows],
            "reward": sampled.reward.tolist(),
            **{f"reward/{k}": v.tolist() for k, v in sampled.parts.items()},
            "advantage": advantages.tolist(),
        }
    )


def reward_curve_figure(curve: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve["step"], curve["train/reward_mean"], label="reward mean")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
