"""Reward functions, picked by name from REWARDS and summed with the weights of `train.rewards.weights`.

A reward function takes a RewardBatch and returns one float per completion. Adding one is a
function here plus a line in REWARDS.

`auto` scores each row by its `data_source`, as verl's default scoring does: SOURCES routes a source
to one of the SCORERS, `(completion, ground_truth) -> float` (`train.rewards.reward_sources` adds or changes
routes). `reward_file` calls the user's own function
(`train.rewards.reward_file`, `train.rewards.reward_function`), with verl's signature
`(data_source, completion, ground_truth, extra_info) -> float`.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from grpolab.runtime.device import device, working_dtype
from grpolab.errors import ConfigError, RewardError
from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")  # config reads REWARDS' names in processes that need no torch

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
GSM8K_STRICT_RE = re.compile(r"#### (-?[0-9.,]+)")  # verl's gsm8k strict extraction
NUMBER_RE = re.compile(r"-?[0-9.,]+")
GSM8K_TAIL = 300  # verl scores the last 300 characters: a long completion cannot list every number


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


def gsm8k_answer(completion: str, extraction: str = "strict") -> str | None:
    """GSM8K's final answer, as verl extracts it from the completion's last 300 characters: `strict`, the
    number after the first `#### `; `flexible`, the last number anywhere. Commas and `$` dropped."""
    tail = completion[-GSM8K_TAIL:]
    if extraction == "strict":
        match = GSM8K_STRICT_RE.search(tail)
        found = match.group(1) if match else None
    else:
        found = next((n for n in reversed(NUMBER_RE.findall(tail)) if n not in ("", ".", ",")), None)
    return None if found is None else found.replace(",", "").replace("$", "")


def gsm8k_match(completion: str, ground_truth: str, extraction: str = "strict") -> float:
    """1 if the extracted final answer equals the ground truth (numbers compared by value), else 0."""
    answer = gsm8k_answer(completion, extraction)
    return float(answer is not None and _normalise(answer) == _normalise(ground_truth))


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def math_match(completion: str, ground_truth: str) -> float:
    """1 if the last `\\boxed{…}` of the completion is mathematically equal to the ground truth
    (math-verify: `\\frac{1}{2}` equals `0.5`), else 0."""
    from math_verify import parse, verify

    answer = last_boxed(completion)
    if answer is None:
        return 0.0
    gold = last_boxed(ground_truth) or ground_truth  # MATH's solutions hold their answer boxed
    return float(verify(parse(f"${gold}$"), parse(f"${answer}$")))


SCORERS: dict[str, Callable[[str, str], float]] = {
    "answer_match": answer_match,  # the `answer_match` reward's scorer
    "gsm8k": gsm8k_match,
    "gsm8k_flexible": lambda completion, truth: gsm8k_match(completion, truth, "flexible"),
    "math": math_match,
}
# data_source -> scorer name: what `auto` routes each row to (verl's source names).
SOURCES: dict[str, str] = {
    "arithmetic": "answer_match",  # grpolab's generated task (`data.task`)
    "openai/gsm8k": "gsm8k",
    "lighteval/MATH": "math",
    "DigitalLearningGmbH/MATH-lighteval": "math",
    "HuggingFaceH4/MATH-500": "math",
}


def check_sources(rows: list[dict], routes: dict[str, str], what: str) -> None:
    """Every row's data_source has a route: else name the first row without (its file and row) and the known sources."""
    for row in rows:
        if row["data_source"] not in routes:
            raise RewardError(
                f"{row_name(row, what)}: data_source {row['data_source']!r} has no scorer for the `auto` reward "
                f"(known: {', '.join(routes)}); route it with train.rewards.reward_sources (scorers: {', '.join(SCORERS)}), "
                "or score it with your own train.rewards.reward_file"
            )


def row_name(row: dict, what: str) -> str:
    """`<user file>: row <i>` for a row of the user's files, else `<what>: row <index>`."""
    info = row.get("extra_info") or {}
    if "source_file" in info:
        return f"{info['source_file']}: row {info['source_row']}"
    return f"{what}: row {info.get('index', '?')}"


class RewardFile:
    """The user's reward function `function` in the Python file `path`, loaded once; every error names the file."""

    def __init__(self, path: str, function: str):
        self.where = f"train.rewards.reward_file: {path}"
        spec = importlib.util.spec_from_file_location(f"grpolab_reward_file_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise RewardError(f"{self.where}: loading it raised {type(exc).__name__}: {exc}") from exc
        self.function = getattr(module, function, None)
        if not callable(self.function):
            raise RewardError(f"{self.where}: no function {function!r} in it (train.rewards.reward_function)")
        try:
            inspect.signature(self.function).bind("source", "completion", "truth", {})
        except TypeError:
            raise RewardError(f"{self.where}: {function}{inspect.signature(self.function)} cannot be called as "
                              f"{function}(data_source, completion, ground_truth, extra_info)") from None
        self.name = function

    def __call__(self, row: dict, completion: str, what: str) -> float:
        try:
            value = self.function(row["data_source"], completion, row["ground_truth"], dict(row.get("extra_info") or {}))
        except Exception as exc:
            raise RewardError(f"{self.where}: {self.name} raised {type(exc).__name__}: {exc} on {row_name(row, what)}") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardError(f"{self.where}: {self.name} returned {value!r} on {row_name(row, what)}; it must return a finite number")
        return float(value)


@dataclass
class RewardBatch:
    """One completion per row; `rows` are the data rows (prompt, ground_truth, data_source, extra_info)."""

    rows: list[dict]
    completions: list[str]
    what: str = "data"  # the file the rows came from, for errors
    routes: dict[str, str] = field(default_factory=lambda: dict(SOURCES))  # `auto`: data_source -> scorer
    judge: Judge | None = None
    reward_file: RewardFile | None = None

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]

    @property
    def ground_truths(self) -> list[str]:
        return [r["ground_truth"] for r in self.rows]

    @property
    def data_sources(self) -> list[str]:
        return [r["data_source"] for r in self.rows]


