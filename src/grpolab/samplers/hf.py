"""The `hf` sampler: grpolab's own batched decoder over a transformers model, with a KV cache.

Left-padded prompts, completions cut at the first stop token, always in eval mode (dropout off, the KV
cache on, also under gradient checkpointing), in chunks of `batch_size` rows. The prefill keeps only the
last position's logits. Sampling noise is counter-based (`algos.sampling`): a row's completion depends on
its key (seed, row id) alone, so splitting a step's prompts across processes, chunks or micro-batches gives
the same completions as one big batch; it is drawn on the device, and a decode step synchronises with the
host once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from grpolab.algos.sampling import counter_uniform, sample_tokens
from grpolab.logprobs import last_logits_only
from grpolab.samplers.base import Rollout, cat_rollouts, left_pad


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
    """The decoding loop of `sample`: completion ids, their log p and the entropy under softmax(logits /
    temperature), each [B, steps], with anything after EOS unspecified."""
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
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # the distribution sampled from
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




class HFSampler:
    """grpolab's decoder over the policy module itself: nothing to sync, `batch_size` rows at a time."""

    name = "hf"
    reads_policy = True

    def __init__(self, model: torch.nn.Module, *, eos_ids: list[int], pad_id: int, batch_size: int | None):
        self.model, self.eos_ids, self.pad_id, self.batch_size = model, eos_ids, pad_id, batch_size

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model

    def rest(self) -> None:
        pass

    def close(self) -> None:
        self.model = None

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
               keys: torch.Tensor | None = None) -> Rollout:
        return sample(self.model, prompts, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
                      temperature=temperature, top_p=top_p, keys=keys, batch_size=self.batch_size)
