"""The `mia` stage: a membership score per train prompt under the base model (`mia.method`), turned
into the prompt weights that training reads (`extra_info.mia_weight` of data/train_weighted.parquet);
or the users' own precomputed weights, validated."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch

from grpolab.algos.mia_weights import normalize_scores
from grpolab.config import Params
from grpolab.data.schema import write_parquet
from grpolab.data.tokenizer import load_tokenizer
from grpolab.runtime.device import working_dtype
from grpolab.errors import DataError
from grpolab.mia.attack import load_reference, membership_scores
from grpolab.samplers import make_sampler
from grpolab.mia.roc import membership_roc
from grpolab.models import load_model
from grpolab.paths import BASE_DIR, EVAL_FILE, SCORES_FILE, TRAIN_FILE, WEIGHTED_TRAIN_FILE


def _precomputed_weights(train: pd.DataFrame) -> np.ndarray | None:
    """The users' own `extra_info.mia_weight`, validated; None when no row carries one."""
    has = [isinstance(x, dict) and x.get("mia_weight") is not None for x in train["extra_info"]]
    if not any(has):
        return None
    weights = []
    for has_weight, info in zip(has, train["extra_info"]):
        where = f"{info.get('source_file', TRAIN_FILE)}: row {info.get('source_row', info.get('index'))}"
        if not has_weight:
            raise DataError(f"{where}: extra_info.mia_weight is missing (other rows have one)")
        w = info["mia_weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 <= w <= 1:
            raise DataError(f"{where}: extra_info.mia_weight must be a finite number in [0, 1], got {w!r}")
        weights.append(float(w))
    return np.array(weights)


def mia(params: Params, tracker=None) -> dict[str, float]:
    m = params.mia
    train, eval_ = pd.read_parquet(TRAIN_FILE), pd.read_parquet(EVAL_FILE)
    if m.method == "precomputed":
        weights = _precomputed_weights(train)
        if weights is None:
            warnings.warn(f"mia.method=precomputed but no row of {TRAIN_FILE} has extra_info.mia_weight: "
                          "the train data goes on unweighted", stacklevel=1)
        train_scores = weights if weights is not None else np.full(len(train), np.nan)
        scored = pd.DataFrame({"split": "train", "prompt": train["prompt"], "score": train_scores})
        eval_scores = None
    else:
        if not (BASE_DIR / "config.json").is_file():
            raise FileNotFoundError(f"{BASE_DIR}: no base model (run the sft stage first)")
        dtype = working_dtype(params.model.dtype)
        model, tokenizer = load_model(BASE_DIR, dtype), load_tokenizer(str(BASE_DIR))
        reference = load_reference(m.reference_model, tokenizer, dtype) if m.method == "reference" else None
        prompts = [*train["prompt"], *eval_["prompt"]]
        sampler = make_sampler(params.train.rollout.backend, model, tokenizer, batch_size=m.batch_size,
                               settings=params.train.rollout, model_dir=BASE_DIR, seed=params.seed)
        all_scores = membership_scores(model, tokenizer, prompts, [m.method], k=m.k, max_new_tokens=m.max_new_tokens,
                                       batch_size=m.batch_size, sampler=sampler, reference=reference,
                                       chunk_tokens=params.model.logit_chunk_tokens)[m.method]
        sampler.close()
        train_scores, eval_scores = all_scores[: len(train)], all_scores[len(train) :]
        weights = normalize_scores(torch.from_numpy(train_scores), m.normalize).numpy()
        scored = pd.DataFrame({"split": ["train"] * len(train) + ["eval"] * len(eval_), "prompt": prompts, "score": all_scores})

    if weights is not None:
        train = train.copy()
        train["extra_info"] = [
            {**info, "mia_weight": float(w), "mia_score": float(s), "mia_method": m.method}
            for info, w, s in zip(train["extra_info"], weights, train_scores)
        ]
    write_parquet(train, WEIGHTED_TRAIN_FILE)
    write_parquet(scored, SCORES_FILE)

    summary: dict[str, float] = {"mia/num_scored": float(len(scored))}
    if weights is not None:
        summary.update({"mia/weight_mean": float(weights.mean()), "mia/weight_std": float(weights.std()),
                        "mia/weight_min": float(weights.min()), "mia/weight_max": float(weights.max())})
    if eval_scores is not None:
        # members of nothing yet (train, eval and SFT prompts are disjoint): ~0.5 is the sanity check
        summary["mia/base_train_vs_eval_auc"] = membership_roc(train_scores, eval_scores)["auc"]
    if tracker:
        tracker.dataset(train, "train_weighted", WEIGHTED_TRAIN_FILE, "train")
        tracker.artifacts(SCORES_FILE)
    return summary
