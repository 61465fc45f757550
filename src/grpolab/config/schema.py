"""The pydantic models behind params.yaml: every knob typed and described, validated as a whole.

Loading validates the whole file before any stage starts, so a typo or an out-of-range value fails
fast with the dotted key path in the message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpolab.algos.advantages import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES
from grpolab.algos.credit import MITIGATIONS
from grpolab.algos.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from grpolab.algos.mia_weights import MIA_WEIGHT_TRANSFORMS, SCORE_NORMALIZATIONS
from grpolab.algos.tracin import KEEP_RULES, VAL_LOSS_COEFFICIENTS, VAL_SELECTIONS
from grpolab.data.tasks import problem_space
from grpolab.errors import ConfigError
from grpolab.mia.scores import MIA_METHODS
from grpolab.algos.rollout_correction import CORRECTION_MODES
from grpolab.samplers import SAMPLERS

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    # allow_inf_nan=False: no knob means anything at inf or nan, and YAML's .inf/.nan would otherwise pass as floats
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _existing_paths(paths: list[str]) -> list[str]:
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"file not found: {path}")
    return paths


def _existing_model(value: str | None) -> str | None:
    if value is not None and not (Path(value) / "config.json").is_file():
        raise ValueError(f"no Hugging Face model folder (config.json) at {value}")
    return value


DEFAULT_NUM_VAL = 200
RENAMED_SCORERS = {"answer_tag": "answer_match"}  # old spelling -> name (refused, not aliased)
# train.rewards when params.yaml leaves it empty: with a reward file, with the user's data files, for the generated task
DEFAULT_REWARDS = {"reward_file": {"reward_file": 1.0}, "auto": {"auto": 1.0}, "task": {"answer_match": 1.0, "format": 0.1}}


class DataParams(Section):
    task: Literal["arithmetic"] = Field(
        "arithmetic",
        description="Synthetic task generated when no train/eval files are given. "
        "`arithmetic`: integer + and - problems with a checkable answer.",
    )
    num_sft: int = Field(4000, ge=0, description="Number of generated SFT examples (prompt + worked completion).")
    sft_carry_error_rate: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Share of generated SFT demonstrations that forget every carry (borrow), as a sloppy "
        "demonstrator would: the base model inherits a systematic error that RL can fix. 0: all correct.",
    )
    num_train: int = Field(1000, ge=1, description="Number of generated RL train prompts.")
    num_eval: int = Field(200, ge=1, description="Number of generated eval prompts, disjoint from SFT and train.")
    max_operand: int = Field(
        99, ge=9, le=10**9, description="Largest operand of a generated problem; sets the difficulty."
    )
    operations: list[Literal["+", "-"]] = Field(
        ["+", "-"], min_length=1, description="Operators the generated problems draw from."
    )
    train_files: list[str] = Field(
        [], description="Your own train parquet files in verl's format; replaces the generated train prompts."
    )
    eval_files: list[str] = Field(
        [], description="Your own eval parquet files in verl's format; required together with `train_files`."
    )
    sft_files: list[str] = Field(
        [],
        description="Your own SFT parquet files (`prompt` and `response` columns); replaces the generated SFT set.",
    )
    num_val: int | None = Field(
        None,
        ge=0,
        description="Validation prompts (TracIn's `separate` mode), disjoint from train, eval and SFT prompts. Empty: "
        "200 generated for the task; with your own files none, unless you give `val_files` or set a number, "
        "which holds out that many of your train prompts (picked by `seed`).",
    )
    val_files: list[str] = Field(
        [], description="Your own validation parquet files in verl's format (with `train_files`); replaces `num_val`."
    )
    max_prompt_length: int | None = Field(
        None, ge=1, description="Longest prompt in tokens, as the model sees it (chat template applied): `prepare` drops "
        "longer train, eval and validation prompts and logs how many (`data/num_dropped_long_prompts`), as verl's "
        "`filter_overlong_prompts` does. Empty: keep every prompt.",
    )

    _check_files = field_validator("train_files", "eval_files", "sft_files", "val_files")(_existing_paths)

    @property
    def validation_size(self) -> int | None:
        """Validation prompts prepare makes: a number, or None when they come from `val_files`."""
        if self.val_files:
            return None
        if self.num_val is not None:
            return self.num_val
        return 0 if self.train_files else DEFAULT_NUM_VAL

    @model_validator(mode="after")
    def _files_come_in_pairs(self) -> DataParams:
        if bool(self.train_files) != bool(self.eval_files):
            missing = "eval_files" if self.train_files else "train_files"
            raise ValueError(f"train_files and eval_files go together: set {missing} too")
        if self.val_files and not self.train_files:
            raise ValueError("val_files go with train_files (the generated task makes its own validation split)")
        if self.val_files and self.num_val is not None:
            raise ValueError("num_val and val_files exclude each other: the validation split is your val_files")
        if not self.train_files:  # generated: every split draws distinct problems from one finite space
            counts = {"num_eval": self.num_eval, "num_train": self.num_train, "num_val": self.validation_size or 0}
            if not self.sft_files:
                counts["num_sft"] = self.num_sft
            space = problem_space(self.max_operand, self.operations)
            if sum(counts.values()) > space:
                raise ValueError(
                    f"{' + '.join(counts)} = {sum(counts.values())} distinct problems, but max_operand={self.max_operand} "
                    f"with operations {self.operations} makes only {space}: raise max_operand or lower the counts"
                )
        return self


class LoraParams(Section):
    r: int = Field(0, ge=0, description="LoRA rank of the adapters GRPO trains (PEFT); 0: LoRA off, every weight trains.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: the adapter's update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: names (e.g. `[q_proj, v_proj]`) or `all-linear` "
        "(every linear layer but the output head).",
    )


class ModelParams(Section):
    name_or_path: str | None = Field(
        None,
        description="Local Hugging Face model folder (what `save_pretrained` writes) to start from, with its own "
        "tokenizer. Empty: build a tiny model and train a tokenizer on the task corpus.",
    )
    arch: Literal["llama", "qwen2"] = Field("llama", description="Architecture of the tiny model built from config.")
    vocab_size: int = Field(512, ge=64, description="Target vocabulary size of the BPE tokenizer trained on the task.")
    hidden_size: int = Field(128, ge=8, description="Width of the tiny model.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks of the tiny model.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the tiny model; must divide `hidden_size`.")
    intermediate_size: int = Field(512, ge=8, description="MLP width of the tiny model.")
    max_length: int = Field(128, ge=16, description="Longest prompt + completion in tokens (position embeddings).")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="What every stage's models work in (`grpolab.runtime.device`): `auto` is bf16 on a GPU and fp32 "
        "on the CPU. Weights load in it (fp32-only buffers such as RoPE's stay fp32); log-probs, entropies, losses "
        "and MIA statistics are fp32 whatever it is. SFT trains fp32 weights under bf16 autocast, GRPO on "
        "DeepSpeed's bf16 (fp32 master weights, fp32 gradient accumulation).",
    )
    logit_chunk_tokens: int | None = Field(
        None, ge=1, description="Tokens whose logits every log-prob pass (SFT's loss, GRPO's log-probs, TracIn, MIA) "
        "forms at once: the output head runs over the response tokens this many at a time, each chunk recomputed "
        "in the backward pass. Empty: 2^26 / vocabulary (256 MB of fp32 logits; 441 tokens at Qwen2.5's 151,936).",
    )
    lora: LoraParams = Field(
        default_factory=LoraParams, description="LoRA adapters for GRPO: the base weights stay frozen, the KL reference "
        "is the same model with its adapters disabled, and models/trained holds the adapter and the merged model.",
    )

    _check_model = field_validator("name_or_path")(_existing_model)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


class SFTParams(Section):
    steps: int = Field(350, ge=0, description="Optimizer steps of supervised warm start; 0 skips training.")
    batch_size: int = Field(64, ge=1, description="Sequences per optimizer step.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Sequences per forward and backward pass; their gradients accumulate over the step "
        "(the loss is the step's token mean either way, up to summation order). Empty: batch_size, one pass.",
    )
    learning_rate: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(35, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    log_every: int = Field(10, ge=1, description="Log the loss to MLflow every this many steps.")


class EvalParams(Section):
    max_new_tokens: int = Field(48, ge=1, description="Longest completion generated per prompt.")
    num_samples: int = Field(4, ge=1, description="Sampled completions per prompt (besides the greedy one).")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of the sampled completions.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold of the sampled completions.")
    batch_size: int = Field(256, ge=1, description="Sequences generated together.")
    num_logged_samples: int = Field(
        20, ge=0, description="Eval prompts whose completions go to the samples file and MLflow table."
    )
    mia_methods: list[Literal[tuple(MIA_METHODS)]] = Field(
        ["loss", "zlib", "min_k", "min_k_plus_plus"],
        description="Membership attacks evaluated on the base and trained models: train prompts are the "
        "members, eval prompts the non-members (`reference` needs mia.reference_model).",
    )


class MiaParams(Section):
    method: Literal[(*MIA_METHODS, "precomputed")] = Field(
        "min_k_plus_plus",
        description="Membership score of each train prompt under the base model (higher = more likely a member): "
        "`loss` mean log-likelihood, `zlib` that over zlib bytes, `min_k` mean of the lowest k % token "
        "log-probs, `min_k_plus_plus` Min-K%++, `reference` likelihood ratio against `reference_model`, "
        "`precomputed` keep the train files' own `extra_info.mia_weight`.",
    )
    k: float = Field(0.2, gt=0, le=1, description="Share of lowest-scoring tokens averaged by `min_k` and `min_k_plus_plus`.")
    normalize: Literal[tuple(SCORE_NORMALIZATIONS)] = Field(
        "rank", description="How train scores become weights in [0, 1]: rank (robust to outliers) or min-max."
    )
    reference_model: str | None = Field(
        None, description="Local causal-LM model folder for the `reference` method (same tokenizer as the base model)."
    )
    max_new_tokens: int = Field(48, ge=1, description="Length of the greedy completion whose tokens are scored.")
    batch_size: int = Field(256, ge=1, description="Prompts scored together.")

    _check_reference = field_validator("reference_model")(_existing_model)

    @model_validator(mode="after")
    def _reference_needs_model(self) -> MiaParams:
        if self.method == "reference" and self.reference_model is None:
            raise ValueError("method: `reference` needs mia.reference_model")
        return self


class MitigationParams(Section):
    name: Literal[tuple(MITIGATIONS)] = Field(
        "none",
        description="Credit-assignment mitigation: a detached per-token weight on the policy-gradient term "
        "(docs: concepts/credit.md). `none`: plain GRPO.",
    )
    think_discount: float | None = Field(
        None, ge=0, description="`outcome_conditional` (default 0.5): weight of think-section tokens; answer tokens get 1."
    )
    epsilon: float | None = Field(None, gt=0, description="`inverse_logprob` (default 0.1): weight 1 / (abs(log p) + epsilon).")
    credit_scale: float | None = Field(
        None, ge=0, description="`attention_credit` (default 2.0): how strongly the answer's attention shifts the weights."
    )
    entropy_temp: float | None = Field(
        None, gt=0, description="`entropy_weighted` (default 1.0): softmax temperature over token entropies."
    )
    mask_percentile: float | None = Field(
        None, ge=0, le=100,
        description="`entropy_masking` (default 80): tokens below this percentile of the batch's entropy lose the "
        "policy-gradient term.",
    )

    @model_validator(mode="after")
    def _own_knobs_only(self) -> MitigationParams:
        for knob in sorted({k for m in MITIGATIONS.values() for k in m.knobs}):
            if getattr(self, knob) is not None and knob not in MITIGATIONS[self.name].knobs:
                owner = next(name for name, m in MITIGATIONS.items() if knob in m.knobs)
                raise ValueError(f"{knob}: a knob of `{owner}`, not of `{self.name}`")
        return self

    def knob(self, knob: str) -> float:
        """The value of one of this mitigation's knobs: as set, else its default."""
        value = getattr(self, knob)
        return MITIGATIONS[self.name].knobs[knob] if value is None else value

    def knobs(self) -> dict[str, float]:
        """This mitigation's knobs by name: as set, else their defaults."""
        return {k: self.knob(k) for k in MITIGATIONS[self.name].knobs}


