"""TracIn: ghost inner products against one autograd backward per sample, selection and the
validation losses against hand-computed values."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpolab.algos.losses import token_logprobs
from grpolab.algos.tracin import (
    KEEP_RULES,
    VAL_LOSS_COEFFICIENTS,
    VAL_SELECTIONS,
    embedding_dot,
    embedding_grad,
    influence_stats,
    linear_bias_dot,
    linear_bias_grad,
    linear_weight_dot,
    linear_weight_grad,
    linear_weight_pairwise,
    per_row,
    select,
    unit_scores,
    validation_loss,
)
from grpolab.trainer.tracin import GradientProbe, InnerProducts, accumulate


def tiny_model(arch: str) -> torch.nn.Module:
    cfg = AutoConfig.for_model(arch, vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).double()  # float64: the comparison is about the math, not rounding


def per_row_losses(model, ids, mask, weights):
    """L_i = sum_t w_{i,t} log p(ids_{i,t+1}) over valid t and t+1: a weighted sequence log-likelihood
    per row, like the policy-gradient loss (padding positions predict nothing)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return (token_logprobs(logits, ids[:, 1:]) * weights * mask[:, :-1] * mask[:, 1:]).sum(-1)


def brute_force_grads(model, names, ids, mask, weights):
    """One backward per row: [B, P] flattened gradients over the probed parameters."""
    params = [p for n, p in model.named_parameters() if n in names]
    rows = []
    for i in range(len(ids)):
        loss = per_row_losses(model, ids[i : i + 1], mask[i : i + 1], weights[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as in rollouts
    mask[3, :5] = 0
    weights = torch.randn(5, 8, generator=g, dtype=torch.float64)  # advantage x token weights
    return ids, mask, weights


# qwen2: q/k/v biases; both: tied embedding and head. Checkpointed: each layer's forward recomputed in the
# backward pass that hands over the captured gradients (as training with gradient_checkpointing runs it).
@pytest.mark.parametrize("arch, checkpointed", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_ghost_inner_products_match_per_sample_autograd(arch, checkpointed, batch):
    ids, mask, weights = batch
    model = tiny_model(arch)
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    probe = GradientProbe(model)
    names = set(probe.params)
    trainable = {n for n, p in model.named_parameters()}
    assert trainable - names == {n for n in trainable if "norm" in n}  # every parameter but the norm scales
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in names)
    loss = lambda: per_row_losses(model, ids, mask, weights).sum()  # noqa: E731
    v = {n: t.double() for n, t in probe.zeros().items()}
    probe.capture(loss, mask.bool(), accumulate(v))
    assert all(p.grad is None for p in model.parameters())  # gradients at the layers' outputs only

    def inner_products(vector):
        products = InnerProducts(vector, len(ids))
        probe.capture(loss, mask.bool(), products)
        return products.out

    same_batch = inner_products(v)

    grads = brute_force_grads(model, names, ids, mask, weights)
    flat_v = torch.cat([v[n].reshape(-1) for n, _ in model.named_parameters() if n in names])
    torch.testing.assert_close(flat_v, grads.sum(0), rtol=1e-6, atol=1e-9)  # the batch gradient
    torch.testing.assert_close(same_batch, grads @ grads.sum(0), rtol=1e-4, atol=0)

    # Against a fixed vector (a validation gradient), e.g. a random one.
    g = torch.Generator().manual_seed(2)
    fixed = {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in v.items()}
    flat_fixed = torch.cat([fixed[n].reshape(-1) for n, _ in model.named_parameters() if n in names])
    torch.testing.assert_close(inner_products(fixed), grads @ flat_fixed, rtol=1e-4, atol=0)


def test_pairwise_ghost_product_matches_materialised_gradients():
    g = torch.Generator().manual_seed(3)
    x_a, g_a = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    x_b, g_b = torch.randn(2, 7, 5, generator=g, dtype=torch.float64), torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    grad_a = torch.einsum("bto,bti->boi", g_a, x_a).reshape(3, -1)
    grad_b = torch.einsum("bto,bti->boi", g_b, x_b).reshape(2, -1)
    torch.testing.assert_close(linear_weight_pairwise(x_a, g_a, x_b, g_b), grad_a @ grad_b.T)


def test_parameter_uses_by_hand():
    # one row's two tokens, d_in = 2, d_out = 1: grad_W = g1 x1^T + g2 x2^T, <grad_W, V> = g1 V x1 + g2 V x2
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    g = torch.tensor([[2.0], [-1.0]])
    rows = torch.tensor([0, 0])
    v = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(linear_weight_grad(x, g, torch.zeros(1, 2)), torch.tensor([[2 - 3.0, 4 - 4.0]]))
    assert linear_bias_grad(x, g, torch.zeros(1)).tolist() == [1.0]
    assert linear_weight_dot(x, g, v).tolist() == [2 * 3, -1 * 7]
    assert per_row(linear_weight_dot(x, g, v), rows, 2).tolist() == [-1.0, 0.0]
    assert per_row(linear_bias_dot(x, g, torch.tensor([5.0])), rows, 1).tolist() == [5.0]
    ids = torch.tensor([1, 1])
    assert embedding_grad(ids, g, torch.zeros(3, 1)).squeeze(-1).tolist() == [0.0, 1.0, 0.0]
    assert embedding_dot(ids, g, torch.tensor([[0.0], [2.0], [7.0]])).tolist() == [4.0, -2.0]


def test_selection_keeps_positive_influence():
    keep, fallback = select(torch.tensor([0.5, -0.1, 0.0, 2.0, -3.0]), 0.1, 0.5)
    assert keep.tolist() == [1, 0, 0, 1, 0] and not fallback


def test_the_random_control_keeps_as_many_units_at_random():
    keep = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert torch.equal(KEEP_RULES["influence"](keep, torch.Generator().manual_seed(0)), keep)
    draws = [KEEP_RULES["random"](keep, torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert all(d.sum() == 3 and set(d.tolist()) <= {0.0, 1.0} for d in draws)
    assert torch.equal(draws[0], KEEP_RULES["random"](keep, torch.Generator().manual_seed(0)))  # seeded
    # uniform over the units: each is kept 3/8 of the time, not where the influence put them
    assert len({tuple(d.tolist()) for d in draws}) > 10 and 0 < torch.stack(draws)[:, 1].mean() < 1


def test_all_non_positive_influence_takes_the_fallback():
    scores = torch.tensor([-0.5, -0.1, 0.0, -2.0, -3.0, 0.0])
    keep, fallback = select(scores, 0.1, 0.5)  # top int(0.5 * 6) = 3: 0.0 (index 2), 0.0 (index 5), -0.1
    assert fallback and keep.tolist() == [0, 1, 1, 0, 0, 1]
    # one positive of 20 is below 10 %: the fallback; two of 20 are not
    scores = -torch.arange(1.0, 21.0)
    scores[7] = 1.0
    keep, fallback = select(scores, 0.1, 0.5)
    assert fallback and keep.sum() == 10 and keep[7] == 1
    scores[8] = 0.5
    keep, fallback = select(scores, 0.1, 0.5)
    assert not fallback and keep.nonzero().squeeze(-1).tolist() == [7, 8]
    keep, fallback = select(torch.tensor([-1.0, -2.0]), 0.1, 0.1)  # the fallback keeps at least one
    assert keep.tolist() == [1, 0]


def test_influence_stats_and_prompt_units():
    scores = torch.tensor([1.0, -1.0, 0.0, 2.0])
    keep, fallback = select(scores, 0.1, 0.5)
    stats = influence_stats(scores, keep, fallback)
    assert stats["positive_ratio"] == 0.5 and stats["negative_ratio"] == 0.25 and stats["zero_ratio"] == 0.25
    assert stats["min_ip"] == -1 and stats["max_ip"] == 2 and stats["mean_ip"] == 0.5 and stats["selected_ratio"] == 0.5
    assert stats["std_ip"] == pytest.approx(torch.tensor([1.0, -1.0, 0.0, 2.0]).std().item()) and stats["fallback"] == 0
    assert unit_scores(scores, 2, "prompt").tolist() == [0.0, 2.0]
    assert unit_scores(scores, 2, "completion").tolist() == scores.tolist()


def test_validation_selections_by_hand():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.7, 0.3])
    assert VAL_SELECTIONS["top"](rewards, 2, None).tolist() == [1, 4]
    assert VAL_SELECTIONS["bottom"](rewards, 2, None).tolist() == [3, 0]
    assert VAL_SELECTIONS["balanced"](rewards, 4, None).tolist() == [1, 4, 0, 3]
    picked = VAL_SELECTIONS["random"](rewards, 4, torch.Generator().manual_seed(0))
    assert len(set(picked.tolist())) == 4
    assert torch.equal(picked, VAL_SELECTIONS["random"](rewards, 4, torch.Generator().manual_seed(0)))


def test_validation_losses_by_hand():
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    adv = torch.tensor([1.5, -1.0, 0.5, -1.0])
    lastadv = validation_loss(logp, VAL_LOSS_COEFFICIENTS["seqloss-lastadv"](rewards, adv))
    assert lastadv.item() == pytest.approx(-(-1.0 * 1.5 + -2.0 * -1.0 + -3.0 * 0.5 + -4.0 * -1.0) / 4)
    reward = validation_loss(logp, VAL_LOSS_COEFFICIENTS["seqloss-reward"](rewards, adv))
    assert reward.item() == pytest.approx(-(-1.0 * 1.0 + 0 + -3.0 * 0.5 + -4.0 * 0.2) / 4)
    # good = rewards 1.0, 0.5 (rows 0, 2); bad = 0.0, 0.2 (rows 1, 3)
    contrastive = validation_loss(logp, VAL_LOSS_COEFFICIENTS["contrastive"](rewards, adv))
    assert contrastive.item() == pytest.approx(-(-1.0 + -3.0) / 2 + (-2.0 + -4.0) / 2)
