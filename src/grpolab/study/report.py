"""A study's report, built from the MLflow store alone (so `grpolab report NAME` rebuilds it any time):
per variant the mean ± std over seeds and the per-seed values of every headline quantity; for every other
variant its per-seed differences to the baseline, their mean and 95 % paired t-interval (every arm of a seed
shares that seed's data, SFT model and MIA weights: the arms are matched by seed), and what the seeds could
detect (`grpolab.study.power`); reward curves and membership ROC curves by variant. Written to
`reports/<study>/` and to the study's own MLflow run `study-<name>` (the report, and the differences as metrics
`paired/<variant>/<quantity>/…`). `report_from_cells` rebuilds the text from a report's own cells.csv."""

from __future__ import annotations

import datetime
import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from ruamel.yaml import YAML
from scipy import stats

from grpolab import tracking
from grpolab.errors import ConfigError
from grpolab.runtime.fsutil import atomic_output, atomic_write_text, output_folder
from grpolab.mia import scores as mia_scores
from grpolab.paths import ROC_DIR
from grpolab.study import power, records
from grpolab.study.spec import StudySpec

REPORTS_DIR = Path("reports")
CURVE_KEY = "train/reward_mean"
CONFIDENCE = 0.95
MIA_METHODS = tuple(mia_scores.MIA_METHODS)
# The quantities whose power the report states: the task's quality and the membership signal the loss attack sees.
HEADLINE = {"trained greedy success": "success on the eval prompts", "trained loss": "membership AUC of the loss attack"}
STATED_DIFFERENCE = 0.05  # the report also says how many seeds a difference of this size needs (success or AUC)
REPORT_FILES = ("report.md", "cells.csv", "summary.csv", "paired.csv", "reward_curves.png", "mia_roc.png")


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
    """(mean difference, low, high): the 95 % Welch t-interval of mean(values) - mean(baseline), two
    independent samples. The report's fallback for arms that share fewer than two seeds."""
    diff = float(np.mean(values) - np.mean(baseline))
    if len(values) < 2 or len(baseline) < 2 or (np.var(values) == 0 and np.var(baseline) == 0):
        return diff, math.nan, math.nan
    interval = stats.ttest_ind(values, baseline, equal_var=False).confidence_interval(CONFIDENCE)
    return diff, float(interval.low), float(interval.high)


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of per-seed differences (arm - baseline, one per shared seed): the 95 % paired
    t-interval mean ± t_{0.975, n-1} · sd / √n, as `scipy.stats.ttest_rel(arm, baseline)` gives it. Below two
    seeds no interval (NaN); the same difference on every seed has no spread: the interval is that point."""
    d = np.asarray(differences, dtype=float)
    mean = float(d.mean()) if len(d) else math.nan
    if len(d) < 2:
        return mean, math.nan, math.nan
    if np.all(d == d[0]):
        return mean, mean, mean
    interval = stats.ttest_1samp(d, 0.0).confidence_interval(CONFIDENCE)
    return mean, float(interval.low), float(interval.high)


def compare(values: pd.Series, baseline: pd.Series) -> dict:
    """One arm against the baseline on one quantity; both series by seed, NaN where a cell has no value.
    Paired over the seeds both have when there are two or more (`interval: paired`), else Welch over all of
    each (`interval: welch`). Gives the interval, the per-seed differences (`diff_seed_<s>`), the spread of
    the differences and what it lets the seeds detect (`min_detectable`, `seeds_needed` for the observed
    difference, `seeds_for_<STATED_DIFFERENCE>`); the Welch interval rides along (`welch_low`, `welch_high`)."""
    values, baseline = values.dropna(), baseline.dropna()
    shared = sorted(set(values.index) & set(baseline.index))
    differences = values[shared] - baseline[shared]
    both = len(values) and len(baseline)
    _, welch_low, welch_high = welch_interval(values.tolist(), baseline.tolist()) if both else (math.nan,) * 3
    row = {f"diff_seed_{s}": float(d) for s, d in differences.items()}
    stated = f"seeds_for_{STATED_DIFFERENCE:g}"
    if len(shared) >= 2:
        mean, low, high = paired_interval(differences.tolist())
        sd = float(differences.std(ddof=1))
        row |= {"interval": "paired", "n": len(shared), "diff": mean, "ci_low": low, "ci_high": high, "sd": sd,
                "min_detectable": power.min_detectable_difference(sd, len(shared)),
                "seeds_needed": power.seeds_needed(mean, sd), stated: power.seeds_needed(STATED_DIFFERENCE, sd)}
    else:  # no two seeds in common: two independent samples, and no spread of differences to size the seeds by
        mean = float(values.mean() - baseline.mean()) if both else math.nan
        row |= {"interval": "welch", "n": min(len(values), len(baseline)), "diff": mean, "ci_low": welch_low,
                "ci_high": welch_high, "sd": math.nan, "min_detectable": math.nan, "seeds_needed": math.nan, stated: math.nan}
    return row | {"welch_low": welch_low, "welch_high": welch_high}


def _complete(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells with a column for every quantity of TABLES (NaN where a cell table, an older report's say,
    has none)."""
    missing = [label for quantities in TABLES.values() for label in quantities if label not in cells]
    return cells.assign(**{label: math.nan for label in missing}) if missing else cells


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


