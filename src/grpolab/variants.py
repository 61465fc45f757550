"""Per-token, per-prompt and per-sample weights that variants multiply into the policy-gradient
term at the trainer's composition point (`algos.losses.compose_token_loss`). Plain GRPO: all ones.

MIA prompt weights, credit-assignment token weights and TracIn keep masks plug in here; the
training loop asks `Variants.loss_weights` for each batch and never changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd
import torch

from grpolab.algos.mia_weights import transform_mia_weights
from grpolab.config import Params


@dataclass
class LossWeights:
    token: torch.Tensor  # [B, T]
    prompt: torch.Tensor  # [B]
    keep: torch.Tensor  # [B]


def _mia_weight(row) -> float | None:
    info = row["extra_info"]
    return info.get("mia_weight") if isinstance(info, dict) else None


class Variants:
    """Built once per training from params and the train data; gives each batch its loss weights."""

    def __init__(self, params: Params, data: pd.DataFrame):
        self.params = params
        t = params.train
        self.mia_on = t.use_mia_weighted_loss and all(_mia_weight(r) is not None for _, r in data.iterrows())
        if t.use_mia_weighted_loss and not self.mia_on:
            warnings.warn("train.use_mia_weighted_loss is set but the train data has no extra_info.mia_weight: "
                          "training plain GRPO", stacklevel=2)

    def start_metrics(self, data: pd.DataFrame) -> dict[str, float]:
        """Seed 000's log line and its figures as metrics, at the start of training (empty when off)."""
        if not self.mia_on:
            return {}
        t = self.params.train
        raw = torch.tensor([_mia_weight(r) for _, r in data.iterrows()], dtype=torch.float64)
        w = transform_mia_weights(raw, t.mia_weighting_mode, t.mia_invert_weights)
        stats = {"mean": w.mean().item(), "std": w.std().item() if len(w) > 1 else 0.0, "min": w.min().item(), "max": w.max().item()}
        print(f"MIA-weighted loss enabled: mode={t.mia_weighting_mode}, invert={t.mia_invert_weights}, "
              + ", ".join(f"weight_{k}={v:.4f}" for k, v in stats.items()), flush=True)
        return {f"mia/weight_{k}": v for k, v in stats.items()}

    def loss_weights(self, completion_mask: torch.Tensor, prompt_rows: list) -> LossWeights:
        """Weights for one batch of rollouts. completion_mask: [B, T]; prompt_rows: the B rows' train
        data (a prompt's row repeated for each of its completions, so they share its weight)."""
        t = self.params.train
        batch = completion_mask.shape[0]
        prompt = torch.ones(batch)
        if self.mia_on:
            raw = torch.tensor([_mia_weight(r) for r in prompt_rows], dtype=torch.float32)
            prompt = transform_mia_weights(raw, t.mia_weighting_mode, t.mia_invert_weights)
        return LossWeights(
            token=torch.ones_like(completion_mask, dtype=torch.float32),
            prompt=prompt,
            keep=torch.ones(batch),
        )
