"""The `train` params: the shape of a step at the top, the rest in sections (`optim`, `loss`, `rewards`,
`dynamic_sampling`, `mia_weighting`, `mitigation`, `tracin`, `rollout`, `log`, `deepspeed`).

Every choice with knobs of its own is an `option` (`grpolab.config.base`): `train.loss.policy: {name: gspo,
clip_low: 3e-4}`, `train.mitigation: {name: entropy_masking, mask_percentile: 80}`. The leaf names are the ones
users of the seeds, TRL and verl know (`use_mia_weighted_loss`, `think_discount`, `mask_percentile`,
`loss_agg_mode`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from grpolab.algos.advantages import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES
from grpolab.algos.losses import AGGREGATIONS, KL_ESTIMATORS
from grpolab.algos.mia_weights import MIA_WEIGHT_TRANSFORMS
from grpolab.algos.rollout_correction import CORRECTION_MODES
from grpolab.algos.tracin import KEEP_RULES, VAL_LOSS_COEFFICIENTS, VAL_SELECTIONS
from grpolab.config.base import Option, Section, existing_model, option

RENAMED_SCORERS = {"answer_tag": "answer_match"}  # old spelling -> name (refused, not aliased)
# train.rewards.weights when params.yaml leaves it empty: with a reward file, with the user's data files, for the generated task
DEFAULT_REWARDS = {"reward_file": {"reward_file": 1.0}, "auto": {"auto": 1.0}, "task": {"answer_match": 1.0, "format": 0.1}}


class OptimParams(Section):
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


# The policy losses (`algos.losses.POLICY_LOSSES`), each with its clip bounds and their defaults.
class PpoClipLoss(Option):
    name: Literal["ppo_clip"] = Field("ppo_clip", description="PPO's clipped token ratio (GRPO, DAPO; verl's `vanilla`).")
    clip_low: float = Field(0.2, ge=0, lt=1, description="The ratio is kept above 1 - clip_low.")
    clip_high: float = Field(0.2, ge=0, description="The ratio is kept below 1 + clip_high (DAPO's clip-higher).")


class GspoLoss(Option):
    name: Literal["gspo"] = Field("gspo", description="GSPO's clipped sequence ratio (Zheng et al. 2025), in its "
                                  "GSPO-token form: token weights still apply.")
    clip_low: float = Field(3e-4, ge=0, lt=1, description="The sequence ratio is kept above 1 - clip_low (the paper's 3e-4).")
    clip_high: float = Field(4e-4, ge=0, description="The sequence ratio is kept below 1 + clip_high (the paper's 4e-4).")


class CispoLoss(Option):
    name: Literal["cispo"] = Field("cispo", description="CISPO's clipped importance weight as a constant on A log p "
                                   "(MiniMax-M1).")
    clip_low: float = Field(1.0, ge=0, le=1, description="The importance weight is kept above 1 - clip_low (1: no lower "
                            "bound, as in MiniMax-M1).")
    clip_high: float = Field(3.0, ge=0, description="The importance weight is kept below 1 + clip_high (3: at most 4, "
                             "ScaleRL's and Tinker's cap).")


PolicyLossParams = option(PpoClipLoss, GspoLoss, CispoLoss)


class LossParams(Section):
    policy: PolicyLossParams = Field(
        default_factory=PpoClipLoss, description="The policy-gradient loss by `name`, with its clip bounds: `ppo_clip`, "
        "`gspo`, `cispo`. Switching `name` with `-S` drops the old loss's bounds from params.yaml.",
    )
    advantage_estimator: Literal[tuple(ADVANTAGE_ESTIMATORS)] = Field(
        "grpo", description="The baseline subtracted in each group: `grpo` its mean, `rloo` the mean of the other "
        "completions (leave-one-out), `opo` its length-weighted mean (verl's `opo`); `scale_rewards` then divides."
    )
    scale_rewards: Literal[tuple(ADVANTAGE_SCALES)] = Field(
        "group", description="Advantage scaling: std of the group (GRPO), of the batch, or none (Dr. GRPO)."
    )
    kl_beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the frozen reference; 0 loads no reference.")
    kl_estimator: Literal[tuple(KL_ESTIMATORS)] = Field("k3", description="KL estimator: k1 log-ratio, k2 half squared log-ratio, k3 Schulman's.")
    entropy_coef: float = Field(
        0.0, ge=0, description="Entropy bonus: the loss subtracts entropy_coef x each token's policy entropy, aggregated as the loss is."
    )
    loss_agg_mode: Literal[tuple(AGGREGATIONS)] = Field(
        "token-mean", description="How token losses reduce to one number (verl's names)."
    )
    mask_truncated_completions: bool = Field(
        False, description="A completion that reached max_new_tokens without a stop token contributes no policy-gradient "
        "term (DAPO's overlong filtering); the KL and the entropy bonus still see it."
    )


class OverlongOff(Option):
    KEY: ClassVar[str] = "enable"
    enable: Literal[False] = Field(False, description="DAPO's soft overlong punishment, off.")


class OverlongOn(Option):
    KEY: ClassVar[str] = "enable"
    enable: Literal[True] = Field(True, description="DAPO's soft overlong punishment (verl's `overlong_buffer`): "
                                  "the reward part `overlong`.")
    len: int = Field(ge=1, description="Completions longer than max_new_tokens - len lose reward linearly, up to "
                     "penalty_factor at max_new_tokens.")
    penalty_factor: float = Field(1.0, ge=0, description="The most reward the punishment takes (DAPO's 1.0).")


OverlongBufferParams = option(OverlongOff, OverlongOn)


class RewardsParams(Section):
    weights: dict[str, float] | None = Field(
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
        "its activation memory. Default: `train.rollout_batch_size`. Each text is cut from the left to the judge's "
        "context, so a long prompt cannot push the completion out.",
    )
    overlong_buffer: OverlongBufferParams = Field(
        default_factory=OverlongOff, description="DAPO's soft overlong punishment, verl's `overlong_buffer`: "
        "`{enable: true, len: 16, penalty_factor: 1.0}`.",
    )

    @field_validator("weights")
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

    _check_judge = field_validator("judge_model")(existing_model)

    @model_validator(mode="after")
    def _what_rewards_need(self) -> RewardsParams:
        weights = self.weights or {}
        if "judge" in weights and self.judge_model is None:
            raise ValueError("weights: the judge reward needs train.rewards.judge_model")
        if "reward_file" in weights and self.reward_file is None:
            raise ValueError("weights: the reward_file reward needs train.rewards.reward_file")
        if self.reward_file is not None and self.weights is not None and "reward_file" not in weights:
            raise ValueError("reward_file: is set but train.rewards.weights does not use it (add `reward_file: 1.0`)")
        return self


class DynamicSamplingOff(Option):
    KEY: ClassVar[str] = "enable"
    enable: Literal[False] = Field(False, description="Dynamic sampling off: every group trains.")


class DynamicSamplingOn(Option):
    KEY: ClassVar[str] = "enable"
    enable: Literal[True] = Field(True, description="DAPO's dynamic sampling (verl's `filter_groups`): groups whose "
                                  "rewards are all equal are dropped and more batches of prompts sampled until "
                                  "prompts_per_step groups with signal are gathered.")
    max_rollout_batches: int = Field(
        4, ge=1, description="The most batches of rollouts one step samples (verl's `max_num_gen_batches`); past them "
        "the step trains the groups it has, topped up with groups without signal."
    )


DynamicSamplingParams = option(DynamicSamplingOff, DynamicSamplingOn)


class MiaWeightingOff(Option):
    KEY: ClassVar[str] = "use_mia_weighted_loss"
    use_mia_weighted_loss: Literal[False] = Field(False, description="Plain GRPO: every prompt weighs 1.")


class MiaWeightingOn(Option):
    KEY: ClassVar[str] = "use_mia_weighted_loss"
    use_mia_weighted_loss: Literal[True] = Field(
        True, description="Multiply each prompt's policy-gradient loss by its transformed `extra_info.mia_weight` "
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


MiaWeightingParams = option(MiaWeightingOff, MiaWeightingOn)


# The credit-assignment mitigations (`algos.credit.MITIGATIONS`, seed 002), each with its knobs and their defaults.
class NoMitigation(Option):
    name: Literal["none"] = Field("none", description="Plain GRPO: every token weighs 1.")


class OutcomeConditional(Option):
    name: Literal["outcome_conditional"] = Field("outcome_conditional", description="Think tokens weigh less.")
    think_discount: float = Field(0.5, ge=0, description="Weight of think-section tokens; answer tokens get 1.")


class InverseLogprob(Option):
    name: Literal["inverse_logprob"] = Field("inverse_logprob", description="Unlikely tokens weigh more.")
    epsilon: float = Field(0.1, gt=0, description="Weight 1 / (abs(log p) + epsilon).")


class AttentionCredit(Option):
    name: Literal["attention_credit"] = Field("attention_credit", description="Tokens the answer attends to weigh more.")
    credit_scale: float = Field(2.0, ge=0, description="How strongly the answer's attention shifts the weights.")


class EntropyWeighted(Option):
    name: Literal["entropy_weighted"] = Field("entropy_weighted", description="Uncertain tokens weigh more.")
    entropy_temp: float = Field(1.0, gt=0, description="Softmax temperature over token entropies.")


class EntropyMasking(Option):
    name: Literal["entropy_masking"] = Field("entropy_masking", description="Only uncertain tokens train.")
    mask_percentile: float = Field(
        80.0, ge=0, le=100, description="Tokens below this percentile of the batch's entropy lose the policy-gradient term."
    )


MitigationParams = option(NoMitigation, OutcomeConditional, InverseLogprob, AttentionCredit, EntropyWeighted, EntropyMasking)

VAL_POOL_FACTOR = 4  # a top/bottom/balanced selection picks val_batch_size out of this many times as many


# TracIn's L_val (seeds 001/003): the step's own loss, or a loss on fresh completions of validation prompts.
class SameBatchValidation(Option):
    name: Literal["same_batch"] = Field("same_batch", description="L_val is the step's own policy-gradient loss (seed 003's fix).")


class SeparateValidation(Option):
    name: Literal["separate"] = Field("separate", description="L_val is a loss on fresh completions of validation "
                                      "prompts (data/val.parquet; the original design).")
    val_batch_size: int = Field(
        64, ge=2, description="Validation completions that form L_val (the seeds' `tracin_val_batch_size`)."
    )
    val_pool_size: int | None = Field(
        None, ge=2,
        description="Validation prompts sampled (one completion each) per influence step, from which `val_selection` "
        "picks `val_batch_size`. Default: val_batch_size for `random`, 4x it otherwise.",
    )
    val_selection: Literal[tuple(VAL_SELECTIONS)] = Field(
        "random", description="Which pooled completions enter L_val: random, the top or bottom by reward (`top` is the "
        "original top-k), or `balanced` half top, half bottom (seed 001).",
    )
    val_loss: Literal[tuple(VAL_LOSS_COEFFICIENTS)] = Field(
        "seqloss-lastadv", description="Seed 003's losses over the selected completions: mean of -log p(y) * advantage, "
        "mean of -log p(y) * reward, or -mean log p(good) + mean log p(bad) with good/bad the top/bottom half by "
        "reward. log p(y) is the sum over the completion's tokens.",
    )

    @property
    def pool_size(self) -> int:
        if self.val_pool_size is not None:
            return self.val_pool_size
        return self.val_batch_size * (1 if self.val_selection == "random" else VAL_POOL_FACTOR)

    @model_validator(mode="after")
    def _pool_holds_batch(self) -> SeparateValidation:
        if self.pool_size < self.val_batch_size:
            raise ValueError(f"val_pool_size ({self.pool_size}) must be at least val_batch_size ({self.val_batch_size})")
        if self.val_selection != "random" and self.pool_size == self.val_batch_size:
            raise ValueError(
                f"val_selection: `{self.val_selection}` picks val_batch_size ({self.val_batch_size}) out of val_pool_size "
                f"({self.pool_size}), which keeps them all: set val_pool_size larger"
            )
        return self


TracInValidationParams = option(SameBatchValidation, SeparateValidation)


class TracInParams(Section):
    use_tracin: bool = Field(
        False, description="TracIn sample selection (seeds 001/003): keep only completions whose influence "
        "<grad L_i, grad L_val> is positive. Off: plain GRPO, bit for bit."
    )
    validation: TracInValidationParams = Field(
        default_factory=SameBatchValidation,
        description="What L_val is, by `name`: `same_batch` the step's own policy-gradient loss (seed 003's fix), "
        "`separate` a loss on fresh completions of validation prompts, with its knobs `val_*`.",
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


    @model_validator(mode="before")
    @classmethod
    def _validation_is_a_section(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("validation"), str):
            raise ValueError(f"validation: now a section: validation: {{name: {data['validation']}}} (its val_* knobs beside name)")
        return data


class HfRollout(Option):
    KEY: ClassVar[str] = "backend"
    backend: Literal["hf"] = Field(
        "hf", description="grpolab's own decoder over the policy (the default; the same completions as before this knob)."
    )


class VllmRollout(Option):
    KEY: ClassVar[str] = "backend"
    backend: Literal["vllm"] = Field(
        "vllm", description="A vLLM engine in each training process that holds the policy's weights, pushed in place "
        "before each batch of rollouts (`make install-vllm`).",
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
    def _bounds(self) -> VllmRollout:
        if self.vllm_importance_sampling_clip_min >= self.vllm_importance_sampling_clip_max:
            raise ValueError(f"vllm_importance_sampling_clip_min ({self.vllm_importance_sampling_clip_min}) must be below "
                             f"vllm_importance_sampling_clip_max ({self.vllm_importance_sampling_clip_max})")
        return self


# What generates the rollouts (`samplers.SAMPLERS`); TracIn's validation rollouts, the mia stage's and evaluate's
# completions follow it.
RolloutParams = option(HfRollout, VllmRollout)


class LogParams(Section):
    credit_log_every: int = Field(
        10, ge=0, description="Save per-token credit logs (parquet, MLflow) every this many steps (0: never)."
    )
    log_completions_every: int = Field(10, ge=1, description="Log a table of sample completions every this many steps.")

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
    num_processes: int = Field(
        1, ge=1, description="Training processes in all. On one machine the train stage starts them itself; under an "
        "external launcher (torchrun --nnodes, deepspeed --hostfile, srun) it must equal the job's WORLD_SIZE."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass instead of keeping them "
        "(transformers' gradient checkpointing): activation memory for about one more forward pass of compute."
    )
    deterministic: bool = Field(
        False, description="Bit-for-bit repeatable runs on a GPU: torch's deterministic kernels "
        "(`torch.use_deterministic_algorithms`, `CUBLAS_WORKSPACE_CONFIG=:4096:8`); an op that has none is named in a "
        "warning. Slower on a GPU; on the CPU runs repeat without it. See concepts/trainer.md, Reproducibility."
    )
    save_every: int = Field(20, ge=0, description="Checkpoint every this many steps (0: only at the end).")
    optim: OptimParams = Field(default_factory=OptimParams, description="The AdamW optimizer and its schedule.")
    loss: LossParams = Field(default_factory=LossParams, description="The policy-gradient loss, advantages, KL and entropy.")
    rewards: RewardsParams = Field(default_factory=RewardsParams, description="What the reward is.")
    dynamic_sampling: DynamicSamplingParams = Field(
        default_factory=DynamicSamplingOff, description="DAPO's dynamic sampling (verl's `filter_groups`): "
        "`{enable: true, max_rollout_batches: 4}`.",
    )
    mia_weighting: MiaWeightingParams = Field(
        default_factory=MiaWeightingOff, description="MIA-weighted loss (seed 000): `{use_mia_weighted_loss: true, "
        "mia_weighting_mode: linear, ...}`.",
    )
    mitigation: MitigationParams = Field(
        default_factory=NoMitigation, description="Credit-assignment mitigation (seed 002) by `name`, with its knob: a "
        "detached per-token weight on the policy-gradient term (docs: concepts/credit.md). `none`: plain GRPO.",
    )
    tracin: TracInParams = Field(default_factory=TracInParams, description="TracIn sample selection (seeds 001/003).")
    rollout: RolloutParams = Field(
        default_factory=HfRollout, description="The rollout engine by `backend` (hf or vLLM), with vLLM's knobs and "
        "mismatch correction.",
    )
    log: LogParams = Field(default_factory=LogParams, description="What training logs besides its metrics, and how often.")
    deepspeed: DeepSpeedParams = Field(default_factory=DeepSpeedParams, description="DeepSpeed engine settings.")

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
        overlong = self.rewards.overlong_buffer
        if overlong.enable and overlong.len >= self.max_new_tokens:
            raise ValueError(f"rewards.overlong_buffer.len ({overlong.len}) must be below max_new_tokens "
                             f"({self.max_new_tokens}): the punishment starts max_new_tokens - len tokens in")
        if self.gradient_checkpointing and self.tracin.use_tracin:
            # TracIn takes gradients at the layers' forward outputs; a checkpointed backward recomputes those
            # outputs instead of reaching the ones the forward returned.
            raise ValueError("gradient_checkpointing cannot be combined with tracin.use_tracin (TracIn needs the "
                             "forward's own layer outputs, which checkpointing recomputes)")
        validation = self.tracin.validation
        if self.tracin.use_tracin and validation.name == "separate" and validation.pool_size % self.num_processes:
            raise ValueError(f"tracin.validation.val_pool_size ({validation.pool_size}) must divide evenly across "
                             f"num_processes ({self.num_processes})")
        return self