# TracIn's knobs that only the `separate` validation mode reads, with their defaults (seeds 001/003).
SEPARATE_VALIDATION_KNOBS: dict[str, Any] = {
    "val_batch_size": 64,
    "val_pool_size": None,  # resolved by TracInParams.pool_size
    "val_selection": "random",
    "val_loss": "seqloss-lastadv",
}
VAL_POOL_FACTOR = 4  # a top/bottom/balanced selection picks val_batch_size out of this many times as many


class TracInParams(Section):
    use_tracin: bool = Field(
        False, description="TracIn sample selection (seeds 001/003): keep only completions whose influence "
        "<grad L_i, grad L_val> is positive. Off: plain GRPO, bit for bit."
    )
    validation: Literal["same_batch", "separate"] = Field(
        "same_batch",
        description="What L_val is: `same_batch` the step's own policy-gradient loss (seed 003's fix), `separate` "
        "a loss on fresh completions of validation prompts (data/val.parquet; the original design).",
    )
    val_batch_size: int | None = Field(
        None, ge=2, description="`separate` (default 64; the seeds' `tracin_val_batch_size`): validation completions "
        "that form L_val.",
    )
    val_pool_size: int | None = Field(
        None, ge=2,
        description="`separate`: validation prompts sampled (one completion each) per influence step, from which "
        "`val_selection` picks `val_batch_size`. Default: val_batch_size for `random`, 4x it otherwise.",
    )
    val_selection: Literal[tuple(VAL_SELECTIONS)] | None = Field(
        None, description="`separate` (default random): which pooled completions enter L_val: random, the top or "
        "bottom by reward (`top` is the original top-k), or `balanced` half top, half bottom (seed 001).",
    )
    val_loss: Literal[tuple(VAL_LOSS_COEFFICIENTS)] | None = Field(
        None, description="`separate` (default seqloss-lastadv), seed 003's losses over the selected completions: "
        "mean of -log p(y) * advantage, mean of -log p(y) * reward, or -mean log p(good) + mean log p(bad) with "
        "good/bad the top/bottom half by reward. log p(y) is the sum over the completion's tokens.",
    )
    fallback_min_positive: float = Field(
        0.1, ge=0, le=1, description="If fewer than this share of the units have positive influence, keep the top "
        "`fallback_top_fraction` by influence instead (seed 001).",
    )
    fallback_top_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of units kept by the fallback, highest influence first."
    )
    every: int = Field(
        1, ge=1, description="Compute influence on every N-th batch of rollouts (= steps when ppo_epochs is 1); "
        "the batches in between update with every completion, as plain GRPO.",
    )
    capture_tokens: int | None = Field(
        None, ge=1, description="Positions (prompt + completion, padding included) the influence pass captures at "
        "once: each hooked layer's input stays alive over them until its gradient arrives. Rows are taken longest "
        "first until the next would pass this (a longer row alone). Smaller: less memory, more forward passes. "
        "Empty: a train micro-batch at the batch's width (train.micro_batch_size rows).",
    )
    keep: Literal[tuple(KEEP_RULES)] = Field(
        "influence", description="What is trained: `influence` the units TracIn selects, `random` (the control arm) "
        "as many units drawn at random, seeded by the step: influence is still computed, for the size and the logs."
    )
    selection_unit: Literal["completion", "prompt"] = Field(
        "completion", description="What is kept or dropped: each completion by its own influence (the seeds), or "
        "each prompt's whole group by the sum of its completions' influences.",
    )

    @model_validator(mode="after")
    def _separate_knobs(self) -> TracInParams:
        if self.validation == "same_batch":
            for knob in SEPARATE_VALIDATION_KNOBS:
                if getattr(self, knob) is not None:
                    raise ValueError(f"{knob}: a knob of validation `separate`, not of `same_batch`")
            return self
        if self.pool_size < self.batch_size:
            raise ValueError(f"val_pool_size ({self.pool_size}) must be at least val_batch_size ({self.batch_size})")
        if self.selection != "random" and self.pool_size == self.batch_size:
            raise ValueError(
                f"val_selection: `{self.selection}` picks val_batch_size ({self.batch_size}) out of val_pool_size "
                f"({self.pool_size}), which keeps them all: set val_pool_size larger"
            )
        return self

    def knob(self, knob: str) -> Any:
        value = getattr(self, knob)
        return SEPARATE_VALIDATION_KNOBS[knob] if value is None else value

    @property
    def batch_size(self) -> int:
        return self.knob("val_batch_size")

    @property
    def selection(self) -> str:
        return self.knob("val_selection")

    @property
    def loss(self) -> str:
        return self.knob("val_loss")

    @property
    def pool_size(self) -> int:
        if self.val_pool_size is not None:
            return self.val_pool_size
        return self.batch_size * (1 if self.selection == "random" else VAL_POOL_FACTOR)


