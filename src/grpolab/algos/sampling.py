"""Sampling a token from next-token logits with counter-based noise: pure tensor functions.

A row's randomness is a function of (its key, the position): `counter_uniform` hashes them with
SplitMix64 (Vigna's generator, the stream of state `mix(key) + (t + 1) * GAMMA`), so a completion
depends on nothing but its own key, whatever batch, device or split it is sampled in, and the
noise of a whole rollout is drawn on the device at once, without a generator per row.
`sample_tokens` draws by inverse CDF: one uniform per row and step, against the cumulative
probabilities in float64 (fine enough that a token of probability 1e-12 keeps its share).
"""

from __future__ import annotations

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio)
MIX_1, MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK_64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 bit patterns (multiplication wraps modulo 2^64). [...] -> [...]"""
    x = (x ^ _shift_right(x, 30)) * _signed(MIX_1)
    x = (x ^ _shift_right(x, 27)) * _signed(MIX_2)
    return x ^ _shift_right(x, 31)


def splitmix64(seeds: torch.Tensor, steps: int) -> torch.Tensor:
    """The first `steps` outputs of SplitMix64 seeded with each of `seeds`, as int64 bit patterns.
    seeds: [B] int64 -> [B, steps]."""
    t = torch.arange(1, steps + 1, dtype=torch.int64, device=seeds.device)
    return mix64(seeds.unsqueeze(-1) + t * _signed(GAMMA))


def counter_uniform(keys: torch.Tensor, steps: int) -> torch.Tensor:
    """Uniforms in [0, 1) with 53 random bits, one per (row key, position): u[b, t] depends on keys[b]
    and t only. keys: [B] int64 -> [B, steps] float64."""
    bits = splitmix64(mix64(keys), steps)
    return _shift_right(bits, 11).to(torch.float64) * 2.0**-53


def sample_tokens(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to the smallest set of tokens
    whose probability reaches top_p (the token that crosses it stays in), by inverse CDF at `uniform`.
    logits: [B, V]; uniform: [B] in [0, 1) -> [B] token ids. A token of probability 0 is never drawn."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        cdf = _cumsum(probs.double())
        return _first_above(cdf, uniform * cdf[:, -1])
    probs, order = torch.sort(probs, dim=-1, descending=True)
    cdf = _cumsum(probs.double())
    kept = (cdf - probs.double()) <= top_p  # a prefix of the sorted tokens
    total = torch.where(kept, probs.double(), 0.0).sum(-1)
    return order.gather(-1, _first_above(cdf, uniform * total).unsqueeze(-1)).squeeze(-1)


def _cumsum(probs: torch.Tensor) -> torch.Tensor:
    """probs.cumsum(-1); on CUDA under torch.use_deterministic_algorithms, where torch's float cumsum has no
    deterministic kernel, `fixed_point_cumsum` (as torch's own ops switch kernels under that mode)."""
    if probs.is_cuda and torch.are_deterministic_algorithms_enabled():
        return fixed_point_cumsum(probs)
    return probs.cumsum(-1)


def fixed_point_cumsum(probs: torch.Tensor) -> torch.Tensor:
    """Cumulative sums of probabilities in [0, 1] (float64, last dim), summed exactly as integers in units of
    2^-62, so in any order: the same bits on every run. Each term is rounded by at most 2^-63, a CDF over V terms
    by at most V 2^-63 (1.6e-14 at V = 151,936), the order of a float64 cumsum's own rounding. [..., V] -> [..., V]"""
    return (probs * 2.0**62).round().long().cumsum(-1).double() * 2.0**-62


def _first_above(cdf: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability exceeds the threshold. [B, V], [B] -> [B]"""
    index = torch.searchsorted(cdf, threshold.unsqueeze(-1), right=True).squeeze(-1)
    return index.clamp(max=cdf.shape[-1] - 1)  # threshold == total only by rounding
