"""The rollout correction: pure tensor functions for the mismatch between the engine that sampled the
rollouts and the trainer that computes their log-probs.

A vLLM engine and the DeepSpeed policy hold the same weights but compute with other kernels (and, on a
GPU, other batch shapes), so the sampler's pi_sampler(y_t) differs from the trainer's pi_old(y_t). The
policy-gradient term is then an off-policy estimate, and the field corrects it with the importance ratio
rho = pi_old / pi_sampler, bounded (Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"; TRL's `vllm_importance_sampling_*`, verl's `rollout_is`, OpenRLHF's
`is_correction_type`). The ratio enters the composition point as one more detached factor, w_is[b, t].

Modes (`CORRECTION_MODES`), granularity x bound:
- token_truncate: w = clamp(rho_t, lo, hi) (TIS)
- token_mask:     w = rho_t where lo <= rho_t <= hi, else 0 (MIS; with lo > 0, IcePop's two-sided mask)
- sequence_truncate / sequence_mask: the same on rho = exp(sum_t log rho_t) of the completion, each of its
  tokens weighted by it.
"""

from __future__ import annotations

from collections.abc import Callable

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")


def log_ratios(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log rho per token (`token`) or per completion, broadcast to its tokens (`sequence`), 0 at padding.
    old_logp, sampler_logp, mask: [B, T] -> [B, T]."""
    m = mask.to(old_logp.dtype)
    log_rho = (old_logp - sampler_logp) * m
    if level == "sequence":
        log_rho = log_rho.sum(-1, keepdim=True).expand_as(log_rho) * m
    return log_rho


def truncate(ratio: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamp(ratio, low, high), where it was cut). [B, T] -> [B, T], [B, T] bool"""
    weight = ratio.clamp(min=low, max=high)
    return weight, weight != ratio


def mask_outside(ratio: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio inside [low, high], 0 outside; where it was dropped). [B, T] -> [B, T], [B, T] bool"""
    outside = (ratio < low) | (ratio > high)
    return torch.where(outside, torch.zeros_like(ratio), ratio), outside


# mode name -> (level, bound)
CORRECTION_MODES: dict[str, tuple[str, Callable[[torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]]] = {
    "token_truncate": ("token", truncate),
    "token_mask": ("token", mask_outside),
    "sequence_truncate": ("sequence", truncate),
    "sequence_mask": ("sequence", mask_outside),
}


def rollout_correction(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The correction's weights and what to log. old_logp: the trainer's log pi_old [B, T]; sampler_logp: the
    sampler's [B, T]; mask [B, T]. Returns (w_is [B, T] detached, 1 at padding; rho [B, T] before bounding;
    bounded [B, T] bool: where the bound truncated or masked it)."""
    level, bound = CORRECTION_MODES[mode]
    ratio = torch.exp(log_ratios(old_logp.detach(), sampler_logp, mask, level))
    weight, bounded = bound(ratio, low, high)
    valid = mask.bool()
    return torch.where(valid, weight, torch.ones_like(weight)), ratio, bounded & valid
