"""Credit assignment: token classes, the mitigations' per-token weights, and per-token credit.

Plain GRPO gives every token of a completion the same advantage; a mitigation returns a
detached weight w_tok[b, t] that the composition point multiplies into the policy-gradient
term. Every weight is normalised so that the learning rate need not change between
mitigations: per completion to mean 1 over its tokens (the completion's total advantage mass
stays that of plain GRPO, only redistributed), except `entropy_masking`, whose 0/1 mask is
normalised to mean 1 over the batch's tokens (a token-mean over the kept tokens only, as in
arXiv 2506.01939). Shapes: B completions, T completion positions, mask [B, T] valid tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")

# token classes, as stored in the credit logs
OTHER, THINK, ANSWER, TAG = 0, 1, 2, 3
CLASS_NAMES = {OTHER: "other", THINK: "think", ANSWER: "answer", TAG: "tag"}
_TAG = re.compile(r"</?(think|answer)>")


def token_classes(texts: list[str], lengths: torch.Tensor) -> torch.Tensor:
    """Class of every token from its decoded text -> [B, T]. texts: each completion's tokens' pieces joined;
    lengths [B, T]: each piece's number of characters (0 past the completion).

    A token overlapping `<think>`, `</think>`, `<answer>` or `</answer>` is `tag`; a token between
    `<think>` and `</think>` is `think`, between `<answer>` and `</answer>` is `answer` (an
    unclosed section runs to the end); anything else (text outside the tags, EOS, padding) is
    `other`. A completion without tags is all `other`. Python runs per tag, never per token or character.
    """
    text = "\0".join(texts)  # one regex pass over the batch: no tag holds a NUL, so none spans two completions
    size = len(text)
    row_start = np.cumsum([0] + [len(x) + 1 for x in texts[:-1]])
    found = [(m.start(), m.end(), OTHER if m.group(0)[1] == "/" else THINK if m.group(1) == "think" else ANSWER)
             for m in _TAG.finditer(text)]
    starts, ends, after = (np.array(column, dtype=np.int64) for column in zip(*found)) if found else [np.zeros(0, np.int64)] * 3
    inside = np.zeros(size + 1, dtype=np.int64)  # +1 at a tag's first character, -1 past its last
    np.add.at(inside, starts, 1)
    np.add.at(inside, ends, -1)
    is_tag = np.cumsum(inside)[:size] > 0
    section = np.full(size + 1, -1, dtype=np.int64)  # where the section changes: a completion starts, a tag ends
    section[row_start] = OTHER
    section[ends] = after
    section = section[np.maximum.accumulate(np.where(section >= 0, np.arange(size + 1), 0))]
    char_class = np.append(np.where(is_tag, TAG, section[:size]), OTHER)  # [size + 1]: an empty piece may sit at the end
    tags_before = np.concatenate([[0], np.cumsum(is_tag)])  # tag characters before each character
    n = lengths.numpy().astype(np.int64)
    first = row_start[:, None] + np.cumsum(n, axis=1) - n  # each token's first character in `text`
    last = first + n
    out = np.where(tags_before[last] > tags_before[first], TAG, char_class[first])
    return torch.from_numpy(np.where(n > 0, out, OTHER))


def _ones_outside(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 at positions that are not tokens (padding), like plain GRPO's weights."""
    return torch.where(mask.bool(), weights, torch.ones_like(weights))


