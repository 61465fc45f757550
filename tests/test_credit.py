"""Credit-assignment mitigations and per-token credit against hand-computed values and autograd."""

import math
import random

import pytest
import torch

from grpolab import config
from grpolab.algos import credit as C
from grpolab.algos.losses import aggregate, clipped_policy_loss, compose_token_loss, policy_token_stats

from grpolab.errors import ConfigError

MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


def classes_of(pieces: list[list[str]], width: int) -> torch.Tensor:
    """C.token_classes of completions given as their tokens' pieces."""
    lengths = torch.tensor([[len(p) for p in row] + [0] * (width - len(row)) for row in pieces])
    return C.token_classes(["".join(row) for row in pieces], lengths)


def test_token_classes_by_hand():
    pieces = [
        ["<think>", "7", "+", "5", "</think>", "<ans", "wer>", "12", "</answer>", ""],
        ["12", "<answer>", "3"],  # text before the tags is other; an unclosed section runs to the end
        ["no", " tags"],
    ]
    classes = classes_of(pieces, 10)
    T, K, A, O = C.TAG, C.THINK, C.ANSWER, C.OTHER
    assert classes[0].tolist() == [T, K, K, K, T, T, T, A, T, O]
    assert classes[1, :3].tolist() == [O, T, A]
    assert classes[2, :2].tolist() == [O, O]


def per_token_classes(pieces: list[list[str]], width: int) -> torch.Tensor:
    """token_classes as it was written before it was vectorised (character by character, token by token)."""
    out = torch.full((len(pieces), width), C.OTHER, dtype=torch.long)
    for b, row in enumerate(pieces):
        text = "".join(row)
        char_class, section, last = [C.OTHER] * len(text), C.OTHER, 0
        for m in C._TAG.finditer(text):
            char_class[last : m.start()] = [section] * (m.start() - last)
            char_class[m.start() : m.end()] = [C.TAG] * (m.end() - m.start())
            section = (C.THINK if m.group(1) == "think" else C.ANSWER) if not m.group(0).startswith("</") else C.OTHER
            last = m.end()
        char_class[last:] = [section] * (len(text) - last)
        start = 0
        for t, piece in enumerate(row[:width]):
            span = char_class[start : start + len(piece)]
            start += len(piece)
            out[b, t] = C.TAG if C.TAG in span else (span[0] if span else C.OTHER)
    return out


def test_token_classes_equal_the_per_token_version_on_random_completions():
    rng = random.Random(0)
    fragments = ["<think>", "</think>", "<answer>", "</answer>", "<", "</", ">", "think", "answer", "ans", "wer>", "<thi",
                 "nk>", "", "x", "7 ", "12", "\n", "\0", "é", "</answer><think>", "> <"]
    for _ in range(20):
        width = rng.randint(1, 40)
        pieces = [[rng.choice(fragments) for _ in range(rng.randint(0, width))] for _ in range(rng.randint(1, 12))]
        assert torch.equal(classes_of(pieces, width), per_token_classes(pieces, width)), pieces


def test_outcome_conditional_by_hand():
    classes = torch.tensor([[C.THINK, C.THINK, C.ANSWER, C.TAG], [C.THINK, C.ANSWER, 0, 0]])
    w = C.outcome_conditional(classes, MASK, 0.5)
    # row 0: raw [0.5, 0.5, 1, 1], mean 0.75; row 1: raw [0.5, 1], mean 0.75; padding 1
    torch.testing.assert_close(w, torch.tensor([[2 / 3, 2 / 3, 4 / 3, 4 / 3], [2 / 3, 4 / 3, 1, 1]]))


def test_inverse_logprob_by_hand():
    logp = torch.tensor([[-0.9, -1.9, -0.4, -0.9], [-0.1, -0.4, 0.0, 0.0]])
    w = C.inverse_logprob(logp, MASK, 0.1)
    raw0 = torch.tensor([1.0, 0.5, 2.0, 1.0])  # 1 / (|logp| + 0.1)
    raw1 = torch.tensor([5.0, 2.0])
    torch.testing.assert_close(w[0], raw0 / raw0.mean())
    torch.testing.assert_close(w[1], torch.cat([raw1 / raw1.mean(), torch.ones(2)]))


def test_entropy_weighted_by_hand():
    h = torch.tensor([[0.0, math.log(3), 0.0, 0.0], [1.0, 1.0, 9.0, 9.0]])
    w = C.entropy_weighted(h, MASK, 1.0)
    # row 0: softmax([0, ln 3, 0, 0]) = [1, 3, 1, 1] / 6, times 4 tokens; row 1: uniform over 2 tokens
    torch.testing.assert_close(w, torch.tensor([[4 / 6, 2.0, 4 / 6, 4 / 6], [1.0, 1.0, 1.0, 1.0]]))


def test_entropy_masking_by_hand():
    h = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.8, 5.0, 5.0]])
    # valid entropies 0.1 0.9 0.5 0.7 0.3 0.8: the 50th percentile ("lower") is 0.5 -> keep 0.9 0.5 0.7 0.8
    w = C.entropy_masking(h, MASK, 50)
    scale = 6 / 4  # mean 1 over the batch's 6 tokens
    torch.testing.assert_close(w, torch.tensor([[0, scale, scale, scale], [0, scale, 1, 1]]))
    # the top 20 % rule: one token of six at the 80th percentile and above
    assert (C.entropy_masking(h, MASK, 80) * MASK).count_nonzero().item() == 2  # 0.8 and 0.9