class DeepSpeedParams(Section):
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        None, description="ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters "
        "(gathered for generation). Empty: 1 when training in bf16 (DeepSpeed accumulates gradients in fp32 only "
        "at ZeRO >= 1) or with `offload_optimizer`, else 0."
    )
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: keep the optimizer state in CPU memory and step it there with DeepSpeed's "
        "CPU Adam (a C++ op compiled for the CPU that runs it: `make install` builds it, the CUDA image on first use). "
        "Needs zero_stage >= 1."
    )
    stage3_param_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3: parameters with fewer elements than this stay whole on every process (DeepSpeed's "
        "knob of this name; empty: DeepSpeed's default, 100,000). 0 partitions every parameter, as a 0.5B model's "
        "matrices are anyway: what a multi-process test of a tiny model sets to exercise ZeRO-3's gathers."
    )

    @model_validator(mode="before")
    @classmethod
    def _bf16_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "bf16" in data:
            raise ValueError("bf16: replaced by model.dtype (auto: bf16 on a GPU; bfloat16; float32), which every stage follows")
        return data

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedParams:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO partitions the optimizer state it offloads)")
        if self.stage3_param_persistence_threshold is not None and self.zero_stage != 3:
            raise ValueError("stage3_param_persistence_threshold is a knob of zero_stage 3")
        return self

    def stage(self, bf16: bool) -> int:
        """The ZeRO stage the engine runs: as set, else the lowest that accumulates bf16 gradients in fp32."""
        if self.zero_stage is not None:
            return self.zero_stage
        return 1 if bf16 or self.offload_optimizer else 0


