"""The log-probabilities of completions under a model, and the micro-batches (rows by length) every pass over a batch uses.

One forward pass over [prompt | completion] that keeps the final hidden states, then the output head and
the log-softmax over the completion tokens only, a chunk of tokens at a time (recomputed in the backward
pass), so no [rows, positions, vocabulary] tensor is ever held. Log-probs are those of the distribution
the completions were sampled from: softmax(logits / temperature), as TRL and verl compute them (top_p is
not applied here: a vLLM rollout's mismatch correction covers it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from grpolab.runtime import distributed as dist
from grpolab.algos.losses import policy_token_stats, token_logprobs

if TYPE_CHECKING:  # the samplers import this module
    from grpolab.samplers.base import Rollout

# Logits formed at once in a log-prob pass (tokens x vocabulary): 256 MB of fp32 whatever the vocabulary.
LOGIT_CHUNK_ELEMENTS = 2**26


def language_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a DeepSpeed engine and/or a PEFT wrapper (adapters are injected in place)."""
    if any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_logits_only(model: torch.nn.Module, keep: int = 1) -> dict:
    """The forward kwarg that has the model form logits for its last `keep` positions only (when it takes it)."""
    return {"logits_to_keep": keep} if _takes_logits_to_keep(type(language_model(model))) else {}


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def forward_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kwargs):
    """One forward pass over [prompt | completion] (prompt left-padded, completion right-padded);
    the model's output, `kwargs` passed on."""
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, completion_ids], dim=1).to(device)
    mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)


def completion_token_stats(model, rollout: Rollout, stats: Callable[..., tuple[torch.Tensor, ...]],
                           temperature: float = 1.0, chunk_tokens: int | None = None) -> tuple[torch.Tensor, ...]:
    """Per-token statistics of each valid completion token under `model`: `stats(logits [n, V] fp32,
    targets [n])` -> tensors [n], evaluated a chunk of tokens at a time and returned as [b, T] each
    (0 at padding), on the CPU, for the b rows of `rollout` (prompts [b, P] left-padded, completions [b, T]
    right-padded). Under autograd each chunk's logits are recomputed in the backward pass rather
    than kept; `stats` sees logits / temperature; `chunk_tokens` tokens at a time (default: LOGIT_CHUNK_ELEMENTS /
    vocabulary). The statistics `stats` computes with autograd are differentiable (log p; an entropy bonus's
    entropy), the others should be computed detached."""
    out = forward_completions(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask,
                              output_hidden_states=True, **last_logits_only(model))
    p = rollout.prompt_ids.shape[1]
    hidden = out.hidden_states[-1][:, p - 1 : -1]  # position p - 1 + t predicts completion token t
    valid = rollout.completion_mask.bool().to(hidden.device)
    h, targets = hidden[valid], rollout.completion_ids.to(hidden.device)[valid]  # [n, H], [n]
    lm = language_model(model)
    head, cap = lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)

    def chunk_stats(h_chunk: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = head(h_chunk).float()
        if cap:  # Gemma 2/3 soft-cap their logits in the forward that this bypasses
            logits = torch.tanh(logits / cap) * cap
        return stats(logits / temperature if temperature != 1.0 else logits, y)

    vocab = getattr(head, "out_features", None) or lm.config.get_text_config().vocab_size  # (ZeRO-3 empties .weight)
    size = chunk_tokens or max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    n = len(h)
    if _partitioned(head):
        # ZeRO-3 gathers the head's weight for each call, forward and backward (a collective), and checks that
        # every rank calls the same modules in the same order: every rank makes as many calls, of full chunks
        # (zero rows past this rank's tokens, whose statistics are dropped).
        calls = dist.all_reduce_max(-(-n // size))
        h = torch.cat([h, h.new_zeros(calls * size - n, h.shape[1])])
        targets = torch.cat([targets, targets.new_zeros(calls * size - n)])
    pieces = []
    for start in range(0, len(h), size):
        args = (h[start : start + size], targets[start : start + size])
        pieces.append(checkpoint(chunk_stats, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_stats(*args))
    valid = valid.cpu()
    results = []
    for i in range(len(pieces[0]) if pieces else 0):
        values = torch.cat([piece[i] for piece in pieces])[:n].cpu()
        full = torch.zeros(valid.shape, dtype=values.dtype)
        results.append(full.masked_scatter(valid, values))
    return tuple(results)


def _partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 gathers `module`'s parameters for each call (a collective): some are partitioned (not kept
    whole) and its hooks are on (off inside `distributed.gathered`). Decided from what every rank has alike,
    not from a parameter's momentary state, which prefetching makes differ between ranks."""
    if not any(hasattr(p, "ds_id") and not getattr(p, "ds_persist", False) for p in module.parameters()):
        return False
    return any("_pre_forward_module_hook" in getattr(h, "__qualname__", "") for h in module._forward_pre_hooks.values())


def completion_logprobs(model, rollout: Rollout, entropy: bool = False, entropy_grad: bool = False, temperature: float = 1.0,
                        chunk_tokens: int | None = None):
    """log p of each completion token under softmax(`model`'s logits / temperature) ([b, T]) and, if asked,
    (entropy, sum_v p_v^2) of that distribution ([b, T] each; the entropy differentiable with `entropy_grad`), for
    the b rows of `rollout`;
    the output head `chunk_tokens` tokens at a time (`completion_token_stats`)."""
    if not entropy:
        return completion_token_stats(model, rollout, lambda logits, y: (token_logprobs(logits, y),), temperature, chunk_tokens)[0], None
    logp, ent, prob_sq = completion_token_stats(model, rollout, lambda logits, y: policy_token_stats(logits, y, entropy_grad),
                                                temperature, chunk_tokens)
    return logp, (ent, prob_sq)


def by_length(mask: torch.Tensor, size: int, index: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices (`index`, default all rows of mask [B, T]) in chunks of `size`, longest completion
    first (stable), so that each chunk, cut to its own width (`Rollout.take`), carries little padding."""
    index = torch.arange(mask.shape[0]) if index is None else index
    order = index[torch.argsort(mask[index].sum(-1), descending=True, stable=True)]
    return [order[i : i + size] for i in range(0, len(order), size)]


def by_tokens(prompt_mask: torch.Tensor, mask: torch.Tensor, budget: int, index: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices (`index`, default all rows of mask [B, T]) in chunks whose [prompt | completion] block, cut to
    its own width (`Rollout.take`), holds at most `budget` positions (a row longer than that alone), longest completion
    first (stable) as `by_length`. prompt_mask: [B, P] left-padded."""
    index = torch.arange(mask.shape[0]) if index is None else index
    order = index[torch.argsort(mask[index].sum(-1), descending=True, stable=True)].tolist()
    prompt_lengths, lengths = prompt_mask.sum(-1).tolist(), mask.sum(-1).tolist()
    chunks: list[list[int]] = []
    width_p = width_c = 0
    for i in order:
        wp, wc = max(width_p, prompt_lengths[i]), max(width_c, lengths[i])
        if not chunks or (len(chunks[-1]) + 1) * (wp + wc) > budget:
            chunks.append([])
            wp, wc = prompt_lengths[i], lengths[i]
        chunks[-1].append(i)
        width_p, width_c = wp, wc
    return [torch.tensor(c, dtype=torch.long) for c in chunks]
