"""Reward functions, picked by name from REWARDS and summed with the weights of `train.rewards`.

A reward function takes a RewardBatch and returns one float per completion. Adding one is a
function here plus a line in REWARDS.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The text inside the first `<answer>…</answer>`, stripped; None if there is none."""
    match = ANSWER_RE.search(completion)
    return match.group(1).strip() if match else None


def _normalise(text: str) -> str:
    text = text.strip().replace(",", "")
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def answer_match(completion: str, ground_truth: str) -> float:
    """1 if the answer tag holds the ground truth (numbers compared by value), else 0."""
    answer = extract_answer(completion)
    return float(answer is not None and _normalise(answer) == _normalise(ground_truth))


def format_reward(completion: str, ground_truth: str) -> float:
    """1 if the completion is exactly `<think>…</think><answer>…</answer>` (whitespace aside)."""
    return float(FORMAT_RE.match(completion) is not None)


class Judge:
    """A frozen sequence-classification model that scores prompt + completion (seed 004's judge).

    The score is sigmoid(logit) for a one-label head, else the probability of the last label.
    """

    def __init__(self, path: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from grpolab.config import ConfigError

        model, loading = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        if loading["missing_keys"]:  # transformers would start them at random, and the judge would score noise
            raise ConfigError(
                f"train.judge_model: {path} has no trained classification head ({', '.join(sorted(loading['missing_keys']))} "
                "missing): give a sequence-classification checkpoint (AutoModelForSequenceClassification.save_pretrained)"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[float]:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        logits = self.model(**batch).logits.float()
        scores = torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, -1]
        return scores.tolist()


@dataclass
class RewardBatch:
    prompts: list[str]
    completions: list[str]
    ground_truths: list[str]
    judge: Judge | None = None


def answer_match_reward(batch: RewardBatch) -> list[float]:
    return [answer_match(c, g) for c, g in zip(batch.completions, batch.ground_truths)]


def format_batch_reward(batch: RewardBatch) -> list[float]:
    return [format_reward(c, g) for c, g in zip(batch.completions, batch.ground_truths)]


def judge_reward(batch: RewardBatch) -> list[float]:
    if batch.judge is None:
        raise ValueError("train.rewards: the judge reward needs train.judge_model")
    return batch.judge([p + c for p, c in zip(batch.prompts, batch.completions)])


REWARDS: dict[str, Callable[[RewardBatch], list[float]]] = {
    "answer_match": answer_match_reward,
    "format": format_batch_reward,
    "judge": judge_reward,
}


def score(batch: RewardBatch, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total [B], {name: [B]}): each named reward and their weighted sum."""
    parts = {name: torch.tensor(REWARDS[name](batch), dtype=torch.float32) for name in weights}
    total = sum(weights[name] * parts[name] for name in weights)
    return total, parts