def paired_table(cells: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """One row per variant but the baseline and quantity that both have values of: `compare` of the variant's
    finished cells with the baseline's (paired over their shared seeds); `diff_seed_<s>` for every seed of
    the study."""
    cells = _complete(cells)
    finished = cells[cells["status"] == "finished"]
    base = finished[finished["variant"] == spec.baseline].set_index("seed")
    rows = []
    for variant in [v.name for v in spec.variants if v.name != spec.baseline]:
        mine = finished[finished["variant"] == variant].set_index("seed")
        for quantities in TABLES.values():
            for label in quantities:
                if mine[label].notna().any() and base[label].notna().any():
                    rows.append({"variant": variant, "quantity": label, **compare(mine[label], base[label])})
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    return table.reindex(columns=[c for c in table.columns if not c.startswith("diff_seed_")] + [f"diff_seed_{s}" for s in spec.seeds])


def summary_table(cells: pd.DataFrame, spec: StudySpec, paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per variant and quantity: mean, std, the value of each seed, the difference to the baseline with its
    interval (`paired_table`'s, whose `interval` says paired or Welch) and the difference on each seed."""
    cells = _complete(cells)
    paired = paired_table(cells, spec) if paired is None else paired
    deltas = paired.set_index(["variant", "quantity"]) if len(paired) else None
    finished = cells[cells["status"] == "finished"]
    rows = []
    for variant in [v.name for v in spec.variants]:
        mine = finished[finished["variant"] == variant].set_index("seed")
        for quantities in TABLES.values():
            for label in quantities:
                values = mine[label].dropna().tolist()
                if not values:
                    continue
                found = deltas is not None and (variant, label) in deltas.index
                delta = deltas.loc[(variant, label)] if found else {}
                rows.append({
                    "variant": variant, "quantity": label, "n": len(values), "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,  # one seed: no spread to show
                    **{f"seed_{s}": mine[label].get(s, math.nan) for s in spec.seeds},
                    "diff_to_baseline": delta.get("diff", math.nan), "ci_low": delta.get("ci_low", math.nan),
                    "ci_high": delta.get("ci_high", math.nan), "interval": delta.get("interval", ""),
                    **{f"diff_seed_{s}": delta.get(f"diff_seed_{s}", math.nan) for s in spec.seeds},
                })
    return pd.DataFrame(rows)


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _signed(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _seeds(x: float) -> str:
    """A number of seeds as the power table shows it."""
    if math.isnan(x):
        return "–"
    return f"> {power.MAX_SEEDS}" if math.isinf(x) else str(int(x))


def _diff(row, seeds: list[int]) -> str:
    """A Δ cell: mean difference [interval] (the difference on each seed); bold where the interval excludes 0."""
    if math.isnan(row["diff_to_baseline"]):
        return "–"
    if row["interval"] == "paired" and row["diff_to_baseline"] == row["ci_low"] == row["ci_high"] == 0:
        return "0 on every seed"  # a quantity the arms share by design (the base model's), or two arms that train alike
    text = f"{row['diff_to_baseline']:+.3f}"
    if not math.isnan(row["ci_low"]):
        text += f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        text = f"**{text}**" if row["ci_low"] > 0 or row["ci_high"] < 0 else text
    if row["interval"] == "welch":
        return f"{text} (Welch: no two seeds in common)"
    return f"{text} ({', '.join(_signed(row[f'diff_seed_{s}']) for s in seeds)})"


def power_lines(paired: pd.DataFrame) -> list[str]:
    """The report's power section: for each HEADLINE quantity and arm, what its seeds could detect."""
    rows = paired[paired["quantity"].isin(list(HEADLINE)) & (paired["interval"] == "paired")] if len(paired) else paired
    if not len(rows):
        return []
    stated = f"seeds_for_{STATED_DIFFERENCE:g}"
    lines = [
        "## Power", "",
        f"What the seeds could detect, for the headline quantities ({'; '.join(f'{q}: {what}' for q, what in HEADLINE.items())}): a two-sided paired "
        f"t-test at α = {power.ALPHA:g} with power {power.POWER:g}, from the spread (sample std) of each arm's per-seed "
        "differences to the baseline (noncentral t). *Smallest detectable*: the true difference these seeds would "
        "detect 4 times in 5; a smaller one is not ruled out by an interval that includes 0. *Seeds needed*: how many "
        f"seeds (pairs) the observed difference, and a difference of {STATED_DIFFERENCE:g}, would need at the same spread.", "",
        f"| variant | quantity | seeds | std of Δ | Δ | smallest detectable | seeds needed for Δ | seeds needed for {STATED_DIFFERENCE:g} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for quantity in HEADLINE:
        for _, r in rows[rows["quantity"] == quantity].iterrows():
            lines.append(f"| `{r['variant']}` | {quantity} | {r['n']} | {_fmt(r['sd'])} | {_signed(r['diff'])} | {_fmt(r['min_detectable'])} | "
                         f"{'–' if r['diff'] == 0 else _seeds(r['seeds_needed'])} | {_seeds(r[stated])} |")
    return lines + [""]


def markdown(spec: StudySpec, cells: pd.DataFrame, summary: pd.DataFrame, paired: pd.DataFrame, store: str | None,
             note: str = "") -> str:
    """The report's text. `store`: the MLflow store the cells came from (None: rebuilt from a cells.csv, which
    `note` then says)."""
    finished = (cells["status"] == "finished").sum()
    source = (f"MLflow: `{store}`, experiment `{spec.name}` (one parent run per cell, tags `grpolab.variant`, `grpolab.seed`)."
              if store else "Each cell's values as its MLflow parent run held them, kept in the run's `cells.csv` (run ids below).")
    lines = [
        f"# Study `{spec.name}`", "", spec.description.strip(), "", *([note.strip(), ""] if note.strip() else []),
        f"{len(cells)} cells ({len(spec.variants)} variants × {len(spec.seeds)} seeds {spec.seeds}), {finished} finished. "
        f"Baseline: `{spec.baseline}`. {source}", "",
        f"Each value: mean ± std over seeds (sample std), then the value of each seed ({', '.join(map(str, spec.seeds))}). "
        f"Δ: the variant's difference to the baseline seed by seed (every arm of a seed shares its data, SFT model and MIA "
        f"weights: the arms are matched by seed), the mean of those differences with its {CONFIDENCE:.0%} paired t-interval "
        "over the seeds both have, then the difference on each seed; **bold** where the interval excludes 0. "
        "A variant with no two seeds in common with the baseline gets the Welch t-interval of the two means instead, "
        "and says so. What the seeds could detect: the section *Power*.", "",
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
                lines.append(f"| Δ vs `{spec.baseline}` | " + " | ".join(_diff(mine.loc[q], spec.seeds) if q in mine.index else "–" for q in present) + " |")
        lines.append("")
    lines += power_lines(paired)
    unfinished = cells[cells["status"] != "finished"]
    if len(unfinished):
        lines += ["## Cells that did not finish", ""]
        lines += [f"- `{r.variant}` seed {r.seed}: {r.status}" + (f" (run `{r.run_id}`)" if isinstance(r.run_id, str) else "")
                  for r in unfinished.itertuples()]
        lines.append("")
    lines += ["![reward by variant](reward_curves.png)", "", "![membership ROC by variant](mia_roc.png)", ""]
    lines += ["## Cells", "", "| variant | seed | status | GPUs | MLflow run |", "|---|---|---|---|---|"]
    lines += [f"| `{r.variant}` | {r.seed} | {r.status} | {r.gpus if isinstance(r.gpus, str) else '–'} | `{r.run_id}` |" if isinstance(r.run_id, str)
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


def metric_name(label: str) -> str:
    """A report quantity as part of an MLflow metric name: lower case, every run of characters other than
    letters and digits one `_` (`trained pass@k` → `trained_pass_k`, `step time (s)` → `step_time_s`)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def comparison_metrics(paired: pd.DataFrame) -> dict[str, float]:
    """`paired_table` as metrics of the study's run, so the MLflow UI shows what the report concludes:
    `paired/<variant>/<quantity>/mean|low|high|n` (`welch/…` for an arm without two seeds in common) and, for
    the HEADLINE quantities, `power/<variant>/<quantity>/min_detectable|seeds_needed`. NaN and inf are left out
    (no interval; more seeds than power.MAX_SEEDS)."""
    found = {}
    for _, r in paired.iterrows():
        prefix = f"{r['interval']}/{r['variant']}/{metric_name(r['quantity'])}"
        found |= {f"{prefix}/mean": r["diff"], f"{prefix}/low": r["ci_low"], f"{prefix}/high": r["ci_high"], f"{prefix}/n": r["n"]}
        if r["quantity"] in HEADLINE and r["interval"] == "paired":
            found |= {f"power/{r['variant']}/{metric_name(r['quantity'])}/min_detectable": r["min_detectable"],
                      f"power/{r['variant']}/{metric_name(r['quantity'])}/seeds_needed": r["seeds_needed"]}
    return {k: float(v) for k, v in found.items() if math.isfinite(v)}


def log_comparisons(client: MlflowClient, run_id: str, paired: pd.DataFrame) -> dict[str, float]:
    """`comparison_metrics(paired)` logged to the run `run_id` (the study's), step 0; returns them."""
    metrics = comparison_metrics(paired)
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, 0) for key, value in sorted(metrics.items())]
    for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a call
        client.log_batch(run_id, metrics=batch[start:start + 1000])
    return metrics


def build_report(client: MlflowClient, spec: StudySpec, cells: list[dict], study_run: str, out: Path | None = None) -> str:
    """Collect every cell from MLflow, write the report to `out` (default reports/<study>/) and to the
    study's MLflow run (`report/`, and `comparison_metrics` as its metrics); returns the markdown."""
    out = output_folder(out or REPORTS_DIR / spec.name, "--out")
    results = collect(client, spec.name, cells)
    table = cell_table(results)
    text, paired = _write_tables(out, spec, table, client.tracking_uri)
    atomic_write_text(out / "cells.csv", table.to_csv(index=False))
    for name, figure in (("reward_curves.png", reward_figure(spec, results)), ("mia_roc.png", roc_figure(spec, results))):
        with atomic_output(out / name) as tmp:
            figure.savefig(tmp, dpi=110)
        figure.clf()
    for name in REPORT_FILES:
        client.log_artifact(study_run, str(out / name), "report")
    log_comparisons(client, study_run, paired)
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


def report_from_cells(cells_csv: Path, spec: StudySpec, out: Path, note: str = "") -> str:
    """A report's text rebuilt from its `cells.csv` alone (a shipped study whose MLflow store is gone) with
    today's analysis: report.md, summary.csv and paired.csv in `out` (the figures need the store: keep the
    old ones). The study file's variants and seeds without a cell there are left out, and the report says so,
    with `note` (what the reader should know about the run, e.g. the param names of its time)."""
    if not Path(cells_csv).is_file():
        raise ConfigError(f"{cells_csv}: cells table not found (a report's cells.csv)")
    cells = pd.read_csv(cells_csv)
    for column in ("variant", "seed", "status"):
        if column not in cells:
            raise ConfigError(f"{cells_csv}: no column {column!r} (a report's cells.csv has variant, seed, status, run_id, gpus, ...)")
    cells = cells.assign(**{c: None for c in ("run_id", "gpus") if c not in cells})  # older reports kept no GPUs
    present, seeds = set(cells["variant"]), sorted(set(cells["seed"]))
    if spec.baseline not in present:
        raise ConfigError(f"{cells_csv}: no cell of the baseline {spec.baseline!r} (variants there: {', '.join(sorted(present))})")
    left_out = [v.name for v in spec.variants if v.name not in present]
    unknown = sorted(present - {v.name for v in spec.variants})
    if unknown:
        raise ConfigError(f"{cells_csv}: variant(s) {', '.join(unknown)} not in study {spec.name!r}")
    spec = spec.model_copy(update={"variants": [v for v in spec.variants if v.name in present], "seeds": [int(s) for s in seeds]})
    rebuilt = (f"*Rebuilt {datetime.date.today().isoformat()} from this run's `cells.csv` with the paired analysis; "
               "the figures are the run's own.*" + (f" The study file's variants without a cell in this run, left out: "
                                                   f"{', '.join(f'`{v}`' for v in left_out)}." if left_out else ""))
    return _write_tables(output_folder(out, "--out"), spec, cells, None, f"{rebuilt} {note}".strip())[0]


def _write_tables(out: Path, spec: StudySpec, cells: pd.DataFrame, store: str | None, note: str = "") -> tuple[str, pd.DataFrame]:
    """The report's text and tables from its cell table, written to `out` (report.md, summary.csv, paired.csv);
    -> the text and the paired table."""
    paired = paired_table(cells, spec)
    summary = summary_table(cells, spec, paired)
    text = markdown(spec, cells, summary, paired, store, note)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out / "paired.csv", paired.to_csv(index=False))
    return text, paired
