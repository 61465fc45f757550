"""TracIn beside the training loop: activation captures, the influence pass, validation
rollouts and the per-step influence log. The math is in `algos/influence.py`; the loop only
asks `TracIn.select` for a batch's keep mask, which enters the loss at the composition point.

Which parameters enter the inner product: every trainable parameter used by an `nn.Linear`
(weight and bias) or an `nn.Embedding` (the token table, tied to the output head in the tiny
model, so the tied matrix's whole gradient counts). Left out: normalisation scales, which hold
well under 1 % of the parameters and whose per-row gradient needs the layer's internal
normalised input, not its input. With a PEFT model only the adapters train, so only they count.

Rows whose advantage is 0 (a group whose completions all scored alike) have no policy-gradient
term: their influence is exactly 0 and they skip the influence pass.

Memory: one chunk of rows (`train.micro_batch_size`) is captured at a time, the output head's
gradients for its completion tokens only. Same-batch influence needs the whole batch's gradient
before any product, so it takes two passes: one sums the batch gradient chunk by chunk and keeps
the last chunk's captures for its products, the next recomputes every other chunk's (a batch of k
chunks costs 2k - 1 captures instead of k, with the memory of one chunk; one chunk costs one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from grpolab import distributed as dist
from grpolab.algos.advantages import group_advantages
from grpolab.algos.losses import POLICY_LOSSES, aggregate, aggregation_units, compose_token_loss
from grpolab.algos.tracin import (
    KEEP_RULES,
    PARAMETER_USES,
    VAL_LOSS_COEFFICIENTS,
    VAL_SELECTIONS,
    influence_stats,
    per_row,
    select,
    unit_scores,
    validation_loss,
)
from grpolab.config import Params
from grpolab.data.tokenizer import encode_prompt
from grpolab.errors import DataError
from grpolab.paths import VAL_FILE
from grpolab.rewards import Rewarder
from grpolab.logprobs import by_length, completion_logprobs, take
from grpolab.samplers import Sampler, decode, sample_keys

if TYPE_CHECKING:
    from grpolab.trainer import Batch, Sampled

# Sampling streams of the validation rollouts, apart from the train rollouts' (seed, row) generators.
VAL_ROW_OFFSET = 1 << 40
VAL_STREAM = 1
METRIC_KEYS = [
    "tracin/positive_ratio", "tracin/negative_ratio", "tracin/zero_ratio", "tracin/min_ip", "tracin/max_ip",
    "tracin/mean_ip", "tracin/std_ip", "tracin/selected_ratio", "tracin/fallback", "tracin/val_grad_norm",
]
SEPARATE_METRIC_KEYS = ["tracin/val_reward_mean", "tracin/val_advantage_min", "tracin/val_advantage_max"]


@dataclass
class Record:
    """One use of a parameter in a forward pass: its input and the gradient at its output."""

    kind: str  # a key of algos.influence.PARAMETER_USES
    param: str  # the parameter's name (tied parameters share one)
    inputs: torch.Tensor  # [N, d_in] activations, or [N] ids, at the positions it saw that have a gradient
    grad: torch.Tensor  # [N, d_out]
    rows: torch.Tensor  # [N] the row each position belongs to


@dataclass
class Captures:
    """What one forward and backward of a batch of rows leaves: its parameter uses, packed."""

    records: list[Record]
    n_rows: int


class GradientProbe:
    """The model's trainable linear and embedding layers, hooked while `capture` runs a forward."""

    def __init__(self, model: nn.Module):
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.uses: dict[nn.Module, list[tuple[str, str]]] = {}
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                kind = "linear" if isinstance(module, nn.Linear) else "embedding"
                uses = [(f"{kind}.{attr}", names[id(p)]) for attr in ("weight", "bias")
                        if (p := getattr(module, attr, None)) is not None and id(p) in names]
                if uses:
                    self.uses[module] = uses
        used = {name for uses in self.uses.values() for _, name in uses}
        self.params = {n: p for n, p in model.named_parameters() if n in used}
        self.device = next(model.parameters()).device

    def zeros(self) -> dict[str, torch.Tensor]:
        """A zero fp32 tensor per probed parameter, where a batch gradient accumulates."""
        # ZeRO-3 partitions parameters: their full shape is `ds_shape`.
        return {n: torch.zeros(getattr(p, "ds_shape", p.shape), device=self.device) for n, p in self.params.items()}

    def capture(self, forward, valid: torch.Tensor, packed_rows: torch.Tensor | None = None) -> Captures:
        """Run `forward` (returns the scalar loss of a batch whose valid positions are `valid`
        [B, S] bool), then one autograd.grad to the hooked outputs: no parameter gradient is
        formed, so neither DeepSpeed's gradient buffers nor its ZeRO-3 parameter hooks are touched.

        A layer called on [B, S, ...] keeps its valid positions. A layer called on packed positions
        [n, d] (the output head, which `rollout.completion_token_stats` applies to the completion
        tokens only, a chunk at a time) takes their rows from `packed_rows` [N], in call order."""
        calls = []
        hook = lambda module, args, output: calls.append((module, args[0], output))  # noqa: E731
        handles = [m.register_forward_hook(hook) for m in self.uses]
        try:
            loss = forward()
        finally:
            for h in handles:
                h.remove()
        grads = torch.autograd.grad(loss, [out for _, _, out in calls], allow_unused=True)
        valid = valid.to(self.device)
        valid_rows = valid.nonzero()[:, 0]
        cursor: dict[nn.Module, int] = {}  # per layer: how many packed positions its calls have taken
        out = []
        for (module, inputs, _), g in zip(calls, grads):
            if not (inputs.dim() == 2 and inputs.is_floating_point()):  # [B, S, d] activations or [B, S] ids
                keep, rows = valid, valid_rows
            else:  # packed: one chunk of positions after another
                start = cursor.get(module, 0)
                cursor[module] = start + len(inputs)
                keep, rows = slice(None), packed_rows[start : start + len(inputs)].to(self.device)
            if g is None:
                continue
            inputs = _at_least_fp32(inputs.detach()[keep]) if inputs.is_floating_point() else inputs[keep]
            out += [Record(kind, param, inputs, _at_least_fp32(g[keep]), rows) for kind, param in self.uses[module]]
        return Captures(out, valid.shape[0])


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def accumulate(captures: Captures, v: dict[str, torch.Tensor]) -> None:
    """Add the captured batch gradient into v (parameter name -> tensor)."""
    for r in captures.records:
        PARAMETER_USES[r.kind][0](r.inputs, r.grad, v[r.param])