class RolloutParams(Section):
    backend: Literal[tuple(SAMPLERS)] = Field(
        "hf", description="What generates the rollouts: `hf` grpolab's own decoder over the policy (the default; the "
        "same completions as before this knob), `vllm` a vLLM engine in each training process that holds the policy's "
        "weights, pushed in place before each batch of rollouts (`make install-vllm`). TracIn's validation rollouts, "
        "the mia stage's and evaluate's completions follow it.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="vLLM: the share of the device's memory the engine may take for its weights, "
        "activations and KV cache (TRL's name and colocate default), beside the DeepSpeed engine on the same device. "
        "On the CPU it is a share of the host's memory.",
    )
    vllm_kv_cache_gib: float | None = Field(
        None, gt=0, description="vLLM: the KV cache's size in GiB (vLLM's `kv_cache_memory_bytes`), instead of what "
        "vllm_gpu_memory_utilization leaves. Empty: that on a GPU, 1 GiB on the CPU. Refused before any work when it "
        "holds less than one sequence of the model's positions.",
    )
    vllm_enforce_eager: bool = Field(
        False, description="vLLM: no CUDA graphs (slower decoding, less memory and a faster start). Always eager on the CPU."
    )
    vllm_enable_sleep_mode: bool = Field(
        False, description="vLLM: between batches of rollouts the engine sleeps (its weights offloaded to the host, its KV "
        "cache freed: TRL's knob), so the update has the device's memory; woken before the next weight push. GPU only.",
    )
    vllm_importance_sampling_correction: bool = Field(
        True, description="vLLM: multiply each token's policy-gradient term by the truncated or masked ratio "
        "pi_old / pi_sampler of the trainer's and vLLM's log-probs (TRL's knob; verl's `rollout_is`), which corrects "
        "for the two engines' numerical mismatch. The hf backend samples from the policy itself: no correction.",
    )
    vllm_importance_sampling_mode: Literal[tuple(CORRECTION_MODES)] = Field(
        "token_truncate", description="vLLM: `token_*` a ratio per token, `sequence_*` one per completion (the "
        "product of its tokens' ratios); `*_truncate` clamps the ratio into [clip_min, clip_max] (TIS), `*_mask` "
        "drops the token or completion whose ratio lies outside (MIS; with both bounds, IcePop).",
    )
    vllm_importance_sampling_clip_min: float = Field(
        0.0, ge=0, description="vLLM: the lower bound of the correction's ratio (0: none, as TRL and verl default)."
    )
    vllm_importance_sampling_clip_max: float = Field(
        2.0, gt=0, description="vLLM: the upper bound of the correction's ratio (verl's `rollout_is_threshold` 2; TRL "
        "uses 3)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> RolloutParams:
        if self.vllm_importance_sampling_clip_min >= self.vllm_importance_sampling_clip_max:
            raise ValueError(f"vllm_importance_sampling_clip_min ({self.vllm_importance_sampling_clip_min}) must be below "
                             f"vllm_importance_sampling_clip_max ({self.vllm_importance_sampling_clip_max})")
        if self.backend != "vllm":
            for knob, field in type(self).model_fields.items():
                if knob.startswith("vllm_") and getattr(self, knob) != field.default:
                    raise ValueError(f"{knob}: a knob of backend `vllm`, not of `{self.backend}`")
        return self


class TrainParams(Section):
    steps: int = Field(100, ge=0, description="Optimizer steps of GRPO.")
    prompts_per_step: int = Field(16, ge=1, description="Prompts drawn per batch of rollouts (across all processes).")
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt; advantages are relative to this group.")
    max_new_tokens: int = Field(48, ge=1, description="Longest completion sampled in rollouts.")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Rollout nucleus sampling threshold.")
    micro_batch_size: int = Field(
        64, ge=1, description="Sequences per forward/backward on one process; gradients accumulate over the rest. "
        "A step's rows are sorted by completion length and each micro-batch is cut to its own width."
    )
    rollout_batch_size: int = Field(
        256, ge=1, description="Rows generated together on one process (rollouts and TracIn's validation rollouts): "
        "bounds generation memory (KV cache, logits); a completion does not depend on it."
    )
    ppo_epochs: int = Field(1, ge=1, description="Optimizer steps per batch of rollouts (1 = on-policy).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass instead of keeping them "
        "(transformers' gradient checkpointing): activation memory for about one more forward pass of compute."
    )
    deterministic: bool = Field(
        False, description="Bit-for-bit repeatable runs on a GPU: torch's deterministic kernels "
        "(`torch.use_deterministic_algorithms`, `CUBLAS_WORKSPACE_CONFIG=:4096:8`); an op that has none is named in a "
        "warning. Slower on a GPU; on the CPU runs repeat without it. See concepts/trainer.md, Reproducibility."
    )
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    clip_eps_low: float = Field(0.2, ge=0, lt=1, description="Lower PPO clip: the ratio is kept above 1 - clip_eps_low.")
    clip_eps_high: float = Field(0.2, ge=0, description="Upper PPO clip: the ratio is kept below 1 + clip_eps_high (DAPO's clip-higher).")
    policy_loss: Literal[tuple(POLICY_LOSSES)] = Field(
        "ppo_clip", description="The policy-gradient loss: `ppo_clip` PPO's clipped token ratio (GRPO, DAPO; verl's "
        "`vanilla`), `gspo` GSPO's clipped sequence ratio (Zheng et al. 2025, in its GSPO-token form: token weights "
        "still apply), `cispo` CISPO's clipped importance weight as a constant on A log p (MiniMax-M1)."
    )
    gspo_clip_low: float = Field(3e-4, ge=0, lt=1, description="GSPO: the sequence ratio is kept above 1 - gspo_clip_low (the paper's 3e-4).")
    gspo_clip_high: float = Field(4e-4, ge=0, description="GSPO: the sequence ratio is kept below 1 + gspo_clip_high (the paper's 4e-4).")
    cispo_clip_low: float = Field(
        1.0, ge=0, le=1, description="CISPO: the importance weight is kept above 1 - cispo_clip_low (1: no lower bound, as in MiniMax-M1)."
    )
    cispo_clip_high: float = Field(
        3.0, ge=0, description="CISPO: the importance weight is kept below 1 + cispo_clip_high (3: at most 4, ScaleRL's and Tinker's cap)."
    )
    advantage_estimator: Literal[tuple(ADVANTAGE_ESTIMATORS)] = Field(
        "grpo", description="The baseline subtracted in each group: `grpo` its mean, `rloo` the mean of the other "
        "completions (leave-one-out), `opo` its length-weighted mean (verl's `opo`); `scale_rewards` then divides."
    )
    entropy_coef: float = Field(
        0.0, ge=0, description="Entropy bonus: the loss subtracts entropy_coef x each token's policy entropy, aggregated as the loss is."
    )
    overlong_buffer_len: int = Field(
        0, ge=0, description="DAPO's soft overlong punishment: completions longer than max_new_tokens - overlong_buffer_len "
        "lose reward linearly, up to overlong_penalty_factor at max_new_tokens (the reward part `overlong`; 0: off)."
    )
    overlong_penalty_factor: float = Field(1.0, ge=0, description="The most reward the overlong punishment takes (DAPO's 1.0).")
    mask_truncated_completions: bool = Field(
        False, description="A completion that reached max_new_tokens without a stop token contributes no policy-gradient "
        "term (DAPO's overlong filtering); the KL and the entropy bonus still see it."
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling (verl's `filter_groups`): groups whose rewards are all equal are "
        "dropped and more batches of prompts sampled until prompts_per_step groups with signal are gathered."
    )
    max_rollout_batches: int = Field(
        4, ge=1, description="Dynamic sampling: the most batches of rollouts one step samples (verl's `max_num_gen_batches`); "
        "past them the step trains the groups it has, topped up with groups without signal."
    )
    kl_beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the frozen reference; 0 loads no reference.")
    kl_estimator: Literal[tuple(KL_ESTIMATORS)] = Field("k3", description="KL estimator: k1 log-ratio, k2 half squared log-ratio, k3 Schulman's.")
    scale_rewards: Literal[tuple(ADVANTAGE_SCALES)] = Field(
        "group", description="Advantage scaling: std of the group (GRPO), of the batch, or none (Dr. GRPO)."
    )
    loss_agg_mode: Literal[tuple(AGGREGATIONS)] = Field(
        "token-mean", description="How token losses reduce to one number (verl's names)."
    )
    rewards: dict[str, float] | None = Field(
        None, description="Reward functions by name and their weights; the reward is the weighted sum. Empty: "
        "`{reward_file: 1}` with a `reward_file`, else `{auto: 1}` with your own data files (each row scored by its "
        "`data_source`), else `{answer_match: 1, format: 0.1}` (the generated task).",
    )
    reward_sources: dict[str, str] = Field(
        {}, description="Routes for the `auto` reward on top of the built-in ones: data_source -> scorer "
        "(`answer_match`, `gsm8k`, `gsm8k_flexible`, `math`).",
    )
    reward_file: str | None = Field(
        None, description="Your own reward: a Python file with a function `(data_source, completion, ground_truth, "
        "extra_info) -> float` (verl's custom reward function), used by the `reward_file` reward.",
    )
    reward_function: str = Field("compute_score", min_length=1, description="The function's name in `reward_file`.")
    judge_model: str | None = Field(
        None, description="Local sequence-classification model folder used by the `judge` reward (frozen)."
    )
    judge_batch_size: int | None = Field(
        None, ge=1, description="Texts the judge scores together (verl's `reward_model.micro_batch_size_per_gpu`): bounds "
        "its activation memory. Default: `rollout_batch_size`. Each text is cut from the left to the judge's context, "
        "so a long prompt cannot push the completion out.",
    )
    use_mia_weighted_loss: bool = Field(
        False, description="Multiply each prompt's policy-gradient loss by its transformed `extra_info.mia_weight` "
        "(seed 000); train data without weights falls back to plain GRPO with a warning."
    )
    mia_weighting_mode: Literal[tuple(MIA_WEIGHT_TRANSFORMS)] = Field(
        "linear", description="Transform of the MIA weight w: w, w^2 or exp(w - 1)."
    )
    mia_invert_weights: bool = Field(False, description="Use 1 - w before the transform.")
    mia_normalize_weights: bool = Field(
        False, description="Rescale each batch's prompt weights to mean 1 (over every process's rows): the control "
        "that separates which prompts a weighting favours from how much smaller it makes the step."
    )
    mitigation: MitigationParams = Field(
        default_factory=MitigationParams, description="Credit-assignment mitigation (seed 002)."
    )
    credit_log_every: int = Field(
        10, ge=0, description="Save per-token credit logs (parquet, MLflow) every this many steps (0: never)."
    )
    save_every: int = Field(20, ge=0, description="Checkpoint every this many steps (0: only at the end).")
    log_completions_every: int = Field(10, ge=1, description="Log a table of sample completions every this many steps.")
    num_processes: int = Field(
        1, ge=1, description="Training processes in all. On one machine the train stage starts them itself; under an "
        "external launcher (torchrun --nnodes, deepspeed --hostfile, srun) it must equal the job's WORLD_SIZE."
    )
    rollout: RolloutParams = Field(
        default_factory=RolloutParams, description="The rollout engine (hf or vLLM) and vLLM's mismatch correction."
    )
    tracin: TracInParams = Field(default_factory=TracInParams, description="TracIn sample selection (seeds 001/003).")
    deepspeed: DeepSpeedParams = Field(default_factory=DeepSpeedParams, description="DeepSpeed engine settings.")

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        from grpolab.rewards import REWARDS

        if value is None:
            return value
        if not value:
            raise ValueError("needs at least one reward function")
        for name in value:
            if name not in REWARDS:
                raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
        return value

    @field_validator("reward_sources")
    @classmethod
    def _known_scorers(cls, value: dict[str, str]) -> dict[str, str]:
        from grpolab.rewards import SCORERS

        for source, scorer in value.items():
            if scorer in RENAMED_SCORERS:
                raise ValueError(f"{source}: the scorer {scorer!r} is now {RENAMED_SCORERS[scorer]!r} (one name with the reward)")
            if scorer not in SCORERS:
                raise ValueError(f"{source}: unknown scorer {scorer!r}; scorers: {', '.join(SCORERS)}")
        return value

    @field_validator("reward_file")
    @classmethod
    def _python_file(cls, value: str | None) -> str | None:
        if value is not None and not (Path(value).is_file() and value.endswith(".py")):
            raise ValueError(f"no Python file (.py) at {value}")
        return value

    _check_judge = field_validator("judge_model")(_existing_model)

    def _unused_knobs(self) -> None:
        """A knob changed from its default that the chosen settings never read is a mistake: refused, naming
        the key that turns it off."""
        unread = {knob: f"a knob of policy_loss `{name}`, not of `{self.policy_loss}`"
                  for name, loss in POLICY_LOSSES.items() if name != self.policy_loss for knob in loss.clip}
        if not self.dynamic_sampling:
            unread["max_rollout_batches"] = "a knob of dynamic_sampling, which is off"
        if not self.use_mia_weighted_loss:
            unread["mia_normalize_weights"] = "a knob of use_mia_weighted_loss, which is off"
        if not self.overlong_buffer_len:
            unread["overlong_penalty_factor"] = "a knob of the overlong punishment, which overlong_buffer_len 0 turns off"
        for knob, why in unread.items():
            if getattr(self, knob) != type(self).model_fields[knob].default:
                raise ValueError(f"{knob}: {why}")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainParams:
        batch = self.prompts_per_step * self.group_size
        if self.prompts_per_step % self.num_processes:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must divide evenly across num_processes ({self.num_processes})"
            )
        per_process = batch // self.num_processes
        if per_process % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide the per-process batch "
                f"(prompts_per_step x group_size / num_processes = {per_process})"
            )
        self._unused_knobs()
        if self.overlong_buffer_len >= self.max_new_tokens:
            raise ValueError(f"overlong_buffer_len ({self.overlong_buffer_len}) must be below max_new_tokens "
                             f"({self.max_new_tokens}): the punishment starts max_new_tokens - overlong_buffer_len tokens in")
        rewards = self.rewards or {}
        if "judge" in rewards and self.judge_model is None:
            raise ValueError("rewards: the judge reward needs train.judge_model")
        if "reward_file" in rewards and self.reward_file is None:
            raise ValueError("rewards: the reward_file reward needs train.reward_file")
        if self.reward_file is not None and self.rewards is not None and "reward_file" not in rewards:
            raise ValueError("reward_file: is set but train.rewards does not use it (add `reward_file: 1.0`)")
        if self.gradient_checkpointing and self.tracin.use_tracin:
            # TracIn takes gradients at the layers' forward outputs; a checkpointed backward recomputes those
            # outputs instead of reaching the ones the forward returned.
            raise ValueError("gradient_checkpointing cannot be combined with tracin.use_tracin (TracIn needs the "
                             "forward's own layer outputs, which checkpointing recomputes)")
        tracin = self.tracin
        if tracin.use_tracin and tracin.validation == "separate" and tracin.pool_size % self.num_processes:
            raise ValueError(
                f"tracin.val_pool_size ({tracin.pool_size}) must divide evenly across num_processes ({self.num_processes})"
            )
        return self


