"""algos/ against hand-computed values."""

import math

import pytest
import torch

from grpolab.algos.advantages import dynamic_sampling_groups, group_advantages, zero_std_groups
from grpolab.algos.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    aggregate,
    aggregation_units,
    cispo_policy_loss,
    clipped_policy_loss,
    compose_token_loss,
    entropy_from_logits,
    gspo_policy_loss,
    policy_token_stats,
    token_logprobs,
)
from grpolab.algos.mia_weights import mean_one, normalize_scores
from grpolab.algos.rollout_correction import rollout_correction


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, sample std sqrt(1/3); group 2 all equal -> 0
    s = math.sqrt(1 / 3)
    expected = torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(r, 4, "group", eps=0.0 + 1e-12), expected)
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch_std = r.std()
    torch.testing.assert_close(group_advantages(r, 4, "batch"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (batch_std + 1e-6))
    assert zero_std_groups(r, 4).tolist() == [False, True]


def test_equal_rewards_give_zero_not_nan():
    a = group_advantages(torch.ones(6), 3, "group")
    assert torch.equal(a, torch.zeros(6))
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(torch.ones(4), 2, "median")


def test_clipped_policy_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 against old logp 0
    old = torch.zeros(1, 3)
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([2.0]), torch.ones_like(logp), 0.2, 0.3)
    # A>0: -min(rA, clip(r)A): r=1.5 -> clip 1.3 -> -2.6; r=0.5 -> -min(1.0, 1.6) = -1.0; r=1 -> -2
    torch.testing.assert_close(loss, torch.tensor([[-2.6, -1.0, -2.0]]))
    assert clipped.tolist() == [[True, False, False]]
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([-1.0]), torch.ones_like(logp), 0.2, 0.3)
    # A<0: r=1.5 -> -min(-1.5, -1.3) = 1.5; r=0.5 -> -min(-0.5, -0.8) = 0.8 (clipped at 1-0.2)
    torch.testing.assert_close(loss, torch.tensor([[1.5, 0.8, 1.0]]))
    assert clipped.tolist() == [[False, True, False]]


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(2)  # logp - ref
    torch.testing.assert_close(KL_ESTIMATORS["k1"](logp, ref), torch.tensor([[d]]))
    torch.testing.assert_close(KL_ESTIMATORS["k2"](logp, ref), torch.tensor([[0.5 * d * d]]))
    torch.testing.assert_close(KL_ESTIMATORS["k3"](logp, ref), torch.tensor([[0.5 - 1 + d]]))  # q/p - 1 - log(q/p)
    assert KL_ESTIMATORS["k3"](ref, ref).item() == 0.0


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "token-mean", 4).item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean", 4).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", 4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(loss, mask, "sum", 4)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_micro_batches_add_up_to_the_batch(mode):
    torch.manual_seed(0)
    loss, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).long()
    mask[:, 0] = 1
    units = aggregation_units(mask, mode)
    parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], mode, 5, units) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, aggregate(loss, mask, mode, 5))


def test_composition_point_weights_and_detaches():
    pg = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    kl = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    w_tok = torch.tensor([[1.0, 0.5], [2.0, 1.0]], requires_grad=True)
    out = compose_token_loss(pg, kl, 0.1, w_tok, torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([[2.05, 2.05], [0.05, 0.05]]))
    out.sum().backward()
    assert w_tok.grad is None  # weights scale gradients, they are not trained
    torch.testing.assert_close(pg.grad, torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    ones = torch.ones(2)
    torch.testing.assert_close(compose_token_loss(pg, None, 0.1, torch.ones(2, 2), ones, ones), pg)


def test_logprobs_and_entropy_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.25)]]))
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[h]]))


def test_tied_groups_are_exactly_zero_despite_rounding():
    r = 1.0 * torch.zeros(8) + 0.1 * torch.ones(8)  # 0.1 does not average back to 0.1 exactly in float32
    assert torch.equal(group_advantages(r, 8, "group"), torch.zeros(8))


def test_policy_token_stats_match_the_separate_functions():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    logp, entropy, prob_sq = policy_token_stats(logits, targets)
    torch.testing.assert_close(logp, token_logprobs(logits, targets))
    torch.testing.assert_close(entropy, entropy_from_logits(logits))
    torch.testing.assert_close(prob_sq, torch.softmax(logits, -1).square().sum(-1))
    assert logp.requires_grad and not entropy.requires_grad and not prob_sq.requires_grad


def _pairwise_rank(s: torch.Tensor) -> torch.Tensor:
    """The former N x N formula of rank normalisation: (count below + (count equal - 1) / 2) / (N - 1)."""
    s = s.double()
    below = (s.unsqueeze(0) < s.unsqueeze(1)).sum(1).double()
    equal = (s.unsqueeze(0) == s.unsqueeze(1)).sum(1).double()
    return (below + (equal - 1) / 2) / (s.numel() - 1)


