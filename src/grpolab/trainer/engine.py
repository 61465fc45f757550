"""The DeepSpeed engine of a training: its config from the params, AdamW (DeepSpeed's CPU Adam when the
optimizer state is offloaded) on a cosine schedule, and the trained model saved from it in fp32."""

from __future__ import annotations

import torch

from grpolab.runtime import distributed as dist
from grpolab.config import Params
from grpolab.errors import ConfigError
from grpolab.models import save_model


def deepspeed_config(params: Params, bf16: bool) -> dict:
    t = params.train
    per_process = t.prompts_per_step * t.group_size // t.num_processes
    stage = t.deepspeed.stage(bf16)
    if bf16 and stage == 0:
        raise ConfigError("train.deepspeed.zero_stage: 0 with bf16 (model.dtype) would accumulate gradients in bf16 over "
                          "the micro-batches: set 1, 2 or 3, or leave it empty (1 under bf16)")
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": per_process // t.micro_batch_size,
        "train_batch_size": per_process * t.num_processes,
        "gradient_clipping": t.optim.max_grad_norm,
        "zero_optimization": {"stage": stage}
        | ({"stage3_param_persistence_threshold": threshold} if (threshold := t.deepspeed.stage3_param_persistence_threshold) is not None else {})
        | ({"offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()}} if t.deepspeed.offload_optimizer else {}),
        "bf16": {"enabled": bf16},
        # fp32 gradient accumulation: with bf16 weights DeepSpeed would otherwise sum micro-batch gradients in bf16
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


def make_optimizer(params: Params, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; with the optimizer state offloaded, DeepSpeed's CPU Adam (the same AdamW update, stepped on the
    CPU in C++: DeepSpeed refuses a torch optimizer there)."""
    t = params.train
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters
    if t.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        dist.load_native_ops("CPUAdamBuilder")
        return DeepSpeedCPUAdam(trainable, lr=t.optim.learning_rate, weight_decay=t.optim.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(trainable, lr=t.optim.learning_rate, weight_decay=t.optim.weight_decay)


def build_engine(params: Params, model: torch.nn.Module, ds_config: dict):
    """The DeepSpeed engine of a training: AdamW (`make_optimizer`) on a cosine schedule with warm-up, gradient
    checkpointing if asked, `ds_config` from `deepspeed_config`."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    t = params.train
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(params, model)
    schedule = get_cosine_schedule_with_warmup(optimizer, t.optim.warmup_steps, max(t.steps, 1))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    return engine


def save_trained(engine, tokenizer, bf16: bool, path) -> None:
    """The trained model in fp32 (rank 0 writes it). Under bf16 the weights are the optimizer's fp32 master
    copies, not the bf16 ones the forward used (assembling them is a collective: every rank takes part)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = [safe_get_full_fp32_param(p) for p in engine.module.parameters()] if bf16 else []
    if not dist.is_rank0():
        return
    model = engine.module.float()
    for p, master in zip(model.parameters(), masters):
        if master is not None:  # None: a frozen weight (LoRA's base), which has no master copy
            p.data.copy_(master)
    save_model(model, tokenizer, path)
