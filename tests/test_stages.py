"""Stages called in-process on a tmp project folder, with a real MLflow sqlite store."""

import json

import pandas as pd
import pytest
import torch

from grpolab import config
from grpolab.config import schema
from grpolab.data.tokenizer import train_tokenizer
from grpolab.models import build_model, load_model, save_model
from grpolab.paths import SFT_LOSS_FILE
from grpolab.stages import run_stage
from grpolab.stages.sft import _encode, sft_step_loss

from conftest import TINY


def test_user_checkpoint_is_loaded_with_its_own_tokenizer(in_tmp, tmp_path):
    corpus = [f"{a}+{b}=<think>x</think><answer>{a + b}</answer>" for a in range(30) for b in range(30)]
    tok = train_tokenizer(corpus, vocab_size=90)
    params = schema.ModelParams(arch="qwen2", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64)
    user_model = build_model(params, tok, seed=5)
    ckpt = tmp_path / "my-hf-model"
    save_model(user_model, tok, ckpt)

    p = config.apply_overrides([*TINY, f"model.name_or_path={ckpt}", "sft.steps=0"])
    assert run_stage("prepare", p)["data/vocab_size"] == len(tok)
    run_stage("sft", p)
    base = load_model("models/base")
    assert base.config.model_type == "qwen2"
    for (name, a), b in zip(user_model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), name
    run_stage("mia", p)
    run_stage("train", p)
    metrics = run_stage("evaluate", p)
    assert "trained/success_rate" in metrics
    assert set(json.loads(open("metrics/eval.json").read())) == set(metrics)

    # sft.steps > 0 fine-tunes the user's model on the SFT set.
    p = config.apply_overrides(["sft.steps=3", "sft.learning_rate=0.01"])
    final_loss = run_stage("sft", p)["sft/final_loss"]
    losses = pd.read_csv(SFT_LOSS_FILE)["loss"].tolist()
    assert len(losses) == 3 and final_loss == pytest.approx(sum(losses) / 3, abs=1e-5)  # the headline is the curve's
    assert losses[-1] < losses[0]  # it learns the SFT set
    tuned = load_model("models/base")
    assert not all(torch.equal(a, b) for a, b in zip(user_model.parameters(), tuned.parameters()))


def test_sft_loss_is_the_response_tokens_mean_nll_in_micro_batches_with_a_chunked_head():
    tok = train_tokenizer(["1+2=<think>2+1+0=3</think><answer>3</answer>"] * 5, vocab_size=70)
    data = pd.DataFrame({"prompt": ["1+2=", "10+2=", "3+4="], "response": ["<answer>3</answer>", "<think>x</think><answer>12</answer>", "<answer>7</answer>"]})
    prompts, responses = _encode(data, tok, max_length=64)
    assert prompts[0] == tok("1+2=", add_special_tokens=False)["input_ids"] and responses[0][-1] == tok.eos_token_id
    model = build_model(schema.ModelParams(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=64), tok, seed=0)

    # what the stage computed before: transformers' own loss over [prompt | response], prompt labels ignored
    ids = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, ids))
    batch = {"input_ids": torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
             "labels": torch.tensor([[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r in zip(prompts, responses)])}
    expected = model(**batch).loss
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    for micro_batch_size, chunk_tokens in [(3, None), (2, 3), (1, 1)]:
        model.zero_grad(set_to_none=True)
        loss = sft_step_loss(model, prompts, responses, tok.pad_token_id, micro_batch_size, chunk_tokens, torch.float32)
        assert loss == pytest.approx(expected.item(), rel=1e-5)
        for got, want in zip((p.grad for p in model.parameters()), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
