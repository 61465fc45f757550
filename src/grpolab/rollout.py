"""Batched generation with a KV cache, and the log-probabilities of completions under a model.

Generation: left-padded prompts, completions cut at the first stop token (any EOS id of the model's
generation config, or the tokenizer's EOS), always in eval mode (dropout off, the KV cache on, also
under gradient checkpointing), in chunks of `batch_size` rows. The prefill keeps only the last
position's logits. Sampling noise is counter-based (`algos.sampling`): a row's completion depends
on its key (seed, row id) alone, so splitting a step's prompts across processes, chunks or
micro-batches gives the same completions as one big batch; it is drawn on the device, and a decode
step synchronises with the host once.

Log-probabilities: one forward pass over [prompt | completion] that keeps the final hidden states,
then the output head and the log-softmax over the completion tokens only, a chunk of tokens at a
time (recomputed in the backward pass), so no [rows, positions, vocabulary] tensor is ever held.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpolab.algos.losses import policy_token_stats, token_logprobs
from grpolab.algos.sampling import counter_uniform, sample_tokens
from grpolab.data.tokenizer import encode_prompt
from grpolab.errors import ConfigError

# Logits formed at once in a log-prob pass (tokens x vocabulary): 256 MB of fp32 whatever the vocabulary.
LOGIT_CHUNK_ELEMENTS = 2**26


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, T] right-padded with pad id
    completion_mask: torch.Tensor  # [B, T] 1 up to and including EOS
    # Under the sampling model's own (untempered) distribution, 0 past EOS: log p of each token, entropy.
    token_logp: torch.Tensor | None = None  # [B, T]
    token_entropy: torch.Tensor | None = None  # [B, T]

    @property
    def lengths(self) -> list[int]:
        return self.completion_mask.sum(-1).tolist()


def cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of consecutive rows as one: prompts re-padded on the left, completions on the right."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    width = max(p.completion_ids.shape[1] for p in parts)
    left = lambda t, value: torch.nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)  # noqa: E731
    right = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    pads = {"prompt_ids": (left, pad_id), "prompt_mask": (left, 0), "completion_ids": (right, pad_id),
            "completion_mask": (right, 0), "token_logp": (right, 0.0), "token_entropy": (right, 0.0)}
    return Rollout(**{f.name: torch.cat([pads[f.name][0](getattr(p, f.name), pads[f.name][1]) for p in parts])
                      for f in fields(Rollout)})


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[[ids]] -> (ids [B, P], mask [B, P]) padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the EOS ids of the model's generation config (a chat model often has
    several, e.g. Qwen2.5's `<|im_end|>` and `<|endoftext|>`) and the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted({*configured, tokenizer.eos_token_id})


def sample_keys(seed: int, row_ids: list[int]) -> torch.Tensor:
    """One sampling key per row, from (seed, row id): a row's samples depend on nothing else. -> [B] int64"""
    return torch.tensor([seed * 1_000_003 + r for r in row_ids], dtype=torch.int64)


