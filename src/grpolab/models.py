"""Build the tiny default causal LM from config, or load any HF causal LM from a local path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from grpolab.config.schema import LoraParams, ModelParams
from grpolab.runtime.device import device
from grpolab.runtime.fsutil import atomic_output


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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A local HF causal LM in `dtype` (`device.working_dtype`) on this process's device. `from_pretrained`'s
    dtype keeps the buffers the model computes in fp32 (RoPE's) in fp32: a cast with `.to(dtype)` would not."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no Hugging Face model folder here (config.json missing)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device())


ADAPTER_DIR = "adapter"  # the LoRA adapter inside a trained model's folder


def with_lora(model: PreTrainedModel, lora: LoraParams) -> PreTrainedModel:
    """`model` with LoRA adapters (PEFT) on `lora.target_modules`, only they trainable; `model` as it is with r = 0."""
    if not lora.r:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@contextmanager
def reference_policy(policy: torch.nn.Module, frozen: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The KL reference: the frozen copy, or, with LoRA, the policy itself with its adapters disabled
    (the base weights never train, so no second copy is needed)."""
    if frozen is not None:
        yield frozen
        return
    with policy.disable_adapter():
        yield policy


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """`save_pretrained` of model and tokenizer into one self-contained folder, atomically. A LoRA model is
    saved twice: its adapter in `adapter/` (PEFT's format) and merged into the base weights, so whatever
    loads a plain checkpoint loads it. The merge changes `model` in place: save it last."""
    with atomic_output(path, directory=True) as tmp:
        if hasattr(model, "merge_and_unload"):  # a PEFT model (with_lora); peft itself takes seconds to import
            model.save_pretrained(Path(tmp) / ADAPTER_DIR)
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def num_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())
