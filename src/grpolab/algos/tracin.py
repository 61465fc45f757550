"""TracIn inside GRPO: per-completion gradient inner products without per-sample gradients,
the validation losses, and selection with the fallback (seeds 001 and 003).

influence(i) = <grad L_i, v>, with v the batch's own gradient (same-batch) or a validation
gradient. For a parameter used as y = x W^T (+ b) by a linear layer, completion i's gradient is
grad_W L_i = sum_t g_{i,t} x_{i,t}^T, where x_{i,t} is the layer's input at position t of row i
and g_{i,t} = dL/dy_{i,t} the gradient at its output; both come out of one forward and one
backward of the batch loss (rows are independent, so dL/dy_{i,t} = dL_i/dy_{i,t}). Hence
<grad_W L_i, V> = sum_t g_{i,t}^T V x_{i,t} (one matmul per layer, no [B, d_out, d_in] tensor),
and for an embedding table E looked up at ids: <grad_E L_i, V> = sum_t g_{i,t} . V[id_{i,t}].
The batch gradient V = sum_{i,t} g_{i,t} x_{i,t}^T comes from the same captures, so no
parameter gradient is asked of autograd (ZeRO-3's parameter hooks stay out of it).
See "Data Shapley in One Training Run" (Wang et al., ICLR'25) section 4.2 and GhostSuite.

Shapes: N valid token positions of a batch (prompt and completion, padding left out: its
gradient is 0), d_in / d_out the layer's widths.
"""

from __future__ import annotations

from collections.abc import Callable

from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")

# ---- inner products, one kind of parameter use at a time ---------------------------------------
# Token-level: x / ids and g hold the N valid positions of a batch, packed ([N, d], rows elsewhere
# say which row each came from); a row's inner product is the sum of its tokens' values.


