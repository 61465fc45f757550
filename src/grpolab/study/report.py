"""A study's report, built from the MLflow store alone (so `grpolab report NAME` rebuilds it any time):
per variant the mean ± std over seeds and the per-seed values of every headline quantity, the
difference to the baseline with a 95 % Welch interval, reward curves and membership ROC curves by
variant. Written to `reports/<study>/` and to the study's own MLflow run `study-<name>`."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from ruamel.yaml import YAML
from scipy import stats

from grpolab import tracking
from grpolab.errors import ConfigError
from grpolab.runtime.fsutil import atomic_output, atomic_write_text, output_folder
from grpolab.mia import scores as mia_scores
from grpolab.paths import ROC_DIR
from grpolab.study import records
from grpolab.study.spec import StudySpec

REPORTS_DIR = Path("reports")
CURVE_KEY = "train/reward_mean"
CONFIDENCE = 0.95
MIA_METHODS = tuple(mia_scores.MIA_METHODS)


def _pass_at_k(m: dict) -> float | None:
    key = next((k for k in m if k.startswith("trained/sampled/pass_at_")), None)
    return m[key] if key else None


def _gain(m: dict) -> float | None:
    return m["trained/success_rate"] - m["base/success_rate"] if {"trained/success_rate", "base/success_rate"} <= m.keys() else None


def _key(key: str) -> Callable[[dict], float | None]:
    return lambda m: m.get(key)


# The report's quantities, by table: a label and how a cell's parent-run metrics give it.
TABLES: dict[str, dict[str, Callable[[dict], float | None]]] = {
    "Quality on the eval prompts": {
        "trained greedy success": _key("trained/success_rate"),
        "trained sampled success": _key("trained/sampled/success_rate"),
        "trained pass@k": _pass_at_k,
        "gain over base (greedy)": _gain,
        "base greedy success": _key("base/success_rate"),
        "step time (s)": _key("mean/train/step_time"),
    },
    "Training (mean over steps)": {
        "reward": _key("mean/train/reward_mean"),
        "entropy": _key("mean/train/entropy"),
        "rollout batches per step": _key("mean/train/rollout_batches"),
        "tied groups dropped per step": _key("mean/train/groups_dropped"),
    },
    "Membership (ROC AUC, train prompts vs eval prompts)": {
        **{f"trained {m}": _key(f"trained/mia/{m}/auc") for m in MIA_METHODS},
        **{f"base {m}": _key(f"base/mia/{m}/auc") for m in MIA_METHODS},
    },
    "Credit (shares of the policy-gradient credit, mean over steps)": {
        "answer": _key("mean/credit/answer_share"),
        "think": _key("mean/credit/think_share"),
        "high-entropy tokens": _key("mean/credit/high_entropy_share"),
        "gini": _key("mean/credit/gini"),
    },
    "TracIn (mean over steps)": {
        "positive ratio": _key("mean/tracin/positive_ratio"),
        "selected ratio": _key("mean/tracin/selected_ratio"),
        "share of steps with fallback": _key("mean/tracin/fallback"),
        "validation grad norm": _key("mean/tracin/val_grad_norm"),
        "validation reward": _key("mean/tracin/val_reward_mean"),
    },
}


@dataclass
class CellResult:
    variant: str
    seed: int
    status: str  # finished | failed | not run
    run_id: str | None = None
    gpus: str | None = None  # the cell's GPUs, as its stages recorded them
    metrics: dict[str, float] = field(default_factory=dict)
    curve: pd.Series | None = None  # reward by step
    roc: dict[str, pd.DataFrame] = field(default_factory=dict)  # method -> fpr, base, trained


def collect(client: MlflowClient, experiment: str, cells: list[dict]) -> list[CellResult]:
    """Each cell's record: its newest pipeline parent run of the cell's params (status from the summary
    stage's completion tag), its metrics, its reward curve and its ROC curves."""
    results = []
    for cell in cells:
        parents = [r for r in records.pipeline_runs(client, experiment, cell["params_hash"]) if r.data.tags.get(tracking.STAGE_TAG) == "pipeline"]
        if not parents:
            results.append(CellResult(cell["variant"], cell["seed"], "not run"))
            continue
        run = parents[0]
        if run.data.tags.get(tracking.COMPLETE_TAG) != "true":
            results.append(CellResult(cell["variant"], cell["seed"], "failed", run.info.run_id))
            continue
        history = client.get_metric_history(run.info.run_id, CURVE_KEY)
        curve = pd.Series({m.step: m.value for m in history}).sort_index()
        results.append(CellResult(cell["variant"], cell["seed"], "finished", run.info.run_id, run.data.tags.get(tracking.GPUS_TAG),
                                  run.data.metrics, curve, _rocs(client, run.info.run_id)))
    return results


def _rocs(client: MlflowClient, run_id: str) -> dict[str, pd.DataFrame]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, ROC_DIR.name, tmp))
        return {f.stem: pd.read_csv(f) for f in sorted(folder.glob("*.csv"))}


