"""What every sampler shares: the `Sampler` interface, the `Rollout` it returns, and the helpers around them
(padding, stop ids, per-row keys, decoding, the room a prompt leaves)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

import torch

from grpolab.errors import ConfigError

if TYPE_CHECKING:  # params validation imports the samplers' names: no transformers import here
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    """B rows of prompts and their completions: a sampler's, or sft's data responses; what every log-prob pass reads."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, T] right-padded with pad id
    completion_mask: torch.Tensor  # [B, T] 1 up to and including EOS
    # As the sampler computed them, under the distribution it sampled from (softmax(logits / temperature)),
    # 0 past EOS: log p of each token (the sampler's log-probs, which the mismatch correction compares with
    # the trainer's), and its entropy (None from a sampler that does not return it: vLLM).
    token_logp: torch.Tensor | None = None  # [B, T]
    token_entropy: torch.Tensor | None = None  # [B, T]

    @property
    def lengths(self) -> list[int]:
        return self.completion_mask.sum(-1).tolist()

    def take(self, index: torch.Tensor | slice, trim: bool = True) -> Rollout:
        """Rows `index` as a rollout of their own. trim: cut to their own width, the prompts losing the leading
        and the completions the trailing positions that are padding in every taken row (a micro-batch then
        carries little padding); the width of the completions taken is `completion_mask.shape[1]`."""
        taken = Rollout(*(None if x is None else x[index] for x in (getattr(self, f.name) for f in fields(Rollout))))
        if not trim:
            return taken
        first = int(taken.prompt_mask.any(0).nonzero()[0])
        last = int(taken.completion_mask.any(0).nonzero()[-1]) + 1 if taken.completion_mask.any() else 1
        cut = lambda x: None if x is None else x[:, :last]  # noqa: E731
        return Rollout(taken.prompt_ids[:, first:], taken.prompt_mask[:, first:], cut(taken.completion_ids),
                       cut(taken.completion_mask), cut(taken.token_logp), cut(taken.token_entropy))


def cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of consecutive rows as one (of one sampler): prompts re-padded on the left, completions on the right."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    width = max(p.completion_ids.shape[1] for p in parts)
    left = lambda t, value: torch.nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)  # noqa: E731
    right = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    pads = {"prompt_ids": (left, pad_id), "prompt_mask": (left, 0), "completion_ids": (right, pad_id),
            "completion_mask": (right, 0), "token_logp": (right, 0.0), "token_entropy": (right, 0.0)}
    return Rollout(**{f.name: None if getattr(parts[0], f.name) is None  # a column the sampler does not return
                      else torch.cat([pads[f.name][0](getattr(p, f.name), pads[f.name][1]) for p in parts])
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


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[[ids]] -> (ids [B, T], mask [B, T]) padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
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


def check_room(model_config, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
               key: str, source: str) -> None:
    """Every prompt of `source` plus `max_new_tokens` (the param `key`) fits the model's positions: else
    name the longest prompt's row, before any generation (past them a model fails or reads garbage)."""

    limit = getattr(model_config, "max_position_embeddings", None)
    if not limit or not prompts:
        return
    from grpolab.data.tokenizer import encode_prompt

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


class Sampler(Protocol):
    """What generates: prompts (token ids) in, a `Rollout` out, row i sampled with the noise of keys[i]
    (`sample_keys`) or greedy when `keys` is None."""

    name: str
    reads_policy: bool  # samples from the policy module itself (ZeRO-3 must gather it meanwhile)
    eos_ids: list[int]
    pad_id: int

    def sync(self, model: torch.nn.Module) -> None:
        """Make the engine hold `model`'s current weights (nothing to do for a sampler that reads the policy)."""

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
               keys: torch.Tensor | None = None) -> Rollout: ...

    def rest(self) -> None:
        """The batch's rollouts are done: free what the update may need until the next `sync` (vLLM's sleep mode)."""

    def close(self) -> None:
        """Free the engine (its memory, its KV cache); the sampler is not used again."""


