"""The `train` stage: GRPO on a DeepSpeed engine, read top to bottom in `train()`.

PPO cycles, each: sample (this process's share of the cycle's prompts, group_size completions each) -> score
(rewards, gathered over processes; with dynamic sampling, more batches until enough groups have signal) ->
weigh (group-relative advantages, the loss weighting's token and prompt weights, old and reference
log-probs; TracIn: the keep mask, from `trainer/tracin.py`); then ppo_epochs times: update (the clipped
policy loss over micro-batches, `trainer/update.py`) -> record (`trainer/recorder.py`); a checkpoint at the
end of a cycle.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from grpolab.runtime import device as dev
from grpolab.runtime import distributed as dist
from grpolab.algos.advantages import dynamic_sampling_groups, group_advantages, zero_std_groups
from grpolab.algos.credit import MITIGATIONS
from grpolab.algos.length import overlong_penalty, truncated
from grpolab.algos.mia_weights import mean_one
from grpolab.trainer.checkpoints import broadcast_fingerprint, discard, fingerprint, left_behind, resumable
from grpolab.config import Params
from grpolab.data.tokenizer import encode_prompt, load_tokenizer
from grpolab.models import load_model, reference_policy, with_lora
from grpolab.paths import BASE_DIR, TRAINED_DIR, VAL_FILE, WEIGHTED_TRAIN_FILE
from grpolab.trainer.recorder import Recorder
from grpolab.rewards import Rewarder
from grpolab.logprobs import by_length
from grpolab.samplers import Rollout, Sampler, cat_rollouts, check_room, decode, make_sampler, sample_keys, stop_ids
from grpolab.trainer.tracin import Selection, TracIn
from grpolab.trainer.update import SAMPLING_KEYS, Batch, Sampled, batch_logprobs, rollout_entropies, step_metrics, update
from grpolab.trainer.engine import build_engine, deepspeed_config, save_trained
from grpolab.trainer.loss_weights import LossWeighting

if TYPE_CHECKING:  # MLflow is imported by the stage's driver; the training loop itself runs without it
    from grpolab.tracking import Tracker

DEEPSPEED_CONFIG_ARTIFACT = "deepspeed_config.json"  # the engine's config as generated from params, in the train run


DYNAMIC_SAMPLING_KEYS = ["train/rollout_batches", "train/groups_dropped"]  # a step's, in the curve too
EXTRA_BATCHES = 2**20  # batch ids of dynamic sampling's extra rollout batches start past any run's PPO cycles


@dataclass
class Training:
    """What every part of a training reads, built once by `setup`."""

    params: Params
    engine: object  # the DeepSpeed engine of the policy
    tokenizer: object
    data: pd.DataFrame  # the train data (weighted by the mia stage)
    rewarder: Rewarder
    sampler: Sampler  # the rollout engine
    weighting: LossWeighting
    ref_model: torch.nn.Module | None  # the frozen reference (kl_beta > 0 without LoRA)
    tracin: TracIn | None
    record: Recorder
    key: str  # the training's fingerprint: whose checkpoints it resumes
    bf16: bool


@dataclass
class Cycle:
    """One PPO cycle's batch of rollouts, ready for its ppo_epochs updates."""

    sampled: Sampled
    batch: Batch
    metrics: dict[str, float]  # dynamic sampling's, in each of the cycle's steps' metrics
    selection: Selection | None  # TracIn's, recorded with the cycle's first step


def step_prompts(params: Params, n_train: int, batch_id: int) -> np.ndarray:
    """The prompts of one batch of rollouts, seeded by (seed, batch id): the same on every rank and after a resume."""
    rng = np.random.default_rng([params.seed, batch_id])
    return rng.choice(n_train, size=params.train.prompts_per_step, replace=n_train < params.train.prompts_per_step)


def sample_rollouts(run: Training, batch_id: int) -> tuple[list[dict], Rollout]:
    """(this process's data rows, their completions): its share of the prompts of rollout batch `batch_id`
    (a PPO cycle's index; dynamic sampling's extra batches past EXTRA_BATCHES), `group_size` completions each,
    each seeded by its row's place in the run."""
    params, data = run.params, run.data
    t = params.train
    per_rank = t.prompts_per_step // dist.world_size()
    prompt_index = step_prompts(params, len(data), batch_id)
    mine = prompt_index[dist.rank() * per_rank : (dist.rank() + 1) * per_rank]
    rows = [row for row in data.take(mine).to_dict("records") for _ in range(t.group_size)]  # column by column, not row by row
    encoded = {i: encode_prompt(run.tokenizer, data["prompt"].iat[i]) for i in set(mine.tolist())}
    first_row = batch_id * t.prompts_per_step * t.group_size + dist.rank() * per_rank * t.group_size
    with dist.gathered(run.engine) if run.sampler.reads_policy else nullcontext():
        rollout = run.sampler.sample(
            [encoded[i] for i in mine.tolist() for _ in range(t.group_size)], max_new_tokens=t.max_new_tokens,
            temperature=t.temperature, top_p=t.top_p, keys=sample_keys(params.seed, list(range(first_row, first_row + len(rows)))),
        )
    return rows, rollout


