"""Generation and completion log-probabilities (samplers/hf.py, logprobs.py, algos/sampling.py): the noise against SplitMix64's
published outputs, sampling against hand-computed draws and the distribution it should follow, batch
invariance, greedy decoding against a recompute-everything loop, eval mode whatever the caller's, and the
chunked output head against the full logits."""

import math

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoConfig, AutoModelForCausalLM

from grpolab import logprobs
from grpolab.algos.losses import policy_token_stats
from grpolab.algos.sampling import MASK_64, counter_uniform, fixed_point_cumsum, sample_tokens, splitmix64
from grpolab.logprobs import by_length, by_tokens, completion_token_stats
from grpolab.samplers import Rollout, sample_keys
from grpolab.samplers.hf import sample
from grpolab.trainer.loss_weights import LossWeights
from grpolab.trainer.update import Batch

VOCAB, PAD, EOS = 24, 0, 1


def tiny_model(arch: str = "llama", vocab: int = VOCAB) -> torch.nn.Module:
    cfg = AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                               tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def test_counter_noise_is_splitmix64_and_a_function_of_key_and_position_only():
    # Vigna's splitmix64.c seeded with 1234567: its first five outputs
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]
    assert [x & MASK_64 for x in splitmix64(torch.tensor([1234567]), 5)[0].tolist()] == expected
    keys = sample_keys(3, list(range(10)))
    u = counter_uniform(keys, 7)
    assert u.dtype == torch.float64 and u.shape == (10, 7) and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(counter_uniform(keys[[7, 2]], 7), u[[7, 2]])  # a row's noise ignores its batch-mates
    assert torch.equal(counter_uniform(keys, 3), u[:, :3])  # and how long the rollout is
    assert u.unique().numel() == u.numel()


def test_sample_tokens_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))  # probabilities 0.5, 0.3, 0.2 and 0
    draw = lambda u, temperature=1.0, top_p=1.0: sample_tokens(logits, torch.tensor([u], dtype=torch.float64), temperature, top_p).item()  # noqa: E731
    # inverse CDF: [0, 0.5) -> 0, [0.5, 0.8) -> 1, [0.8, 1) -> 2; the token of probability 0 never
    assert [draw(u) for u in (0.0, 0.49, 0.5, 0.79, 0.81, 1 - 2**-53)] == [0, 0, 1, 1, 2, 2]
    # top_p 0.6 keeps {0, 1} (0.5 < 0.6, and 1 crosses it): renormalised 0.625 / 0.375
    assert [draw(u, top_p=0.6) for u in (0.6, 0.63, 0.99)] == [0, 1, 1]
    # temperature 0.5 squares and renormalises: 0.25 / 0.38 = 0.658, 0.09 / 0.38 = 0.237, 0.04 / 0.38 = 0.105
    assert [draw(u, temperature=0.5) for u in (0.65, 0.66, 0.89, 0.9)] == [0, 1, 1, 2]


