"""Per-token, per-prompt and per-sample weights that variants multiply into the policy-gradient
term at the trainer's composition point (`algos.losses.compose_token_loss`). Plain GRPO: all ones.

MIA prompt weights, credit-assignment token weights and TracIn keep masks plug in here; the
training loop calls `loss_weights` and never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpolab.config import Params


@dataclass
class LossWeights:
    token: torch.Tensor  # [B, T]
    prompt: torch.Tensor  # [B]
    keep: torch.Tensor  # [B]


def loss_weights(params: Params, completion_mask: torch.Tensor, prompt_rows: list[dict]) -> LossWeights:
    """Weights for one batch of rollouts. completion_mask: [B, T]; prompt_rows: the B rows' train data."""
    batch = completion_mask.shape[0]
    return LossWeights(
        token=torch.ones_like(completion_mask, dtype=torch.float32),
        prompt=torch.ones(batch),
        keep=torch.ones(batch),
    )
