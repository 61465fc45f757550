"""Group-relative advantages: a baseline per group (the estimator), then a scale."""

from __future__ import annotations

from collections.abc import Callable

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")


def grpo_baseline(grouped: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """r_i - mean_j r_j over the group (GRPO, Shao et al. 2024). [n, G] -> [n, G]."""
    return grouped - grouped.mean(dim=1, keepdim=True)


def rloo_baseline(grouped: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """r_i - mean_{j != i} r_j, the leave-one-out baseline (RLOO, Ahmadian et al. 2024) = G/(G-1) (r_i - mean).
    [n, G] -> [n, G]; G >= 2."""
    size = grouped.shape[1]
    return (grouped - grouped.mean(dim=1, keepdim=True)) * (size / (size - 1))


def opo_baseline(grouped: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """r_i - sum_j l_j r_j / sum_j l_j, the length-weighted group mean (OPO, Hao et al. 2025: the optimal
    baseline when gradient norms grow with length; verl's `adv_estimator=opo`). grouped, lengths: [n, G]."""
    weights = lengths.to(grouped.dtype)
    baseline = (weights * grouped).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1)
    return grouped - baseline


# train.loss.advantage_estimator: (grouped rewards [n, G], completion lengths [n, G]) -> centred rewards [n, G]
ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grpo": grpo_baseline,
    "rloo": rloo_baseline,
    "opo": opo_baseline,
}

# train.loss.scale_rewards: (centred [n, G], grouped rewards [n, G], rewards [B], eps) -> scaled [n, G]
ADVANTAGE_SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "group": lambda centred, grouped, rewards, eps: centred / (grouped.std(dim=1, keepdim=True) + eps),  # GRPO
    "batch": lambda centred, grouped, rewards, eps: centred / (rewards.std() + eps),
    "none": lambda centred, grouped, rewards, eps: centred,  # Dr. GRPO
}


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6, estimator: str = "grpo",
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """A = (r - baseline of the group, by `estimator`), divided by a std picked by `scale`.

    rewards: [B] with B = n_prompts * group_size, a prompt's completions contiguous; lengths: [B]
    completion lengths (read by `opo` only; default all equal).
    scale:   "group" (std of the group, GRPO), "batch" (std of the whole batch),
             "none" (no division: Dr. GRPO).
    returns: [B]. A group whose rewards are all equal gets exactly 0 (no NaN).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose from {sorted(ADVANTAGE_SCALES)}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose from {sorted(ADVANTAGE_ESTIMATORS)}")
    grouped = rewards.view(-1, group_size)
    lengths = torch.ones_like(rewards) if lengths is None else lengths
    centred = ADVANTAGE_SCALES[scale](ADVANTAGE_ESTIMATORS[estimator](grouped, lengths.view(-1, group_size)), grouped, rewards, eps)
    # Exact zeros for tied groups: float rounding in the mean would otherwise leave ~1e-9 residues
    # that the std division blows up to visible advantages.
    tied = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return centred.masked_fill(tied, 0.0).reshape(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [n_prompts] bool: groups whose rewards are all equal (they carry no signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def dynamic_sampling_groups(has_signal: torch.Tensor, n: int) -> torch.Tensor:
    """DAPO's dynamic sampling (Yu et al. 2025; verl's `filter_groups`): which of the groups sampled so far
    a step trains. has_signal: [N] bool, the groups of every rollout batch in order (False: all rewards
    equal, no gradient signal); n: groups per step, N >= n -> [n] group indices, the first n with signal
    in sampling order, topped up with the first ones without when fewer than n have it (the cap on
    rollout batches was reached)."""
    order = torch.cat([has_signal.nonzero().flatten(), (~has_signal).nonzero().flatten()])
    return order[:n]