def test_rank_normalisation_ties_by_hand():
    # sorted: 1, 1, 1 (ranks 0-2, mean 1), 2 (3), 4, 4 (ranks 4-5, mean 4.5), 7 (6); N - 1 = 6
    s = torch.tensor([4.0, 1.0, 7.0, 1.0, 2.0, 4.0, 1.0])
    expected = torch.tensor([4.5, 1.0, 6.0, 1.0, 3.0, 4.5, 1.0], dtype=torch.float64) / 6
    assert torch.equal(normalize_scores(s.double(), "rank"), expected)
    torch.testing.assert_close(normalize_scores(s, "rank"), expected.float())
    # two values, each tied twice: ranks 0.5, 2.5 over 3
    assert normalize_scores(torch.tensor([3.0, -1.0, 3.0, -1.0], dtype=torch.float64), "rank").tolist() == [2.5 / 3, 0.5 / 3, 2.5 / 3, 0.5 / 3]
    assert normalize_scores(torch.full((5,), -2.0), "rank").tolist() == [0.5] * 5
    assert normalize_scores(torch.tensor([9.0, 8.0]), "rank").tolist() == [1.0, 0.0]


def test_rank_normalisation_equals_the_pairwise_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 50, (3000,), generator=g).double() / 7  # many ties
    assert torch.equal(normalize_scores(s, "rank"), _pairwise_rank(s))
    s32 = torch.randn(2000, generator=g).float().round(decimals=1)
    assert torch.equal(normalize_scores(s32, "rank"), _pairwise_rank(s32).float())


def test_rank_normalisation_scales_to_many_prompts():
    # the N x N form would need 2 x 40e9 comparisons here; the sort needs O(N) memory
    n = 200_000
    s = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(1)).double()
    w = normalize_scores(s, "rank")
    assert w.shape == (n,) and bool(((w >= 0) & (w <= 1)).all())
    assert w.mean().item() == pytest.approx(0.5, abs=1e-12)  # mean rank (N - 1) / 2, ties or not


def test_mean_one_rescales_a_batchs_prompt_weights():
    w = torch.tensor([0.5, 0.5, 0.25, 0.25])  # two prompts, two rows each
    torch.testing.assert_close(mean_one(w, w.sum().item(), 4), torch.tensor([4 / 3, 4 / 3, 2 / 3, 2 / 3]))
    # one process's half of a batch whose other half sums to 0.5: the whole batch's mean is what becomes 1
    torch.testing.assert_close(mean_one(w[:2], 1.5, 4), torch.tensor([4 / 3, 4 / 3]))
    assert torch.equal(mean_one(torch.zeros(3), 0.0, 3), torch.zeros(3))


