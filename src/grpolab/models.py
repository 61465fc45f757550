"""Build the tiny default causal LM from config, or load any HF causal LM from a local path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from grpolab.config import ModelParams
from grpolab.fsutil import atomic_output


def build_model(params: ModelParams, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A randomly initialised Llama- or Qwen2-style model sized by `model.*`."""
    config = AutoConfig.for_model(
        params.arch,
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_heads,
        intermediate_size=params.intermediate_size,
        max_position_embeddings=params.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def load_model(path: str | Path) -> PreTrainedModel:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no Hugging Face checkpoint here (config.json missing)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """`save_pretrained` of model and tokenizer into one self-contained folder, atomically."""
    with atomic_output(path, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def num_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())
