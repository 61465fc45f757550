"""`grpolab analyze-credit RUN_ID ...`: compare training runs' credit assignment from MLflow.

Reads each train run's step metrics (credit shares, Gini, reward, grad norm) and its last
credit log, and writes PNG plots and a markdown summary to the output folder and to a new
MLflow run `analyze-credit` in the same experiment: credit share by token class over
training, credit against entropy, learning curves, grad-norm stability.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from grpolab.config import Params
from grpolab.errors import ConfigError
from grpolab.runtime.fsutil import atomic_output, atomic_write_text, output_folder
from grpolab.tracking import tracking_uri

SERIES = ["credit/answer_share", "credit/think_share", "credit/high_entropy_share", "credit/gini", "train/reward_mean", "train/grad_norm"]


def _label(client: MlflowClient, run) -> str:
    parent_id = run.data.tags.get("mlflow.parentRunId")
    params = client.get_run(parent_id).data.params if parent_id else run.data.params
    return f"{params.get('train.mitigation.name', '?')} ({run.info.run_id[:8]})"


def _history(client: MlflowClient, run_id: str) -> pd.DataFrame:
    frames = [
        pd.DataFrame([(m.step, m.value) for m in client.get_metric_history(run_id, key)], columns=["step", key]).set_index("step")
        for key in SERIES
    ]
    return pd.concat(frames, axis=1).sort_index()


def _last_credit_log(client: MlflowClient, run_id: str, scratch: Path) -> pd.DataFrame | None:
    logs = sorted(f.path for f in client.list_artifacts(run_id, "credit") if f.path.endswith(".parquet"))
    return pd.read_parquet(client.download_artifacts(run_id, logs[-1], str(scratch))) if logs else None


def _figures(histories: dict[str, pd.DataFrame], logs: dict[str, pd.DataFrame | None]) -> dict[str, object]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ["credit/answer_share", "credit/think_share", "credit/high_entropy_share"]):
        for label, h in histories.items():
            ax.plot(h.index, h[key].rolling(5, min_periods=1).mean(), label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    figures["credit_share_by_class.png"] = fig

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, log in logs.items():
        if log is None or log.empty:
            continue
        bins = pd.qcut(log["entropy"], q=10, duplicates="drop")
        binned = log.groupby(bins, observed=True).agg(entropy=("entropy", "mean"), credit=("credit", "mean"))
        ax.plot(binned["entropy"], binned["credit"], marker="o", label=label)
    ax.set_xlabel("token entropy (decile mean)")
    ax.set_ylabel("mean credit")
    ax.set_title("credit against entropy (last credit log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figures["credit_vs_entropy.png"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, h in histories.items():
        axes[0].plot(h.index, h["train/reward_mean"].rolling(10, min_periods=1).mean(), label=label)
        axes[1].plot(h.index, h["train/grad_norm"], label=label, lw=0.8)
    axes[0].set_title("reward (rolling mean of 10 steps)")
    axes[1].set_title("grad norm (before clipping)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    figures["learning_and_grad_norm.png"] = fig
    return figures


def _summary(histories: dict[str, pd.DataFrame], run_ids: dict[str, str]) -> str:
    lines = [
        "# Credit assignment: run comparison",
        "",
        "| run | MLflow run | reward, last 10 steps | answer share | think share | high-entropy share | Gini | grad norm mean ± std (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, h in histories.items():
        g = h["train/grad_norm"].dropna()
        lines.append(
            f"| {label} | `{run_ids[label]}` | {h['train/reward_mean'].tail(10).mean():.3f} | "
            f"{h['credit/answer_share'].mean():.3f} | {h['credit/think_share'].mean():.3f} | "
            f"{h['credit/high_entropy_share'].mean():.3f} | {h['credit/gini'].mean():.3f} | "
            f"{g.mean():.3f} ± {g.std():.3f} ({g.max():.3f}) |"
        )
    lines += ["", "Shares and Gini are means over all logged steps; credit of a token = |A w| ||onehot(y) - p||."]
    return "\n".join(lines) + "\n"


def analyze_credit(params: Params, run_ids: list[str], out_dir: Path) -> str:
    """Compare the train runs `run_ids`; returns the markdown summary (also written to out_dir)."""
    out_dir = output_folder(out_dir, "--out")  # refused before any work if it holds the user's files
    client = MlflowClient(tracking_uri(params))
    runs = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except Exception as exc:  # MLflow raises its own exception types for unknown ids
            raise ConfigError(f"run {run_id}: not found in {tracking_uri(params)}") from exc
        if run.data.tags.get("grpolab.stage") != "train":
            raise ConfigError(f"run {run_id}: not a train run (grpolab.stage = {run.data.tags.get('grpolab.stage')!r})")
        runs.append(run)

    histories, logs, ids = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for run in runs:
            label = _label(client, run)
            ids[label] = run.info.run_id
            histories[label] = _history(client, run.info.run_id)
            logs[label] = _last_credit_log(client, run.info.run_id, Path(scratch))
    figures = _figures(histories, logs)
    summary = _summary(histories, ids)

    for name, fig in figures.items():
        with atomic_output(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=110)
    atomic_write_text(out_dir / "summary.md", summary)
    experiment_id = runs[0].info.experiment_id
    report = client.create_run(experiment_id, run_name="analyze-credit",
                               tags={"grpolab.stage": "analyze-credit", "grpolab.compared_runs": ",".join(run_ids)})
    for name in [*figures, "summary.md"]:
        client.log_artifact(report.info.run_id, str(out_dir / name))
    client.set_terminated(report.info.run_id)
    return summary
