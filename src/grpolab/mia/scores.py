"""Membership scores of texts from one batched forward pass: pure tensor functions.

Every method maps per-token statistics of a scored span (mask [B, T]) to one score per row,
higher = "more likely a member": `loss` (mean log-likelihood), `zlib` (that / zlib bytes),
`min_k` (mean of the lowest k % token log-probs), `min_k_plus_plus` (Zhang et al. 2024,
arXiv 2404.02936: the same over z_t = (log p(x_t) - mu_t) / sigma_t) and `reference` (mean
log-likelihood minus a reference model's). At least one token always counts, so short texts
where floor(k n) = 0 still score, and nothing divides by zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")

SIGMA_FLOOR = 1e-6


def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, T, V] (position t predicts targets[:, t]), targets [B, T] ->
    (log p(x_t), mu_t, sigma_t), each [B, T], where mu_t = sum_v p log p and
    sigma_t^2 = sum_v p (log p)^2 - mu_t^2 under the model's own next-token distribution."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    p = logp_all.exp()
    mu = (p * logp_all).sum(-1)
    second = (p * logp_all.square()).sum(-1)
    sigma = (second - mu.square()).clamp(min=0).sqrt()
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, mu, sigma


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T], [B, T] -> [B]: mean over the masked-in positions (0 for an empty row)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)


def lowest_k_mean(values: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """[B, T], [B, T] -> [B]: mean of each row's lowest max(1, floor(k n)) masked-in values."""
    m = mask.bool()
    n = m.sum(-1)
    take = torch.clamp(torch.floor(k * n.to(torch.float64)).long(), min=1)
    ordered = torch.sort(values.masked_fill(~m, float("inf")), dim=-1).values
    ranks = torch.arange(values.shape[-1], device=values.device).unsqueeze(0)
    chosen = (ranks < take.unsqueeze(-1)) & (ranks < n.unsqueeze(-1))
    total = torch.where(chosen, ordered, torch.zeros_like(ordered)).sum(-1)
    return total / chosen.sum(-1).clamp(min=1)


def score_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(logp, mask)


def score_zlib(logp: torch.Tensor, mask: torch.Tensor, zlib_bytes: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood over zlib-compressed bytes [B] of the text (Carlini et al. 2021)."""
    return masked_mean(logp, mask) / zlib_bytes.to(logp.dtype).clamp(min=1)


def score_min_k(logp: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    return lowest_k_mean(logp, mask, k)


def score_min_k_plus_plus(logp: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    z = (logp - mu) / sigma.clamp(min=SIGMA_FLOOR)
    return lowest_k_mean(z, mask, k)


def score_reference(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Likelihood ratio: the target's mean log-likelihood minus the reference model's."""
    return masked_mean(logp, mask) - masked_mean(ref_logp, mask)


@dataclass(frozen=True)
class Span:
    """The per-token statistics of the scored spans of B texts ([B, T] each, from `token_statistics`) and the
    extras some methods need: filled only when a chosen method asks for them."""

    logp: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    mask: torch.Tensor
    zlib_bytes: torch.Tensor | None = None  # [B] zlib-compressed length of each text
    reference_logp: torch.Tensor | None = None  # [B, T] the reference model's log p of the same tokens


@dataclass(frozen=True)
class MiaMethod:
    """A membership attack: `score(span, k) -> [B]`, higher = more likely a member; `needs`: the Span extras it reads."""

    score: Callable[[Span, float], torch.Tensor]
    needs: frozenset[str] = frozenset()


# mia.method / eval.mia_methods: name -> attack
MIA_METHODS: dict[str, MiaMethod] = {
    "loss": MiaMethod(lambda s, k: score_loss(s.logp, s.mask)),
    "zlib": MiaMethod(lambda s, k: score_zlib(s.logp, s.mask, s.zlib_bytes), frozenset({"zlib_bytes"})),
    "min_k": MiaMethod(lambda s, k: score_min_k(s.logp, s.mask, k)),
    "min_k_plus_plus": MiaMethod(lambda s, k: score_min_k_plus_plus(s.logp, s.mu, s.sigma, s.mask, k)),
    "reference": MiaMethod(lambda s, k: score_reference(s.logp, s.reference_logp, s.mask), frozenset({"reference_logp"})),
}
