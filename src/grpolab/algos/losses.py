"""Policy-gradient losses by name, KL to the reference, the composition point, and loss aggregation."""

from __future__ import annotations

from collections.abc import Callable

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position. logits: [B, T, V] (position t predicts targets[:, t]); targets: [B, T] -> [B, T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def policy_token_stats(
    logits: torch.Tensor, targets: torch.Tensor, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one log-softmax: log p(target) [B, T] (differentiable), the entropy [B, T] (differentiable
    with `entropy_grad`, for an entropy bonus; else detached) and, detached, sum_v p_v^2 [B, T] (what the
    credit of a token needs)."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    detached = logp_all.detach()
    probs = detached.exp()
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if entropy_grad else -(probs * detached).sum(-1)
    return logp, entropy, probs.square().sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution. [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (GRPO's, DAPO's with clip_high > clip_low):
    -min(r A, clip(r, 1-clip_low, 1+clip_high) A), r = exp(logp - old_logp).

    logp, old_logp, mask: [B, T]; advantages: [B]. Returns (loss [B, T], clipped [B, T] bool: where the clip bound won).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def gspo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO's sequence-level clipped surrogate (Zheng et al. 2025), in its GSPO-token form.

    The sequence ratio s_i = exp(mean_t (logp - old_logp)) over completion i's tokens is clipped per
    sequence. Per token, s_it = sg[s_i] exp(logp_t - sg[logp_t]) has the value s_i and the gradient
    s_i grad(logp_t), so averaged over a completion's tokens (`seq-mean-token-mean`) the loss and its
    gradient are GSPO's, A_i grad(s_i) = A_i s_i mean_t grad(logp_t); a token weight (a mitigation's)
    multiplies A_i per token, as GSPO-token allows. The log-ratio is capped at 10 (verl's guard against
    overflow). logp, old_logp, mask: [B, T]; advantages: [B]. Returns (loss [B, T], clipped [B, T] bool).
    """
    m = mask.to(logp.dtype)
    seq_log_ratio = ((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1)  # [B]
    log_ratio = logp - logp.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(log_ratio, max=10.0))
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped) & mask.bool()


def cispo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, Chen et al. 2025): REINFORCE with the clipped importance weight as a constant,
    -sg(clip(r, 1-clip_low, 1+clip_high)) A logp per token. Its gradient, -clip(r) A grad(logp), keeps
    every token (PPO's min zeroes a clipped token's), and equals PPO's where r lies inside the bounds.
    logp, old_logp, mask: [B, T]; advantages: [B]. Returns (loss [B, T], clipped [B, T] bool: the weight was cut).
    """
    ratio = torch.exp(logp - old_logp).detach()
    weight = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return -(weight * advantages.unsqueeze(-1) * logp), weight != ratio


# train.loss.policy.name -> its loss: `loss(logp, old_logp, advantages, mask, clip_low, clip_high) -> (loss [B, T], clipped
# [B, T])`, its clip bounds the knobs of its params section (verl's PolicyLossFn: one signature for every loss)
POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "ppo_clip": clipped_policy_loss,  # GRPO, DAPO (verl's "vanilla")
    "gspo": gspo_policy_loss,
    "cispo": cispo_policy_loss,
}


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
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    correction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one place a variant changes the loss: L = keep * w_prompt * w_token * w_is * L_pg + beta * KL - c * H.

    pg_loss, kl, token_weights, entropy, correction: [B, T]; prompt_weights, keep: [B]. Weights are detached:
    they scale gradients and are never trained. `correction` is w_is, the rollout correction's weight
    (`algos.rollout_correction`; None: 1). The entropy bonus (c = entropy_coef), like the KL, is on every
    token, whatever the weights. Returns [B, T].
    """
    weight = keep.detach().unsqueeze(-1) * prompt_weights.detach().unsqueeze(-1) * token_weights.detach()
    if correction is not None:
        weight = weight * correction.detach()
    loss = weight * pg_loss
    if kl is not None and kl_beta > 0:
        loss = loss + kl_beta * kl
    if entropy is not None and entropy_coef > 0:
        loss = loss - entropy_coef * entropy
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
