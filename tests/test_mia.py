"""MIA weights and membership scores against hand-computed values and slow reference loops."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from grpolab.algos.advantages import group_advantages
from grpolab.algos.losses import aggregate, clipped_policy_loss, compose_token_loss
from grpolab.algos.mia_weights import normalize_scores, transform_mia_weights
from grpolab.errors import DataError
from grpolab.mia import scores as S
from grpolab.mia.roc import membership_roc
from grpolab.stages.mia import _precomputed_weights


def test_transforms_and_inversion_exact():
    w = torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=torch.float64)
    assert transform_mia_weights(w, "linear", False).tolist() == [0.0, 0.5, 0.9, 1.0]
    torch.testing.assert_close(transform_mia_weights(w, "quadratic", False), torch.tensor([0.0, 0.25, 0.81, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        transform_mia_weights(w, "exponential", False),
        torch.tensor([math.exp(-1), math.exp(-0.5), math.exp(-0.1), 1.0], dtype=torch.float64),
    )
    # invert: 1 - w first
    torch.testing.assert_close(transform_mia_weights(w, "quadratic", True), torch.tensor([1.0, 0.25, 0.01, 0.0], dtype=torch.float64))
    torch.testing.assert_close(transform_mia_weights(w, "linear", True), torch.tensor([1.0, 0.5, 0.1, 0.0], dtype=torch.float64))
    # seed 000's ratios: linear 0.9/0.1 = 9x, quadratic 81x
    assert transform_mia_weights(torch.tensor([0.9]), "quadratic", False) / transform_mia_weights(torch.tensor([0.1]), "quadratic", False) == pytest.approx(81)
    with pytest.raises(ValueError, match="unknown MIA weighting mode"):
        transform_mia_weights(w, "cubic", False)


def test_normalize_scores_by_hand():
    s = torch.tensor([-3.0, -1.0, -2.0, -1.0, 5.0])
    torch.testing.assert_close(normalize_scores(s, "minmax"), torch.tensor([0.0, 0.25, 0.125, 0.25, 1.0]))
    # ranks 0, 2.5 (tie of ranks 2 and 3), 1, 2.5, 4 over N - 1 = 4
    torch.testing.assert_close(normalize_scores(s, "rank"), torch.tensor([0.0, 0.625, 0.25, 0.625, 1.0]))
    assert normalize_scores(torch.ones(3), "rank").tolist() == [0.5, 0.5, 0.5]
    assert normalize_scores(torch.tensor([2.0]), "minmax").tolist() == [0.5]


def _single_prompt_loss(logits: torch.Tensor, weight: float) -> torch.Tensor:
    """One prompt, group of 3, 2 tokens each: the weighted GRPO loss through the real functions."""
    targets = torch.tensor([[0, 1], [1, 1], [2, 0]])
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5]), 3)
    pg, _ = clipped_policy_loss(logp, logp.detach(), adv, torch.ones_like(logp), 0.2, 0.2)
    mask = torch.ones(3, 2)
    loss = compose_token_loss(pg, None, 0.0, torch.ones(3, 2), torch.full((3,), weight), torch.ones(3))
    return aggregate(loss, mask, "token-mean", 2)


def test_weighted_gradient_is_weight_times_unweighted():
    logits = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (plain,) = torch.autograd.grad(_single_prompt_loss(logits, 1.0), logits)
    (weighted,) = torch.autograd.grad(_single_prompt_loss(logits, 0.3), logits)
    torch.testing.assert_close(weighted, 0.3 * plain)


def test_reward_side_weights_cancel_but_loss_side_weights_do_not():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # two prompts, group of 4
    weights = torch.tensor([0.9] * 4 + [0.1] * 4)  # each completion carries its prompt's weight
    plain = group_advantages(rewards, 4)
    # seed 000's "incorrect approach": the group normalisation divides the weight back out
    torch.testing.assert_close(group_advantages(rewards * weights, 4), plain, atol=1e-4, rtol=1e-4)
    # loss side: the per-token loss scales by the weight, prompt by prompt
    pg = -plain.unsqueeze(-1).expand(8, 3)
    weighted = compose_token_loss(pg, None, 0.0, torch.ones(8, 3), weights, torch.ones(8))
    torch.testing.assert_close(weighted, pg * weights.unsqueeze(-1))
    assert not torch.allclose(weighted, pg)


def test_lowest_k_mean_by_hand_and_short_texts():
    values = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0, 0.0], [7.0, 9.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    # row 0: n = 5, floor(0.4 * 5) = 2 lowest of {5, 1, 3, 2, 4} -> (1 + 2) / 2; the masked 0 is ignored
    # row 1: n = 2, floor(0.4 * 2) = 0 -> at least one: 7
    assert S.lowest_k_mean(values, mask, 0.4).tolist() == [1.5, 7.0]
    assert S.lowest_k_mean(values, mask, 1.0).tolist() == [3.0, 8.0]
    empty = S.lowest_k_mean(values, torch.zeros_like(mask), 0.2)
    assert torch.isfinite(empty).all()


def test_loss_zlib_min_k_scores_by_hand():
    logp = torch.tensor([[-1.0, -3.0, -2.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert S.score_loss(logp, mask).item() == pytest.approx(-2.0)
    assert S.score_zlib(logp, mask, torch.tensor([8])).item() == pytest.approx(-0.25)
    assert S.score_min_k(logp, mask, 0.2).item() == pytest.approx(-3.0)
    assert S.score_reference(logp, logp - 0.5, mask).item() == pytest.approx(0.5)


def test_min_k_plus_plus_against_a_slow_per_token_loop():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 20, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:]
    logp, mu, sigma = S.token_statistics(logits, targets)
    fast = S.score_min_k_plus_plus(logp, mu, sigma, mask, 0.3)
    for b in range(3):
        zs = []
        for t in range(int(mask[b].sum())):
            probs = torch.softmax(logits[b, t].double(), -1)
            logps = torch.log(probs)
            m = (probs * logps).sum()
            var = (probs * logps**2).sum() - m**2
            zs.append(((logps[targets[b, t]] - m) / var.sqrt()).item())
        lowest = sorted(zs)[: max(1, math.floor(0.3 * len(zs)))]
        assert fast[b].item() == pytest.approx(sum(lowest) / len(lowest), rel=1e-4, abs=1e-5)


def test_membership_roc_by_hand():
    roc = membership_roc(np.array([0.9, 0.8, 0.3]), np.array([0.7, 0.2, 0.1, 0.0]))
    # pairs member > non-member: 0.9 beats 4, 0.8 beats 4, 0.3 beats 3 -> 11 of 12
    assert roc["auc"] == pytest.approx(11 / 12)
    assert roc["tpr@0.01"] == pytest.approx(2 / 3) and roc["tpr@0.05"] == pytest.approx(2 / 3)
    perfect = membership_roc(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    assert perfect["auc"] == 1.0 and perfect["tpr@0.01"] == 1.0


def test_precomputed_weights_are_validated_naming_file_and_row():
    def frame(*weights):
        return pd.DataFrame({"extra_info": [
            {"source_file": "mine.parquet", "source_row": i, **({} if w is None else {"mia_weight": w})} for i, w in enumerate(weights)
        ]})

    assert _precomputed_weights(frame(0.2, 1.0)).tolist() == [0.2, 1.0]
    assert _precomputed_weights(frame(None, None)) is None
    with pytest.raises(DataError, match=r"mine.parquet: row 1: extra_info.mia_weight must be a finite number in \[0, 1\], got 1.5"):
        _precomputed_weights(frame(0.2, 1.5))
    with pytest.raises(DataError, match="mine.parquet: row 0: extra_info.mia_weight must be"):
        _precomputed_weights(frame(float("nan"), 0.5))
    with pytest.raises(DataError, match="mine.parquet: row 1: extra_info.mia_weight is missing"):
        _precomputed_weights(frame(0.5, None))