def sample_scored(run: Training, cycle: int) -> tuple[Sampled, Rollout, dict[str, float]]:
    """The scored rollouts PPO cycle `cycle` trains on, and (dynamic sampling) its `train/…` metrics: with dynamic
    sampling, batches are sampled until prompts_per_step groups have signal (or max_rollout_batches), and the
    groups chosen over every process (the same as one process keeps) are dealt out to the processes again."""
    t = run.params.train
    if not t.dynamic_sampling.enable:
        rows, rollout = sample_rollouts(run, cycle)
        return score(run, rows, rollout), rollout, {}
    batches: list[tuple[Sampled, Rollout]] = []
    for attempt in range(t.dynamic_sampling.max_rollout_batches):
        rows, rollout = sample_rollouts(run, cycle + attempt * EXTRA_BATCHES)
        batches.append((score(run, rows, rollout), rollout))
        has_signal = torch.cat([~zero_std_groups(s.all_rewards, t.group_size) for s, _ in batches])
        if has_signal.sum() >= t.prompts_per_step:
            break
    chosen = dynamic_sampling_groups(has_signal, t.prompts_per_step)
    sampled, rollout = chosen_groups(run, batches, chosen)
    dropped = int((~has_signal).sum()) - int((~has_signal[chosen]).sum())
    return sampled, rollout, dict(zip(DYNAMIC_SAMPLING_KEYS, (float(len(batches)), float(dropped))))


def chosen_groups(run: Training, batches: list[tuple[Sampled, Rollout]], chosen: torch.Tensor) -> tuple[Sampled, Rollout]:
    """This process's share of the groups `chosen` (indices over every batch's groups in order, as
    `dynamic_sampling_groups` gives them), gathered from whichever process sampled each."""
    t = run.params.train
    shares = dist.all_gather_objects([(s.rows, s.texts, s.reward, s.parts, r) for s, r in batches])  # rank-major
    mine, everyone = dist.deal_groups(chosen.tolist(), len(batches), t.prompts_per_step, t.group_size)
    mine = [(shares[share], at) for share, at in mine]
    sampled = Sampled(
        rows=[row for (rows, *_), at in mine for row in rows[at]],
        texts=[text for (_, texts, *_), at in mine for text in texts[at]],
        reward=torch.cat([reward[at] for (_, _, reward, *_), at in mine]),
        parts={name: torch.cat([parts[name][at] for (*_, parts, _), at in mine]) for name in batches[0][0].parts},
        all_rewards=torch.cat([batches[b][0].all_rewards[at] for b, at in everyone]),
        sources=[source for b, at in everyone for source in batches[b][0].sources[at]],
        all_lengths=torch.cat([batches[b][0].all_lengths[at] for b, at in everyone]),
    )
    return sampled, cat_rollouts([rollout.take(at, trim=False) for (*_, rollout), at in mine], run.tokenizer.pad_token_id)


def score(run: Training, rows: list[dict], rollout: Rollout) -> Sampled:
    """The rollouts' rewards (with DAPO's overlong punishment, if on, as the part `overlong`); every process's
    too, with the completions' lengths (advantages and the logged stats see the whole batch)."""
    t = run.params.train
    texts = decode(run.tokenizer, rollout)
    reward, parts = run.rewarder(rows, texts, str(WEIGHTED_TRAIN_FILE))
    lengths = rollout.completion_mask.sum(-1)
    overlong = t.rewards.overlong_buffer
    if overlong.enable:
        parts["overlong"] = overlong_penalty(lengths, t.max_new_tokens, overlong.len, overlong.penalty_factor)
        reward = reward + parts["overlong"]
    all_rewards = dist.all_gather_cat(reward)
    sources = dist.all_gather_objects([r["data_source"] for r in rows])  # aligned with all_rewards
    return Sampled(rows, texts, reward, parts, all_rewards, sources, dist.all_gather_cat(lengths))


