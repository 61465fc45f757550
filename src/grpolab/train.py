"""`train` stage: GRPO on a DeepSpeed engine. Glue only: the math lives in `algos/`.

One step: draw prompts -> sample group_size completions each -> rewards -> group-relative
advantages -> (TracIn: the keep mask, from `influence.py`) -> clipped policy loss (+ KL to a
frozen reference) weighted at the composition point -> aggregate -> backward over
micro-batches -> optimizer step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from grpolab import device as dev
from grpolab import distributed as dist
from grpolab.algos.advantages import group_advantages, zero_std_groups
from grpolab.algos.credit import ANSWER, CLASS_NAMES, THINK, gini, token_credit
from grpolab.algos.losses import (
    KL_ESTIMATORS, aggregate, aggregation_units, clipped_policy_loss, compose_token_loss,
)
from grpolab.checkpoints import CHECKPOINT_DIR, clear_step_logs, discard, load_training_checkpoint, resumable, save_training_checkpoint
from grpolab.config import ConfigError, Params
from grpolab.data.prepare import VAL_FILE
from grpolab.data.schema import write_parquet
from grpolab.data.tokenizer import encode_prompt, load_tokenizer
from grpolab.fsutil import atomic_write_text
from grpolab.influence import TRACIN_DIR, TracIn
from grpolab.membership import WEIGHTED_TRAIN_FILE
from grpolab.models import load_model, reference_policy, save_checkpoint, with_lora
from grpolab.rewards import Rewarder, source_means
from grpolab.rollout import Rollout, by_length, check_room, completion_logprobs, decode, sample, sample_keys, stop_ids, take
from grpolab.sft import BASE_DIR
from grpolab.variants import LossWeights, Variants

if TYPE_CHECKING:  # MLflow is imported by the stage's driver; the training loop itself runs without it
    from grpolab.tracking import Tracker

TRAINED_DIR = Path("models/trained")
CURVE_FILE = Path("metrics/train_curve.csv")
CREDIT_DIR = Path("metrics/credit")
STEP_LOG_DIRS = [CREDIT_DIR, TRACIN_DIR]
DEEPSPEED_CONFIG_ARTIFACT = "deepspeed_config.json"  # the engine's config as generated from params, in the train run
CURVE_KEYS = [
    "train/reward_mean", "train/loss", "train/kl", "train/entropy", "train/completion_length", "train/step_time",
    "train/grad_norm", "credit/answer_share", "credit/think_share", "credit/high_entropy_share", "credit/gini",
]


@dataclass
class Batch:
    """One process's share of a batch of rollouts, everything the update needs, B rows."""

    rollout: Rollout
    advantages: torch.Tensor  # [B]
    old_logp: torch.Tensor | None  # [B, T], None when on-policy (ppo_epochs = 1)
    ref_logp: torch.Tensor | None  # [B, T], None when kl_beta = 0
    weights: LossWeights
    token_class: torch.Tensor  # [B, T] think / answer / tag / other (algos.credit)
    credit: torch.Tensor | None = None  # [B, T] filled by the update: |A w| ||onehot(y) - p||
    entropy: torch.Tensor | None = None  # [B, T] filled by the update: the policy's token entropy

    def columns(self) -> dict[str, torch.Tensor | None]:
        """Every per-row and per-token tensor of the batch, by the name the loss reads it under."""
        r = self.rollout
        return {
            "prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask, "completion_ids": r.completion_ids,
            "mask": r.completion_mask, "advantages": self.advantages, "old_logp": self.old_logp, "ref_logp": self.ref_logp,
            "w_token": self.weights.token, "w_prompt": self.weights.prompt, "keep": self.weights.keep,
        }

    def micro_batches(self, size: int) -> list[torch.Tensor]:
        """The rows of each micro-batch: sorted by completion length, so each, cut to its own width
        (`rollout.take`), carries little padding. Every pass over the batch (old and reference log-probs,
        the update) uses these, so they see the same shapes (step 1's KL is exactly 0)."""
        return by_length(self.rollout.completion_mask, size)


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
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": stage}
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
        return DeepSpeedCPUAdam(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)


def batch_logprobs(model, batch: Batch, size: int) -> torch.Tensor:
    """log p of every completion token of the batch under `model`, micro-batch by micro-batch. -> [B, T]"""
    columns, out = batch.columns(), torch.zeros(batch.rollout.completion_mask.shape)
    with torch.inference_mode():
        for index in batch.micro_batches(size):
            logp = completion_logprobs(model, take(columns, index))[0]
            out[index, : logp.shape[1]] = logp
    return out.clone()  # an ordinary tensor: it meets the policy's log-probs in the loss


