"""What TracIn costs, measured side by side in one run (seed 001/003's variant, issue 9).

Four contenders, each a whole training step on the same model and the same batch of rollouts:
  plain        sample, score, weigh (rollouts, rewards, reference) + update: plain GRPO
  same_batch   + influence against the batch's own gradient (ghost inner products), then update
  separate     + validation rollouts, L_val's gradient, influence against it, then update
  naive        + influence by one backward per completion (per-sample gradients over the same
               parameters, each dotted with the batch gradient from one more backward), then update
The model and optimizer are restored before each contender (untimed), so all four see the same
model and sample the same batch; blocks alternate the order and use a new batch each. Reported:
median step time and spread (min-max over blocks), the per-block ratio to plain, and what the
influence adds to a plain step, same-batch against naive. Then a profile of one influence step.

    make bench-tracin     # or: python bench/bench_tracin.py --blocks 7

Needs `make run` (or `dvc repro mia`) first, for models/base, data/train_weighted.parquet and data/val.parquet.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from common import alternate, engine_on_base, hf_sampler, make_batch, scratch_params, spread

ROOT = Path.cwd()
CONTENDERS = ("plain", "same_batch", "separate", "naive")


def naive_influence(tracin, model, batch) -> torch.Tensor:
    """<grad L_i, grad L_batch> with one autograd backward per completion over the probed parameters."""
    from grpolab.runtime import distributed as dist
    from grpolab.algos.losses import aggregation_units

    t = tracin.params.train
    params = list(tracin.probe.params.values())
    units = dist.all_reduce_sum(aggregation_units(batch.rollout.completion_mask.float(), t.loss.loss_agg_mode))
    n = len(batch.advantages)
    active = batch.advantages.nonzero().squeeze(-1).tolist()  # the same rows the ghost pass skips
    take = lambda index: batch.take(torch.tensor(index))  # noqa: E731
    model.train()
    v = None
    for start in range(0, len(active), t.micro_batch_size):
        grads = torch.autograd.grad(tracin._pg_loss(model, take(active[start : start + t.micro_batch_size]), units), params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        v = flat if v is None else v + flat
    influence = torch.zeros(n, dtype=torch.float64)
    for i in active:
        grads = torch.autograd.grad(tracin._pg_loss(model, take([i]), units), params)
        influence[i] = (torch.cat([g.reshape(-1) for g in grads]) @ v).item()
    return influence


def main() -> None:
    import grpolab.stages.train as T
    import grpolab.trainer.tracin as I
    import grpolab.trainer.update as U
    from grpolab import config
    from grpolab.algos.tracin import select
    from grpolab.rewards import Rewarder
    from grpolab.trainer.tracin import TracIn
    from grpolab.trainer.loss_weights import LossWeighting

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=7, help="blocks of the four contenders, alternating their order")
    a = p.parse_args()

    plain = config.apply_overrides(["train.tracin.use_tracin=false"], scratch := scratch_params(ROOT))
    same = config.apply_overrides(["train.tracin.use_tracin=true", "train.tracin.validation.name=same_batch"], scratch)
    separate = config.apply_overrides(["train.tracin.validation.name=separate"], scratch)  # defaults: 64, random, seqloss-lastadv
    engine, optimizer, ref, tokenizer, data = engine_on_base(ROOT, plain)
    variants, rewarder = LossWeighting(plain, data, tokenizer), Rewarder(plain)
    sampler = hf_sampler(plain, engine, tokenizer)
    tracins = {"same_batch": TracIn(same, engine.module, tokenizer, Rewarder(same), sampler),
               "separate": TracIn(separate, engine.module, tokenizer, Rewarder(separate), sampler)}
    tracins["naive"] = tracins["same_batch"]
    snapshot = (copy.deepcopy(engine.module.state_dict()), copy.deepcopy(optimizer.state_dict()))
    g = plain.train.group_size

    def step(name: str, index: int) -> dict:
        engine.module.load_state_dict(snapshot[0])
        optimizer.load_state_dict(snapshot[1])
        began = time.perf_counter()
        batch, sampled = make_batch(plain, engine, ref, tokenizer, data, rewarder, variants, index)
        if name in ("same_batch", "separate"):
            batch.weights.keep = tracins[name].select(engine.module, batch, sampled, index, index + 1).keep
        elif name == "naive":
            scores = naive_influence(tracins[name], engine.module, batch)
            batch.weights.keep = select(scores, 0.1, 0.5)[0]
        U.update(plain, engine, batch)  # through the module: the profile below wraps it
        return {"time": time.perf_counter() - began, "active": int((batch.advantages != 0).sum())}

    for name in CONTENDERS:  # warm-up (untimed)
        step(name, 10_000)
    results = alternate({name: (lambda block, name=name: step(name, block)) for name in CONTENDERS}, a.blocks)
    times = {name: [r["time"] for r in results[name]] for name in CONTENDERS}
    active = [r["active"] for r in results["plain"]]  # the same batch for every contender of a block

    n = plain.train.prompts_per_step * g
    print(f"\nTracIn step cost: {a.blocks} blocks x 4 contenders, one model and batch per block, {n} completions per step")
    print(f"completions with a non-zero advantage (the rows an influence pass runs on): {spread(active, fmt='{:.0f}')}")
    print(f"{'contender':<12} {'step ms: median [min, max]':>30} {'ratio to plain: median [min, max]':>36}")
    for name in CONTENDERS:
        ratios = [x / y for x, y in zip(times[name], times["plain"])]
        print(f"{name:<12} {spread(times[name], 1e3):>30} {spread(ratios, fmt='{:.2f}'):>36}")
    added = {name: [x - y for x, y in zip(times[name], times["plain"])] for name in ("same_batch", "naive")}
    ratio = [nv / max(sb, 1e-9) for nv, sb in zip(added["naive"], added["same_batch"])]
    print(f"added to a plain step: same_batch {spread(added['same_batch'], 1e3)} ms, naive {spread(added['naive'], 1e3)} ms; "
          f"naive / same_batch {spread(ratio, fmt='{:.1f}')}x  (goal >= 5x)")

    phases = {  # (module, attribute) -> label; wrapped to sum their wall time
        (T, "sample_rollouts"): "sample (rollouts)",
        (T, "score"): "score (rewards)",
        (T, "weigh"): "weigh (advantages, weights, reference log-probs)",
        (U, "update"): "update (forward, backward, optimizer step)",
        (I.TracIn, "select"): "TracIn.select (influence + selection)",
        (I.TracIn, "_validation_gradient"): "  validation rollouts + L_val gradient",
        (I.TracIn, "_pg_loss"): "  policy forward of the influence pass",
        (I.GradientProbe, "capture"): "  forward + autograd.grad to the hooked outputs",
        (I, "accumulate"): "  batch gradient from the captures",
        (I, "inner_products"): "  inner products",
    }
    spent: dict[str, float] = {}

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - began
        return wrapper

    for (owner, attr), label in phases.items():
        setattr(owner, attr, timed(getattr(owner, attr), label))
    for name in ("plain", "same_batch", "separate"):
        spent.clear()
        for block in range(a.blocks):
            step(name, block)
        print(f"\nwhere the time of a {name} step goes (mean ms over {a.blocks} steps; indented: inside the line above)")
        for label in phases.values():
            if label in spent:
                print(f"  {label:<50} {spent[label] / a.blocks * 1e3:8.1f}")


if __name__ == "__main__":
    main()