def test_the_fixed_point_cdf_of_deterministic_gpu_sampling_draws_what_the_float_cdf_draws():
    """Under train.deterministic on a GPU the sampler sums its CDF as integers (torch's float cumsum has no
    deterministic CUDA kernel): at a real vocabulary, the same CDF to float64 rounding and the same tokens."""
    probs = torch.softmax(torch.randn(8, 151936, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4, -1)
    exact, summed = fixed_point_cumsum(probs), probs.cumsum(-1)
    torch.testing.assert_close(exact, summed, rtol=0, atol=1e-13)
    u = counter_uniform(sample_keys(0, list(range(8))), 2000)
    draws = [torch.searchsorted(cdf, u * cdf[:, -1:], right=True) for cdf in (exact, summed)]
    assert torch.equal(*draws)


def test_sampled_completions_follow_softmax_of_logits_over_temperature_within_top_p():
    """The first token of 6000 rows of one prompt, each with its own key, against the model's own next-token
    distribution, tempered and cut to top_p (chi-square)."""
    model = tiny_model()
    prompt = prompts(1)[0]
    temperature, top_p, n = 0.7, 0.8, 6000
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    probs = torch.softmax(logits.double() / temperature, -1)
    ranked, order = torch.sort(probs, descending=True)
    inside = order[(ranked.cumsum(0) - ranked) <= top_p]
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[inside] = probs[inside] / probs[inside].sum()
    r = sample(model, [prompt] * n, max_new_tokens=1, eos_ids=[EOS], pad_id=PAD, temperature=temperature, top_p=top_p,
               keys=sample_keys(11, list(range(n))))
    counts = torch.bincount(r.completion_ids[:, 0], minlength=VOCAB).double()
    assert counts[expected == 0].sum() == 0  # nothing outside top_p
    assert len(inside) >= 3
    assert chisquare(counts[inside].numpy(), (expected[inside] * n).numpy()).pvalue > 1e-3


def test_a_completion_does_not_depend_on_how_its_batch_is_split():
    model = tiny_model()
    rows = prompts(12, seed=1)
    keys = sample_keys(5, list(range(100, 112)))
    kwargs = dict(max_new_tokens=10, eos_ids=[EOS], pad_id=PAD, temperature=1.3, top_p=0.95)
    whole = sample(model, rows, keys=keys, **kwargs)
    assert len(set(map(tuple, whole.completion_ids.tolist()))) > 6  # sampled, not one completion 12 times
    chunks = sample(model, rows, keys=keys, batch_size=5, **kwargs)
    backwards = sample(model, rows[::-1], keys=keys.flip(0), **kwargs)
    alone = [sample(model, [p], keys=keys[i : i + 1], **kwargs) for i, p in enumerate(rows)]
    for i in range(len(rows)):
        n = whole.lengths[i]
        expected = whole.completion_ids[i, :n].tolist()
        assert chunks.completion_ids[i, :n].tolist() == expected and chunks.lengths[i] == n
        assert backwards.completion_ids[len(rows) - 1 - i, :n].tolist() == expected
        assert alone[i].completion_ids[0, :n].tolist() == expected
    torch.testing.assert_close(chunks.token_logp, whole.token_logp)  # re-padded in cat_rollouts: same positions


def test_greedy_decoding_equals_argmax_over_a_full_recompute_of_every_step():
    model = tiny_model("qwen2")
    rows = prompts(6, seed=2)
    r = sample(model, rows, max_new_tokens=8, eos_ids=[EOS], pad_id=PAD, batch_size=4)
    for i, p in enumerate(rows):
        ids = list(p)
        with torch.no_grad():
            for _ in range(r.lengths[i]):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert r.completion_ids[i, : r.lengths[i]].tolist() == ids[len(p) :]


def test_generation_runs_in_eval_mode_whatever_mode_the_caller_left():
    """With LoRA dropout on and the model in train mode (as the update leaves it), a rollout equals the
    eval-mode rollout bit for bit; under gradient checkpointing too (transformers turns the KV cache off in
    train mode: decoding past the first token failed); each module's mode is back afterwards."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at 0: the adapters would add nothing, with or without dropout
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows, keys = prompts(5, seed=3), sample_keys(0, list(range(5)))
    kwargs = dict(max_new_tokens=6, eos_ids=[EOS], pad_id=PAD, keys=keys)
    model.eval()
    expected = sample(model, rows, **kwargs)
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    got = sample(model, rows, **kwargs)
    assert torch.equal(got.completion_ids, expected.completion_ids) and torch.equal(got.token_logp, expected.token_logp)
    assert {name: m.training for name, m in model.named_modules()} == modes and model.training
    assert max(expected.lengths) > 1


def test_the_prefill_forms_logits_for_the_last_position_only():
    model = tiny_model()
    widths = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    sample(model, prompts(4, seed=4), max_new_tokens=3, eos_ids=[EOS], pad_id=PAD)
    handle.remove()
    assert widths and set(widths) == {1}  # the prefill too, not [rows, prompt length, vocabulary]


def _rollout(model, n: int = 6, seed: int = 5) -> Rollout:
    return sample(model, prompts(n, seed=seed), max_new_tokens=9, eos_ids=[EOS], pad_id=PAD, keys=sample_keys(seed, list(range(n))))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_completion_stats_equal_the_full_logits_and_their_gradient(arch, monkeypatch):
    """log p, entropy and sum p^2 of each completion token, and the gradient of a loss on log p, from the head
    applied a few tokens at a time (here 3), equal those of the logits of every position to fp32 rounding."""
    model = tiny_model(arch)
    rollout = _rollout(model)
    mask = rollout.completion_mask.bool()
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    p = rollout.prompt_ids.shape[1]

    full = logprobs.forward_completions(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    expected = policy_token_stats(full.logits[:, p - 1 : -1], rollout.completion_ids)
    (expected[0] * weights * mask).sum().backward()
    expected_grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()

    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 3 * VOCAB)
    chunk_sizes = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: chunk_sizes.append(args[0].shape[:-1]))
    got = completion_token_stats(model, rollout, policy_token_stats)
    (got[0] * weights * mask).sum().backward()
    handle.remove()
    assert chunk_sizes[0] == (rollout.prompt_ids.shape[0], 1)  # the model's own call: the last position only
    assert all(len(s) == 1 and s[0] <= 3 for s in chunk_sizes[1:]) and sum(s[0] for s in chunk_sizes[1:]) >= mask.sum()
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value[mask], reference[mask].detach(), rtol=1e-5, atol=1e-6)
        assert (value[~mask] == 0).all()
    for n, q in model.named_parameters():
        torch.testing.assert_close(q.grad, expected_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_take_cuts_rows_to_their_own_width_and_by_length_puts_the_longest_first():
    prompt_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    rollout = Rollout(prompt_mask * 7, prompt_mask, mask * 9, mask, mask * -0.5)
    batch = Batch(rollout, torch.arange(4.0), None, mask * -1.0, LossWeights(mask * 2.0, torch.arange(4.0) + 1, torch.ones(4)), mask * 3)
    chunks = by_length(mask, 2)
    assert [c.tolist() for c in chunks] == [[1, 3], [0, 2]]  # lengths 4, 3 | 2, 1
    micro = batch.take(chunks[0])
    assert micro.rollout.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]  # the all-padding first column dropped
    assert micro.rollout.completion_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert all(x.shape == (2, 4) for x in (micro.ref_logp, micro.rollout.token_logp, micro.weights.token, micro.token_class))
    assert micro.advantages.tolist() == [1.0, 3.0] and micro.weights.prompt.tolist() == [2.0, 4.0]
    assert micro.old_logp is None and micro.rollout.token_entropy is None and micro.credit is None
    micro = batch.take(chunks[1])
    assert micro.rollout.prompt_ids.shape == (2, 4) and micro.rollout.completion_ids.tolist() == [[9, 9], [9, 0]]
    assert [c.tolist() for c in by_length(mask, 3, torch.tensor([0, 2, 3]))] == [[3, 0, 2]]
    assert math.isclose(float(rollout.take(torch.tensor([2])).completion_mask.sum()), 1.0)
    assert rollout.take(slice(1, 3), trim=False).completion_mask.tolist() == mask[1:3].tolist()  # rows as they are
    # a token budget: rows 1 (P 3, T 4) and 3 (P 1, T 3) take 2 x (3 + 4) = 14 positions cut to their width
    assert [c.tolist() for c in by_tokens(prompt_mask, mask, 14)] == [[1, 3], [0, 2]]
    assert [c.tolist() for c in by_tokens(prompt_mask, mask, 13)] == [[1], [3, 0], [2]]  # 3 and 0: 2 x (2 + 3)
    assert [c.tolist() for c in by_tokens(prompt_mask, mask, 5)] == [[1], [3], [0], [2]]  # row 1 (7 positions) alone
    assert [c.tolist() for c in by_tokens(prompt_mask, mask, 100, torch.tensor([0, 2]))] == [[0, 2]]