def _step_prompts(params: Params, n_train: int, rollout_index: int) -> np.ndarray:
    """The prompts of one batch of rollouts, seeded by (seed, index): the same on every rank and after a resume."""
    rng = np.random.default_rng([params.seed, rollout_index])
    return rng.choice(n_train, size=params.train.prompts_per_step, replace=n_train < params.train.prompts_per_step)


def make_batch(params: Params, engine, ref_model, tokenizer, data: pd.DataFrame, rewarder: Rewarder, variants: Variants, rollout_index: int):
    t = params.train
    per_rank = t.prompts_per_step // dist.world_size()
    prompt_index = _step_prompts(params, len(data), rollout_index)
    mine = prompt_index[dist.rank() * per_rank : (dist.rank() + 1) * per_rank]
    rows = [data.iloc[i] for i in mine for _ in range(t.group_size)]
    encoded = {i: encode_prompt(tokenizer, data.iloc[i]["prompt"]) for i in set(mine.tolist())}
    first_row = rollout_index * t.prompts_per_step * t.group_size + dist.rank() * per_rank * t.group_size
    with dist.gathered(engine):
        rollout = sample(
            engine.module, [encoded[i] for i in mine.tolist() for _ in range(t.group_size)], max_new_tokens=t.max_new_tokens,
            eos_ids=stop_ids(engine.module, tokenizer), pad_id=tokenizer.pad_token_id, temperature=t.temperature, top_p=t.top_p,
            keys=sample_keys(params.seed, list(range(first_row, first_row + len(rows)))), batch_size=t.rollout_batch_size,
        )
    texts = decode(tokenizer, rollout)
    reward, parts = rewarder(rows, texts, str(WEIGHTED_TRAIN_FILE))
    all_rewards = dist.all_gather_cat(reward)  # advantages (batch scaling) and logged stats see the whole batch
    offset = dist.rank() * len(rows)
    advantages = group_advantages(all_rewards, t.group_size, t.scale_rewards)[offset : offset + len(rows)]
    classes = variants.token_classes(rollout)
    weights = variants.loss_weights(rollout, rows, classes, engine.module, by_length(rollout.completion_mask, t.micro_batch_size))
    batch = Batch(rollout, advantages, None, None, weights, classes)
    engine.module.eval()
    if t.ppo_epochs > 1:
        batch.old_logp = batch_logprobs(engine.module, batch, t.micro_batch_size)
    if t.kl_beta > 0:
        with reference_policy(engine.module, ref_model) as reference:
            batch.ref_logp = batch_logprobs(reference, batch, t.micro_batch_size)
    sources = dist.all_gather_objects([r["data_source"] for r in rows])  # aligned with all_rewards
    info = {"rows": rows, "texts": texts, "reward": reward, "parts": parts, "all_rewards": all_rewards, "batch": batch,
            "sources": sources}
    return batch, info