def test_advantage_estimators_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    none = lambda estimator, **kw: group_advantages(r, 4, "none", estimator=estimator, **kw)  # noqa: E731
    torch.testing.assert_close(none("grpo"), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # leave-one-out: r_i - mean of the other three, e.g. 1 - (0 + 0 + 1) / 3
    torch.testing.assert_close(none("rloo"), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # length-weighted baseline: (1*1 + 1*0 + 1*0 + 3*1) / 6 = 2/3
    torch.testing.assert_close(none("opo", lengths=torch.tensor([1, 1, 1, 3])), torch.tensor([1 / 3, -2 / 3, -2 / 3, 1 / 3]))
    s = math.sqrt(1 / 3)  # the group's sample std: `scale_rewards` divides each estimator's centred rewards by it
    torch.testing.assert_close(group_advantages(r, 4, "group", eps=1e-12, estimator="rloo"), torch.tensor([2, -2, -2, 2]) / 3 / s)
    assert torch.equal(group_advantages(torch.ones(4), 4, "group", estimator="opo", lengths=torch.tensor([1, 2, 3, 4])), torch.zeros(4))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(r, 4, estimator="ppo")


def test_dynamic_sampling_keeps_the_first_groups_with_signal_then_tops_up():
    # two rollout batches of 3 groups: signal in groups 1, 3 and 4
    signal = torch.tensor([False, True, False, True, True, False])
    assert dynamic_sampling_groups(signal, 2).tolist() == [1, 3]  # group 4, surplus, is not trained
    assert dynamic_sampling_groups(signal, 3).tolist() == [1, 3, 4]
    # the cap reached with 3 of 5: topped up with the first groups without signal, in order
    assert dynamic_sampling_groups(signal, 5).tolist() == [1, 3, 4, 0, 2]
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert dynamic_sampling_groups(~zero_std_groups(rewards, 2), 1).tolist() == [1]


def _grad(loss_fn, logp0: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mode: str, *clip) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss aggregated by `mode`, its gradient with respect to logp)."""
    logp = logp0.clone().requires_grad_(True)
    mask = torch.ones_like(logp)
    loss, _ = loss_fn(logp, old, advantages, mask, *clip)
    total = aggregate(loss, mask, mode, logp.shape[1])
    total.backward()
    return total.detach(), logp.grad


def test_gspo_is_the_sequence_ratio_and_its_gradient_by_hand():
    old = torch.log(torch.tensor([[0.25, 0.5]]))
    adv = torch.tensor([1.0])
    # token ratios (2, 1): the sequence ratio is their geometric mean, sqrt(2)
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    value, grad = _grad(gspo_policy_loss, logp, old, adv, "seq-mean-token-mean", 10.0, 10.0)
    torch.testing.assert_close(value, torch.tensor(-math.sqrt(2)))
    # GSPO: d(-A s)/d logp_t = -A s / |y| for every token; GRPO's would be -A r_t / |y| = (-1, -0.5)
    torch.testing.assert_close(grad, torch.full((1, 2), -math.sqrt(2) / 2))
    _, grpo = _grad(clipped_policy_loss, logp, old, adv, "seq-mean-token-mean", 10.0, 10.0)
    torch.testing.assert_close(grpo, torch.tensor([[-1.0, -0.5]]))
    # token ratios (2, 0.5): the sequence ratio is 1, GSPO's value is GRPO's at ratio 1 (-A) but GRPO's is -1.25 A,
    # and the gradients differ: GSPO's -A/2 on both tokens, GRPO's (-A, -A/4)
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    value, grad = _grad(gspo_policy_loss, logp, old, adv, "seq-mean-token-mean", 0.2, 0.2)
    torch.testing.assert_close((value, grad), (torch.tensor(-1.0), torch.full((1, 2), -0.5)))
    value, grpo = _grad(clipped_policy_loss, logp, old, adv, "seq-mean-token-mean", 10.0, 10.0)
    torch.testing.assert_close((value, grpo), (torch.tensor(-1.25), torch.tensor([[-1.0, -0.25]])))
    # clipped per sequence: s = sqrt(2) > 1 + 0.1 with A > 0: the value is -(1.1) A and no token gets a gradient
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    value, grad = _grad(gspo_policy_loss, logp, old, adv, "seq-mean-token-mean", 0.1, 0.1)
    torch.testing.assert_close((value, grad), (torch.tensor(-1.1), torch.zeros(1, 2)))
    _, clipped = gspo_policy_loss(logp, old, adv, torch.tensor([[1.0, 0.0]]), 0.1, 0.1)
    # with the second token masked s = 2; the clip flag is the sequence's, on its valid tokens only
    assert clipped.tolist() == [[True, False]]


def test_cispo_keeps_the_gradient_ppo_clips_by_hand():
    old = torch.log(torch.tensor([[0.25, 0.5]]))
    logp = torch.log(torch.tensor([[0.5, 0.25]]))  # ratios (2, 0.5)
    adv = torch.tensor([1.0])
    # weights clip(r, 0, 1.5) = (1.5, 0.5), constants: loss_t = -w_t A logp_t, gradient -w_t A
    value, grad = _grad(cispo_policy_loss, logp, old, adv, "token-mean", 1.0, 0.5)
    torch.testing.assert_close(value, torch.tensor(-(1.5 * math.log(0.5) + 0.5 * math.log(0.25)) / 2))
    torch.testing.assert_close(grad, torch.tensor([[-1.5, -0.5]]) / 2)
    # PPO's clip (0.2) drops the first token (r = 2 > 1.2, A > 0) and keeps the second (-r A)
    _, ppo = _grad(clipped_policy_loss, logp, old, adv, "token-mean", 0.2, 0.2)
    torch.testing.assert_close(ppo, torch.tensor([[0.0, -0.5]]) / 2)
    _, clipped = cispo_policy_loss(logp, old, adv, torch.ones(1, 2), 1.0, 0.5)
    assert clipped.tolist() == [[True, False]]
    # on-policy (ratio 1) all three losses have the same gradient: -A / |y| per token
    for fn in (clipped_policy_loss, gspo_policy_loss, cispo_policy_loss):
        _, g = _grad(fn, logp, logp.detach(), adv, "seq-mean-token-mean", 0.2, 0.2)
        torch.testing.assert_close(g, torch.full((1, 2), -0.5), msg=fn.__name__)


def test_the_policy_losses_registry_holds_functions_and_each_loss_its_own_clip_defaults():
    """The registry holds no config field names: each loss's clip bounds are the knobs of its section."""
    from grpolab.config import Params, validate

    t = Params().train
    assert set(POLICY_LOSSES) == {"ppo_clip", "gspo", "cispo"} and t.loss.policy.name == "ppo_clip"
    assert POLICY_LOSSES["ppo_clip"] is clipped_policy_loss
    assert {name: validate({"train": {"loss": {"policy": {"name": name}}}}).train.loss.policy.knobs() for name in POLICY_LOSSES} == {
        "ppo_clip": {"clip_low": 0.2, "clip_high": 0.2}, "gspo": {"clip_low": 3e-4, "clip_high": 4e-4},
        "cispo": {"clip_low": 1.0, "clip_high": 3.0}}


def test_entropy_bonus_at_the_composition_point():
    pg, entropy = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.5]])
    loss = compose_token_loss(pg, None, 0.0, torch.ones(1, 2), torch.ones(1), torch.ones(1), entropy, 0.1)
    torch.testing.assert_close(loss, torch.tensor([[1.0 - 0.05, 2.0 - 0.15]]))


