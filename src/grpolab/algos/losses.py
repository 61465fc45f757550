"""Clipped policy loss, KL to the reference, the composition point, and loss aggregation."""

from __future__ import annotations

from collections.abc import Callable

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position. logits: [B, T, V] (position t predicts targets[:, t]); targets: [B, T] -> [B, T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def policy_token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one log-softmax: log p(target) [B, T] (differentiable), and, detached, the entropy
    [B, T] and sum_v p_v^2 [B, T] (what the credit of a token needs)."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    detached = logp_all.detach()
    probs = detached.exp()
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(probs * detached).sum(-1), probs.square().sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution. [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: -min(r A, clip(r, 1-clip_low, 1+clip_high) A), r = exp(logp - old_logp).

    logp, old_logp: [B, T]; advantages: [B]. Returns (loss [B, T], clipped [B, T] bool: where the clip bound won).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log(p/q): unbiased, can be negative. [B, T] -> [B, T]."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """0.5 (log p/q)^2: low variance, biased. [B, T] -> [B, T]."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """q/p - 1 - log(q/p): unbiased and non-negative (Schulman's estimator, GRPO's default). [B, T] -> [B, T]."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def compose_token_loss(
    pg_loss: torch.Tensor,
    kl: torch.Tensor | None,
    kl_beta: float,
    token_weights: torch.Tensor,
    prompt_weights: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """The one place a variant changes the loss: L = keep * w_prompt * w_token * L_pg + beta * KL.

    pg_loss, kl, token_weights: [B, T]; prompt_weights, keep: [B]. Weights are detached: they
    scale gradients and are never trained. Returns [B, T].
    """
    weight = keep.detach().unsqueeze(-1) * prompt_weights.detach().unsqueeze(-1) * token_weights.detach()
    loss = weight * pg_loss
    if kl is not None and kl_beta > 0:
        loss = loss + kl_beta * kl
    return loss


def _token_sum(loss: torch.Tensor, mask: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (loss * mask).sum(), mask.sum()


def _seq_token_mean(loss: torch.Tensor, mask: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum(), torch.tensor(float(loss.shape[0]))


def _seq_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    per_seq = (loss * mask).sum(-1) / max_len
    return per_seq.sum(), torch.tensor(float(loss.shape[0]))


# mode -> (numerator, number of units it averages over) for one (micro-)batch
AGGREGATIONS = {
    "token-mean": _token_sum,  # mean over every valid token of the batch (DAPO)
    "seq-mean-token-mean": _seq_token_mean,  # mean per sequence, then over sequences (GRPO paper)
    "seq-mean-token-sum-norm": _seq_token_sum_norm,  # per-sequence sum / constant max_len (Dr. GRPO)
}


def aggregation_units(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """How many units (tokens for token-mean, sequences otherwise) `mask` [B, T] holds: the denominator."""
    return mask.sum() if mode == "token-mean" else torch.tensor(float(mask.shape[0]))


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int, units: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a token loss [B, T] with completion mask [B, T] to a scalar by `mode`.

    `units` is the denominator: by default this batch's own (`aggregation_units`); a micro-batch
    passes the whole batch's so that the micro-batches' losses add up to the batch loss exactly.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose from {sorted(AGGREGATIONS)}")
    numerator, own_units = AGGREGATIONS[mode](loss, mask.to(loss.dtype), max_len)
    return numerator / (own_units if units is None else units).clamp(min=1)