def inner_products(captures: Captures, v: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row <grad L_b, v> over every captured parameter use -> [B] (float64)."""
    return sum(per_row(PARAMETER_USES[r.kind][1](r.inputs, r.grad, v[r.param]).double(), r.rows, captures.n_rows)
               for r in captures.records).cpu()


def _reduced(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum v over processes (one all-reduce of the flattened tensors)."""
    if dist.world_size() == 1:
        return v
    flat = dist.all_reduce_sum(torch.cat([t.reshape(-1) for t in v.values()]))
    out, i = {}, 0
    for name, t in v.items():
        out[name] = flat[i : i + t.numel()].view_as(t)
        i += t.numel()
    return out


def _take(rows: dict, index: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Rows `index` of a batch's columns cut to their own width, the valid positions of [prompt | completion]
    ([b, S] bool: the only ones with a gradient) and the row of each completion token ([n], row-major: the
    positions the output head sees)."""
    out = take(rows, index)
    return out, torch.cat([out["prompt_mask"], out["mask"]], dim=1).bool(), out["mask"].bool().nonzero()[:, 0]


def _sequence_logp(model, rows: dict, temperature: float) -> torch.Tensor:
    """log p(y) of each completion at the sampling temperature: the sum of its token log-probs. -> [b]"""
    return (completion_logprobs(model, rows, temperature=temperature)[0] * rows["mask"]).sum(-1)


def _norm(v: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in v.values())).item()


@dataclass
class Selection:
    keep: torch.Tensor  # [B] this process's rows, 0/1
    metrics: dict[str, float]
    log: pd.DataFrame  # the whole batch: prompt, completion, reward, advantage, influence, kept


class TracIn:
    """Built once per training; `select` gives a batch of rollouts its keep mask."""

    def __init__(self, params: Params, model: nn.Module, tokenizer, rewarder: Rewarder, sampler: Sampler):
        self.params = params
        self.sampler = sampler  # the train rollouts' (validation rollouts follow the train backend)
        self.cfg = params.train.tracin
        self.tokenizer = tokenizer
        self.rewarder = rewarder
        self.probe = GradientProbe(model)
        self.val = None
        if self.cfg.validation == "separate":
            if not VAL_FILE.is_file():
                raise FileNotFoundError(f"{VAL_FILE}: no validation split (run the prepare stage first)")
            self.val = pd.read_parquet(VAL_FILE)
            rewarder.check(self.val.to_dict("records"), str(VAL_FILE))
            if len(self.val) < self.cfg.pool_size:
                raise DataError(
                    f"{VAL_FILE}: {len(self.val)} validation prompts, fewer than train.tracin.val_pool_size "
                    f"({self.cfg.pool_size})"
                )

    @property
    def metric_keys(self) -> list[str]:
        return METRIC_KEYS + (SEPARATE_METRIC_KEYS if self.cfg.validation == "separate" else [])

    def due(self, rollout_index: int) -> bool:
        return rollout_index % self.cfg.every == 0

    # ---- the policy-gradient loss of the batch's rows, and L_val ----

    def _pg_loss(self, model, rows: dict, units: torch.Tensor) -> torch.Tensor:
        """sum_i L_i over `rows`: each row's term of the update's policy-gradient loss (its advantage,
        its prompt and token weights, the update's aggregation), on-policy (ratio 1), without KL."""
        t = self.params.train
        logp = completion_logprobs(model, rows, temperature=t.temperature)[0]
        policy_loss = POLICY_LOSSES[t.policy_loss]  # at ratio 1 all three give -A grad(log p) per token
        pg, _ = policy_loss.loss(logp, logp.detach(), rows["advantages"], rows["mask"], *[getattr(t, k) for k in policy_loss.clip])
        token_loss = compose_token_loss(pg, None, 0.0, rows["w_token"], rows["w_prompt"], torch.ones(len(pg)))
        return aggregate(token_loss, rows["mask"], t.loss_agg_mode, t.max_new_tokens, units)

    def _validation_gradient(self, model, rollout_index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """grad L_val over fresh completions of validation prompts (seed 003's losses), summed over processes."""
        t, cfg = self.params.train, self.cfg
        per_rank = cfg.pool_size // dist.world_size()
        pool = np.random.default_rng([self.params.seed, rollout_index, VAL_STREAM]).choice(len(self.val), cfg.pool_size, replace=False)
        first = dist.rank() * per_rank
        rows = self.val.take(pool[first : first + per_rank]).to_dict("records")
        row_ids = [VAL_ROW_OFFSET + rollout_index * cfg.pool_size + first + j for j in range(per_rank)]
        rollout = self.sampler.sample(
            [encode_prompt(self.tokenizer, r["prompt"]) for r in rows], max_new_tokens=t.max_new_tokens,
            temperature=t.temperature, top_p=t.top_p, keys=sample_keys(self.params.seed, row_ids),
        )
        texts = decode(self.tokenizer, rollout)
        reward, _ = self.rewarder(rows, texts, str(VAL_FILE))
        rewards = dist.all_gather_cat(reward)
        chosen = VAL_SELECTIONS[cfg.selection](rewards, cfg.batch_size, torch.Generator().manual_seed(self.params.seed * 1_000_003 + rollout_index))
        advantages = group_advantages(rewards[chosen], len(chosen), "group")  # (r - mean) / std over the validation batch
        coefficients = torch.zeros(len(rewards))
        coefficients[chosen] = VAL_LOSS_COEFFICIENTS[cfg.loss](rewards[chosen], advantages)
        mine = coefficients[first : first + per_rank]
        v = self.probe.zeros()
        r = rollout
        val_rows = {"prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask, "completion_ids": r.completion_ids,
                    "mask": r.completion_mask, "coefficients": mine}
        for idx in by_length(r.completion_mask, t.micro_batch_size, mine.nonzero().squeeze(-1)):  # a 0 coefficient adds nothing
            rows, valid, packed = _take(val_rows, idx)
            loss = lambda: validation_loss(_sequence_logp(model, rows, t.temperature), rows["coefficients"])  # noqa: E731
            accumulate(self.probe.capture(loss, valid, packed), v)
        metrics = {
            "tracin/val_reward_mean": rewards[chosen].mean().item(),
            "tracin/val_advantage_min": advantages.min().item(),
            "tracin/val_advantage_max": advantages.max().item(),
        }
        return _reduced(v), metrics

    # ---- selection ----

    def select(self, model, batch: Batch, sampled: Sampled, rollout_index: int, step: int) -> Selection:
        """Influence of every completion of the batch (this process's rows [B]) on L_val, and the
        keep mask: positive influence, or the fallback's top share, chosen over the whole batch."""
        t, cfg = self.params.train, self.cfg
        model.train()
        units = dist.all_reduce_sum(aggregation_units(batch.rollout.completion_mask.float(), t.loss_agg_mode))
        n = len(batch.advantages)
        columns = batch.columns()
        chunks = by_length(batch.rollout.completion_mask, t.micro_batch_size, batch.advantages.nonzero().squeeze(-1))

        def capture(idx: torch.Tensor) -> Captures:
            rows, valid, packed = _take(columns, idx)
            return self.probe.capture(lambda: self._pg_loss(model, rows, units), valid, packed)

        influence = torch.zeros(n, dtype=torch.float64)
        metrics: dict[str, float] = {}
        if cfg.validation == "separate":
            v, metrics = self._validation_gradient(model, rollout_index)
        elif chunks:  # v is the whole batch's gradient: one pass sums it chunk by chunk, keeping the last chunk only
            v = self.probe.zeros()
            for i, idx in enumerate(chunks):
                captures = capture(idx)
                accumulate(captures, v)
                if i < len(chunks) - 1:
                    del captures  # before the next chunk's are taken: one chunk's captures at a time
            v = _reduced(v)
            influence[chunks[-1]] = inner_products(captures, v)
            del captures
            chunks = chunks[:-1]
        else:
            v = _reduced(self.probe.zeros())
        # v is known: each (other) chunk's products, its captures recomputed and dropped before the next
        for idx in chunks:
            influence[idx] = inner_products(capture(idx), v)
        everyone = dist.all_gather_cat(influence)
        scores = unit_scores(everyone, t.group_size, cfg.selection_unit)
        keep_units, fallback = select(scores, cfg.fallback_min_positive, cfg.fallback_top_fraction)
        # the stats describe the influence selection; the control arm trains a random one of its size
        trained = KEEP_RULES[cfg.keep](keep_units, torch.Generator().manual_seed(self.params.seed * 1_000_003 + rollout_index))
        keep = trained if cfg.selection_unit == "completion" else trained.repeat_interleave(t.group_size)
        stats = {f"tracin/{k}": v for k, v in influence_stats(scores, keep_units, fallback).items()}
        metrics = {**stats, "tracin/val_grad_norm": _norm(v), **metrics}
        offset = dist.rank() * n
        log = self._log(sampled, batch, everyone, keep, step)
        if dist.is_rank0():
            tqdm.write(summary_line(step, metrics, len(scores), cfg.selection_unit))
        return Selection(keep[offset : offset + n].clone(), metrics, log)

    def _log(self, sampled: Sampled, batch: Batch, influence: torch.Tensor, keep: torch.Tensor, step: int) -> pd.DataFrame:
        prompts = dist.all_gather_objects([r["prompt"] for r in sampled.rows])
        texts = dist.all_gather_objects(sampled.texts)
        return pd.DataFrame({
            "step": step,
            "row": np.arange(len(influence)),
            "prompt": prompts,
            "completion": texts,
            "reward": sampled.all_rewards.numpy(),
            "advantage": dist.all_gather_cat(batch.advantages).numpy(),
            "influence": influence.numpy(),
            "kept": keep.numpy().astype(bool),
        })


def summary_line(step: int, m: dict[str, float], units: int, unit: str) -> str:
    return (
        f"tracin step {step}: {m['tracin/positive_ratio']:.0%} of {units} {unit}s positive, "
        f"{m['tracin/negative_ratio']:.0%} negative, {m['tracin/zero_ratio']:.0%} zero; selected {m['tracin/selected_ratio']:.0%}"
        f"{' (fallback)' if m['tracin/fallback'] else ''}; ip mean {m['tracin/mean_ip']:.3g} "
        f"[{m['tracin/min_ip']:.3g}, {m['tracin/max_ip']:.3g}]; |v| {m['tracin/val_grad_norm']:.3g}"
        + (f"; val reward {m['tracin/val_reward_mean']:.3f}" if "tracin/val_reward_mean" in m else "")
    )
