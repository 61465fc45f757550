"""The pipeline's record: each stage's headline metrics file, the `summary` stage that puts the
whole pipeline into its MLflow parent run, and the end-of-run summary printed by `grpolab run` and
published as a Prefect artifact."""

from __future__ import annotations

import json

import pandas as pd

from grpolab.config import Params
from grpolab.paths import CURVE_FILE, HEADLINES, ROC_DIR
from grpolab.tracking import COMPLETE_TAG, REUSED_TAG, Tracker, tracking_uri

PARENT_ARTIFACTS = {CURVE_FILE: None, ROC_DIR: ROC_DIR.name}  # local path -> artifact folder in the parent run


def summary(params: Params, tracker: Tracker | None = None) -> dict[str, float]:
    """`summary` stage: the headline metrics of every stage, the training curve (one metric history per
    column) and the ROC curves go into the pipeline's parent run, whether a stage ran in this run tree or
    DVC restored its outputs from its cache (then it logged nothing here). Idempotent: what the parent
    already holds is not logged again. Tags the parent complete, naming the stages it did not run."""
    missing = [str(path) for path in [*HEADLINES.values(), *PARENT_ARTIFACTS] if not path.exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: missing (run the pipeline's stages first)")
    headline = {k: float(v) for path in HEADLINES.values() for k, v in json.loads(path.read_text()).items()}
    if tracker is None:
        return {"summary/metrics": float(len(headline))}
    logged = tracker.logged_metrics()
    tracker.metrics({k: v for k, v in headline.items() if logged.get(k) != v})
    if not tracker.has_history("train/reward_mean"):
        tracker.curve(pd.read_csv(CURVE_FILE))
    present = tracker.artifact_names()
    for path, folder in PARENT_ARTIFACTS.items():
        if (folder or path.name) not in present:
            tracker.artifacts(path, folder)
    reused = [stage for stage in HEADLINES if stage not in tracker.child_stages()]
    tracker.tags({COMPLETE_TAG: "true", REUSED_TAG: ", ".join(reused) or "none"})
    return {"summary/metrics": float(len(headline)), "summary/reused_stages": float(len(reused))}


OUTPUTS = [
    "data/train.parquet", "data/eval.parquet", "data/tokenizer/", "data/train_weighted.parquet", "models/base/",
    "models/trained/", "metrics/train_curve.csv", "metrics/eval.json", "metrics/eval_samples.jsonl", "metrics/mia_roc/",
]


def summary_markdown(params: Params) -> str:
    metrics = json.loads(HEADLINES["evaluate"].read_text())
    models = sorted({key.split("/")[0] for key in metrics if key.endswith("/success_rate") and key.count("/") == 1})
    rows = [
        f"| {m} | {metrics[f'{m}/success_rate']:.1%} | {metrics[f'{m}/sampled/success_rate']:.1%} | "
        f"{metrics[f'{m}/format_rate']:.1%} | {metrics[f'{m}/completion_length']:.1f} |"
        for m in models
    ]
    methods = sorted({key.split("/")[2] for key in metrics if key.split("/")[1:2] == ["mia"]})
    mia_table = [
        "| membership AUC (train vs eval prompts) | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
        *[f"| {m} | " + " | ".join(f"{metrics[f'{m}/mia/{x}/auc']:.3f}" for x in methods) + " |" for m in models],
        "",
    ] if methods else []
    return "\n".join(
        [
            "# grpolab pipeline summary",
            "",
            "| model | success (greedy) | success (sampled) | format (greedy) | completion tokens |",
            "|---|---|---|---|---|",
            *rows,
            "",
            *mia_table,
            "Outputs: " + ", ".join(f"`{o}`" for o in OUTPUTS),
            "",
            f"MLflow store: `{tracking_uri(params)}`, experiment `{params.tracking.experiment}`. "
            "Open the UI with `make ui` (or `grpolab ui`) and browse http://127.0.0.1:5000",
        ]
    )
