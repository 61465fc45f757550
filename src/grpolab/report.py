"""The end-of-run summary: printed by `grpolab run` and published as a Prefect artifact."""

from __future__ import annotations

import json
from pathlib import Path

from grpolab.config import Params
from grpolab.evaluate import METRICS_FILE
from grpolab.tracking import tracking_uri

OUTPUTS = [
    "data/train.parquet", "data/eval.parquet", "data/tokenizer/", "data/train_weighted.parquet", "models/base/",
    "models/trained/", "metrics/train_curve.csv", "metrics/eval.json", "metrics/eval_samples.jsonl", "metrics/mia_roc/",
]


def summary_markdown(params: Params) -> str:
    metrics = json.loads(Path(METRICS_FILE).read_text())
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