def weigh(run: Training, sampled: Sampled, rollout: Rollout) -> Batch:
    """What the update reads: this process's advantages, the loss weighting's weights at the composition point, and
    the old (ppo_epochs > 1) and reference (kl_beta > 0) log-probs."""
    params, engine, weighting = run.params, run.engine, run.weighting
    t = params.train
    offset = dist.rank() * len(sampled.rows)
    advantages = group_advantages(sampled.all_rewards, t.group_size, t.loss.scale_rewards, estimator=t.loss.advantage_estimator,
                                  lengths=sampled.all_lengths)[offset : offset + len(sampled.rows)]
    classes = weighting.token_classes(rollout)
    engine.module.eval()  # every pass below reads the policy as it sampled: the update left it training (dropout)
    if rollout.token_entropy is None and MITIGATIONS[t.mitigation.name].needs_entropy:  # vLLM returns no entropies
        rollout.token_entropy = rollout_entropies(engine.module, rollout, t.micro_batch_size, t.temperature, params.model.logit_chunk_tokens)
    weights = weighting.loss_weights(rollout, sampled.rows, classes, engine.module, by_length(rollout.completion_mask, t.micro_batch_size))
    if t.mia_weighting.use_mia_weighted_loss and t.mia_weighting.mia_normalize_weights:
        weights.prompt = mean_one(weights.prompt, dist.all_reduce_sum(weights.prompt.sum()).item(), len(sampled.all_rewards))
    if t.loss.mask_truncated_completions:
        stops = stop_ids(engine.module, run.tokenizer)
        weights.keep = weights.keep * ~truncated(rollout.completion_ids, rollout.completion_mask, stops, t.max_new_tokens)
    batch = Batch(rollout, advantages, None, None, weights, classes)
    if t.ppo_epochs > 1:
        batch.old_logp = batch_logprobs(engine.module, batch, t.micro_batch_size, t.temperature, params.model.logit_chunk_tokens)
    if t.loss.kl_beta > 0:
        with reference_policy(engine.module, run.ref_model) as reference:
            batch.ref_logp = batch_logprobs(reference, batch, t.micro_batch_size, t.temperature, params.model.logit_chunk_tokens)
    return batch


def sample_cycle(run: Training, cycle: int, step: int) -> Cycle:
    """PPO cycle `cycle`'s batch, before its first update, `step`: the policy's weights into the rollout engine,
    then sample, score, weigh (and TracIn's keep mask, from the batch as sampled)."""
    engine, sampler, tracin = run.engine, run.sampler, run.tracin
    # the policy's current weights into the rollout engine (vLLM: pushed in place, gathered at ZeRO-3)
    with dist.gathered(engine) if not sampler.reads_policy else nullcontext():
        sampler.sync(engine.module)
    sampled, rollout, metrics = sample_scored(run, cycle)
    selection = None
    # passes without an optimizer step on whole parameters (ZeRO-3: gathered once, its per-call gathers off,
    # so loops whose length differs between ranks cannot leave them waiting on each other)
    with dist.gathered(engine):
        batch = weigh(run, sampled, rollout)
        if tracin and tracin.due(cycle):
            selection = tracin.select(engine.module, batch, sampled, cycle, step)
    if selection:
        batch.weights.keep = batch.weights.keep * selection.keep
    sampler.rest()
    return Cycle(sampled, batch, metrics, selection)


