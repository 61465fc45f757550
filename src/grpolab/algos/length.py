"""Length handling from DAPO (Yu et al. 2025): a soft penalty for completions near the length limit, and
which completions the limit cut off."""

from __future__ import annotations

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer_len tokens, then falling linearly to
    -factor at max_len (and -factor beyond). lengths: [B] -> [B], <= 0."""
    start = max_len - buffer_len
    return factor * torch.clamp((start - lengths.to(torch.float32)) / buffer_len, min=-1.0, max=0.0)


def truncated(completion_ids: torch.Tensor, completion_mask: torch.Tensor, stop_ids: list[int], max_len: int) -> torch.Tensor:
    """Completions the length limit cut off: max_len tokens and no stop token at the end.
    completion_ids, completion_mask: [B, T] (right-padded) -> [B] bool."""
    lengths = completion_mask.sum(-1).long()
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return (lengths >= max_len) & ~torch.isin(last, torch.tensor(stop_ids, dtype=completion_ids.dtype))