def test_overlong_penalty_and_truncation_by_hand():
    from grpolab.algos.length import overlong_penalty, truncated

    # max 10 tokens, a buffer of 4: no penalty up to 6, then (6 - len) / 4, times the factor
    torch.testing.assert_close(overlong_penalty(torch.tensor([5, 6, 7, 10]), 10, 4, 0.5), torch.tensor([0.0, 0.0, -0.125, -0.5]))
    ids = torch.tensor([[5, 6, 2], [5, 6, 7], [5, 2, 0]])  # stop token 2, padding 0
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    assert truncated(ids, mask, [2], 3).tolist() == [False, True, False]


# --- the rollout correction (algos/rollout_correction.py): rho = pi_old / pi_sampler per token or per completion
LN = math.log
CORRECTION_OLD = torch.tensor([[LN(0.5), 0.0, LN(3.0)], [LN(1.5), LN(4.0), 0.0]])  # log pi_old - log pi_sampler, as old
CORRECTION_SAMPLER = torch.zeros(2, 3)
CORRECTION_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])  # row 1: one token, then padding


@pytest.mark.parametrize("mode, low, high, weights, bounded", [
    # per token: rho = [0.5, 1, 3] and [1.5]; padding weighs 1 and is never bounded
    ("token_truncate", 0.0, 2.0, [[0.5, 1.0, 2.0], [1.5, 1.0, 1.0]], [[0, 0, 1], [0, 0, 0]]),
    ("token_truncate", 0.8, 2.0, [[0.8, 1.0, 2.0], [1.5, 1.0, 1.0]], [[1, 0, 1], [0, 0, 0]]),
    ("token_mask", 0.6, 2.0, [[0.0, 1.0, 0.0], [1.5, 1.0, 1.0]], [[1, 0, 1], [0, 0, 0]]),
    # per completion: rho = 0.5 * 1 * 3 = 1.5 on each token of row 0, 1.5 on row 1's
    ("sequence_truncate", 0.0, 1.2, [[1.2, 1.2, 1.2], [1.2, 1.0, 1.0]], [[1, 1, 1], [1, 0, 0]]),
    ("sequence_mask", 0.0, 2.0, [[1.5, 1.5, 1.5], [1.5, 1.0, 1.0]], [[0, 0, 0], [0, 0, 0]]),
    ("sequence_mask", 0.0, 1.2, [[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1, 1, 1], [1, 0, 0]]),
])
def test_rollout_correction_by_hand(mode, low, high, weights, bounded):
    w, ratio, cut = rollout_correction(CORRECTION_OLD, CORRECTION_SAMPLER, CORRECTION_MASK, mode, low, high)
    torch.testing.assert_close(w, torch.tensor(weights), atol=1e-6, rtol=0)
    assert cut.int().tolist() == bounded
    expected = [0.5, 1.0, 3.0] if mode.startswith("token") else [1.5, 1.5, 1.5]
    torch.testing.assert_close(ratio[0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_rollout_correction_enters_the_composition_point_as_a_detached_factor():
    pg = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    correction = torch.tensor([[0.5, 1.0, 2.0]], requires_grad=True)
    ones = torch.ones(1, 3)
    loss = compose_token_loss(pg, None, 0.0, ones, torch.ones(1), torch.ones(1), correction=correction)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 2.0, 6.0]]))
    loss.sum().backward()
    assert correction.grad is None  # detached: it scales the gradient, it is not trained
    torch.testing.assert_close(pg.grad, torch.tensor([[0.5, 1.0, 2.0]]))
    plain = compose_token_loss(pg, None, 0.0, ones, torch.ones(1), torch.ones(1))
    assert torch.equal(plain, pg)  # None: no factor at all (the hf sampler's loss, bit for bit)
