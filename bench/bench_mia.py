"""What MIA costs, measured side by side in one run.

1. Min-K%++ scoring of a batch (forward pass + per-token mean/variance of log p under the
   model's own distribution + lowest-k selection) against a bare forward pass over the same
   batch: the ratio of median times over interleaved repeats.
2. The MIA-weighted loss against plain GRPO: the weight lookup plus the update of one fixed
   batch of rollouts, with MIA weights and with all-ones weights alternating; the difference,
   added to a plain step's time (rollouts + update), gives the step-time ratio.

    make bench-mia        # or: python bench/bench_mia.py --repeats 30 --steps 8

Needs `make run` (or `dvc repro mia`) first, for models/base and data/train_weighted.parquet.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from common import engine_on_base, scratch_params

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
    """(plain step time, loss weights + update with MIA weights, the same with all-ones weights):
    the update is timed on one fixed batch of rollouts, weighted and plain alternating, so the
    difference is the weighting's cost alone, without two diverging trajectories' noise."""
    from grpolab import config
    from grpolab.train import make_batch, update
    from grpolab.variants import Variants

    scratch = scratch_params(ROOT)
    weighted = config.apply_overrides(["train.use_mia_weighted_loss=true", "train.mia_weighting_mode=quadratic",
                                       "train.mia_invert_weights=true"], scratch)
    plain = config.apply_overrides(["train.use_mia_weighted_loss=false"], scratch)
    engine, _, ref, tokenizer, data = engine_on_base(ROOT, plain)
    variants = {False: Variants(plain, data, tokenizer), True: Variants(weighted, data, tokenizer)}

    steps = []
    for i in range(a.steps):  # plain steps end to end: rollouts, rewards, reference, update
        began = time.perf_counter()
        batch, info = make_batch(plain, engine, ref, tokenizer, data, None, variants[False], i)
        update(plain, engine, batch)
        steps.append(time.perf_counter() - began)
    rows = info["rows"]
    updates = {False: [], True: []}
    for _ in range(a.repeats):
        for on in (False, True):
            began = time.perf_counter()
            batch.weights = variants[on].loss_weights(batch.rollout, rows, batch.token_class, engine.module)
            update(weighted if on else plain, engine, batch)
            updates[on].append(time.perf_counter() - began)
    return statistics.median(steps[1:]), statistics.median(updates[True]), statistics.median(updates[False])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="texts scored per batch")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats of each scoring function")
    p.add_argument("--steps", type=int, default=8, help="plain training steps timed end to end")
    a = p.parse_args()
    bare, mkpp = bench_scoring(a)
    step, update_weighted, update_plain = bench_weighted_loss(a)
    print(f"\nMin-K%++ scoring of {a.batch} texts vs a bare forward pass ({a.repeats} interleaved repeats, median)")
    print(f"  bare forward   {bare * 1e3:8.1f} ms")
    print(f"  Min-K%++       {mkpp * 1e3:8.1f} ms")
    print(f"  ratio          {mkpp / bare:8.3f}x   (goal <= 1.2x)")
    added = update_weighted - update_plain
    print(f"\nMIA-weighted loss vs plain GRPO (update of one batch, {a.repeats} interleaved repeats, median)")
    print(f"  plain step (rollouts + update)  {step * 1e3:8.1f} ms  (median of {a.steps - 1} steps)")
    print(f"  update, plain weights           {update_plain * 1e3:8.1f} ms")
    print(f"  update, MIA weights             {update_weighted * 1e3:8.1f} ms")
    print(f"  step-time ratio                 {(step + added) / step:8.3f}x   (goal <= 1.02x)")


if __name__ == "__main__":
    main()
