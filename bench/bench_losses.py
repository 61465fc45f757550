"""What each member of the GRPO family costs per step against plain GRPO, measured side by side.

Per block: `--steps` plain GRPO steps end to end (rollouts, rewards, reference, update) make the
block's batch of rollouts and its step time; then the update of that one batch (`trainer.update`, the
only part a policy loss or an aggregation changes) under each contender, taking turns `--repeats`
times in the block's order. A contender's step-time ratio is (plain step + its update - plain update)
/ plain step, per block; printed with their median and spread (min, max) over the blocks. The
advantage estimators (RLOO, OPO) and the overlong punishment are a few tensor ops on [B] rewards
outside the update (not timed); DAPO's update is plain GRPO's, its cost is dynamic sampling's extra
rollout batches (`train/rollout_batches` of the baselines study).

    make bench-losses     # or: python bench/bench_losses.py --blocks 5 --repeats 6 --steps 3

Needs `make run` (or `dvc repro mia`) first, for models/base and data/train_weighted.parquet.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import block_order, engine_on_base, make_batch, markdown_table, scratch_params, seconds, spread, take_turns

ROOT = Path.cwd()
CONTENDERS = {  # name -> overrides of the default params (the baselines study's arms, where they touch the update)
    "grpo": [],
    "gspo": ["train.loss.policy.name=gspo", "train.loss.loss_agg_mode=seq-mean-token-mean"],
    "cispo": ["train.loss.policy.name=cispo"],
    "dr_grpo": ["train.loss.scale_rewards=none", "train.loss.loss_agg_mode=seq-mean-token-sum-norm"],
    "entropy_bonus": ["train.loss.entropy_coef=0.01"],
}


def bench(a) -> list[dict[str, float]]:
    """Per block: the median plain step, and each contender's median update of the block's batch, in seconds."""
    from grpolab import config
    from grpolab.rewards import Rewarder
    from grpolab.trainer.update import update
    from grpolab.trainer.loss_weights import LossWeighting

    params = {name: config.apply_overrides(overrides, scratch_params(ROOT)) for name, overrides in CONTENDERS.items()}  # a file each
    plain = params["grpo"]
    engine, _, ref, tokenizer, data = engine_on_base(ROOT, plain)
    variants, rewarder = LossWeighting(plain, data, tokenizer), Rewarder(plain)
    made = {}

    def plain_step(i: int) -> None:
        made["batch"], _ = make_batch(plain, engine, ref, tokenizer, data, rewarder, variants, i)
        update(plain, engine, made["batch"])

    plain_step(0)  # warm-up (untimed)
    updates = {name: (lambda _, p=p: seconds(lambda: update(p, engine, made["batch"]))) for name, p in params.items()}
    blocks = []
    for block in range(a.blocks):
        steps = [seconds(lambda: plain_step(1 + block * a.steps + i)) for i in range(a.steps)]
        got = take_turns(updates, block, a.repeats)
        blocks.append({"step": statistics.median(steps), **{name: statistics.median(t) for name, t in got.items()}})
    return blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=5, help="blocks, rotating which contender goes first")
    p.add_argument("--repeats", type=int, default=6, help="timed updates of each contender per block, taking turns")
    p.add_argument("--steps", type=int, default=3, help="plain GRPO steps timed end to end per block")
    a = p.parse_args()
    blocks = bench(a)
    names = list(CONTENDERS)
    ratio = lambda b, name: (b["step"] + b[name] - b["grpo"]) / b["step"]  # noqa: E731
    print(f"\nThe update of one batch of rollouts per contender vs plain GRPO ({a.blocks} blocks: {a.steps} plain steps, "
          f"then {a.repeats} updates of the block's last batch by each contender, taking turns; per block the medians)")
    print(markdown_table(["block", "order", "plain step (ms)", *[f"{n} update (ms)" for n in names]],
                         [[i + 1, ", ".join(block_order(names, i)), f"{b['step'] * 1e3:.0f}", *[f"{b[n] * 1e3:.0f}" for n in names]]
                          for i, b in enumerate(blocks)]))
    print(markdown_table(["contender", "update ratio vs grpo, median [min, max]", "step-time ratio vs grpo, median [min, max]"],
                         [[n, f"{spread([b[n] / b['grpo'] for b in blocks], fmt='{:.3f}')}x", f"{spread([ratio(b, n) for b in blocks], fmt='{:.3f}')}x"]
                          for n in names[1:]]))


if __name__ == "__main__":
    main()
