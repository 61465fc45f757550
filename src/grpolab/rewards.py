"""Reward functions: `fn(completion, ground_truth) -> float`, picked by name from REWARDS."""

from __future__ import annotations

import re
from collections.abc import Callable

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


REWARDS: dict[str, Callable[[str, str], float]] = {
    "answer_match": answer_match,
    "format": format_reward,
}
