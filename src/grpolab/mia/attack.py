"""Membership scores of prompts under a model: the `mia` stage turns them into prompt weights, and
`evaluate` into ROC curves of the base and trained models.

The scored text of a prompt is the model's own greedy completion of it, conditioned on the
prompt: GRPO trains on completions, never on prompt tokens, so that is where training leaves
its trace. One greedy generation and one forward pass per batch give every method at once
(`mia.scores`); `reference` adds one forward pass of the reference model.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from grpolab.data.tokenizer import encode_prompt, load_tokenizer
from grpolab.errors import ConfigError
from grpolab.mia import scores as S
from grpolab.models import load_model
from grpolab.logprobs import completion_logprobs, completion_token_stats
from grpolab.samplers import Sampler, decode


def load_reference(path: str, tokenizer, dtype: torch.dtype) -> torch.nn.Module:
    """The reference model of `mia.reference_model` (in `dtype`): its scores are compared token by token
    with the base model's, so it must read text with the same tokenizer."""
    reference_tokenizer = load_tokenizer(path, "mia.reference_model")
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"mia.reference_model: the tokenizer in {path} differs from the base model's ({len(reference_tokenizer)} vs "
            f"{len(tokenizer)} tokens, or other ids): a reference must share the base model's tokenizer"
        )
    return load_model(path, dtype).eval()


@torch.no_grad()
def membership_scores(
    model, tokenizer, prompts: list[str], methods: list[str], *, k: float, max_new_tokens: int,
    batch_size: int, sampler: Sampler, reference=None, chunk_tokens: int | None = None,
) -> dict[str, np.ndarray]:
    """{method: scores [len(prompts)]}, higher = more likely a member of `model`'s training data: the statistics
    of `model`'s own (untempered) distribution over each prompt's greedy completion, which `sampler` (of `model`)
    generates, `batch_size` prompts at a time (the output head `chunk_tokens` tokens at a time)."""
    unknown = [m for m in methods if m not in S.MIA_METHODS]
    if unknown:
        raise ValueError(f"unknown MIA methods {unknown}; choose from {list(S.MIA_METHODS)}")
    model.eval()
    out: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rollout = sampler.sample([encode_prompt(tokenizer, p) for p in chunk], max_new_tokens=max_new_tokens)
        logp, mu, sigma = completion_token_stats(model, rollout, S.token_statistics, chunk_tokens=chunk_tokens)  # fp32, [b, T] each
        needs = set().union(*(S.MIA_METHODS[m].needs for m in methods))
        zlib_bytes = reference_logp = None
        if "zlib_bytes" in needs:
            zlib_bytes = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in decode(tokenizer, rollout)])
        if "reference_logp" in needs:
            reference_logp = completion_logprobs(reference, rollout, chunk_tokens=chunk_tokens)[0]
        span = S.Span(logp, mu, sigma, rollout.completion_mask, zlib_bytes, reference_logp)
        for method in methods:
            out[method].append(S.MIA_METHODS[method].score(span, k))
    return {m: torch.cat(v).double().numpy() if v else np.zeros(0) for m, v in out.items()}
