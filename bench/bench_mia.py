"""What MIA costs, measured side by side in one run.

1. Min-K%++ scoring of a batch (forward pass + per-token mean/variance of log p under the
   model's own distribution + lowest-k selection) against a bare forward pass over the same
   batch: the ratio of median times over interleaved repeats.
2. The MIA-weighted loss against plain GRPO: training steps with `train.use_mia_weighted_loss`
   on and off, alternated in pairs from the same start, the ratio of mean step times; and the
   weight lookup itself timed directly, as a share of a step.

    make bench-mia        # or: python bench/bench_mia.py --repeats 30 --steps 8 --pairs 3

Needs `make run` (or `dvc repro mia`) first, for models/base and data/train_weighted.parquet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path.cwd()


def bench_scoring(a) -> tuple[float, float]:
    from grpolab.data.tokenizer import encode_prompt, load_tokenizer
    from grpolab.mia import scores as S
    from grpolab.models import load_model
    from grpolab.rollout import completion_logits, sample

    model, tokenizer = load_model(ROOT / "models/base").eval(), load_tokenizer(str(ROOT / "models/base"))
    prompts = pd.read_parquet(ROOT / "data/train.parquet")["prompt"].tolist()[: a.batch]
    with torch.no_grad():
        r = sample(model, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens=48,
                   eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    parts = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)

    @torch.no_grad()
    def bare():
        completion_logits(model, *parts)

    @torch.no_grad()
    def min_k_plus_plus():
        logp, mu, sigma = S.token_statistics(completion_logits(model, *parts), r.completion_ids)
        S.score_min_k_plus_plus(logp, mu, sigma, r.completion_mask, 0.2)

    times = {bare: [], min_k_plus_plus: []}
    for fn in times:
        fn()  # warm-up
    for _ in range(a.repeats):
        for fn in times:
            began = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - began)
    return statistics.median(times[bare]), statistics.median(times[min_k_plus_plus])


def bench_weighted_loss(a) -> tuple[float, float, float]:
    from grpolab import config
    from grpolab.train import CURVE_FILE, train
    from grpolab.variants import Variants

    step_times = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("data", "models/base"):
            shutil.copytree(ROOT / name, Path(tmp) / name)
        shutil.copy(ROOT / "params.yaml", Path(tmp) / "params.yaml")
        os.chdir(tmp)
        try:
            for pair in range(a.pairs):
                for on in (False, True) if pair % 2 == 0 else (True, False):
                    params = config.apply_overrides([
                        f"train.steps={a.steps}", "train.save_every=0", f"train.use_mia_weighted_loss={str(on).lower()}",
                        "train.mia_weighting_mode=quadratic", "train.mia_invert_weights=true",
                    ])
                    train(params)
                    step_times[on] += pd.read_csv(CURVE_FILE)["train/step_time"].iloc[1:].tolist()  # first step warms up
            # the weight lookup and transform alone, for one batch of rollouts
            data = pd.read_parquet("data/train_weighted.parquet")
            variants = Variants(params, data)
            rows = [data.iloc[i] for i in range(params.train.prompts_per_step) for _ in range(params.train.group_size)]
            mask = torch.ones(len(rows), params.train.max_new_tokens, dtype=torch.long)
            began = time.perf_counter()
            for _ in range(100):
                variants.loss_weights(mask, rows)
            lookup = (time.perf_counter() - began) / 100
        finally:
            os.chdir(ROOT)
    return statistics.mean(step_times[False]), statistics.mean(step_times[True]), lookup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="texts scored per batch")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats of each scoring function")
    p.add_argument("--steps", type=int, default=8, help="training steps per run")
    p.add_argument("--pairs", type=int, default=3, help="(plain, weighted) training runs, order alternating")
    a = p.parse_args()
    bare, mkpp = bench_scoring(a)
    plain, weighted, lookup = bench_weighted_loss(a)
    print(f"\nMin-K%++ scoring of {a.batch} texts vs a bare forward pass ({a.repeats} interleaved repeats, median)")
    print(f"  bare forward   {bare * 1e3:8.1f} ms")
    print(f"  Min-K%++       {mkpp * 1e3:8.1f} ms")
    print(f"  ratio          {mkpp / bare:8.3f}x   (goal <= 1.2x)")
    print(f"\nMIA-weighted loss vs plain GRPO ({a.pairs} pairs of {a.steps}-step runs, mean step time)")
    print(f"  plain          {plain:8.3f} s/step")
    print(f"  weighted       {weighted:8.3f} s/step")
    print(f"  ratio          {weighted / plain:8.3f}x   (goal <= 1.02x)")
    print(f"  weight lookup  {lookup * 1e3:8.3f} ms/step = {lookup / plain:.2%} of a plain step")


if __name__ == "__main__":
    main()
