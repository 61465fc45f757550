"""Batched generation with a KV cache: left-padded prompts, completions cut at EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpolab.data.tokenizer import encode_prompt


@dataclass
class Completions:
    texts: list[str]  # [n_prompts * n_per_prompt], the completions of prompt i at i*n .. i*n+n-1
    lengths: list[int]  # generated tokens per completion, EOS included


@torch.no_grad()
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
) -> Completions:
    """Greedy or sampled completions; sampling draws from torch's global RNG (seed it first)."""
    model.eval()
    texts, lengths = [], []
    expanded = [p for p in prompts for _ in range(n_per_prompt)]
    for start in range(0, len(expanded), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in expanded[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {"do_sample": False}
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sampling,
        )
        for row in out[:, width:].tolist():
            n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            lengths.append(n)
            texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return Completions(texts, lengths)
