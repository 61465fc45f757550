"""Dataset schema: reading a user's verl-format parquet, and the internal files the stages share.

verl's RL format (what users bring):
    prompt            str, or a list of chat messages [{"role": ..., "content": ...}, ...]
    reward_model      {"ground_truth": ..., "style": ...}   (or a top-level `ground_truth` column)
    data_source       str   (optional; defaults to the file's stem)
    extra_info        dict  (optional)

Internal RL schema (data/train.parquet, data/eval.parquet), what every later stage reads:
    prompt            str, the text fed to the model (chat messages rendered with the tokenizer)
    ground_truth      str
    data_source       str
    extra_info        struct with at least `index` and `split`, plus the user's keys

Internal SFT schema (data/sft.parquet): `prompt` str, `response` str.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from grpolab.errors import DataError
from grpolab.runtime.fsutil import atomic_output


def _read(path: str) -> pd.DataFrame:
    try:
        df = pq.read_table(path).to_pandas()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    if len(df) == 0:
        raise DataError(f"{path}: file has no rows")
    return df


def _as_messages(value: Any, where: str) -> list[dict[str, str]]:
    messages = list(value)
    if not messages:
        raise DataError(f"{where}: prompt is an empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: prompt message {i} must be a dict with string `role` and `content`")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))


def _prompt(value: Any, where: str) -> str | list[dict[str, str]]:
    if _is_null(value):
        raise DataError(f"{where}: prompt is missing (null)")
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: prompt is an empty string")
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return _as_messages(value, where)
    raise DataError(f"{where}: prompt must be a string or a list of chat messages, got {type(value).__name__}")


def _ground_truth(row: dict, columns: set[str], where: str) -> str:
    if "ground_truth" in columns:
        value = row["ground_truth"]
        column = "ground_truth"
    else:
        reward_model = row["reward_model"]
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise DataError(f"{where}: column reward_model must be a dict with a `ground_truth` key")
        value = reward_model["ground_truth"]
        column = "reward_model.ground_truth"
    if _is_null(value):
        raise DataError(f"{where}: {column} is missing (null)")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise DataError(f"{where}: {column} must be a string or a number, got {type(value).__name__}")
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        raise DataError(f"{where}: {column} is not a finite number")
    return str(value)


def read_rl_files(paths: list[str], split: str) -> pd.DataFrame:
    """Validate a user's verl-format parquet files and convert them to rows of the RL schema.

    `prompt` keeps the user's value (string or chat messages); `render_prompts` turns it into text.
    """
    rows = []
    for path in paths:
        df = _read(path)
        columns = set(df.columns)
        if "prompt" not in columns:
            raise DataError(f"{path}: missing column `prompt`")
        if "ground_truth" not in columns and "reward_model" not in columns:
            raise DataError(f"{path}: missing column `reward_model` (with `ground_truth`) or `ground_truth`")
        for i, row in enumerate(df.to_dict("records")):
            where = f"{path}: row {i}"
            source = row["data_source"] if "data_source" in columns else Path(path).stem
            if not isinstance(source, str):
                raise DataError(f"{where}: data_source must be a string, got {type(source).__name__}")
            extra = row["extra_info"] if "extra_info" in columns else None
            if extra is None:
                extra = {}
            if not isinstance(extra, dict):
                raise DataError(f"{where}: extra_info must be a dict, got {type(extra).__name__}")
            rows.append(
                {
                    "prompt": _prompt(row["prompt"], where),
                    "ground_truth": _ground_truth(row, columns, where),
                    "data_source": source,
                    "extra_info": {**extra, "split": split, "index": len(rows), "source_file": str(path), "source_row": i},
                }
            )
    return pd.DataFrame(rows)


SOURCE = "source"  # `<file>: row <i>` of a user's SFT row, for errors; not written out


def read_sft_files(paths: list[str]) -> pd.DataFrame:
    rows = []
    for path in paths:
        df = _read(path)
        for column in ("prompt", "response"):
            if column not in df.columns:
                raise DataError(f"{path}: missing column `{column}`")
        for i, (prompt, response) in enumerate(zip(df["prompt"], df["response"])):
            where = f"{path}: row {i}"
            prompt = _prompt(prompt, where)
            if not isinstance(response, str) or not response:
                raise DataError(f"{where}: response must be a non-empty string")
            rows.append({"prompt": prompt, "response": response, SOURCE: where})
    return pd.DataFrame(rows, columns=["prompt", "response", SOURCE])


def render_prompt(prompt: str | list[dict[str, str]], tokenizer) -> str:
    """The text the model sees: chat messages go through the tokenizer's chat template if it has one."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in prompt)


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_output(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
