"""The pydantic models behind params.yaml: every knob typed and described, validated as a whole.

Loading validates the whole file before any stage starts, so a typo or an out-of-range value fails
fast with the dotted key path in the message.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from grpolab.config.base import Section, existing_model, existing_paths, option_members
from grpolab.config.train import (
    DEFAULT_REWARDS,
    RENAMED_SCORERS,
    DeepSpeedParams,
    LossParams,
    MitigationParams,
    OptimParams,
    RewardsParams,
    RolloutParams,
    SeparateValidation,
    TracInParams,
    TrainParams,
)
from grpolab.data.tasks import problem_space
from grpolab.errors import ConfigError
from grpolab.mia.scores import MIA_METHODS
from grpolab.algos.mia_weights import SCORE_NORMALIZATIONS

PARAMS_FILE = "params.yaml"
__all__ = [  # the train sections (grpolab.config.train) are the schema's too
    "DEFAULT_REWARDS", "MOVED_KEYS", "PARAMS_FILE", "RENAMED_SCORERS", "DataParams", "DeepSpeedParams", "EvalParams",
    "LossParams", "MiaParams", "MitigationParams", "ModelParams", "OptimParams", "Params", "RewardsParams",
    "RolloutParams", "SFTParams", "Section", "TracInParams", "TrackingParams", "TrainParams", "flatten", "format_validation_error",
    "moved_key", "option_sections", "params_hash", "validate",
]


DEFAULT_NUM_VAL = 200


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

    _check_files = field_validator("train_files", "eval_files", "sft_files", "val_files")(existing_paths)

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

    _check_model = field_validator("name_or_path")(existing_model)

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

    _check_reference = field_validator("reference_model")(existing_model)

    @model_validator(mode="after")
    def _reference_needs_model(self) -> MiaParams:
        if self.method == "reference" and self.reference_model is None:
            raise ValueError("method: `reference` needs mia.reference_model")
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
        rewards = self.train.rewards
        if rewards.weights is None:
            rewards.weights = DEFAULT_REWARDS["reward_file" if rewards.reward_file else "auto" if self.data.train_files else "task"]
        return self

    @model_validator(mode="after")
    def _reference_for_eval(self) -> Params:
        if "reference" in self.eval.mia_methods and self.mia.reference_model is None:
            raise ValueError("eval.mia_methods: `reference` needs mia.reference_model")
        return self

    @model_validator(mode="after")
    def _tracin_has_validation(self) -> Params:
        tracin = self.train.tracin
        if not (tracin.use_tracin and isinstance(tracin.validation, SeparateValidation)):
            return self
        size = self.data.validation_size
        if size == 0:
            raise ValueError(
                "train.tracin.validation: `separate` needs validation prompts: set data.val_files or data.num_val "
                "(with your own train files none are held out by default)"
            )
        if size is not None and tracin.validation.pool_size > size:
            raise ValueError(
                f"train.tracin.validation.val_pool_size: {tracin.validation.pool_size} validation prompts per influence "
                f"step, but data.num_val is {size}"
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


# Keys of params.yaml that moved (issue 32: the train params in sections), old -> new: an old key is refused with
# its new name, never read. (Other code can apply it as a codemod: every `train.<old>` string becomes its new path.)
MOVED_KEYS: dict[str, str] = {
    **{f"train.{k}": f"train.optim.{k}" for k in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm")},
    "train.policy_loss": "train.loss.policy.name",
    "train.clip_eps_low": "train.loss.policy.clip_low",
    "train.clip_eps_high": "train.loss.policy.clip_high",
    "train.gspo_clip_low": "train.loss.policy.clip_low",
    "train.gspo_clip_high": "train.loss.policy.clip_high",
    "train.cispo_clip_low": "train.loss.policy.clip_low",
    "train.cispo_clip_high": "train.loss.policy.clip_high",
    **{f"train.{k}": f"train.loss.{k}" for k in ("advantage_estimator", "scale_rewards", "kl_beta", "kl_estimator",
                                                 "entropy_coef", "loss_agg_mode", "mask_truncated_completions")},
    "train.rewards": "train.rewards.weights",
    **{f"train.{k}": f"train.rewards.{k}" for k in ("reward_sources", "reward_file", "reward_function", "judge_model",
                                                    "judge_batch_size")},
    "train.overlong_buffer_len": "train.rewards.overlong_buffer.len",
    "train.overlong_penalty_factor": "train.rewards.overlong_buffer.penalty_factor",
    "train.dynamic_sampling": "train.dynamic_sampling.enable",
    "train.max_rollout_batches": "train.dynamic_sampling.max_rollout_batches",
    **{f"train.{k}": f"train.mia_weighting.{k}" for k in ("use_mia_weighted_loss", "mia_weighting_mode",
                                                          "mia_invert_weights", "mia_normalize_weights")},
    **{f"train.{k}": f"train.log.{k}" for k in ("credit_log_every", "log_completions_every")},
    "train.tracin.validation": "train.tracin.validation.name",
    **{f"train.tracin.{k}": f"train.tracin.validation.{k}" for k in ("val_batch_size", "val_pool_size", "val_selection",
                                                                      "val_loss")},
}
# what else the new key needs, where the old one said it by its name or its value
MOVE_NOTES = {
    "train.gspo_clip_low": "with train.loss.policy.name: gspo", "train.gspo_clip_high": "with train.loss.policy.name: gspo",
    "train.cispo_clip_low": "with train.loss.policy.name: cispo", "train.cispo_clip_high": "with train.loss.policy.name: cispo",
    "train.clip_eps_low": "with train.loss.policy.name: ppo_clip", "train.clip_eps_high": "with train.loss.policy.name: ppo_clip",
    "train.overlong_buffer_len": "with train.rewards.overlong_buffer.enable: true",
    "train.overlong_penalty_factor": "with train.rewards.overlong_buffer.enable: true",
    "train.max_rollout_batches": "with train.dynamic_sampling.enable: true",
    "train.mia_weighting_mode": "with train.mia_weighting.use_mia_weighted_loss: true",
    "train.mia_invert_weights": "with train.mia_weighting.use_mia_weighted_loss: true",
    "train.mia_normalize_weights": "with train.mia_weighting.use_mia_weighted_loss: true",
    "train.tracin.val_batch_size": "with train.tracin.validation.name: separate",
    "train.tracin.val_pool_size": "with train.tracin.validation.name: separate",
    "train.tracin.val_selection": "with train.tracin.validation.name: separate",
    "train.tracin.val_loss": "with train.tracin.validation.name: separate",
}


def _section_fields(path: str) -> set[str] | None:
    """The keys the section at dotted `path` takes now (every option's, for a choice); None: not a section."""
    model: Any = Params
    for key in path.split("."):
        fields = {k: f.annotation for k, f in model.model_fields.items()} if model is not None else {}
        if key not in fields:
            return None
        ann = fields[key]
        members = option_members(ann)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if members:
            return {k for m in members.values() for k in m.model_fields}
    return set(model.model_fields) if model is not None else None


def moved_key(key: str, value: Any) -> str | None:
    """Why `key` set to `value` is refused when it is an old key (`moved to ...`), else None. A key that is a section
    now (`train.rewards`) is old when its value is not that section."""
    if key not in MOVED_KEYS:
        return None
    fields = _section_fields(key)
    if fields is not None and isinstance(value, dict) and set(value) <= fields:
        return None
    note = MOVE_NOTES.get(key)
    return f"{key}: moved to {MOVED_KEYS[key]}" + (f" ({note})" if note else "")


def _moved_keys(raw: Any, prefix: str = "") -> list[str]:
    found = []
    for key, value in raw.items() if isinstance(raw, dict) else ():
        path = f"{prefix}{key}"
        why = moved_key(path, value)
        found += [why] if why else _moved_keys(value, f"{path}.")
    return found


def option_sections(model: type[BaseModel] = None, prefix: str = "") -> dict[str, str]:
    """dotted path -> the key that picks the option, for every choice in the params (`train.loss.policy`: `name`)."""
    found = {}
    for name, field in (model or Params).model_fields.items():
        members = option_members(field.annotation)
        if members:
            found[f"{prefix}{name}"] = next(iter(members.values())).KEY
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found.update(option_sections(field.annotation, f"{prefix}{name}."))
    return found


def format_validation_error(err: ValidationError, source: str, raw: Any = None) -> str:
    lines = []
    for e in err.errors():
        loc, node, tag_left_out = [], raw, False
        for part in e["loc"]:  # a choice's member tag follows its path in what pydantic gives: leave it out
            if not tag_left_out and loc and _is_option(".".join(loc)) and not (isinstance(node, dict) and part in node):
                tag_left_out = True
                continue
            loc.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
        path = ".".join(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = ".".join(loc[:-1])
            if _is_option(parent):
                key = option_sections()[parent]
                msg = f"not a knob of `{key}: {_chosen(raw, parent, key)}`"
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            msg = f"{option_sections()[path]}: {ctx.get('tag')!r} is none of {ctx.get('expected_tags')}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{source}: {path}: {msg}" if path else f"{source}: {msg}")
    return "\n".join(lines)


def _is_option(path: str) -> bool:
    return path in option_sections()


def _chosen(raw: Any, path: str, key: str) -> str:
    """The option chosen at `path` in the raw params (the first one where the key is left out)."""
    node = raw
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    model: Any = Params
    for part in path.split("."):
        field = model.model_fields[part]
        model = field.annotation
    default = next(iter(option_members(model))).lower()
    chosen = node.get(key, default) if isinstance(node, dict) else default
    return str(chosen).lower() if isinstance(chosen, bool) else str(chosen)


def validate(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    moved = _moved_keys(raw)
    if moved:
        raise ConfigError("\n".join(f"{source}: {why}" for why in moved))
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, raw)) from None


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