def update(params: Params, engine, batch: Batch) -> dict[str, float]:
    """Backward over micro-batches and one optimizer step. Returns sums for the step's metrics."""
    t = params.train
    engine.module.train()
    units = dist.all_reduce_sum(aggregation_units(batch.rollout.completion_mask.float(), t.loss_agg_mode))
    sums = {k: 0.0 for k in ("loss", "pg", "kl", "entropy", "logp", "clipped", "tokens")}
    grad_norm = math.nan
    columns = batch.columns()
    batch.credit, batch.entropy = torch.zeros(batch.rollout.completion_mask.shape), torch.zeros(batch.rollout.completion_mask.shape)
    for index in batch.micro_batches(t.micro_batch_size):
        rows = take(columns, index)
        logp, (entropy, prob_sq) = completion_logprobs(engine, rows, entropy=True)
        old = rows["old_logp"] if rows["old_logp"] is not None else logp.detach()
        pg, clipped = clipped_policy_loss(logp, old, rows["advantages"], t.clip_eps_low, t.clip_eps_high)
        kl = KL_ESTIMATORS[t.kl_estimator](logp, rows["ref_logp"]) if rows["ref_logp"] is not None else None
        token_loss = compose_token_loss(pg, kl, t.kl_beta, rows["w_token"], rows["w_prompt"], rows["keep"])
        # Each rank's share is scaled by the world size because DeepSpeed averages gradients over ranks.
        loss = aggregate(token_loss, rows["mask"], t.loss_agg_mode, t.max_new_tokens, units) * dist.world_size()
        engine.backward(loss, scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary():
            # Averaged, unclipped gradients are complete here below ZeRO-2; above, DeepSpeed reports the norm.
            norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
            grad_norm = torch.stack(norms).norm().item() if norms else math.nan
        engine.step()
        mask = rows["mask"].float()
        weight = rows["keep"].unsqueeze(-1) * rows["w_prompt"].unsqueeze(-1) * rows["w_token"]
        width = mask.shape[1]
        batch.credit[index, :width] = token_credit(rows["advantages"].unsqueeze(-1) * weight, logp.detach(), prob_sq) * mask
        batch.entropy[index, :width] = entropy
        sums["loss"] += loss.item() / dist.world_size()
        sums["pg"] += (pg.detach() * mask).sum().item()
        sums["kl"] += (kl.detach() * mask).sum().item() if kl is not None else 0.0
        sums["entropy"] += (entropy * mask).sum().item()
        sums["logp"] += (logp.detach() * mask).sum().item()
        sums["clipped"] += (clipped.float() * mask).sum().item()
        sums["tokens"] += mask.sum().item()
    reported = engine.get_global_grad_norm()
    sums["grad_norm"] = float(reported) if reported is not None else grad_norm
    return sums


def step_metrics(params: Params, engine, sums: dict, info: dict, seconds: float) -> dict[str, float]:
    t = params.train
    sums = dict(sums)
    grad_norm = sums.pop("grad_norm")  # the same on every rank: not summed
    totals = dist.all_reduce_sum(torch.tensor([sums[k] for k in sums], dtype=torch.float64))
    s = dict(zip(sums, totals.tolist()))
    tokens = max(s["tokens"], 1.0)
    rewards = info["all_rewards"]
    parts = {name: dist.all_reduce_sum(v.sum()).item() / len(rewards) for name, v in info["parts"].items()}
    metrics = {
        "train/loss": s["loss"],
        "train/pg_loss": s["pg"] / tokens,
        "train/kl": s["kl"] / tokens,
        "train/reward_mean": rewards.mean().item(),
        "train/reward_std": rewards.std().item(),
        **{f"train/reward/{name}": v for name, v in parts.items()},
        **{f"train/reward/{source}": v for source, v in source_means(info["sources"], rewards).items()},
        "train/advantage_mean": group_advantages(rewards, t.group_size, t.scale_rewards).mean().item(),
        "train/logprob_mean": s["logp"] / tokens,
        "train/entropy": s["entropy"] / tokens,
        "train/clip_ratio": s["clipped"] / tokens,
        "train/grad_norm": grad_norm,
        "train/lr": engine.get_lr()[0],
        "train/completion_length": tokens / len(rewards),
        "train/frac_zero_std_groups": zero_std_groups(rewards, t.group_size).float().mean().item(),
        "train/tokens_per_s": tokens / seconds,
        "train/step_time": seconds,
        **credit_metrics(info["batch"]),
    }
    return metrics


def credit_metrics(batch: Batch) -> dict[str, float]:
    """Where the policy-gradient credit of the step went: shares of the total by token class,
    of the top 20 % entropy tokens, and the Gini coefficient of per-token credit."""
    mask = batch.rollout.completion_mask.bool()
    credit_, cls = batch.credit[mask], batch.token_class[mask]
    entropy = batch.entropy[mask]
    high = entropy >= torch.quantile(entropy.double(), 0.8).float() if entropy.numel() else entropy.bool()
    parts = torch.stack([credit_.sum(), credit_[cls == ANSWER].sum(), credit_[cls == THINK].sum(), credit_[high].sum()])
    total, answer, think, high_entropy = dist.all_reduce_sum(parts.double()).tolist()
    share = lambda x: x / total if total > 0 else 0.0  # noqa: E731
    return {
        "credit/answer_share": share(answer),
        "credit/think_share": share(think),
        "credit/high_entropy_share": share(high_entropy),
        "credit/gini": gini(credit_).item(),  # this process's tokens
    }


def credit_log(batch: Batch, variants: Variants, step: int) -> pd.DataFrame:
    """One row per completion token of the step: the credit logs saved as parquet."""
    mask = batch.rollout.completion_mask.bool()
    rows, positions = mask.nonzero(as_tuple=True)
    ids = batch.rollout.completion_ids[mask]
    return pd.DataFrame({
        "step": step,
        "row": rows.numpy(),
        "position": positions.numpy(),
        "token_id": ids.numpy(),
        "token": [variants.piece(i) for i in ids.tolist()],
        "class": [CLASS_NAMES[c] for c in batch.token_class[mask].tolist()],
        "credit": batch.credit[mask].numpy(),
        "entropy": batch.entropy[mask].numpy(),
        "logprob": batch.rollout.token_logp[mask].numpy(),
        "weight": batch.weights.token[mask].numpy(),
        "advantage": batch.advantages[rows].numpy(),
    })


def _completions_table(info: dict, advantages: torch.Tensor) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt": [r["prompt"] for r in info["rows"]],
            "completion": info["texts"],
            "ground_truth": [r["ground_truth"] for r in info["rows"]],
            "reward": info["reward"].tolist(),
            **{f"reward/{k}": v.tolist() for k, v in info["parts"].items()},
            "advantage": advantages.tolist(),
        }
    )


