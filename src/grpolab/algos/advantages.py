"""Group-relative advantages."""

from __future__ import annotations

from collections.abc import Callable

import torch

# train.scale_rewards: (centred [n, G], grouped rewards [n, G], rewards [B], eps) -> scaled [n, G]
ADVANTAGE_SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "group": lambda centred, grouped, rewards, eps: centred / (grouped.std(dim=1, keepdim=True) + eps),  # GRPO
    "batch": lambda centred, grouped, rewards, eps: centred / (rewards.std() + eps),
    "none": lambda centred, grouped, rewards, eps: centred,  # Dr. GRPO
}


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """A = r - mean(group), divided by a std picked by `scale`.

    rewards: [B] with B = n_prompts * group_size, a prompt's completions contiguous.
    scale:   "group" (std of the group, GRPO), "batch" (std of the whole batch),
             "none" (no division: Dr. GRPO).
    returns: [B]. A group whose rewards are all equal gets exactly 0 (no NaN).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose from {sorted(ADVANTAGE_SCALES)}")
    grouped = rewards.view(-1, group_size)
    centred = ADVANTAGE_SCALES[scale](grouped - grouped.mean(dim=1, keepdim=True), grouped, rewards, eps)
    # Exact zeros for tied groups: float rounding in the mean would otherwise leave ~1e-9 residues
    # that the std division blows up to visible advantages.
    tied = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return centred.masked_fill(tied, 0.0).reshape(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [n_prompts] bool: groups whose rewards are all equal (they carry no signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)

