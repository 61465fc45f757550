"""Generation behind one seam: a `Sampler` turns token prompts into a `Rollout`, whichever engine runs it.

Two samplers, by name (`SAMPLERS`, the params' `train.rollout.backend`): `hf`, grpolab's own decoder over
the policy itself (`samplers/hf.py`), and `vllm`, a vLLM engine that holds a copy of the policy's weights,
pushed in place before each batch of rollouts (`samplers/vllm.py`, imported only when chosen). Every place
that generates (train rollouts, TracIn's validation rollouts, evaluate, the MIA stage) goes through one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from grpolab.samplers.base import (Completions, Rollout, Sampler, cat_rollouts, check_room, decode, left_pad, sample_keys,
                                   stop_ids)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["SAMPLERS", "Completions", "Rollout", "Sampler", "cat_rollouts", "check_room", "decode", "generate", "left_pad",
           "make_sampler", "sample_keys", "stop_ids"]


def _hf(model, *, eos_ids, pad_id, batch_size, settings, model_dir, seed, dtype) -> Sampler:
    from grpolab.samplers.hf import HFSampler

    return HFSampler(model, eos_ids=eos_ids, pad_id=pad_id, batch_size=batch_size)


def _vllm(model, *, eos_ids, pad_id, batch_size, settings, model_dir, seed, dtype) -> Sampler:
    from grpolab.samplers.vllm import VLLMSampler  # vLLM is imported only when chosen

    return VLLMSampler(model_dir, model.config, eos_ids=eos_ids, pad_id=pad_id, settings=settings, seed=seed, dtype=dtype)


# name -> builder(model, *, eos_ids, pad_id, batch_size, settings (the params' train.rollout), model_dir, seed, dtype)
SAMPLERS: dict[str, Callable[..., Sampler]] = {"hf": _hf, "vllm": _vllm}


def make_sampler(backend: str, model, tokenizer: PreTrainedTokenizerBase, *, batch_size: int, settings=None,
                 model_dir=None, seed: int = 0) -> Sampler:
    """The sampler `backend` (a name of SAMPLERS) for `model` (the policy; for vLLM, `model_dir` is the model
    folder its engine starts from, with `model`'s config and working dtype)."""
    dtype = next(model.parameters()).dtype
    return SAMPLERS[backend](model, eos_ids=stop_ids(model, tokenizer), pad_id=tokenizer.pad_token_id,
                             batch_size=batch_size, settings=settings, model_dir=model_dir, seed=seed, dtype=dtype)


def generate(
    sampler: Sampler,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    n_per_prompt: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Completions:
    """Texts in, texts out: greedy or seeded sampled completions of every prompt."""
    from grpolab.data.tokenizer import encode_prompt

    encoded = [encode_prompt(tokenizer, p) for p in prompts for _ in range(n_per_prompt)]
    rollout = sampler.sample(encoded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             keys=sample_keys(seed, list(range(len(encoded)))) if do_sample else None)
    return Completions(decode(tokenizer, rollout), rollout.lengths)