class TrackingParams(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Empty: `MLFLOW_TRACKING_URI` if set, else `sqlite:///mlflow.db` "
        "in the project root (also from a `dvc exp run --temp/--queue` copy of the workspace), artifacts in `mlruns/`.",
    )
    experiment: str = Field("grpolab", min_length=1, description="MLflow experiment that holds the run trees.")
    tags: dict[str, str] = Field({}, description="Extra MLflow tags on every run of the pipeline.")
    study: str | None = Field(
        None, description="The study this run is a cell of (set by `grpolab study`): tag `grpolab.study`."
    )
    variant: str | None = Field(
        None,
        description="Name of this configuration (set by `grpolab study`): tag `grpolab.variant` and the run name "
        "`<variant> · seed <seed>`. Empty: the name lists the params that differ from the defaults.",
    )
    run_name: str | None = Field(
        None, description="Name of the pipeline's MLflow parent run, instead of the variant and seed."
    )
    outage_timeout_s: float = Field(
        900, gt=0,
        description="How long a stage waits at its end for a tracking server that stopped answering (what the stage "
        "logged meanwhile waits, and goes out when the server is back). Past it the stage stops with an error naming "
        "the server; a training resumes from its last checkpoint when run again, every step logged once. The MLflow "
        "client's own retries (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, about 4 minutes by default) come first.",
    )


