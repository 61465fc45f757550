"""The GRPO trainer's machinery, beside the loop of `stages/train.py`: the DeepSpeed engine, the batch
of one step, its update over micro-batches, and the step's metrics. The math lives in `algos/`.

One update: per micro-batch, the policy's log-probs -> clipped policy loss (+ KL to a frozen
reference) weighted at the composition point (`loss_weights.py`) -> aggregate -> backward; then one
optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from grpolab.runtime import distributed as dist
from grpolab.algos.advantages import zero_std_groups
from grpolab.algos.credit import ANSWER, CLASS_NAMES, THINK, gini, token_credit
from grpolab.algos.losses import KL_ESTIMATORS, POLICY_LOSSES, aggregate, aggregation_units, compose_token_loss
from grpolab.algos.rollout_correction import rollout_correction
from grpolab.config import Params
from grpolab.config.train import VllmRollout
from grpolab.rewards import source_means
from grpolab.logprobs import by_length, completion_logprobs
from grpolab.samplers import Rollout
from grpolab.trainer.loss_weights import LossWeights, LossWeighting


# update's sums of the sampler/trainer mismatch: |log pi_old - log pi_sampler|, the ratio, tokens bounded
MISMATCH_SUMS = ("logp_diff", "is_ratio", "is_bounded")
SAMPLING_KEYS = ["sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                 "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                 "sampling/importance_sampling_ratio/max", "sampling/importance_sampling_ratio/bounded_share"]


@dataclass
class Sampled:
    """One batch of rollouts as sampled and scored, beside the `Batch` the update reads: this process's
    B rows (a data row per completion, `group_size` copies of each prompt's) and what the step's record needs."""

    rows: list[dict]  # this process's data rows, aligned with its completions
    texts: list[str]  # the decoded completions
    reward: torch.Tensor  # [B] this process's rewards
    parts: dict[str, torch.Tensor]  # reward part -> [B] its unweighted values
    all_rewards: torch.Tensor  # [world_size * B] every process's rewards, in rank order (advantages see them all)
    sources: list[str]  # data_source of each reward of all_rewards
    all_lengths: torch.Tensor  # [world_size * B] the completions' lengths, aligned with all_rewards


@dataclass
class Batch:
    """One process's share of a batch of rollouts, everything the update needs, B rows."""

    rollout: Rollout
    advantages: torch.Tensor  # [B]
    old_logp: torch.Tensor | None  # [B, T], None when on-policy (ppo_epochs = 1)
    ref_logp: torch.Tensor | None  # [B, T], None when kl_beta = 0
    weights: LossWeights
    token_class: torch.Tensor  # [B, T] think / answer / tag / other (algos.credit)
    credit: torch.Tensor | None = None  # [B, T] filled by the update: |A w| ||onehot(y) - p||
    entropy: torch.Tensor | None = None  # [B, T] filled by the update: the policy's token entropy

    def take(self, index: torch.Tensor) -> Batch:
        """Rows `index` [b] as a batch of their own (a micro-batch), cut to their own width (`Rollout.take`);
        what the update fills (credit, entropy) left out."""
        rollout = self.rollout.take(index)
        width = rollout.completion_mask.shape[1]
        cut = lambda x: None if x is None else x[index][:, :width]  # noqa: E731
        return Batch(rollout, self.advantages[index], cut(self.old_logp), cut(self.ref_logp), self.weights.take(index, width),
                     cut(self.token_class))

    def micro_batches(self, size: int) -> list[torch.Tensor]:
        """The rows of each micro-batch: sorted by completion length, so each, cut to its own width
        (`take`), carries little padding. Every pass over the batch (old and reference log-probs,
        the update) uses these, so they see the same shapes (step 1's KL is exactly 0)."""
        return by_length(self.rollout.completion_mask, size)


def batch_logprobs(model, batch: Batch, size: int, temperature: float, chunk_tokens: int | None = None) -> torch.Tensor:
    """log p of every completion token of the batch under `model` at the sampling temperature, micro-batch by
    micro-batch. -> [B, T]"""
    out = torch.zeros(batch.rollout.completion_mask.shape)
    with torch.inference_mode():
        for index in batch.micro_batches(size):
            logp = completion_logprobs(model, batch.rollout.take(index), temperature=temperature, chunk_tokens=chunk_tokens)[0]
            out[index, : logp.shape[1]] = logp
    return out.clone()  # an ordinary tensor: it meets the policy's log-probs in the loss


def rollout_entropies(model, rollout: Rollout, size: int, temperature: float, chunk_tokens: int | None = None) -> torch.Tensor:
    """The entropy of every completion token's distribution at the sampling temperature under `model`, micro-batch
    by micro-batch (for a sampler that returns none: vLLM). -> [B, T]"""
    out = torch.zeros(rollout.completion_mask.shape)
    with torch.inference_mode():
        for index in by_length(rollout.completion_mask, size):
            micro = rollout.take(index)
            entropy = completion_logprobs(model, micro, entropy=True, temperature=temperature, chunk_tokens=chunk_tokens)[1][0] * micro.completion_mask
            out[index, : entropy.shape[1]] = entropy
    return out.clone()


def update(params: Params, engine, batch: Batch) -> dict[str, float]:
    """Backward over micro-batches and one optimizer step. Returns sums for the step's metrics."""
    t = params.train
    engine.module.train()
    units = dist.all_reduce_sum(aggregation_units(batch.rollout.completion_mask.float(), t.loss.loss_agg_mode))
    # Summed as tensors and read once at the end: a read per micro-batch would wait for its backward each time.
    keys = ("pg", "kl", "entropy", "logp", "clipped", "tokens", *MISMATCH_SUMS)
    totals, loss_total = torch.zeros(len(keys), dtype=torch.float64), 0.0
    grad_norm = torch.tensor(math.nan)
    extremes = torch.tensor([math.inf, -math.inf, 0.0], dtype=torch.float64)  # ratio min, ratio max, max |logp diff|
    # the hf sampler's log-probs are measured against pi_old too (logged, never applied), under vLLM's default bounds
    r = t.rollout if t.rollout.backend == "vllm" else VllmRollout()
    correct = t.rollout.backend == "vllm" and r.vllm_importance_sampling_correction  # never for hf rollouts
    batch.credit, batch.entropy = torch.zeros(batch.rollout.completion_mask.shape), torch.zeros(batch.rollout.completion_mask.shape)
    policy = t.loss.policy
    for index in batch.micro_batches(t.micro_batch_size):
        micro = batch.take(index)
        mask, sampler_logp, w = micro.rollout.completion_mask, micro.rollout.token_logp, micro.weights
        logp, (entropy, prob_sq) = completion_logprobs(engine, micro.rollout, entropy=True, entropy_grad=t.loss.entropy_coef > 0,
                                                       temperature=t.temperature, chunk_tokens=params.model.logit_chunk_tokens)
        old = micro.old_logp if micro.old_logp is not None else logp.detach()
        pg, clipped = POLICY_LOSSES[policy.name](logp, old, micro.advantages, mask, **policy.knobs())
        kl = KL_ESTIMATORS[t.loss.kl_estimator](logp, micro.ref_logp) if micro.ref_logp is not None else None
        w_is, mismatch = None, torch.zeros(len(MISMATCH_SUMS), dtype=torch.float64)
        if sampler_logp is not None:  # how far the sampler's log-probs are from the trainer's pi_old
            w_is, ratio, bounded = rollout_correction(old, sampler_logp, mask, r.vllm_importance_sampling_mode,
                                                      r.vllm_importance_sampling_clip_min, r.vllm_importance_sampling_clip_max)
            valid = mask.bool()
            diff = (old.detach() - sampler_logp).abs()[valid]
            if diff.numel():
                extremes = torch.stack([torch.minimum(extremes[0], ratio[valid].min().double()),
                                        torch.maximum(extremes[1], ratio[valid].max().double()),
                                        torch.maximum(extremes[2], diff.max().double())])
            mismatch = torch.stack([diff.sum().double(), ratio[valid].sum().double(), bounded.sum().double()])
            w_is = w_is if correct else None
        token_loss = compose_token_loss(pg, kl, t.loss.kl_beta, w.token, w.prompt, w.keep, entropy, t.loss.entropy_coef, correction=w_is)
        entropy = entropy.detach()
        # Each rank's share is scaled by the world size because DeepSpeed averages gradients over ranks.
        loss = aggregate(token_loss, mask, t.loss.loss_agg_mode, t.max_new_tokens, units) * dist.world_size()
        engine.backward(loss, scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary():
            # Averaged, unclipped gradients are complete here below ZeRO-2; above, DeepSpeed reports the norm.
            grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
            if grads:
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        engine.step()
        mask = mask.float()
        weight = w.keep.unsqueeze(-1) * w.prompt.unsqueeze(-1) * w.token
        width = mask.shape[1]
        batch.credit[index, :width] = token_credit(micro.advantages.unsqueeze(-1) * weight, logp.detach(), prob_sq) * mask
        batch.entropy[index, :width] = entropy
        loss_total = loss_total + loss.detach().double() / dist.world_size()
        kl_sum = (kl.detach() * mask).sum() if kl is not None else torch.zeros(())
        totals += torch.cat([torch.stack([(pg.detach() * mask).sum(), kl_sum, (entropy * mask).sum(), (logp.detach() * mask).sum(),
                                          (clipped.float() * mask).sum(), mask.sum()]).double(), mismatch])
    sums = {"loss": float(loss_total), **dict(zip(keys, totals.tolist()))}
    reported = engine.get_global_grad_norm()
    sums["grad_norm"] = float(reported) if reported is not None else float(grad_norm)
    sums["extremes"] = extremes
    return sums


def step_metrics(params: Params, engine, sums: dict, sampled: Sampled, batch: Batch, seconds: float) -> dict[str, float]:
    """The step's `train/…` and `credit/…` metrics, over every process: `sums` from `update`."""
    t = params.train
    sums = dict(sums)
    grad_norm = sums.pop("grad_norm")  # the same on every rank: not summed
    extremes = dist.all_gather_cat(sums.pop("extremes").unsqueeze(0))  # [world, 3]
    totals = dist.all_reduce_sum(torch.tensor([sums[k] for k in sums], dtype=torch.float64))
    s = dict(zip(sums, totals.tolist()))
    tokens = max(s["tokens"], 1.0)
    rewards = sampled.all_rewards
    parts = {name: dist.all_reduce_sum(v.sum()).item() / len(rewards) for name, v in sampled.parts.items()}
    metrics = {
        "train/loss": s["loss"],
        "train/pg_loss": s["pg"] / tokens,
        "train/kl": s["kl"] / tokens,
        "train/reward_mean": rewards.mean().item(),
        "train/reward_std": rewards.std().item(),
        **{f"train/reward/{name}": v for name, v in parts.items()},
        **{f"train/reward_by_source/{source}": v for source, v in source_means(sampled.sources, rewards).items()},
        "train/advantage_mean": dist.all_reduce_sum(batch.advantages.sum()).item() / len(rewards),  # as trained
        "train/logprob_mean": s["logp"] / tokens,
        "train/entropy": s["entropy"] / tokens,
        "train/clip_ratio": s["clipped"] / tokens,
        "train/grad_norm": grad_norm,
        "train/lr": engine.get_lr()[0],
        "train/completion_length": tokens / len(rewards),
        "train/frac_zero_std_groups": zero_std_groups(rewards, t.group_size).float().mean().item(),
        "train/tokens_per_s": tokens / seconds,
        "train/step_time": seconds,
        **credit_metrics(batch),
    }
    if batch.rollout.token_logp is not None:  # TRL's names for the sampler/trainer mismatch and its correction
        metrics |= {
            "sampling/sampling_logp_difference/mean": s["logp_diff"] / tokens,
            "sampling/sampling_logp_difference/max": extremes[:, 2].max().item(),
            "sampling/importance_sampling_ratio/min": extremes[:, 0].min().item(),
            "sampling/importance_sampling_ratio/mean": s["is_ratio"] / tokens,
            "sampling/importance_sampling_ratio/max": extremes[:, 1].max().item(),
            "sampling/importance_sampling_ratio/bounded_share": s["is_bounded"] / tokens,
        }
    return metrics


def credit_metrics(batch: Batch) -> dict[str, float]:
    """Where the policy-gradient credit of the step went: shares of the total by token class,
    of the top 20 % entropy tokens, and the Gini coefficient of per-token credit."""
    mask = batch.rollout.completion_mask.bool()
    credit_, cls = batch.credit[mask], batch.token_class[mask]
    entropy = batch.entropy[mask]
    high = entropy >= torch.quantile(entropy.double(), 0.8).float() if entropy.numel() else entropy.bool()
    parts = torch.stack([credit_.sum(), credit_[cls == ANSWER].sum(), credit_[cls == THINK].sum(), credit_[high].sum()])
    total, answer, think, high_entropy = dist.all_reduce_sum(parts.double()).tolist()
    share = lambda x: x / total if total > 0 else 0.0  # noqa: E731
    return {
        "credit/answer_share": share(answer),
        "credit/think_share": share(think),
        "credit/high_entropy_share": share(high_entropy),
        "credit/gini": gini(credit_).item(),  # this process's tokens
    }


def credit_log(batch: Batch, weighting: LossWeighting, step: int) -> pd.DataFrame:
    """One row per completion token of the step: the credit logs saved as parquet."""
    mask = batch.rollout.completion_mask.bool()
    row, position = mask.nonzero(as_tuple=True)  # of each token
    ids = batch.rollout.completion_ids[mask]
    return pd.DataFrame({
        "step": step,
        "row": row.numpy(),
        "position": position.numpy(),
        "token_id": ids.numpy(),
        "token": weighting.pieces(ids),
        "class": np.array([CLASS_NAMES[c] for c in sorted(CLASS_NAMES)], dtype=object)[batch.token_class[mask].numpy()],
        "credit": batch.credit[mask].numpy(),
        "entropy": batch.entropy[mask].numpy(),
        "logprob": batch.rollout.token_logp[mask].numpy(),
        "weight": batch.weights.token[mask].numpy(),
        "advantage": batch.advantages[row].numpy(),
    })