def welch_interval(values: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """(mean difference, low, high): the 95 % Welch t-interval of mean(values) - mean(baseline)."""
    diff = float(np.mean(values) - np.mean(baseline))
    if len(values) < 2 or len(baseline) < 2 or (np.var(values) == 0 and np.var(baseline) == 0):
        return diff, math.nan, math.nan
    interval = stats.ttest_ind(values, baseline, equal_var=False).confidence_interval(CONFIDENCE)
    return diff, float(interval.low), float(interval.high)


def cell_table(results: list[CellResult]) -> pd.DataFrame:
    """One row per cell: variant, seed, status, run id and every quantity of the report."""
    rows = []
    for r in results:
        row = {"variant": r.variant, "seed": r.seed, "status": r.status, "run_id": r.run_id, "gpus": r.gpus}
        for quantities in TABLES.values():
            for label, get in quantities.items():
                value = get(r.metrics) if r.status == "finished" else None
                row[label] = math.nan if value is None else value
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(cells: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """Per variant and quantity: mean, std, the value of each seed, the difference to the baseline and its interval."""
    finished = cells[cells["status"] == "finished"]
    base = finished[finished["variant"] == spec.baseline]
    rows = []
    for variant in [v.name for v in spec.variants]:
        mine = finished[finished["variant"] == variant].set_index("seed")
        for quantities in TABLES.values():
            for label in quantities:
                values = mine[label].dropna().tolist()
                if not values:
                    continue
                reference = base[label].dropna().tolist()
                diff, low, high = welch_interval(values, reference) if reference and variant != spec.baseline else (math.nan,) * 3
                rows.append({
                    "variant": variant, "quantity": label, "n": len(values), "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,  # one seed: no spread to show
                    **{f"seed_{s}": mine[label].get(s, math.nan) for s in spec.seeds},
                    "diff_to_baseline": diff, "ci_low": low, "ci_high": high,
                })
    return pd.DataFrame(rows)


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _diff(row) -> str:
    if math.isnan(row["diff_to_baseline"]):
        return "–"
    if math.isnan(row["ci_low"]):
        return f"{row['diff_to_baseline']:+.3f}"
    text = f"{row['diff_to_baseline']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
    return f"**{text}**" if row["ci_low"] > 0 or row["ci_high"] < 0 else text


def markdown(spec: StudySpec, cells: pd.DataFrame, summary: pd.DataFrame, store: str) -> str:
    finished = (cells["status"] == "finished").sum()
    lines = [
        f"# Study `{spec.name}`", "", spec.description.strip(), "",
        f"{len(cells)} cells ({len(spec.variants)} variants × {len(spec.seeds)} seeds {spec.seeds}), {finished} finished. "
        f"Baseline: `{spec.baseline}`. MLflow: `{store}`, experiment `{spec.name}` (one parent run per cell, "
        "tags `grpolab.variant`, `grpolab.seed`).", "",
        f"Each value: mean ± std over seeds (sample std), then the value of each seed ({', '.join(map(str, spec.seeds))}). Δ: difference of the means to "
        f"the baseline with its {CONFIDENCE:.0%} Welch t-interval; **bold** where the interval excludes 0.", "",
    ]
    for title, quantities in TABLES.items():
        present = [q for q in quantities if q in set(summary["quantity"])] if len(summary) else []
        if not present:
            continue
        lines += [f"## {title}", "", "| variant | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
        for variant in [v.name for v in spec.variants]:
            mine = summary[summary["variant"] == variant].set_index("quantity")
            cells_ = [
                f"{_fmt(mine.loc[q, 'mean'])} ± {_fmt(mine.loc[q, 'std'])} ({', '.join(_fmt(mine.loc[q, f'seed_{s}']) for s in spec.seeds)})"
                if q in mine.index else "–"
                for q in present
            ]
            lines.append(f"| `{variant}` | " + " | ".join(cells_) + " |")
            if variant != spec.baseline:
                lines.append(f"| Δ vs `{spec.baseline}` | " + " | ".join(_diff(mine.loc[q]) if q in mine.index else "–" for q in present) + " |")
        lines.append("")
    unfinished = cells[cells["status"] != "finished"]
    if len(unfinished):
        lines += ["## Cells that did not finish", ""]
        lines += [f"- `{r.variant}` seed {r.seed}: {r.status}" + (f" (run `{r.run_id}`)" if r.run_id else "") for r in unfinished.itertuples()]
        lines.append("")
    lines += ["![reward by variant](reward_curves.png)", "", "![membership ROC by variant](mia_roc.png)", ""]
    lines += ["## Cells", "", "| variant | seed | status | GPUs | MLflow run |", "|---|---|---|---|---|"]
    lines += [f"| `{r.variant}` | {r.seed} | {r.status} | {r.gpus if isinstance(r.gpus, str) else '–'} | `{r.run_id}` |" if r.run_id
              else f"| `{r.variant}` | {r.seed} | {r.status} | – | – |" for r in cells.itertuples()]
    lines.append("")
    variants = "\n".join(f"- `{v.name}`: {' '.join(f'`{o}`' for o in v.overrides) or 'the base params'}" + (f" — {v.description}" if v.description else "") for v in spec.variants)
    lines += ["## Variants", "", variants, "", f"Base overrides: {' '.join(f'`{o}`' for o in spec.base) or 'none'}.", ""]
    return "\n".join(lines)


def reward_figure(spec: StudySpec, results: list[CellResult]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, variant in enumerate(v.name for v in spec.variants):
        curves = [r.curve for r in results if r.variant == variant and r.curve is not None and len(r.curve)]
        if not curves:
            continue
        frame = pd.concat(curves, axis=1).rolling(5, min_periods=1).mean()
        ax.plot(frame.index, frame.mean(axis=1), color=f"C{i}", label=f"{variant} ({len(curves)} seeds)")
        ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=f"C{i}", alpha=0.15)
    ax.set(xlabel="step", ylabel="train reward (5-step mean)", title=f"{spec.name}: mean over seeds, band min–max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def roc_figure(spec: StudySpec, results: list[CellResult]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for r in results for m in r.roc})
    fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(3.4 * max(len(methods), 1), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, variant in enumerate(v.name for v in spec.variants):
            tables = [r.roc[method] for r in results if r.variant == variant and method in r.roc]
            if not tables:
                continue
            fpr = tables[0]["fpr"]
            ax.plot(fpr, np.mean([t["trained"] for t in tables], axis=0), color=f"C{i}", label=variant)
            if variant == spec.baseline:
                ax.plot(fpr, np.mean([t["base"] for t in tables], axis=0), color="grey", ls="--", label="base model")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
        ax.set(title=method, xlabel="FPR", ylabel="TPR (mean over seeds)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def build_report(client: MlflowClient, spec: StudySpec, cells: list[dict], study_run: str, out: Path | None = None) -> str:
    """Collect every cell from MLflow, write the report to `out` (default reports/<study>/) and to the
    study's MLflow run (`report/`); returns the markdown."""
    out = output_folder(out or REPORTS_DIR / spec.name, "--out")
    results = collect(client, spec.name, cells)
    table = cell_table(results)
    summary = summary_table(table, spec)
    text = markdown(spec, table, summary, client.tracking_uri)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "cells.csv", table.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    for name, figure in (("reward_curves.png", reward_figure(spec, results)), ("mia_roc.png", roc_figure(spec, results))):
        with atomic_output(out / name) as tmp:
            figure.savefig(tmp, dpi=110)
        figure.clf()
    for name in ("report.md", "cells.csv", "summary.csv", "reward_curves.png", "mia_roc.png"):
        client.log_artifact(study_run, str(out / name), "report")
    return text


def report_from_store(client: MlflowClient, study: str, out: Path | None = None) -> str:
    """The report of study `study` (also its MLflow experiment) from what its last run stored: its file,
    its cells and every cell's runs."""
    record = records.read_study(client, study, study)
    if record is None:
        raise ConfigError(f"no study {study!r} in the MLflow store {client.tracking_uri} (run `grpolab study FILE` first)")
    run_id, text, cells = record
    spec = StudySpec.model_validate(YAML(typ="safe").load(text))
    return build_report(client, spec, cells, run_id, out)
