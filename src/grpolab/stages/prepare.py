"""`prepare` stage: task data (generated or the user's verl parquet) and the tokenizer.

Eval, train and SFT prompts are disjoint: membership evaluation later compares train prompts
(members) with eval prompts (non-members), and the base model must have seen neither. The
validation split (TracIn's `separate` mode) is disjoint from all three.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pandas as pd

from grpolab.config import Params
from grpolab.data.schema import SOURCE, read_rl_files, read_sft_files, render_prompt, write_parquet
from grpolab.data.tasks import Problem, generate_arithmetic
from grpolab.data.tokenizer import encode_prompt, load_tokenizer, train_tokenizer
from grpolab.errors import DataError
from grpolab.runtime.fsutil import atomic_output
from grpolab.paths import EVAL_FILE, SFT_FILE, TOKENIZER_DIR, TRAIN_FILE, VAL_FILE

if TYPE_CHECKING:
    from grpolab.tracking import Tracker



def _rl_frame(problems: list[Problem], split: str, source: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt": [p.prompt for p in problems],
            "ground_truth": [p.answer for p in problems],
            "data_source": source,
            "extra_info": [{"split": split, "index": i} for i in range(len(problems))],
        }
    )


def _generated(params: Params) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    d = params.data
    rng = random.Random(params.seed)
    seen: set[str] = set()
    eval_problems = generate_arithmetic(d.num_eval, d.max_operand, d.operations, rng, seen)
    train_problems = generate_arithmetic(d.num_train, d.max_operand, d.operations, rng, seen)
    sft_problems = generate_arithmetic(d.num_sft, d.max_operand, d.operations, rng, seen, d.sft_carry_error_rate)
    # Drawn last, from the same stream: the other splits do not depend on the validation size.
    val_problems = generate_arithmetic(d.validation_size, d.max_operand, d.operations, rng, seen)
    sft = pd.DataFrame({"prompt": [p.prompt for p in sft_problems], "response": [p.completion for p in sft_problems]})
    frames = (_rl_frame(train_problems, "train", d.task), _rl_frame(eval_problems, "eval", d.task), sft)
    return (*frames, _rl_frame(val_problems, "val", d.task))


def _held_out(params: Params, train: pd.DataFrame, taken: set[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val): `data.num_val` distinct train prompts that are in no other split, picked by
    seed, move (with every row that repeats them) from train to the validation split."""
    size = params.data.validation_size
    candidates = sorted(set(train["prompt"].map(str)) - taken)
    if size > len(candidates) - 1:
        raise DataError(
            f"data.num_val: {size} validation prompts to hold out, but the train files have {len(candidates)} "
            "distinct prompts outside the eval and SFT sets (and train needs one): set it lower, or give data.val_files"
        )
    chosen = set(random.Random(params.seed).sample(candidates, size))
    moved = train["prompt"].map(str).isin(chosen)
    val = train[moved].reset_index(drop=True)
    val["extra_info"] = [{**info, "split": "val"} for info in val["extra_info"]]
    return train[~moved].reset_index(drop=True), val


def _check_disjoint(split: pd.DataFrame, name: str, others: dict[str, set[str]]) -> None:
    """Every prompt of `split` is in none of the `others` (their names -> prompts): else name the row."""
    for _, row in split.iterrows():
        for other, prompts in others.items():
            if row["prompt"] in prompts:
                info = row["extra_info"]
                where = f"{info.get('source_file', name)}: row {info.get('source_row', info['index'])}"
                raise DataError(f"{where}: prompt also appears in the {other} files; {other} and {name} prompts must be disjoint")


def _check_sft_disjoint(sft: pd.DataFrame, others: dict[str, set[str]]) -> None:
    """A user's SFT prompt may not be a train or eval prompt: SFT would make it a member before RL,
    which corrupts the membership baseline (and leaks eval answers)."""
    for prompt, where in zip(sft["prompt"], sft.get(SOURCE, [])):
        for other, prompts in others.items():
            if prompt in prompts:
                raise DataError(f"{where}: this SFT prompt is also a {other} prompt; SFT, train and eval prompts must be "
                                "disjoint (an SFT prompt is a member before RL, which corrupts the membership baseline)")