class Judge:
    """A frozen sequence-classification model that scores prompt + completion (seed 004's judge).

    The score is sigmoid(logit) for a one-label head, else the probability of the last label. Texts are
    scored `batch_size` at a time (the batch's activations bound memory, as the rollouts' do), each cut
    from the left to the judge's context: the completion, which the judge is there to score, is at the end.
    """

    def __init__(self, path: str, dtype: torch.dtype | None = None, batch_size: int = 256):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model, loading = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, dtype=dtype or torch.float32)
        if loading["missing_keys"]:  # transformers would start them at random, and the judge would score noise
            raise ConfigError(
                f"train.rewards.judge_model: {path} has no trained classification head ({', '.join(sorted(loading['missing_keys']))} "
                "missing): give a sequence-classification checkpoint (AutoModelForSequenceClassification.save_pretrained)"
            )
        self.model = model.eval().requires_grad_(False).to(device())  # this process's own GPU on a multi-GPU node
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"
        self.max_length = context_length(self.model.config, self.tokenizer)
        self.batch_size = batch_size

    def __call__(self, texts: list[str]) -> list[float]:
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.max_length).to(self.model.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            scores += (torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, -1]).tolist()
        return scores


def context_length(config, tokenizer) -> int | None:
    """The longest input a model takes: its position table's size or its tokenizer's declared limit, the smaller
    (a tokenizer saved without one declares ~1e30; a model without a position table, None)."""
    limits = [n for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
              if isinstance(n, int) and n < 10**9]
    return min(limits, default=None)


def answer_match_reward(batch: RewardBatch) -> list[float]:
    return [answer_match(c, g) for c, g in zip(batch.completions, batch.ground_truths)]


def format_batch_reward(batch: RewardBatch) -> list[float]:
    return [format_reward(c, g) for c, g in zip(batch.completions, batch.ground_truths)]


def judge_reward(batch: RewardBatch) -> list[float]:
    if batch.judge is None:
        raise ValueError("train.rewards.weights: the judge reward needs train.rewards.judge_model")
    return batch.judge([p + c for p, c in zip(batch.prompts, batch.completions)])


def auto_reward(batch: RewardBatch) -> list[float]:
    check_sources(batch.rows, batch.routes, batch.what)
    return [SCORERS[batch.routes[r["data_source"]]](c, r["ground_truth"]) for r, c in zip(batch.rows, batch.completions)]


def reward_file_reward(batch: RewardBatch) -> list[float]:
    if batch.reward_file is None:
        raise ValueError("train.rewards.weights: the reward_file reward needs train.rewards.reward_file")
    return [batch.reward_file(r, c, batch.what) for r, c in zip(batch.rows, batch.completions)]


REWARDS: dict[str, Callable[[RewardBatch], list[float]]] = {
    "answer_match": answer_match_reward,
    "format": format_batch_reward,
    "judge": judge_reward,
    "auto": auto_reward,
    "reward_file": reward_file_reward,
}


def score(batch: RewardBatch, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total [B], {name: [B]}): each named reward and their weighted sum."""
    parts = {name: torch.tensor(REWARDS[name](batch), dtype=torch.float32) for name in weights}
    total = sum(weights[name] * parts[name] for name in weights)
    return total, parts


class Rewarder:
    """The rewards of `train.rewards.weights` with what they need (the judge, the user's reward file, `auto`'s routes),
    loaded once per stage."""

    def __init__(self, params, judge: bool = True):
        t = params.train
        self.weights = t.rewards.weights
        self.routes = {**SOURCES, **t.rewards.reward_sources}
        self.judge = (Judge(t.rewards.judge_model, working_dtype(params.model.dtype), t.rewards.judge_batch_size or t.rollout_batch_size)
                      if judge and "judge" in self.weights else None)
        self.reward_file = RewardFile(t.rewards.reward_file, t.rewards.reward_function) if t.rewards.reward_file else None

    def check(self, rows: list[dict], what: str) -> None:
        """Before any work: every row can be scored (`auto` knows its data_source)."""
        if "auto" in self.weights or self.reward_file is None:  # eval's success routes by source too
            check_sources(rows, self.routes, what)

    def __call__(self, rows: list[dict], completions: list[str], what: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [B], {name: [B]}) of one completion per row."""
        return score(RewardBatch(rows, completions, what, self.routes, self.judge, self.reward_file), self.weights)

    def success(self, rows: list[dict], completions: list[str], what: str) -> list[float]:
        """Eval's success of one completion per row: your reward file's score when you give one, else the
        row's data_source scorer (`auto`'s routing; for the generated task, the answer tag's match)."""
        batch = RewardBatch(rows, completions, what, self.routes, reward_file=self.reward_file)
        return reward_file_reward(batch) if self.reward_file else auto_reward(batch)


def source_means(sources: list[str], rewards: torch.Tensor) -> dict[str, float]:
    """{data_source: mean reward of its rows}. rewards: [B], aligned with `sources`."""
    out: dict[str, list[float]] = {}
    for source, value in zip(sources, rewards.tolist()):
        out.setdefault(source, []).append(value)
    return {source: sum(v) / len(v) for source, v in sorted(out.items())}
