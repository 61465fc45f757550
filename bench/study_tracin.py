"""Seeds 001/003's question on the default task: does TracIn with the original separate
validation set stall while same-batch TracIn (and the recommended separate set) learns?

Runs seeds x {plain GRPO, TracIn separate as the original, TracIn separate as recommended,
TracIn same-batch}: each seed's prepare/sft/mia once in ROOT/seed<N>, each cell's train and
evaluate in ROOT/seed<N>-<arm>, every run in the MLflow store ROOT/mlflow.db (experiment
`tracin-study`, tags `grpolab.variant` and `grpolab.seed`). A cell whose eval.json exists is
not run again. Then prints the result tables (mean +- std over seeds, per-seed values) and
writes ROOT/report.md and ROOT/reward_curves.png.

    python bench/study_tracin.py --root /tmp/tracin-study [--seeds 0 1 2] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARMS: dict[str, list[str]] = {
    "plain": [],
    "separate-original": [
        "train.tracin.use_tracin=true", "train.tracin.validation=separate", "train.tracin.val_batch_size=16",
        "train.tracin.val_selection=top", "train.tracin.val_loss=seqloss-reward",
    ],
    "separate-recommended": [
        "train.tracin.use_tracin=true", "train.tracin.validation=separate", "train.tracin.val_batch_size=64",
        "train.tracin.val_selection=random", "train.tracin.val_loss=seqloss-lastadv",
    ],
    "same-batch": ["train.tracin.use_tracin=true", "train.tracin.validation=same_batch"],
}
TRACIN_COLUMNS = ["tracin/positive_ratio", "tracin/selected_ratio", "tracin/fallback", "tracin/val_grad_norm", "tracin/val_reward_mean"]


def grpolab(cwd: Path, *args: str) -> None:
    subprocess.run([str(BIN / "grpolab"), *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def base(root: Path, seed: int) -> Path:
    folder = root / f"seed{seed}"
    if not (folder / "models/base/config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "params.yaml", folder / "params.yaml")
        grpolab(folder, "stage", "prepare", "-S", f"seed={seed}")
        grpolab(folder, "stage", "sft")
        grpolab(folder, "stage", "mia")
    return folder


def cell(root: Path, seed: int, arm: str, steps: int) -> Path:
    folder = root / f"seed{seed}-{arm}"
    if (folder / "metrics/eval.json").is_file():
        return folder
    source = base(root, seed)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("data", "models"):
        shutil.copytree(source / name, folder / name, ignore=shutil.ignore_patterns("trained"))
    shutil.copy(source / "params.yaml", folder / "params.yaml")
    overrides = [
        f"seed={seed}", f"train.steps={steps}", *ARMS[arm], f"tracking.uri=sqlite:///{root.resolve()}/mlflow.db",
        "tracking.experiment=tracin-study", f"tracking.tags={{grpolab.variant: {arm}, grpolab.seed: '{seed}'}}",
    ]
    grpolab(folder, "stage", "train", *[f"-S{o}" for o in overrides])
    grpolab(folder, "stage", "evaluate")
    return folder


def _influence_logs(folder: Path) -> pd.DataFrame:
    files = sorted((folder / "metrics/tracin").glob("step_*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files]) if files else pd.DataFrame()


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def report(root: Path, seeds: list[int]) -> str:
    rows, curves = [], {}
    for arm in ARMS:
        evals = [json.loads((root / f"seed{s}-{arm}/metrics/eval.json").read_text()) for s in seeds]
        frames = [pd.read_csv(root / f"seed{s}-{arm}/metrics/train_curve.csv") for s in seeds]
        curves[arm] = frames
        row = {"arm": arm}
        for key in ("base/success_rate", "trained/success_rate", "trained/sampled/success_rate"):
            values = [e[key] for e in evals]
            row[key] = f"{mean_std(values)} ({', '.join(f'{v:.3f}' for v in values)})"
        for key in TRACIN_COLUMNS:
            if key in frames[0]:
                row[key] = mean_std([f[key].mean() for f in frames])
        logs = [_influence_logs(root / f"seed{s}-{arm}") for s in seeds]
        if all(len(log) for log in logs):
            for name, sign in (("kept if A > 0", 1), ("kept if A < 0", -1)):
                row[name] = mean_std([log[np.sign(log["advantage"]) == sign]["kept"].mean() for log in logs])
        rows.append(row)
    table = pd.DataFrame(rows).fillna("–").to_markdown(index=False)
    curve_rows = []
    for arm, frames in curves.items():
        stacked = np.stack([f["train/reward_mean"].to_numpy() for f in frames])
        for lo, hi in ((1, 10), (11, 20), (41, 50), (91, 100)):
            if hi <= stacked.shape[1]:
                curve_rows.append({"arm": arm, "steps": f"{lo}-{hi}", "reward mean": mean_std(stacked[:, lo - 1 : hi].mean(1).tolist())})
    curve_table = pd.DataFrame(curve_rows).pivot(index="arm", columns="steps", values="reward mean").to_markdown()
    _plot(root, curves)
    return f"{table}\n\nTrain reward (mean over the steps, mean ± std over seeds):\n\n{curve_table}\n"


def _plot(root: Path, curves: dict[str, list[pd.DataFrame]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    for color, (arm, frames) in zip(("C0", "C1", "C2", "C3"), curves.items()):
        stacked = np.stack([f["train/reward_mean"].rolling(5, min_periods=1).mean().to_numpy() for f in frames])
        ax.plot(frames[0]["step"], stacked.mean(0), label=arm, color=color)
        ax.fill_between(frames[0]["step"], stacked.min(0), stacked.max(0), alpha=0.12, color=color)
        if "tracin/selected_ratio" in frames[0]:
            kept = np.stack([f["tracin/selected_ratio"].rolling(5, min_periods=1).mean() for f in frames]).mean(0)
            bx.plot(frames[0]["step"], kept, label=arm, color=color)
    ax.set(xlabel="step", ylabel="train reward (5-step mean)", title="reward: mean over seeds, band min-max")
    bx.set(xlabel="step", ylabel="selected share (5-step mean)", title="TracIn: share of completions kept, mean over seeds")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "reward_curves.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for arm in ARMS:
            print(f"==> seed {seed} {arm}", flush=True)
            cell(args.root, seed, arm, args.steps)
    text = report(args.root, args.seeds)
    (args.root / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
