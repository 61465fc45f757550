"""What MIA costs, measured side by side in blocks that alternate which contender goes first.

1. Min-K%++ scoring of a batch (forward pass + per-token mean/variance of log p under the
   model's own distribution + lowest-k selection) against a forward pass that takes the
   completion tokens' log p alone, over the same batch: per block, `--repeats` rounds of one call each (in the block's order); the ratio of
   the block's median times.
2. The MIA-weighted loss against plain GRPO. Per block: `--steps` plain steps end to end
   (rollouts + update), then the weight lookup plus the update of the block's last batch of
   rollouts, with MIA weights and with all-ones weights taking turns `--repeats` times (in the
   block's order); the difference of the medians, added to the median plain step, gives the
   block's step-time ratio.
Blocks alternate the order (A, B; then B, A; ...). Prints the per-block figures and the median
and spread (min, max) of each ratio over the blocks.

    make bench-mia        # or: python bench/bench_mia.py --blocks 5 --repeats 10 --steps 4

Needs `make run` (or `dvc repro mia`) first, for models/base and data/train_weighted.parquet.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import torch

from common import block_order, engine_on_base, make_batch, markdown_table, scratch_params, seconds, spread, take_turns

ROOT = Path.cwd()


def bench_scoring(a) -> list[tuple[float, float]]:
    """Per block: (median bare forward, median Min-K%++ scoring), in seconds."""
    from grpolab.algos.losses import token_logprobs
    from grpolab.data.tokenizer import encode_prompt, load_tokenizer
    from grpolab.mia import scores as S
    from grpolab.models import load_model
    from grpolab.logprobs import completion_token_stats
    from grpolab.samplers import stop_ids
    from grpolab.samplers.hf import sample

    model, tokenizer = load_model(ROOT / "models/base").eval(), load_tokenizer(str(ROOT / "models/base"))
    prompts = pd.read_parquet(ROOT / "data/train.parquet")["prompt"].tolist()[: a.batch]
    with torch.no_grad():
        r = sample(model, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens=48,
                   eos_ids=stop_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)

    @torch.no_grad()
    def bare():  # the forward and the completion tokens' log p, nothing else
        completion_token_stats(model, r, lambda logits, y: (token_logprobs(logits, y),))

    @torch.no_grad()
    def min_k_plus_plus():
        logp, mu, sigma = completion_token_stats(model, r, S.token_statistics)
        S.score_min_k_plus_plus(logp, mu, sigma, r.completion_mask, 0.2)

    contenders = {"bare": lambda _: seconds(bare), "Min-K%++": lambda _: seconds(min_k_plus_plus)}
    for fn in contenders.values():
        fn(-1)  # warm-up
    blocks = [take_turns(contenders, block, a.repeats) for block in range(a.blocks)]
    return [(statistics.median(b["bare"]), statistics.median(b["Min-K%++"])) for b in blocks]


def bench_weighted_loss(a) -> list[tuple[float, float, float]]:
    """Per block: (median plain step time, loss weights + update with MIA weights, the same with
    all-ones weights): the update is timed on one fixed batch of rollouts, weighted and plain taking
    turns, so the difference is the weighting's cost alone, without two diverging trajectories' noise."""
    from grpolab import config
    from grpolab.rewards import Rewarder
    from grpolab.logprobs import by_length
    from grpolab.trainer.update import update
    from grpolab.trainer.loss_weights import LossWeighting

    scratch = scratch_params(ROOT)
    weighted = config.apply_overrides(["train.mia_weighting.use_mia_weighted_loss=true", "train.mia_weighting.mia_weighting_mode=quadratic",
                                       "train.mia_weighting.mia_invert_weights=true"], scratch)
    plain = config.apply_overrides(["train.mia_weighting.use_mia_weighted_loss=false"], scratch)
    engine, _, ref, tokenizer, data = engine_on_base(ROOT, plain)
    variants = {False: LossWeighting(plain, data, tokenizer), True: LossWeighting(weighted, data, tokenizer)}
    rewarder = Rewarder(plain)
    made = {}

    def plain_step(i: int) -> None:  # end to end: rollouts, rewards, reference, update
        made["batch"], made["sampled"] = make_batch(plain, engine, ref, tokenizer, data, rewarder, variants[False], i)
        update(plain, engine, made["batch"])

    def weighted_update(on: bool) -> float:
        def run() -> None:
            batch = made["batch"]
            micro_batches = by_length(batch.rollout.completion_mask, plain.train.micro_batch_size)
            batch.weights = variants[on].loss_weights(batch.rollout, made["sampled"].rows, batch.token_class, engine.module,
                                                      micro_batches)
            update(weighted if on else plain, engine, batch)
        return seconds(run)

    plain_step(0)  # warm-up (untimed)
    updates = {"plain": lambda _: weighted_update(False), "MIA": lambda _: weighted_update(True)}
    blocks = []
    for block in range(a.blocks):
        steps = [seconds(lambda: plain_step(1 + block * a.steps + i)) for i in range(a.steps)]
        got = take_turns(updates, block, a.repeats)
        blocks.append((statistics.median(steps), statistics.median(got["MIA"]), statistics.median(got["plain"])))
    return blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=5, help="blocks, alternating which contender goes first")
    p.add_argument("--batch", type=int, default=256, help="texts scored per batch")
    p.add_argument("--repeats", type=int, default=10, help="timed calls of each contender per block, taking turns")
    p.add_argument("--steps", type=int, default=4, help="plain training steps timed end to end per block")
    a = p.parse_args()
    scoring = bench_scoring(a)
    loss = bench_weighted_loss(a)

    order = lambda names, b: ", ".join(block_order(names, b))  # noqa: E731
    ratios = [m / b for b, m in scoring]
    print(f"\nMin-K%++ scoring of {a.batch} texts vs a bare forward pass ({a.blocks} blocks x {a.repeats} "
          f"calls each taking turns; per block the median)")
    print(markdown_table(["block", "order", "bare forward (ms)", "Min-K%++ (ms)", "ratio"],
                         [[i + 1, order(["bare", "Min-K%++"], i), f"{b * 1e3:.1f}", f"{m * 1e3:.1f}", f"{r:.3f}x"]
                          for i, ((b, m), r) in enumerate(zip(scoring, ratios))]))
    print(f"ratio, median [min, max] over {a.blocks} blocks: {spread(ratios, fmt='{:.3f}')}x   (goal <= 1.2x)")

    step_ratios = [(step + mia - ones) / step for step, mia, ones in loss]
    print(f"\nMIA-weighted loss vs plain GRPO ({a.blocks} blocks: {a.steps} plain steps, then {a.repeats} updates "
          f"of the block's last batch with each weighting, taking turns; per block the medians)")
    print(markdown_table(["block", "order", "plain step (ms)", "update, plain weights (ms)", "update, MIA weights (ms)",
                          "step-time ratio"],
                         [[i + 1, order(["plain", "MIA"], i), f"{step * 1e3:.1f}", f"{ones * 1e3:.1f}", f"{mia * 1e3:.1f}",
                           f"{r:.3f}x"] for i, ((step, mia, ones), r) in enumerate(zip(loss, step_ratios))]))
    print(f"step-time ratio, median [min, max] over {a.blocks} blocks: {spread(step_ratios, fmt='{:.3f}')}x   (goal <= 1.02x)")


if __name__ == "__main__":
    main()