def _drop_long_prompts(frames: dict[str, pd.DataFrame], tokenizer, limit: int) -> tuple[dict[str, pd.DataFrame], int]:
    """Each split without its prompts longer than `limit` tokens, and how many rows went."""
    kept, dropped = {}, 0
    for name, frame in frames.items():
        short = frame["prompt"].map(lambda p: len(encode_prompt(tokenizer, p)) <= limit)
        kept[name] = frame[short].reset_index(drop=True)
        dropped += int((~short).sum())
        if len(frame) and not len(kept[name]):
            raise DataError(f"data.max_prompt_length: every {name} prompt is longer than {limit} tokens: raise it")
    return kept, dropped


def prepare(params: Params, tracker: Tracker | None = None) -> dict[str, int]:
    d = params.data
    # Read and validate everything the user brought before writing anything.
    if d.train_files:
        train = read_rl_files(d.train_files, "train")
        eval_ = read_rl_files(d.eval_files, "eval")
        sft = read_sft_files(d.sft_files) if d.sft_files else pd.DataFrame({"prompt": [], "response": []})
        val = read_rl_files(d.val_files, "val") if d.val_files else train.iloc[:0]
    else:
        train, eval_, sft, val = _generated(params)
        if d.sft_files:
            sft = read_sft_files(d.sft_files)

    if params.model.name_or_path:
        tokenizer = load_tokenizer(params.model.name_or_path)
    else:
        corpus = [*train["prompt"].map(str), *train["ground_truth"], *eval_["prompt"].map(str)]
        corpus += [f"{p}{r}" for p, r in zip(sft["prompt"].map(str), sft["response"])]
        tokenizer = train_tokenizer(corpus, params.model.vocab_size)

    for frame in (train, eval_, sft, val):
        frame["prompt"] = [render_prompt(p, tokenizer) for p in frame["prompt"]]
    dropped = 0
    if d.max_prompt_length:
        kept, dropped = _drop_long_prompts({"train": train, "eval": eval_, "val": val}, tokenizer, d.max_prompt_length)
        train, eval_, val = kept["train"], kept["eval"], kept["val"]
        print(f"prepare: dropped {dropped} prompts longer than data.max_prompt_length={d.max_prompt_length} tokens", flush=True)
    if d.train_files and d.validation_size:
        train, val = _held_out(params, train, set(eval_["prompt"]) | set(sft["prompt"]))
    _check_disjoint(eval_, "eval", {"train": set(train["prompt"])})
    _check_sft_disjoint(sft, {"train": set(train["prompt"]), "eval": set(eval_["prompt"])})
    sft = sft.drop(columns=[SOURCE], errors="ignore")
    _check_disjoint(val, "val", {"train": set(train["prompt"]), "eval": set(eval_["prompt"]), "SFT": set(sft["prompt"])})

    write_parquet(train, TRAIN_FILE)
    write_parquet(eval_, EVAL_FILE)
    write_parquet(sft, SFT_FILE)
    write_parquet(val, VAL_FILE)
    with atomic_output(TOKENIZER_DIR, directory=True) as tmp:
        tokenizer.save_pretrained(tmp)

    summary = {
        "data/num_train": len(train), "data/num_eval": len(eval_), "data/num_sft": len(sft), "data/num_val": len(val),
        "data/vocab_size": len(tokenizer), "data/num_dropped_long_prompts": dropped,
    }
    if tracker:
        tracker.dataset(train, "train", TRAIN_FILE, "train")
        tracker.dataset(eval_, "eval", EVAL_FILE, "eval")
        if len(sft):
            tracker.dataset(sft, "sft", SFT_FILE, "sft")
        if len(val):
            tracker.dataset(val, "val", VAL_FILE, "validation")
        tracker.artifacts(TOKENIZER_DIR, "tokenizer")
    return summary