def _reward_curve_figure(curve: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve["step"], curve["train/reward_mean"], label="reward mean")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _curve(history: list[dict], keys: list[str]) -> pd.DataFrame:
    """The training curve (metrics/train_curve.csv): the `keys` of every step's metrics."""
    return pd.DataFrame(history).reindex(columns=["step", *keys])


def train_inputs(params: Params) -> list[Path]:
    """The files the trained model depends on besides the params: what a checkpoint's fingerprint covers."""
    t = params.train
    inputs = [BASE_DIR, WEIGHTED_TRAIN_FILE]
    if t.tracin.use_tracin:
        inputs.append(VAL_FILE)
    if "judge" in t.rewards and t.judge_model:
        inputs.append(Path(t.judge_model))
    if t.reward_file:
        inputs.append(Path(t.reward_file))
    return inputs


@dataclass
class Logged:
    """What the MLflow run a training logs into holds already (a resumed run): not logged again."""

    through: int = 0  # the last step of its metrics
    tables: set[str] = field(default_factory=set)  # its completion tables' file names


def _resume_or_start(params: Params, engine, inputs: list[Path], tracker: Tracker | None,
                     variants: Variants) -> tuple[int, list[dict], Logged]:
    """(the last step done, every step's metrics so far, what the run holds): from the checkpoint of this
    training if one was left behind (see checkpoints.py), else from scratch; says so in the terminal."""
    checkpoint = resumable(params, inputs)
    if checkpoint:
        history = load_training_checkpoint(engine, checkpoint, STEP_LOG_DIRS)
    else:
        if CHECKPOINT_DIR.exists():  # another configuration's, or other base model or data: not ours to resume
            discard()
        history = []
        if dist.is_rank0():
            for folder in STEP_LOG_DIRS:
                clear_step_logs(folder, 0)
    start = checkpoint.step if checkpoint else 0
    continuing = bool(tracker and checkpoint and tracker.run_id == checkpoint.run_id)
    logged = Logged(tracker.last_step("train/loss"), tracker.artifact_names("completions")) if continuing else Logged()
    if dist.is_rank0() and checkpoint:
        where = f"MLflow run {tracker.run_id}" if tracker else "no MLflow run"
        print(f"train: resuming at step {start} of {params.train.steps} from {checkpoint.path} ({where}; "
              f"steps 1-{logged.through} already logged there)", flush=True)
    if tracker and not continuing:  # a new run: the checkpoint's steps too
        tracker.metrics(variants.start_metrics())
        if start:
            tracker.curve(pd.DataFrame(history))
    return start, history, logged


def _save_step_log(frame: pd.DataFrame, folder: Path, step: int, tracker: Tracker | None) -> None:
    path = folder / f"step_{step:06d}.parquet"
    write_parquet(frame, path)
    if tracker:
        tracker.artifacts(path, folder.name)


def _save_trained(engine, tokenizer, bf16: bool) -> None:
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
    save_checkpoint(model, tokenizer, TRAINED_DIR)