def linear_weight_grad(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Adds the batch gradient of a linear layer's weight, sum_n g_n x_n^T, into `out`.
    x: [N, d_in], g: [N, d_out], out: [d_out, d_in] -> out."""
    return out.addmm_(g.T, x)


def linear_weight_dot(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per token g_n^T V x_n (summed over a row's tokens: <grad_W L_row, V>).
    x: [N, d_in], g: [N, d_out], v: [d_out, d_in] -> [N]."""
    return ((g @ v) * x).sum(-1)


def linear_bias_grad(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Adds the batch gradient of a linear layer's bias, sum_n g_n, into `out`. g: [N, d_out], out: [d_out]."""
    return out.add_(g.sum(0))


def linear_bias_dot(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per token g_n . v. g: [N, d_out], v: [d_out] -> [N]."""
    return g @ v


def embedding_grad(ids: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Adds the batch gradient of an embedding table looked up at `ids` into `out`: row k gets
    every g_n whose id is k. ids: [N] (long), g: [N, d], out: [num_embeddings, d]."""
    return out.index_add_(0, ids, g)


def embedding_dot(ids: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per token g_n . V[ids_n]. ids: [N], g: [N, d], v: [num_embeddings, d] -> [N]."""
    return (g * v[ids]).sum(-1)


def per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum per-token values [N] into their rows ([N] row index) -> [n_rows]."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def linear_weight_pairwise(x_a: torch.Tensor, g_a: torch.Tensor, x_b: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """The "ghost" product between rows of two batches, <grad_W L_i, grad_W L_j> =
    sum_{t,s} (g_{i,t} . g_{j,s}) (x_{i,t} . x_{j,s}), without forming either gradient.
    x_a: [A, S, d_in], g_a: [A, S, d_out], x_b: [C, R, d_in], g_b: [C, R, d_out] -> [A, C].
    O(S R) per pair: cheaper than materialising grad_W when S R < d_out d_in."""
    return torch.einsum("atc,bsc,atd,bsd->ab", g_a, g_b, x_a, x_b)


# Each kind of parameter use: (add its batch gradient into V, its per-token inner products with V),
# both called with the use's packed input (activations, or ids for a lookup) and output gradient.
PARAMETER_USES: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    "linear.weight": (linear_weight_grad, linear_weight_dot),
    "linear.bias": (linear_bias_grad, linear_bias_dot),
    "embedding.weight": (embedding_grad, embedding_dot),
}


# ---- validation: which completions, and the loss over them ------------------------------------


def _top(rewards: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.argsort(rewards, descending=True, stable=True)[:k]


def _bottom(rewards: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.argsort(rewards, stable=True)[:k]


def _random(rewards: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(len(rewards), generator=generator)[:k]


def _balanced(rewards: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    order = torch.argsort(rewards, descending=True, stable=True)
    return torch.cat([order[: k - k // 2], order[len(order) - k // 2 :]])


# name -> (rewards [N], k, generator) -> k distinct indices into the pool (seed 001's strategies)
VAL_SELECTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]] = {
    "random": _random,
    "top": _top,
    "bottom": _bottom,
    "balanced": _balanced,
}


def _lastadv(rewards: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    return -advantages / len(advantages)


def _reward(rewards: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    return -rewards / len(rewards)


def _contrastive(rewards: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    half = len(rewards) // 2
    order = torch.argsort(rewards, descending=True, stable=True)
    coef = torch.zeros_like(rewards)
    coef[order[:half]] = -1.0 / half
    coef[order[len(order) - half :]] = 1.0 / half
    return coef


# name -> (rewards [N], advantages [N]) -> c [N], the loss being sum_n c_n log p(y_n | x_n) (seed 003):
#   seqloss-lastadv  mean_n -log p(y_n) A_n          (the sequence's advantage; GRPO has one per sequence)
#   seqloss-reward   mean_n -log p(y_n) r_n
#   contrastive      -mean_good log p(y) + mean_bad log p(y), good / bad = top / bottom half by reward
# Linear in log p: a loss split across processes is the sum of its parts.
VAL_LOSS_COEFFICIENTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "seqloss-lastadv": _lastadv,
    "seqloss-reward": _reward,
    "contrastive": _contrastive,
}


def validation_loss(seq_logp: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """sum_n c_n log p(y_n). seq_logp: [N] (sum of token log-probs per completion), coefficients: [N] -> []."""
    return (coefficients.to(seq_logp.dtype) * seq_logp).sum()


# ---- selection ---------------------------------------------------------------------------------


def unit_scores(influence: torch.Tensor, group_size: int, unit: str) -> torch.Tensor:
    """The influence of each selection unit: a completion's own ([B] -> [B]) or a prompt group's sum ([B] -> [B / group_size])."""
    return influence if unit == "completion" else influence.view(-1, group_size).sum(-1)


def select(scores: torch.Tensor, fallback_min_positive: float, fallback_top_fraction: float) -> tuple[torch.Tensor, bool]:
    """Keep units with positive influence; if fewer than `fallback_min_positive` of them are
    positive (seed 001: `len(selected) < max(1, int(0.1 * bs))`), keep the top
    `fallback_top_fraction` by influence instead (at least one; ties keep the earlier unit).
    scores: [N] -> (keep [N] float 0/1, whether the fallback was taken)."""
    n = len(scores)
    positive = scores > 0
    if positive.sum().item() >= max(1, int(fallback_min_positive * n)):
        return positive.float(), False
    k = max(1, int(fallback_top_fraction * n))
    keep = torch.zeros(n)
    keep[torch.argsort(scores, descending=True, stable=True)[:k]] = 1.0
    return keep, True


def same_size_random(keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TracIn's control arm: as many units as `keep` holds, drawn uniformly at random instead of by influence.
    keep: [N] 0/1 -> [N] 0/1 with the same sum."""
    out = torch.zeros_like(keep)
    out[torch.randperm(len(keep), generator=generator)[: int(keep.sum().item())]] = 1.0
    return out


# train.tracin.keep: (the influence selection's keep [N], a seeded generator) -> the keep trained [N]
KEEP_RULES: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "influence": lambda keep, generator: keep,
    "random": same_size_random,
}


def influence_stats(scores: torch.Tensor, keep: torch.Tensor, fallback: bool) -> dict[str, float]:
    """Seed 001's diagnostics of one selection. scores, keep: [N]."""
    s = scores.double()
    return {
        "positive_ratio": (s > 0).double().mean().item(),
        "negative_ratio": (s < 0).double().mean().item(),
        "zero_ratio": (s == 0).double().mean().item(),
        "min_ip": s.min().item(),
        "max_ip": s.max().item(),
        "mean_ip": s.mean().item(),
        "std_ip": s.std().item() if len(s) > 1 else 0.0,
        "selected_ratio": keep.double().mean().item(),
        "fallback": float(fallback),
    }
