"""`sft` stage: the base model. Build the tiny model (or load the user's checkpoint) and warm-start
it by supervised fine-tuning on the SFT set, loss on response tokens only, in micro-batches (gradient
accumulation) with the output head over the response tokens a chunk at a time (as the train stage)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pandas as pd
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from grpolab.config import Params
from grpolab.data.tokenizer import encode_prompt, encode_response, load_tokenizer
from grpolab.runtime.device import autocast, device, working_dtype
from grpolab.runtime.fsutil import atomic_write_text
from grpolab.logprobs import completion_logprobs
from grpolab.models import build_model, load_model, num_parameters, save_model
from grpolab.paths import BASE_DIR, SFT_FILE, SFT_LOSS_FILE, TOKENIZER_DIR
from grpolab.samplers.base import Rollout, left_pad, right_pad

if TYPE_CHECKING:
    from grpolab.tracking import Tracker

def _encode(sft: pd.DataFrame, tokenizer, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) of every row: the loss is on the response tokens only."""
    prompts, responses = [], []
    for i, (prompt, response) in enumerate(zip(sft["prompt"], sft["response"])):
        p, r = encode_prompt(tokenizer, prompt), encode_response(tokenizer, response)
        if len(p) + len(r) > max_length:
            raise ValueError(f"{SFT_FILE}: row {i}: {len(p) + len(r)} tokens exceed model.max_length={max_length}")
        prompts.append(p)
        responses.append(r)
    return prompts, responses


def _micro_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Rollout:
    """A micro-batch as the log-prob passes read one: prompts left-padded, responses (as completions) right-padded."""
    return Rollout(*left_pad(prompts, pad_id), *right_pad(responses, pad_id))


def sft_step_loss(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, micro_batch_size: int,
                  chunk_tokens: int | None, dtype: torch.dtype) -> float:
    """The mean negative log-likelihood of the step's response tokens, its gradient accumulated into `model`
    micro-batch by micro-batch (each micro-batch's share of the step's token mean); the output head over the
    response tokens only, `chunk_tokens` at a time, so no [rows, positions, vocabulary] tensor is formed."""
    tokens = sum(len(r) for r in responses)
    total = 0.0
    for start in range(0, len(prompts), micro_batch_size):
        micro = _micro_batch(prompts[start : start + micro_batch_size], responses[start : start + micro_batch_size], pad_id)
        with autocast(dtype):
            logp = completion_logprobs(model, micro, chunk_tokens=chunk_tokens)[0]
        loss = -(logp * micro.completion_mask).sum() / tokens
        loss.backward()
        total += loss.item()
    return total


def sft(params: Params, tracker: Tracker | None = None) -> dict[str, float]:
    p = params.sft
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    if params.model.name_or_path:
        model = load_model(params.model.name_or_path)  # fp32 weights: they train (under autocast when bf16)
    else:
        model = build_model(params.model, tokenizer, params.seed).to(device())
    dtype = working_dtype(params.model.dtype)
    max_length = getattr(model.config, "max_position_embeddings", None) or params.model.max_length
    data = pd.read_parquet(SFT_FILE)
    prompts, responses = _encode(data, tokenizer, max_length)

    summary: dict[str, float] = {"sft/num_parameters": num_parameters(model)}
    history: list[tuple[int, float]] = []
    if p.steps > 0:
        torch.manual_seed(params.seed)
        sampler = torch.Generator().manual_seed(params.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, weight_decay=p.weight_decay)
        schedule = get_cosine_schedule_with_warmup(optimizer, p.warmup_steps, p.steps)
        model.train()
        bar = tqdm(range(1, p.steps + 1), desc="sft", unit="step", dynamic_ncols=True)
        running = math.nan
        for step in bar:
            index = torch.randint(len(prompts), (p.batch_size,), generator=sampler).tolist()
            value = sft_step_loss(model, [prompts[i] for i in index], [responses[i] for i in index], tokenizer.pad_token_id,
                                  p.micro_batch_size or p.batch_size, params.model.logit_chunk_tokens, dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running = value if math.isnan(running) else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.3f}")
            history.append((step, value))
            if tracker and (step % p.log_every == 0 or step == p.steps):
                tracker.metrics({"sft/loss": value, "sft/grad_norm": float(grad_norm), "sft/lr": schedule.get_last_lr()[0]}, step=step)
        summary["sft/final_loss"] = sum(v for _, v in history[-10:]) / len(history[-10:])

    atomic_write_text(SFT_LOSS_FILE, "step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in history))
    save_model(model, tokenizer, BASE_DIR)
    if tracker:
        tracker.artifacts(BASE_DIR, "base_model")
    return summary