def _mean_one_per_row(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale each row so its valid tokens average 1 (a row whose weights are all 0 gets 1s)."""
    m = mask.to(weights.dtype)
    mean = (weights * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    return _ones_outside(torch.where(mean > 0, weights / mean.clamp(min=1e-12), torch.ones_like(weights)), mask)


def outcome_conditional(classes: torch.Tensor, mask: torch.Tensor, think_discount: float) -> torch.Tensor:
    """Think tokens get `think_discount`, every other token 1, then mean 1 per completion. [B, T] -> [B, T]"""
    raw = torch.where(classes == THINK, torch.full(classes.shape, float(think_discount)), torch.ones(classes.shape))
    return _mean_one_per_row(raw, mask)


def inverse_logprob(logp: torch.Tensor, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """1 / (|log p_t| + epsilon), then mean 1 per completion. [B, T] -> [B, T]"""
    return _mean_one_per_row(1.0 / (logp.abs() + epsilon), mask)


def entropy_weighted(entropy: torch.Tensor, mask: torch.Tensor, entropy_temp: float) -> torch.Tensor:
    """softmax(H_t / temp) over each completion's tokens, times its number of tokens (mean 1). [B, T] -> [B, T]"""
    m = mask.bool()
    scores = (entropy / entropy_temp).masked_fill(~m, float("-inf"))
    soft = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row without tokens: all -inf -> 0
    return _ones_outside(soft * m.sum(-1, keepdim=True), mask)


def entropy_masking(entropy: torch.Tensor, mask: torch.Tensor, mask_percentile: float) -> torch.Tensor:
    """Keep tokens whose entropy is at or above the batch's `mask_percentile` percentile of token
    entropy, normalised to mean 1 over the batch's tokens. [B, T] -> [B, T]"""
    m = mask.bool()
    values = entropy[m]
    if values.numel() == 0:
        return torch.ones_like(entropy)
    threshold = torch.quantile(values.double(), mask_percentile / 100.0, interpolation="lower").to(entropy.dtype)
    keep = (entropy >= threshold) & m
    return _ones_outside(keep.to(entropy.dtype) * (m.sum() / keep.sum().clamp(min=1)), mask)


def attention_credit(attention_to: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor, credit_scale: float) -> torch.Tensor:
    """1 + credit_scale * n * c_t, then mean 1 per completion, where c_t is the share of the answer
    tokens' attention that lands on completion token t (c sums to 1 over a completion's tokens)
    and n the completion's number of tokens. Completions without answer tokens get 1 everywhere.

    attention_to: [B, T, T] attention of query position i to key position j within the completion,
    averaged over layers and heads.
    """
    answer = (classes == ANSWER) & mask.bool()
    paid = (attention_to * answer.unsqueeze(-1).to(attention_to.dtype)).sum(1) * mask.to(attention_to.dtype)  # [B, T]
    share = paid / paid.sum(-1, keepdim=True).clamp(min=1e-12)
    n = mask.sum(-1, keepdim=True).to(attention_to.dtype)
    raw = torch.where(answer.any(-1, keepdim=True), 1 + credit_scale * n * share, torch.ones_like(share))
    return _mean_one_per_row(raw, mask)


@dataclass(frozen=True)
class TokenInputs:
    """What a mitigation may read of a batch (or, for one that needs attention, a micro-batch): B completions."""

    classes: torch.Tensor  # [B, T] token classes (token_classes)
    mask: torch.Tensor  # [B, T] valid completion tokens
    logp: torch.Tensor | None = None  # [B, T] log p of each sampled token, as sampled
    entropy: torch.Tensor | None = None  # [B, T] the sampling distribution's entropy
    attention: torch.Tensor | None = None  # [B, T, T] attention among completion tokens (`needs_attention` only)


@dataclass(frozen=True)
class Mitigation:
    """A credit-assignment mitigation: `weights(inputs, **knobs) -> [B, T]`; its knobs, with their defaults, are the
    fields of its params section (`train.mitigation: {name: ..., <knob>: ...}`)."""

    weights: Callable[..., torch.Tensor]
    needs_attention: bool = False  # the policy's attention, computed a micro-batch at a time by the trainer
    needs_entropy: bool = False  # the tokens' entropies (a sampler that returns none: the trainer computes them)


# name -> mitigation (seed 002's names and knobs); `none` is plain GRPO
MITIGATIONS: dict[str, Mitigation] = {
    "none": Mitigation(lambda x: torch.ones_like(x.mask, dtype=torch.float32)),
    "outcome_conditional": Mitigation(lambda x, think_discount: outcome_conditional(x.classes, x.mask, think_discount)),
    "inverse_logprob": Mitigation(lambda x, epsilon: inverse_logprob(x.logp, x.mask, epsilon)),
    "attention_credit": Mitigation(lambda x, credit_scale: attention_credit(x.attention, x.classes, x.mask, credit_scale),
                                   needs_attention=True),
    "entropy_weighted": Mitigation(lambda x, entropy_temp: entropy_weighted(x.entropy, x.mask, entropy_temp),
                                   needs_entropy=True),
    "entropy_masking": Mitigation(lambda x, mask_percentile: entropy_masking(x.entropy, x.mask, mask_percentile),
                                  needs_entropy=True),
}


def token_credit(advantage_weight: torch.Tensor, logp: torch.Tensor, prob_sq_sum: torch.Tensor) -> torch.Tensor:
    """Norm of the policy-gradient term's gradient with respect to a token's logits:
    |A w| * ||onehot(y) - p||_2 = |A w| * sqrt(1 - 2 p_y + sum_v p_v^2). All [B, T] -> [B, T]."""
    p_y = logp.exp()
    return advantage_weight.abs() * (1 - 2 * p_y + prob_sq_sum).clamp(min=0).sqrt()


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of non-negative values [N] (0: all equal, -> 1: one holds everything)."""
    v = torch.sort(values.double().flatten()).values
    n = v.numel()
    if n == 0 or v.sum() <= 0:
        return torch.tensor(0.0, dtype=torch.float64)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return (2 * (ranks * v).sum() / (n * v.sum()) - (n + 1) / n)