def cycles(params: Params, start: int) -> range:
    """The PPO cycles left after step `start` (where the run resumed, at the end of a cycle; 0 from scratch)."""
    epochs = params.train.ppo_epochs
    return range(start // epochs, -(-params.train.steps // epochs)) if start < params.train.steps else range(0)


def cycle_steps(params: Params, cycle: int, start: int) -> range:
    """The steps of PPO cycle `cycle`: its ppo_epochs updates on one batch of rollouts, those after step `start`
    (where the run resumed) and up to train.steps."""
    epochs = params.train.ppo_epochs
    return range(max(cycle * epochs, start) + 1, min((cycle + 1) * epochs, params.train.steps) + 1)


def checkpoint_due(params: Params, cycle: int, step: int) -> bool:
    """Whether a checkpoint follows `step`: every save_every steps, but only at the end of a whole PPO cycle (a
    resume then starts a cycle, with fresh rollouts, as the run did), and not after the last step."""
    t = params.train
    return bool(t.save_every) and step % t.save_every == 0 and step == (cycle + 1) * t.ppo_epochs and step < t.steps


def train_inputs(params: Params) -> list[Path]:
    """The files the trained model depends on besides the params: what a checkpoint's fingerprint covers."""
    t = params.train
    inputs = [BASE_DIR, WEIGHTED_TRAIN_FILE]
    if t.tracin.use_tracin:
        inputs.append(VAL_FILE)
    if "judge" in t.rewards.weights and t.rewards.judge_model:
        inputs.append(Path(t.rewards.judge_model))
    if t.rewards.reward_file:
        inputs.append(Path(t.rewards.reward_file))
    return inputs


def resumed_run(params: Params) -> str | None:
    """The MLflow run of the training checkpoint this training would resume, if any: the stage logs into it again."""
    if not left_behind():  # nothing to hash the inputs for (and they may not exist yet: train() says so)
        return None
    checkpoint = resumable(fingerprint(params, train_inputs(params)))
    return checkpoint.run_id if checkpoint else None


def setup(params: Params, tracker: Tracker | None) -> Training:
    """Everything a training reads, its inputs checked before any work."""
    t = params.train
    if not (BASE_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{BASE_DIR}: no base model (run the sft stage first)")
    if not WEIGHTED_TRAIN_FILE.is_file():
        raise FileNotFoundError(f"{WEIGHTED_TRAIN_FILE}: no train data (run the mia stage first)")
    dev.use_deterministic(t.deterministic)  # before any GPU work
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
    if t.tracin.use_tracin and t.tracin.validation.name == "separate":
        check_room(model.config, tokenizer, list(pd.read_parquet(VAL_FILE)["prompt"]), t.max_new_tokens, "train.max_new_tokens", str(VAL_FILE))
    ref_model = None  # with LoRA the reference is the policy with its adapters disabled
    if t.loss.kl_beta > 0 and not params.model.lora.r:
        ref_model = load_model(BASE_DIR, dtype).eval().requires_grad_(False)  # the policy's dtypes, buffers included
    # the rollout engine before the training engine: what it cannot run is refused before any work
    sampler = make_sampler(t.rollout.backend, model, tokenizer, batch_size=t.rollout_batch_size, settings=t.rollout,
                           model_dir=BASE_DIR, seed=params.seed)
    engine = build_engine(params, model, ds_config)
    if tracker:
        tracker.text(json.dumps(ds_config, indent=2), DEEPSPEED_CONFIG_ARTIFACT)
    weighting = LossWeighting(params, data, tokenizer)
    tracin = TracIn(params, engine.module, tokenizer, rewarder, sampler) if t.tracin.use_tracin else None
    key = broadcast_fingerprint(params, train_inputs(params))
    curve_keys = ((tracin.metric_keys if tracin else []) + (DYNAMIC_SAMPLING_KEYS if t.dynamic_sampling.enable else [])
                  + (SAMPLING_KEYS if t.rollout.backend != "hf" else []))
    record = Recorder(params, tracker, weighting, curve_keys)
    return Training(params, engine, tokenizer, data, rewarder, sampler, weighting, ref_model, tracin, record, key, bf16)


def train(params: Params, tracker: Tracker | None = None) -> dict[str, float]:
    t = params.train
    run = setup(params, tracker)
    start = run.record.resume(run.engine, run.key)
    bar = tqdm(desc="train", unit="step", dynamic_ncols=True, disable=not dist.is_rank0(), initial=start, total=t.steps)
    metrics: dict[str, float] = {}
    for cycle in cycles(params, start):
        began = time.perf_counter()
        steps = cycle_steps(params, cycle, start)
        rollouts = sample_cycle(run, cycle, steps[0])
        batch, selection = rollouts.batch, rollouts.selection
        for step in steps:  # ppo_epochs updates on the cycle's batch
            sums = update(params, run.engine, batch)
            metrics = (step_metrics(params, run.engine, sums, rollouts.sampled, batch, time.perf_counter() - began)
                       | rollouts.metrics | (selection.metrics if selection else {}))
            bar.update()
            bar.set_postfix(reward=f"{metrics['train/reward_mean']:.3f}", loss=f"{metrics['train/loss']:.4f}")
            run.record.step(step, metrics, batch, rollouts.sampled, selection)
            selection, began = None, time.perf_counter()  # TracIn's selection: with the cycle's first step only
        if checkpoint_due(params, cycle, step):
            run.record.checkpoint(run.engine, run.key, step)
    bar.close()

    with dist.gathered(run.engine):
        save_trained(run.engine, run.tokenizer, run.bf16, TRAINED_DIR)
    # No collective follows: rank 0 goes on alone, and the others leave. Writing and uploading a multi-GB model
    # to a slow store can outlast the process group's timeout, which a rank waiting in a barrier would hit.
    summary = run.record.finish(metrics)
    run.sampler.close()
    discard(wait=False)  # only now: the trained model is saved and every upload went through
    return summary
