import torch

from grpolab.config.schema import ModelParams
from grpolab.data.tasks import arithmetic_problem
from grpolab.data.tokenizer import TAG_TOKENS, encode_prompt, encode_response, load_tokenizer, train_tokenizer
from grpolab.models import build_model, load_model, save_model

CORPUS = [arithmetic_problem(a, "+", b).prompt + arithmetic_problem(a, "+", b).completion for a in range(0, 90, 7) for b in range(3, 99, 11)]


def test_tokenizer_round_trip_and_digits_stay_single(tmp_path):
    tok = train_tokenizer(CORPUS, vocab_size=100)
    text = "347+285=<think>7+5+0=12</think><answer>632</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    assert "347" not in pieces and "3" in pieces  # digits are never merged
    assert all(tag in text for tag in TAG_TOKENS)  # every tag is in the text, and each is one token of it
    assert [p for p in pieces if p in TAG_TOKENS] == TAG_TOKENS
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert encode_response(loaded, "<answer>1</answer>")[-1] == loaded.eos_token_id
    assert loaded.decode(encode_prompt(loaded, "12+3="), skip_special_tokens=True) == "12+3="


def test_model_save_load_gives_identical_logits(tmp_path):
    tok = train_tokenizer(CORPUS, vocab_size=100)
    params = ModelParams(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=64)
    for arch in ("llama", "qwen2"):
        model = build_model(params.model_copy(update={"arch": arch}), tok, seed=0)
        assert model.config.model_type == arch and model.config.vocab_size == len(tok)
        save_model(model, tok, tmp_path / arch)
        loaded = load_model(tmp_path / arch)
        ids = torch.tensor([encode_prompt(tok, "12+34=")])
        model.eval()
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=0)
        assert load_tokenizer(str(tmp_path / arch)).get_vocab() == tok.get_vocab()


def test_build_model_is_seeded():
    tok = train_tokenizer(CORPUS, vocab_size=100)
    params = ModelParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    a, b = build_model(params, tok, seed=3), build_model(params, tok, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
