"""TracIn beside the training loop: activation captures, the influence pass, validation
rollouts and the per-step influence log. The math is in `algos/tracin.py`; the loop only
asks `TracIn.select` for a batch's keep mask, which enters the loss at the composition point.

Which parameters enter the inner product: every trainable parameter used by an `nn.Linear`
(weight and bias) or an `nn.Embedding` (the token table, tied to the output head in the tiny
model, so the tied matrix's whole gradient counts). Left out: normalisation scales, which hold
well under 1 % of the parameters and whose per-row gradient needs the layer's internal
normalised input, not its input. With a PEFT model only the adapters train, so only they count.

Rows whose advantage is 0 (a group whose completions all scored alike) have no policy-gradient
term: their influence is exactly 0 and they skip the influence pass.

Memory: one chunk of rows is captured at a time (`train.tracin.capture_tokens` positions), and within it
one layer's gradients at a time: each layer's output gradient is consumed (added into the batch
gradient, or turned into per-row inner products) as the backward pass produces it, then dropped; the
layers' inputs are the forward's own tensors, copied to fp32 one layer at a time. The output head's
gradients are those of the completion tokens only, one logit chunk at a time. Same-batch influence
needs the whole batch's gradient before any product, so it takes two passes over the chunks: one sums
the batch gradient, the next takes the products (2k captures for k chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from grpolab.runtime import distributed as dist
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
from grpolab.logprobs import by_tokens, completion_logprobs
from grpolab.samplers import Rollout, Sampler, decode, sample_keys

if TYPE_CHECKING:
    from grpolab.trainer.update import Batch, Sampled

# Sampling streams of the validation rollouts, apart from the train rollouts' (seed, row) generators.
VAL_ROW_OFFSET = 1 << 40
VAL_STREAM = 1
METRIC_KEYS = [
    "tracin/positive_ratio", "tracin/negative_ratio", "tracin/zero_ratio", "tracin/min_ip", "tracin/max_ip",
    "tracin/mean_ip", "tracin/std_ip", "tracin/selected_ratio", "tracin/fallback", "tracin/val_grad_norm",
]
SEPARATE_METRIC_KEYS = ["tracin/val_reward_mean", "tracin/val_advantage_min", "tracin/val_advantage_max"]


@dataclass
class ParameterUse:
    """One use of a parameter in a forward pass: its input and the gradient at its output."""

    kind: str  # a key of algos.influence.PARAMETER_USES
    param: str  # the parameter's name (tied parameters share one)
    inputs: torch.Tensor  # [N, d_in] activations (fp32 or wider), or [N] ids, at the positions it saw that have a gradient
    grad: torch.Tensor  # [N, d_out] (fp32 or wider)
    row: torch.Tensor  # [N] the row (its index in the batch) each position belongs to


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

    def capture(self, forward, valid: torch.Tensor, consume: Callable[[ParameterUse], None],
                packed_row: torch.Tensor | None = None) -> None:
        """Run `forward` (returns the scalar loss of a batch whose valid positions are `valid` [B, S] bool), then
        one backward to the hooked layers' outputs only: each layer's output gradient goes to `consume` as a
        `ParameterUse` the moment autograd has it, and is dropped after, so at most one layer's fp32 copies exist at
        a time. No parameter gradient is formed, so neither DeepSpeed's gradient buffers nor its ZeRO-3
        parameter hooks are touched.

        A layer called on [B, S, ...] keeps its valid positions. A layer called on packed positions
        [n, d] (the output head, which `logprobs.completion_token_stats` applies to the completion
        tokens only, a chunk at a time) takes their rows from `packed_row` [N], in call order."""
        # Every hooked output gets a zero scalar added: one backward to that scalar reaches every hooked
        # output (a backward to the outputs themselves would return all their gradients at once).
        anchor = torch.zeros((), device=self.device, requires_grad=True)
        valid = valid.to(self.device)
        valid_row = valid.nonzero()[:, 0]
        cursor: dict[nn.Module, int] = {}  # per layer: how many packed positions its calls have taken
        recording = True

        def hook(module, args, output):
            out = output + anchor  # also when checkpointing recomputes the forward: the same graph
            if not recording:
                return out
            inputs = args[0]
            if not (inputs.dim() == 2 and inputs.is_floating_point()):  # [B, S, d] activations or [B, S] ids
                keep, row = valid, valid_row
            else:  # packed: one chunk of positions after another
                start = cursor.get(module, 0)
                cursor[module] = start + len(inputs)
                keep, row = slice(None), packed_row[start : start + len(inputs)].to(self.device)

            def on_grad(g: torch.Tensor) -> None:
                x = _at_least_fp32(inputs.detach()[keep]) if inputs.is_floating_point() else inputs[keep]
                g = _at_least_fp32(g[keep])
                for kind, param in self.uses[module]:
                    consume(ParameterUse(kind, param, x, g, row))

            out.register_hook(on_grad)
            return out

        handles = [m.register_forward_hook(hook) for m in self.uses]
        try:
            loss = forward()
            recording = False
            torch.autograd.grad(loss, anchor, allow_unused=True)
        finally:
            for h in handles:
                h.remove()


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def accumulate(v: dict[str, torch.Tensor]) -> Callable[[ParameterUse], None]:
    """A `capture` consumer that adds the captured batch gradient into v (parameter name -> tensor)."""
    return lambda r: PARAMETER_USES[r.kind][0](r.inputs, r.grad, v[r.param])


class InnerProducts:
    """A `capture` consumer: per row <grad L_b, v> over every captured parameter use, summed into `out` [B] (float64)."""

    def __init__(self, v: dict[str, torch.Tensor], n_rows: int, device: torch.device | str = "cpu"):
        self.v, self.out = v, torch.zeros(n_rows, dtype=torch.float64, device=device)

    def __call__(self, r: ParameterUse) -> None:
        self.out += per_row(PARAMETER_USES[r.kind][1](r.inputs, r.grad, self.v[r.param]).double(), r.row, len(self.out))


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


def _positions(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """What a capture of `rollout`'s b rows needs: the valid positions of [prompt | completion] ([b, S] bool: the
    only ones with a gradient) and the row of each completion token ([n], row-major: the positions the output
    head sees)."""
    mask = rollout.completion_mask
    return torch.cat([rollout.prompt_mask, mask], dim=1).bool(), mask.bool().nonzero()[:, 0]


def _sequence_logp(model, rollout: Rollout, temperature: float, chunk_tokens: int | None) -> torch.Tensor:
    """log p(y) of each completion at the sampling temperature: the sum of its token log-probs. -> [b]"""
    logp = completion_logprobs(model, rollout, temperature=temperature, chunk_tokens=chunk_tokens)[0]
    return (logp * rollout.completion_mask).sum(-1)


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
        if self.cfg.validation.name == "separate":
            if not VAL_FILE.is_file():
                raise FileNotFoundError(f"{VAL_FILE}: no validation split (run the prepare stage first)")
            self.val = pd.read_parquet(VAL_FILE)
            rewarder.check(self.val.to_dict("records"), str(VAL_FILE))
            if len(self.val) < self.cfg.validation.pool_size:
                raise DataError(
                    f"{VAL_FILE}: {len(self.val)} validation prompts, fewer than train.tracin.validation.val_pool_size "
                    f"({self.cfg.validation.pool_size})"
                )

    @property
    def metric_keys(self) -> list[str]:
        return METRIC_KEYS + (SEPARATE_METRIC_KEYS if self.cfg.validation.name == "separate" else [])

    def due(self, rollout_index: int) -> bool:
        return rollout_index % self.cfg.every == 0

    # ---- the policy-gradient loss of the batch's rows, and L_val ----

    def _pg_loss(self, model, micro: Batch, units: torch.Tensor) -> torch.Tensor:
        """sum_i L_i over the rows of `micro`: each row's term of the update's policy-gradient loss (its advantage,
        its prompt and token weights, the update's aggregation), on-policy (ratio 1), without KL."""
        t, mask = self.params.train, micro.rollout.completion_mask
        logp = completion_logprobs(model, micro.rollout, temperature=t.temperature, chunk_tokens=self.params.model.logit_chunk_tokens)[0]
        policy = t.loss.policy  # at ratio 1 all three losses give -A grad(log p) per token
        pg, _ = POLICY_LOSSES[policy.name](logp, logp.detach(), micro.advantages, mask, **policy.knobs())
        token_loss = compose_token_loss(pg, None, 0.0, micro.weights.token, micro.weights.prompt, torch.ones(len(pg)))
        return aggregate(token_loss, mask, t.loss.loss_agg_mode, t.max_new_tokens, units)

    def _validation_gradient(self, model, rollout_index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """grad L_val over fresh completions of validation prompts (seed 003's losses), summed over processes."""
        t, cfg = self.params.train, self.cfg
        per_rank = cfg.validation.pool_size // dist.world_size()
        pool = np.random.default_rng([self.params.seed, rollout_index, VAL_STREAM]).choice(len(self.val), cfg.validation.pool_size, replace=False)
        first = dist.rank() * per_rank
        rows = self.val.take(pool[first : first + per_rank]).to_dict("records")
        row_ids = [VAL_ROW_OFFSET + rollout_index * cfg.validation.pool_size + first + j for j in range(per_rank)]
        rollout = self.sampler.sample(
            [encode_prompt(self.tokenizer, r["prompt"]) for r in rows], max_new_tokens=t.max_new_tokens,
            temperature=t.temperature, top_p=t.top_p, keys=sample_keys(self.params.seed, row_ids),
        )
        texts = decode(self.tokenizer, rollout)
        reward, _ = self.rewarder(rows, texts, str(VAL_FILE))
        rewards = dist.all_gather_cat(reward)
        chosen = VAL_SELECTIONS[cfg.validation.val_selection](rewards, cfg.validation.val_batch_size, torch.Generator().manual_seed(self.params.seed * 1_000_003 + rollout_index))
        advantages = group_advantages(rewards[chosen], len(chosen), "group")  # (r - mean) / std over the validation batch
        coefficients = torch.zeros(len(rewards))
        coefficients[chosen] = VAL_LOSS_COEFFICIENTS[cfg.validation.val_loss](rewards[chosen], advantages)
        mine = coefficients[first : first + per_rank]
        v = self.probe.zeros()
        for index in self._chunks(rollout, mine.nonzero().squeeze(-1)):  # a 0 coefficient adds nothing
            micro = rollout.take(index)
            loss = lambda: validation_loss(_sequence_logp(model, micro, t.temperature, self.params.model.logit_chunk_tokens), mine[index])  # noqa: E731
            valid, packed_row = _positions(micro)
            self.probe.capture(loss, valid, accumulate(v), packed_row)
        metrics = {
            "tracin/val_reward_mean": rewards[chosen].mean().item(),
            "tracin/val_advantage_min": advantages.min().item(),
            "tracin/val_advantage_max": advantages.max().item(),
        }
        return _reduced(v), metrics

    def _chunks(self, rollout: Rollout, index: torch.Tensor) -> list[torch.Tensor]:
        """Rows `index` of `rollout` in the chunks one capture takes: train.tracin.capture_tokens positions each
        (default: a train micro-batch of the rollout's width)."""
        prompt_mask, mask = rollout.prompt_mask, rollout.completion_mask
        budget = self.cfg.capture_tokens or self.params.train.micro_batch_size * (prompt_mask.shape[1] + mask.shape[1])
        return by_tokens(prompt_mask, mask, budget, index)

    # ---- selection ----

    def select(self, model, batch: Batch, sampled: Sampled, rollout_index: int, step: int) -> Selection:
        """Influence of every completion of the batch (this process's rows [B]) on L_val, and the
        keep mask: positive influence, or the fallback's top share, chosen over the whole batch."""
        t, cfg = self.params.train, self.cfg
        model.train()
        units = dist.all_reduce_sum(aggregation_units(batch.rollout.completion_mask.float(), t.loss.loss_agg_mode))
        n = len(batch.advantages)
        chunks = self._chunks(batch.rollout, batch.advantages.nonzero().squeeze(-1))  # a 0 advantage has no gradient

        def capture(index: torch.Tensor, consume: Callable[[ParameterUse], None]) -> None:
            micro = batch.take(index)
            valid, packed_row = _positions(micro.rollout)
            self.probe.capture(lambda: self._pg_loss(model, micro, units), valid, consume, packed_row)

        metrics: dict[str, float] = {}
        if cfg.validation.name == "separate":
            v, metrics = self._validation_gradient(model, rollout_index)
        else:  # v is the whole batch's gradient, summed chunk by chunk, before any product
            v = self.probe.zeros()
            for index in chunks:
                capture(index, accumulate(v))
            v = _reduced(v)
        influence = torch.zeros(n, dtype=torch.float64)
        for index in chunks:  # each chunk captured again (same-batch), its products taken as its gradients arrive
            products = InnerProducts(v, len(index), self.probe.device)
            capture(index, products)
            influence[index] = products.out.cpu()
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
