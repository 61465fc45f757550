"""Per-token, per-prompt and per-sample weights that variants multiply into the policy-gradient
term at the trainer's composition point (`algos.losses.compose_token_loss`). Plain GRPO: all ones.

MIA prompt weights and credit-assignment token weights plug in here: the training loop asks
`LossWeighting.loss_weights` for each batch. The TracIn keep mask needs the batch's advantages and
a gradient pass, so `tracin.TracIn.select` sets it on the batch after sampling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from grpolab.algos import credit
from grpolab.algos.mia_weights import transform_mia_weights
from grpolab.config import Params
from grpolab.logprobs import forward_completions, last_logits_only
from grpolab.samplers import Rollout
from grpolab.samplers.hf import evaluating


@dataclass
class LossWeights:
    token: torch.Tensor  # [B, T]
    prompt: torch.Tensor  # [B]
    keep: torch.Tensor  # [B]

    def take(self, index: torch.Tensor, width: int) -> LossWeights:
        """Rows `index` [b], the token weights cut to the `width` first positions (`Batch.take`)."""
        return LossWeights(self.token[index][:, :width], self.prompt[index], self.keep[index])


def _mia_weight(info) -> float | None:
    """A row's `extra_info.mia_weight`, None without."""
    return info.get("mia_weight") if isinstance(info, dict) else None


class LossWeighting:
    """Built once per training from params and the train data; gives each batch its loss weights."""

    def __init__(self, params: Params, data: pd.DataFrame, tokenizer):
        self.params = params
        self.tokenizer = tokenizer
        self._pieces = np.full(0, None, dtype=object)  # token id -> its decoded text, filled as tokens appear
        self._lengths = np.full(0, -1)  # token id -> its text's length, -1 until decoded
        t = params.train
        self._raw_mia_weights = [_mia_weight(x) for x in data["extra_info"]] if t.mia_weighting.use_mia_weighted_loss else []
        self.mia_on = t.mia_weighting.use_mia_weighted_loss and all(w is not None for w in self._raw_mia_weights)
        if t.mia_weighting.use_mia_weighted_loss and not self.mia_on:
            warnings.warn("train.mia_weighting.use_mia_weighted_loss is set but the train data has no extra_info.mia_weight: "
                          "training plain GRPO", stacklevel=2)

    def start_metrics(self) -> dict[str, float]:
        """Seed 000's log line and its figures as metrics, at the start of training (empty when off)."""
        if not self.mia_on:
            return {}
        t = self.params.train
        raw = torch.tensor(self._raw_mia_weights, dtype=torch.float64)
        w = transform_mia_weights(raw, t.mia_weighting.mia_weighting_mode, t.mia_weighting.mia_invert_weights)
        stats = {"mean": w.mean().item(), "std": w.std().item() if len(w) > 1 else 0.0, "min": w.min().item(), "max": w.max().item()}
        print(f"MIA-weighted loss enabled: mode={t.mia_weighting.mia_weighting_mode}, invert={t.mia_weighting.mia_invert_weights}, "
              + ", ".join(f"weight_{k}={v:.4f}" for k, v in stats.items()), flush=True)
        return {f"mia/weight_{k}": v for k, v in stats.items()}

    def pieces(self, ids: torch.Tensor) -> np.ndarray:
        """The text of each token of `ids` (an object array of their shape)."""
        return self._pieces[self._known(ids)]

    def _known(self, ids: torch.Tensor) -> np.ndarray:
        """`ids` as an array, every one of them decoded: an id the first time it appears in the run, then looked up."""
        ids = ids.numpy()
        if ids.size and ids.max() >= len(self._pieces):
            grow = int(ids.max()) + 1 - len(self._pieces)
            self._pieces = np.concatenate([self._pieces, np.full(grow, None, dtype=object)])
            self._lengths = np.concatenate([self._lengths, np.full(grow, -1)])
        for i in (new := np.unique(ids))[self._lengths[new] < 0].tolist():
            self._pieces[i] = self.tokenizer.decode([i])
            self._lengths[i] = len(self._pieces[i])
        return ids

    def token_classes(self, rollout: Rollout) -> torch.Tensor:
        """think / answer / tag / other of every completion token ([B, T], `algos.credit` codes)."""
        ids = self._known(rollout.completion_ids)
        lengths = np.where(rollout.completion_mask.bool().numpy(), self._lengths[ids], 0)
        texts = ["".join(row[:n]) for row, n in zip(self._pieces[ids], rollout.lengths)]
        return credit.token_classes(texts, torch.from_numpy(lengths))

    def loss_weights(self, rollout: Rollout, rows: list[dict], classes: torch.Tensor, model,
                     micro_batches: list[torch.Tensor]) -> LossWeights:
        """Weights for one batch of rollouts [B rows]. rows: the B rows' train data (a
        prompt's row repeated for each of its completions, so they share its weight); classes:
        `token_classes(rollout)`; model: the policy, for mitigations that look inside it, one
        micro-batch (`micro_batches`: row indices) at a time."""
        t = self.params.train
        batch = rollout.completion_ids.shape[0]
        prompt = torch.ones(batch)
        if self.mia_on:
            raw = torch.tensor([_mia_weight(r["extra_info"]) for r in rows], dtype=torch.float32)
            prompt = transform_mia_weights(raw, t.mia_weighting.mia_weighting_mode, t.mia_weighting.mia_invert_weights)
        token = self._token_weights(rollout, classes, model, micro_batches)
        return LossWeights(token=token, prompt=prompt, keep=torch.ones(batch))

    def _token_weights(self, rollout: Rollout, classes: torch.Tensor, model, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        m, mask = self.params.train.mitigation, rollout.completion_mask
        mitigation, knobs = credit.MITIGATIONS[m.name], m.knobs()
        if not mitigation.needs_attention:
            return mitigation.weights(credit.TokenInputs(classes, mask, rollout.token_logp, rollout.token_entropy), **knobs)
        weights = torch.ones(mask.shape)  # row by row the same: each micro-batch's rows on their own
        for index in micro_batches:
            micro = rollout.take(index)
            width = micro.completion_mask.shape[1]
            inputs = credit.TokenInputs(classes[index][:, :width], micro.completion_mask, attention=completion_attention(model, micro))
            weights[index, :width] = mitigation.weights(inputs, **knobs)
        return weights


def completion_attention(model, rollout: Rollout) -> torch.Tensor:
    """Attention among the completion tokens of `rollout`'s b rows (completions [b, T]), averaged over layers and
    heads: [b, T, T], query i to key j.

    Any HF causal LM: one extra forward pass with eager attention (the fused kernels do not
    return attention weights), in eval mode (the update leaves the policy training: LoRA's dropout
    would make the weights noise), both switched back afterwards."""
    own = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), evaluating(model):
            out = forward_completions(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.completion_mask, output_attentions=True, **last_logits_only(model))
            p = rollout.prompt_ids.shape[1]
            attention = sum(layer[:, :, p:, p:].float().mean(1) for layer in out.attentions) / len(out.attentions)
            attention = attention.cpu()  # [b, T, T], summed layer by layer: no [layers, b, heads, S, S] stack
    finally:
        model.set_attn_implementation(own)
    return attention.clone()
