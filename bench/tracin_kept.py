"""Which completions TracIn kept, by the sign of their advantage, in a study's TracIn arms: from the
influence logs each train run holds (`tracin/step_*.parquet`, one per step: advantage and kept per
completion). Per train run the share kept among A > 0 and among A < 0 is taken per step and averaged over
the steps; printed as mean ± std over the seeds, with each arm's lowest kept share of any step.

    python bench/tracin_kept.py [--experiment tracin]      # MLFLOW_TRACKING_URI or ./mlflow.db
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from grpolab.tracking import SEED_TAG, STAGE_TAG, VARIANT_TAG


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def kept_shares(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """Per step: the share kept among positive- and negative-advantage completions (A = 0, a tied group's,
    in neither), and the share of all completions kept."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, "tracin", tmp))
        log = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("step_*.parquet"))])
    return log.groupby("step").apply(lambda s: pd.Series({
        "positive": s.kept[s.advantage > 0].mean(), "negative": s.kept[s.advantage < 0].mean(), "kept": s.kept.mean()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="tracin")
    args = parser.parse_args()
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    experiment = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{STAGE_TAG}` = 'train' and attributes.status = 'FINISHED'",
                              max_results=1000)
    by_arm: dict[str, dict[str, pd.DataFrame]] = defaultdict(dict)
    for run in runs:
        if any(a.path == "tracin" for a in client.list_artifacts(run.info.run_id)):
            by_arm[run.data.tags[VARIANT_TAG]][run.data.tags[SEED_TAG]] = kept_shares(client, run.info.run_id)
    print("| arm | kept if A > 0 | kept if A < 0 | kept, all | lowest kept share of any step (per seed) |\n|---|---|---|---|---|")
    for arm, seeds in sorted(by_arm.items()):
        means = pd.DataFrame({seed: shares.mean() for seed, shares in sorted(seeds.items())}).T
        lowest = ", ".join(f"{shares.kept.min():.3f}" for _, shares in sorted(seeds.items()))
        cells = [f"{means[c].mean():.3f} ± {means[c].std():.3f}" for c in ("positive", "negative", "kept")]
        print(f"| {arm} | {' | '.join(cells)} | {lowest} |")


if __name__ == "__main__":
    main()