def _language_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a DeepSpeed engine and/or a PEFT wrapper (adapters are injected in place)."""
    if any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_logits_only(model: torch.nn.Module, keep: int = 1) -> dict:
    """The forward kwarg that has the model form logits for its last `keep` positions only (when it takes it)."""
    return {"logits_to_keep": keep} if _takes_logits_to_keep(type(_language_model(model))) else {}


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout; transformers keeps the KV cache and skips gradient checkpointing),
    each module's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    keys: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> Rollout:
    """Generate one completion per prompt row, `batch_size` rows at a time (all at once when None), in eval
    mode whatever mode `model` is in. Greedy when `keys` is None, else sampled from softmax(logits /
    temperature) restricted to top_p, row i with the noise of keys[i] (`sample_keys`)."""
    size = batch_size or len(prompts)
    with evaluating(model):
        parts = [_sample_chunk(model, prompts[i : i + size], max_new_tokens, eos_ids, pad_id, temperature, top_p,
                               None if keys is None else keys[i : i + size]) for i in range(0, len(prompts), size)]
    return cat_rollouts(parts, pad_id)


def _sample_chunk(model, prompts, max_new_tokens, eos_ids, pad_id, temperature, top_p, keys) -> Rollout:
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    completion_ids, logp, entropy = (
        x.clone() for x in _decode(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature, top_p, keys)
    )
    # valid = generated before or at the first stop token
    is_stop = torch.isin(completion_ids, torch.tensor(eos_ids))
    eos_seen = is_stop.long().cumsum(-1)
    completion_mask = ((eos_seen == 0) | ((eos_seen == 1) & is_stop)).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
    valid = completion_mask.bool()
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, logp * valid, entropy * valid)


@torch.inference_mode()  # the caller gets clones: ordinary tensors that may enter an autograd graph
def _decode(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature, top_p, keys):
    """The decoding loop of `sample`: completion ids, their log p and the entropy under the model's
    untempered distribution, each [B, steps], with anything after EOS unspecified."""
    batch = prompt_ids.shape[0]
    device = next(model.parameters()).device
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0).to(device)
    out = model(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), position_ids=positions,
                use_cache=True, **last_logits_only(model))
    cache, logits = out.past_key_values, out.logits[:, -1]
    attention = prompt_mask.to(device)
    next_pos = positions[:, -1:] + 1
    uniform = None if keys is None else counter_uniform(keys.to(device), max_new_tokens)  # [B, steps]
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    token_logp = torch.zeros((batch, max_new_tokens), device=device)
    token_entropy = torch.zeros((batch, max_new_tokens), device=device)
    active = torch.arange(batch, device=device)  # rows still generating; finished rows leave the batch
    running = batch  # len(active), known to the host
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # over the active rows
    compactable = hasattr(cache, "batch_select_indices")
    stops = torch.tensor(eos_ids, device=device)
    steps = 0
    for t in range(max_new_tokens):
        token = logits.argmax(-1) if uniform is None else sample_tokens(logits, uniform[active, t], temperature, top_p)
        if not compactable:
            token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens[active, t] = token
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        token_logp[active, t] = logp_all.gather(-1, token[:, None]).squeeze(-1)
        token_entropy[active, t] = -(logp_all.exp() * logp_all).sum(-1)
        steps = t + 1
        done = done | torch.isin(token, stops)
        finished = int(done.sum())  # the step's one host synchronisation
        if finished == running:
            break
        # Drop finished rows once they are a quarter of the batch: the decode cost follows the
        # rows still running, and the KV cache is re-indexed only a few times per rollout.
        if compactable and finished * 4 >= running:
            keep = torch.argsort(done.to(torch.uint8), stable=True)[: running - finished]  # unfinished, in order
            cache.batch_select_indices(keep)
            active, token, attention, next_pos = active[keep], token[keep], attention[keep], next_pos[keep]
            done = torch.zeros(len(keep), dtype=torch.bool, device=device)
            running -= finished
        attention = torch.cat([attention, torch.ones(running, 1, dtype=attention.dtype, device=device)], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens[:, :steps].cpu(), token_logp[:, :steps].cpu(), token_entropy[:, :steps].cpu()


def forward_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kwargs):
    """One forward pass over [prompt | completion] (prompt left-padded, completion right-padded);
    the model's output, `kwargs` passed on."""
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, completion_ids], dim=1).to(device)
    mask = torch.cat([prompt_mask, completion_mask], dim=1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)


