"""What a verl user brings, built by the tests themselves (no hub): GSM8K-style parquet files in verl's
layout and a Qwen2-style checkpoint with a ChatML chat template and two EOS ids in its generation config."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
# Qwen2's chat template, cut to what the tests need: ChatML turns and the assistant's opening.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def gsm8k_rows(n: int, split: str, seed: int, long_every: int = 0) -> pd.DataFrame:
    """`n` word problems as verl's gsm8k preprocessing writes them; every `long_every`-th prompt is padded long."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        question = f"Tom has {a} apples and buys {b} more. How many apples does Tom have?"
        if long_every and i % long_every == 0:
            question += " He counts them again, slowly, one by one, and again." * 6
        rows.append({
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{question} {GSM8K_INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": split, "index": i, "answer": f"{a} + {b} = {a + b}\n#### {a + b}", "question": question},
        })
    return pd.DataFrame(rows)


def save_gsm8k(folder: Path, n_train: int = 40, n_eval: int = 16, long_every: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train, eval_ = folder / "train.parquet", folder / "test.parquet"
    gsm8k_rows(n_train, "train", 1, long_every).to_parquet(train)
    gsm8k_rows(n_eval, "test", 2, long_every).to_parquet(eval_)
    return train, eval_


def save_qwen2_checkpoint(path: Path, corpus: list[str]) -> Path:
    """A tiny random Qwen2 model with a BPE tokenizer trained on `corpus`, ChatML's special tokens, the
    chat template, and generation_config.eos_token_id = [<|im_end|>, <|endoftext|>] as Qwen2.5's instruct models."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    ids = tokenizer.convert_tokens_to_ids(special)
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                                  bos_token_id=ids[0], eos_token_id=ids[2], pad_token_id=ids[0], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [ids[2], ids[0]]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gsm8k_corpus(*frames: pd.DataFrame) -> list[str]:
    return [m["content"] for f in frames for p in f["prompt"] for m in p] + [x["answer"] for f in frames for x in f["extra_info"]]