def test_attention_credit_by_hand():
    classes = torch.tensor([[C.THINK, C.THINK, C.ANSWER, C.TAG], [C.THINK, C.THINK, 0, 0]])
    attention = torch.zeros(2, 4, 4)
    attention[0, 2] = torch.tensor([0.6, 0.2, 0.2, 0.0])  # the one answer token attends to 0, 1, 2
    w = C.attention_credit(attention, classes, MASK, 2.0)
    # shares [0.6, 0.2, 0.2, 0] -> raw 1 + 2 * 4 * share = [5.8, 2.6, 2.6, 1], mean 3
    torch.testing.assert_close(w[0], torch.tensor([5.8, 2.6, 2.6, 1.0]) / 3)
    assert w[1].tolist() == [1.0, 1.0, 1.0, 1.0]  # no answer section: plain GRPO


def test_gini_by_hand():
    assert C.gini(torch.tensor([1.0, 1.0, 1.0])).item() == pytest.approx(0.0)
    assert C.gini(torch.tensor([0.0, 0.0, 0.0, 4.0])).item() == pytest.approx(0.75)  # (n - 1) / n
    assert C.gini(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)


def _loss_and_grad(weights: torch.Tensor):
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0]])
    logp, _, _ = policy_token_stats(logits, targets)
    pg, _ = clipped_policy_loss(logp, logp.detach(), torch.tensor([1.5, -0.5]), MASK, 0.2, 0.2)
    loss = aggregate(compose_token_loss(pg, None, 0.0, weights, torch.ones(2), torch.ones(2)), MASK, "token-mean", 4)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, grad


def test_neutral_settings_equal_plain_grpo_exactly():
    plain_loss, plain_grad = _loss_and_grad(torch.ones(2, 4))
    classes = torch.tensor([[C.THINK, C.ANSWER, C.TAG, C.OTHER], [C.THINK, C.THINK, 0, 0]])
    entropy = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    for weights in (C.outcome_conditional(classes, MASK, 1.0), C.entropy_masking(entropy, MASK, 0)):
        loss, grad = _loss_and_grad(weights)
        assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad)


def test_credit_formula_matches_autograd_on_a_tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(2))
    logits = model(input_ids=ids).logits[:, :-1].detach().requires_grad_(True)
    targets = ids[:, 1:]
    advantage_weight = torch.tensor([[1.2], [-0.7]]) * torch.tensor([[1.0, 0.5, 2.0, 1.0, 0.3]])
    logp, _, prob_sq = policy_token_stats(logits, targets)
    # each token's policy-gradient term -A w log p, differentiated alone
    (grad,) = torch.autograd.grad((-(advantage_weight * logp)).sum(), logits)
    torch.testing.assert_close(C.token_credit(advantage_weight, logp.detach(), prob_sq), grad.norm(dim=-1))


@pytest.mark.parametrize(
    "mitigation, message",
    [
        ({"name": "sharpen"}, "train.mitigation: name: 'sharpen' is none of 'none', 'outcome_conditional'"),
        ({"name": "outcome_conditional", "epsilon": 0.2}, "train.mitigation.epsilon: not a knob of `name: outcome_conditional`"),
        ({"name": "entropy_masking", "mask_percentile": 120}, "train.mitigation.mask_percentile: Input should be less than or equal to 100"),
    ],
)
def test_bad_mitigation_names_the_key(mitigation, message):
    raw = config.Params().model_dump()
    raw["train"]["mitigation"] = mitigation
    with pytest.raises(ConfigError) as err:
        config.validate(raw)
    assert message in str(err.value)


def test_knob_defaults():
    def mitigation(**section):
        return config.validate({"train": {"mitigation": section}}).train.mitigation

    assert mitigation(name="entropy_masking").knobs() == {"mask_percentile": 80.0}
    assert mitigation(name="outcome_conditional", think_discount=0.25).knobs() == {"think_discount": 0.25}
    assert mitigation().knobs() == {} and mitigation().name == "none"  # the key left out: the first option


def test_the_variants_classes_and_pieces_are_those_of_each_token_decoded(tmp_path):
    import pandas as pd
    from transformers import AutoTokenizer

    from grpolab.samplers import Rollout
    from grpolab.trainer.loss_weights import LossWeighting
    from userfiles import save_qwen2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(save_qwen2_checkpoint(tmp_path / "q", ["<think>7 + 5</think> <answer>12</answer>"] * 9))
    generator = torch.Generator().manual_seed(0)
    rows = [tokenizer("<think>7 + 5</think> <answer>12</answer>")["input_ids"], tokenizer("1 <answer>2")["input_ids"]]
    rows += [torch.randint(len(tokenizer), (n,), generator=generator).tolist() for n in (0, 5, 30)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    rollout = Rollout(torch.zeros(len(rows), 1, dtype=torch.long), torch.ones(len(rows), 1, dtype=torch.long), ids, mask)
    variants = LossWeighting(config.Params(), pd.DataFrame({"extra_info": [{}]}), tokenizer)
    pieces = [[tokenizer.decode([i]) for i in row] for row in rows]
    for _ in range(2):  # the second time from the decoded pieces it keeps
        assert torch.equal(variants.token_classes(rollout), per_token_classes(pieces, width))
        assert variants.pieces(ids[mask.bool()]).tolist() == [p for row in pieces for p in row]
    assert {C.THINK, C.ANSWER, C.TAG} <= set(variants.token_classes(rollout)[0].tolist())  # the tags are found
