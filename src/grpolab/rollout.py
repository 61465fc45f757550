"""Batched generation with a KV cache: left-padded prompts, completions cut at the first stop token
(any EOS id of the model's generation config, or the tokenizer's EOS).

Sampling draws each row's noise from that row's own generator, seeded by (seed, row id), so
a completion does not depend on which other rows share its batch: splitting a step's prompts
across processes or micro-batches gives the same completions as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpolab.algos.losses import policy_token_stats, token_logprobs
from grpolab.data.tokenizer import encode_prompt


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


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf the logits outside the smallest set whose probability reaches top_p. [B, V] -> [B, V]"""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    outside = probs.cumsum(-1) - probs > top_p  # the token that crosses top_p stays in
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


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
    generators: list[torch.Generator] | None = None,
) -> Rollout:
    """Generate one completion per prompt row. Greedy when `generators` is None, else Gumbel-max
    sampling from softmax(logits / temperature) restricted to top_p, row i using generators[i]."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    completion_ids, logp, entropy = (
        x.clone() for x in _decode(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature, top_p, generators)
    )
    # valid = generated before or at the first stop token
    is_stop = torch.isin(completion_ids, torch.tensor(eos_ids))
    eos_seen = is_stop.long().cumsum(-1)
    completion_mask = ((eos_seen == 0) | ((eos_seen == 1) & is_stop)).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
    valid = completion_mask.bool()
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, logp * valid, entropy * valid)


@torch.inference_mode()  # the caller gets clones: ordinary tensors that may enter an autograd graph
def _decode(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature, top_p, generators):
    """The decoding loop of `sample`: completion ids, their log p and the entropy under the model's
    untempered distribution, each [B, steps], with anything after EOS unspecified."""
    batch = prompt_ids.shape[0]
    device = next(model.parameters()).device
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0).to(device)
    out = model(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    attention = prompt_mask.to(device)
    next_pos = positions[:, -1:] + 1
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    token_logp = torch.zeros((batch, max_new_tokens), device=device)
    token_entropy = torch.zeros((batch, max_new_tokens), device=device)
    active = torch.arange(batch, device=device)  # rows still generating; finished rows leave the batch
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # over the active rows
    compactable = hasattr(cache, "batch_select_indices")
    vocab = logits.shape[-1]
    stops = torch.tensor(eos_ids, device=device)
    # Noise is drawn a chunk of steps at a time (one call per row per chunk, not per token),
    # the chunk sized to keep the buffer near 64 MB whatever the vocabulary.
    chunk = max(1, min(max_new_tokens, 2**24 // max(1, batch * vocab)))
    steps = 0
    for t in range(max_new_tokens):
        if generators is None:
            token = logits.argmax(-1)
        else:
            if t % chunk == 0:
                uniform = torch.stack([torch.rand(chunk, vocab, generator=g) for g in generators])
                gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20))).to(device)
            scores = top_p_filter(logits.float() / temperature, top_p)
            token = (scores + gumbel[active, t % chunk]).argmax(-1)
        if not compactable:
            token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens[active, t] = token
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        token_logp[active, t] = logp_all.gather(-1, token[:, None]).squeeze(-1)
        token_entropy[active, t] = -(logp_all.exp() * logp_all).sum(-1)
        steps = t + 1
        done = done | torch.isin(token, stops)
        if done.all():
            break
        # Drop finished rows once they are a quarter of the batch: the decode cost follows the
        # rows still running, and the KV cache is re-indexed only a few times per rollout.
        if compactable and done.sum() * 4 >= len(active):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, token, attention, next_pos, done = active[keep], token[keep], attention[keep], next_pos[keep], done[keep]
        attention = torch.cat([attention, torch.ones(len(active), 1, dtype=attention.dtype, device=device)], dim=-1)
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


def completion_logits(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """The logits that predict each completion token. prompt_ids, prompt_mask: [B, P] left-padded;
    completion_ids, completion_mask: [B, T] -> [B, T, V]."""
    logits = forward_completions(model, prompt_ids, prompt_mask, completion_ids, completion_mask).logits
    return logits[:, prompt_ids.shape[1] - 1 : -1]  # position t predicts completion token t


def completion_logprobs(model, rows: dict, entropy: bool = False):
    """log p of each completion token under `model` ([b, T]) and, if asked, (entropy, sum_v p_v^2) ([b, T] each)."""
    logits = completion_logits(model, rows["prompt_ids"], rows["prompt_mask"], rows["completion_ids"], rows["mask"])
    targets = rows["completion_ids"].to(logits.device)
    if not entropy:
        return token_logprobs(logits, targets).cpu(), None
    logp, ent, prob_sq = policy_token_stats(logits, targets)
    return logp.cpu(), (ent.cpu(), prob_sq.cpu())


def check_room(model_config, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
               key: str, source: str) -> None:
    """Every prompt of `source` plus `max_new_tokens` (the param `key`) fits the model's positions: else
    name the longest prompt's row, before any generation (past them a model fails or reads garbage)."""
    from grpolab.config import ConfigError

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


def row_generators(seed: int, row_ids: list[int]) -> list[torch.Generator]:
    """One generator per row, seeded by (seed, row id): a row's samples depend on nothing else."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + r) for r in row_ids]


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
    """Texts in, texts out: greedy or seeded sampled completions of every prompt, in batches."""
    model.eval()
    encoded = [encode_prompt(tokenizer, p) for p in prompts for _ in range(n_per_prompt)]
    eos_ids = stop_ids(model, tokenizer)
    texts, lengths = [], []
    for start in range(0, len(encoded), batch_size):
        rows = list(range(start, min(start + batch_size, len(encoded))))
        rollout = sample(
            model, [encoded[i] for i in rows], max_new_tokens=max_new_tokens,
            eos_ids=eos_ids, pad_id=tokenizer.pad_token_id,
            temperature=temperature, top_p=top_p, generators=row_generators(seed, rows) if do_sample else None,
        )
        texts += decode(tokenizer, rollout)
        lengths += rollout.lengths
    return Completions(texts, lengths)
