"""MIA prompt weights: scores -> [0, 1] weights -> the transform seed 000 specifies."""

from __future__ import annotations

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")


def _minmax(s: torch.Tensor) -> torch.Tensor:
    """(s - min) / (max - min)."""
    return (s - s.min()) / (s.max() - s.min())


def _rank(s: torch.Tensor) -> torch.Tensor:
    """(rank - 1) / (N - 1), ties sharing their mean rank; robust to outliers."""
    # mean rank of ties: the count below plus half the count equal, minus a half; from one sort,
    # O(N) memory (runs of equal values in sorted order are the tie groups)
    ordered, order = torch.sort(s)
    _, group, equal = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    below = torch.cumsum(equal, 0) - equal
    mean_rank = (below.double() + (equal.double() - 1) / 2) / (s.numel() - 1)
    out = torch.empty_like(s)
    out[order] = mean_rank[group]
    return out


# mia.normalize: how membership scores become weights in [0, 1] (float64 in, not all equal)
SCORE_NORMALIZATIONS = {"rank": _rank, "minmax": _minmax}


def normalize_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Membership scores [N] (higher = more likely a member) -> weights [N] in [0, 1] by `how`
    (SCORE_NORMALIZATIONS). All-equal scores (or N = 1) give 0.5 everywhere: no prompt is preferred."""
    if how not in SCORE_NORMALIZATIONS:
        raise ValueError(f"unknown normalization {how!r}; choose from {sorted(SCORE_NORMALIZATIONS)}")
    s = scores.double()
    if s.numel() < 2 or bool((s == s[0]).all()):
        return torch.full_like(s, 0.5).to(scores.dtype)
    return SCORE_NORMALIZATIONS[how](s).to(scores.dtype)


MIA_WEIGHT_TRANSFORMS = {
    "linear": lambda w: w,
    "quadratic": lambda w: w * w,
    "exponential": lambda w: torch.exp(w - 1),
}


def transform_mia_weights(weights: torch.Tensor, mode: str, invert: bool) -> torch.Tensor:
    """Seed 000's transform of prompt weights [B] in [0, 1]: w, w^2 or exp(w - 1), of 1 - w if `invert`."""
    if mode not in MIA_WEIGHT_TRANSFORMS:
        raise ValueError(f"unknown MIA weighting mode {mode!r}; choose from {sorted(MIA_WEIGHT_TRANSFORMS)}")
    return MIA_WEIGHT_TRANSFORMS[mode](1 - weights if invert else weights)


def mean_one(weights: torch.Tensor, total: float, count: int) -> torch.Tensor:
    """Prompt weights rescaled to mean 1 over their batch, which may span processes (`total`: the sum of
    its `count` weights): a weighting then changes which prompts count, not the step's size.
    weights: [B] -> [B]; all zero: unchanged (no scale makes them mean 1)."""
    return weights * (count / total) if total > 0 else weights