def completion_token_stats(model, rows: dict, stats: Callable[..., tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Per-token statistics of each valid completion token under `model`: `stats(logits [n, V] fp32,
    targets [n])` -> tensors [n], evaluated a chunk of tokens at a time and returned as [b, T] each
    (0 at padding), on the CPU. rows: prompt_ids / prompt_mask [b, P] left-padded, completion_ids / mask
    [b, T] right-padded. Under autograd each chunk's logits are recomputed in the backward pass rather
    than kept; the statistics `stats` computes with autograd are differentiable (log p; an entropy bonus's
    entropy), the others should be computed detached."""
    out = forward_completions(model, rows["prompt_ids"], rows["prompt_mask"], rows["completion_ids"], rows["mask"],
                              output_hidden_states=True, **last_logits_only(model))
    p = rows["prompt_ids"].shape[1]
    hidden = out.hidden_states[-1][:, p - 1 : -1]  # position p - 1 + t predicts completion token t
    valid = rows["mask"].bool().to(hidden.device)
    h, targets = hidden[valid], rows["completion_ids"].to(hidden.device)[valid]  # [n, H], [n]
    lm = _language_model(model)
    head, cap = lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)

    def chunk_stats(h_chunk: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = head(h_chunk).float()
        if cap:  # Gemma 2/3 soft-cap their logits in the forward that this bypasses
            logits = torch.tanh(logits / cap) * cap
        return stats(logits, y)

    vocab = getattr(head, "out_features", None) or lm.config.get_text_config().vocab_size  # (ZeRO-3 empties .weight)
    size = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    pieces = []
    for start in range(0, len(h), size):
        args = (h[start : start + size], targets[start : start + size])
        pieces.append(checkpoint(chunk_stats, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_stats(*args))
    valid = valid.cpu()
    results = []
    for i in range(len(pieces[0]) if pieces else 0):
        values = torch.cat([piece[i] for piece in pieces]).cpu()
        full = torch.zeros(valid.shape, dtype=values.dtype)
        results.append(full.masked_scatter(valid, values))
    return tuple(results)


def completion_logprobs(model, rows: dict, entropy: bool = False, entropy_grad: bool = False):
    """log p of each completion token under `model` ([b, T]) and, if asked, (entropy, sum_v p_v^2) ([b, T] each;
    the entropy differentiable with `entropy_grad`)."""
    if not entropy:
        return completion_token_stats(model, rows, lambda logits, y: (token_logprobs(logits, y),))[0], None
    logp, ent, prob_sq = completion_token_stats(model, rows, lambda logits, y: policy_token_stats(logits, y, entropy_grad))
    return logp, (ent, prob_sq)


PROMPT_COLUMNS = ("prompt_ids", "prompt_mask")  # left-padded; every other [rows, width] column is a completion's


def take(rows: dict, index: torch.Tensor) -> dict:
    """Rows `index` of a batch's columns, cut to their own width: prompt columns lose the leading and
    completion columns the trailing positions that are padding in every taken row."""
    out = {k: None if x is None else x[index] for k, x in rows.items()}
    first = int(out["prompt_mask"].any(0).nonzero()[0])
    last = int(out["mask"].any(0).nonzero()[-1]) + 1 if out["mask"].any() else 1
    width = rows["mask"].shape[1]
    for k, x in out.items():
        if k in PROMPT_COLUMNS:
            out[k] = x[:, first:]
        elif isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == width:
            out[k] = x[:, :last]
    return out


def by_length(mask: torch.Tensor, size: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices (`rows`, default all rows of mask [B, T]) in chunks of `size`, longest completion
    first (stable), so that each chunk, cut to its own width (`take`), carries little padding."""
    rows = torch.arange(mask.shape[0]) if rows is None else rows
    order = rows[torch.argsort(mask[rows].sum(-1), descending=True, stable=True)]
    return [order[i : i + size] for i in range(0, len(order), size)]


def check_room(model_config, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
               key: str, source: str) -> None:
    """Every prompt of `source` plus `max_new_tokens` (the param `key`) fits the model's positions: else
    name the longest prompt's row, before any generation (past them a model fails or reads garbage)."""

    limit = getattr(model_config, "max_position_embeddings", None)
    if not limit or not prompts:
        return
    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    row = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[row] + max_new_tokens > limit:
        raise ConfigError(
            f"{key}: {source}: row {row}: its prompt ({lengths[row]} tokens) + {key} ({max_new_tokens}) exceed the "
            f"model's {limit} positions: lower {key}, or drop the long prompts"
        )


def decode(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    return [
        tokenizer.decode(ids[: int(n)], skip_special_tokens=True)
        for ids, n in zip(rollout.completion_ids.tolist(), rollout.completion_mask.sum(-1).tolist())
    ]


@dataclass
class Completions:
    texts: list[str]  # [n_prompts * n_per_prompt], the completions of prompt i at i*n .. i*n+n-1
    lengths: list[int]  # generated tokens per completion, EOS included


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    n_per_prompt: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
) -> Completions:
    """Texts in, texts out: greedy or seeded sampled completions of every prompt, `batch_size` at a time."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts for _ in range(n_per_prompt)]
    rollout = sample(
        model, encoded, max_new_tokens=max_new_tokens, eos_ids=stop_ids(model, tokenizer), pad_id=tokenizer.pad_token_id,
        temperature=temperature, top_p=top_p, keys=sample_keys(seed, list(range(len(encoded)))) if do_sample else None,
        batch_size=batch_size,
    )
    return Completions(decode(tokenizer, rollout), rollout.lengths)