class Params(Section):
    seed: int = Field(0, ge=0, description="The one seed every stage derives its randomness from.")
    data: DataParams = Field(default_factory=DataParams, description="Task data and tokenizer corpus.")
    model: ModelParams = Field(default_factory=ModelParams, description="Base model.")
    sft: SFTParams = Field(default_factory=SFTParams, description="Supervised warm start.")
    mia: MiaParams = Field(default_factory=MiaParams, description="Membership scores and MIA prompt weights.")
    train: TrainParams = Field(default_factory=TrainParams, description="GRPO training.")
    eval: EvalParams = Field(default_factory=EvalParams, description="Evaluation.")
    tracking: TrackingParams = Field(default_factory=TrackingParams, description="MLflow tracking.")

    @model_validator(mode="after")
    def _default_rewards(self) -> Params:
        if self.train.rewards is None:
            self.train.rewards = DEFAULT_REWARDS["reward_file" if self.train.reward_file else "auto" if self.data.train_files else "task"]
        return self

    @model_validator(mode="after")
    def _reference_for_eval(self) -> Params:
        if "reference" in self.eval.mia_methods and self.mia.reference_model is None:
            raise ValueError("eval.mia_methods: `reference` needs mia.reference_model")
        return self

    @model_validator(mode="after")
    def _tracin_has_validation(self) -> Params:
        tracin = self.train.tracin
        if not (tracin.use_tracin and tracin.validation == "separate"):
            return self
        size = self.data.validation_size
        if size == 0:
            raise ValueError(
                "train.tracin.validation: `separate` needs validation prompts: set data.val_files or data.num_val "
                "(with your own train files none are held out by default)"
            )
        if size is not None and tracin.pool_size > size:
            raise ValueError(
                f"train.tracin.val_pool_size: {tracin.pool_size} validation prompts per influence step, but "
                f"data.num_val is {size}"
            )
        return self

    @model_validator(mode="after")
    def _sft_has_data(self) -> Params:
        generated = not self.data.train_files and self.data.num_sft > 0
        if self.sft.steps > 0 and not self.data.sft_files and not generated:
            raise ValueError(
                f"sft.steps: is {self.sft.steps} but there is no SFT set: "
                "set data.sft_files (or data.num_sft > 0 for the generated task), or sft.steps: 0"
            )
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{source}: {path}: {msg}" if path else f"{source}: {msg}")
    return "\n".join(lines)


def validate(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def flatten(params: Params) -> dict[str, Any]:
    """`{"sft.steps": 800, ...}` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", params.model_dump())
    return out


def params_hash(params: Params) -> str:
    """What identifies a configuration: every param but the tracking settings (where it is logged)."""
    flat = {k: v for k, v in flatten(params).items() if not k.startswith("tracking.")}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]