def train(params: Params, tracker: Tracker | None = None) -> dict[str, float]:
    import deepspeed

    t = params.train
    if not (BASE_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{BASE_DIR}: no base model (run the sft stage first)")
    if not WEIGHTED_TRAIN_FILE.is_file():
        raise FileNotFoundError(f"{WEIGHTED_TRAIN_FILE}: no train data (run the mia stage first)")
    dist.init()
    torch.manual_seed(params.seed)
    dtype = dev.working_dtype(params.model.dtype)
    bf16 = dtype == torch.bfloat16
    ds_config = deepspeed_config(params, bf16)  # before any work: it refuses bf16 at ZeRO-0
    if dist.is_rank0():
        print(f"train: {dist.describe()}, {str(dtype).removeprefix('torch.')}, ZeRO-{ds_config['zero_optimization']['stage']}",
              flush=True)
    tokenizer = load_tokenizer(str(BASE_DIR))
    model = with_lora(load_model(BASE_DIR, dtype), params.model.lora)
    data = pd.read_parquet(WEIGHTED_TRAIN_FILE)
    rewarder = Rewarder(params)
    rewarder.check(data.to_dict("records"), str(WEIGHTED_TRAIN_FILE))
    check_room(model.config, tokenizer, list(data["prompt"]), t.max_new_tokens, "train.max_new_tokens", str(WEIGHTED_TRAIN_FILE))
    if t.tracin.use_tracin and t.tracin.validation == "separate":
        check_room(model.config, tokenizer, list(pd.read_parquet(VAL_FILE)["prompt"]), t.max_new_tokens, "train.max_new_tokens", str(VAL_FILE))
    ref_model = None  # with LoRA the reference is the policy with its adapters disabled
    if t.kl_beta > 0 and not params.model.lora.r:
        ref_model = load_model(BASE_DIR, dtype).eval().requires_grad_(False)  # the policy's dtypes, buffers included
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(params, model)
    schedule = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, max(t.steps, 1))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if tracker:
        tracker.text(json.dumps(ds_config, indent=2), DEEPSPEED_CONFIG_ARTIFACT)
    variants = Variants(params, data, tokenizer)
    tracin = TracIn(params, engine.module, tokenizer, rewarder) if t.tracin.use_tracin else None
    inputs = train_inputs(params)
    curve_keys = CURVE_KEYS + (tracin.metric_keys if tracin else [])
    start, history, logged = _resume_or_start(params, engine, inputs, tracker, variants)

    bar = tqdm(range(start + 1, t.steps + 1), desc="train", unit="step", dynamic_ncols=True, disable=not dist.is_rank0(), initial=start, total=t.steps)
    metrics: dict[str, float] = {}
    for step in bar:
        began = time.perf_counter()
        selection = None
        if (step - 1) % t.ppo_epochs == 0 or step == start + 1:
            rollout_index = (step - 1) // t.ppo_epochs
            batch, info = make_batch(params, engine, ref_model, tokenizer, data, rewarder, variants, rollout_index)
            if tracin and tracin.due(rollout_index):  # influence from the batch as sampled, before its first update
                with dist.gathered(engine):
                    selection = tracin.select(engine.module, batch, info, rollout_index, step)
                batch.weights.keep = selection.keep
        sums = update(params, engine, batch)
        metrics = step_metrics(params, engine, sums, info, time.perf_counter() - began) | (selection.metrics if selection else {})
        bar.set_postfix(reward=f"{metrics['train/reward_mean']:.3f}", loss=f"{metrics['train/loss']:.4f}")
        history.append({"step": step, **metrics})
        if tracker and step > logged.through:
            tracker.metrics(metrics, step=step)
        table = f"step_{step:06d}.json"  # a table logged again would get its rows twice: MLflow appends
        if tracker and step % t.log_completions_every == 0 and table not in logged.tables:
            tracker.table(_completions_table(info, batch.advantages), f"completions/{table}")
        if dist.is_rank0() and t.credit_log_every and step % t.credit_log_every == 0:
            _save_step_log(credit_log(batch, variants, step), CREDIT_DIR, step, tracker)
        if dist.is_rank0() and selection:
            _save_step_log(selection.log, TRACIN_DIR, step, tracker)
        # at the end of a PPO cycle only: a resume then starts a cycle, with fresh rollouts, as the run did
        if t.save_every and step % t.save_every == 0 and step % t.ppo_epochs == 0 and step < t.steps:
            if dist.is_rank0():
                atomic_write_text(CURVE_FILE, _curve(history, curve_keys).to_csv(index=False))
            save_training_checkpoint(engine, params, inputs, step, tracker.run_id if tracker else None, history, STEP_LOG_DIRS)

    with dist.gathered(engine):
        _save_trained(engine, tokenizer, bf16)
    dist.barrier()
    # Headline: the last step's values and the means over all steps (shares and TracIn ratios are per step).
    curve = _curve(history, curve_keys)
    summary = {
        "train/steps": float(t.steps),
        **{f"final/{k}": v for k, v in metrics.items() if k in curve_keys and not math.isnan(v)},
        **{f"mean/{k}": v for k, v in curve[curve_keys].astype(float).mean().items() if not math.isnan(v)},
    }
    if dist.is_rank0():
        atomic_write_text(CURVE_FILE, curve.to_csv(index=False))
        if tracker:
            tracker.figure(_reward_curve_figure(curve), "reward_curve.png")
            tracker.artifacts(CURVE_FILE)
            tracker.artifacts(TRAINED_DIR, "trained_model")
    discard()  # only now: the trained model is saved and every upload went through
    return summary
