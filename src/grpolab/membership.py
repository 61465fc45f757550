"""Membership scores of prompts under a model, the `mia` stage that turns them into prompt
weights, and the membership evaluation that `evaluate` runs on the base and trained models.

The scored text of a prompt is the model's own greedy completion of it, conditioned on the
prompt: GRPO trains on completions, never on prompt tokens, so that is where training leaves
its trace. One greedy generation and one forward pass per batch give every method at once
(`mia.scores`); `reference` adds one forward pass of the reference model.
"""

from __future__ import annotations

import math
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from grpolab.algos.mia_weights import normalize_scores
from grpolab.config import ConfigError, Params
from grpolab.data.prepare import EVAL_FILE, TRAIN_FILE
from grpolab.data.schema import DataError, write_parquet
from grpolab.data.tokenizer import encode_prompt, load_tokenizer
from grpolab.fsutil import atomic_output
from grpolab.mia import scores as S
from grpolab.mia.roc import membership_roc
from grpolab.device import working_dtype
from grpolab.models import load_model
from grpolab.rollout import completion_logprobs, completion_token_stats, decode, sample, stop_ids
from grpolab.sft import BASE_DIR

WEIGHTED_TRAIN_FILE = Path("data/train_weighted.parquet")
SCORES_FILE = Path("data/mia_scores.parquet")
ROC_DIR = Path("metrics/mia_roc")
FPR_GRID = np.linspace(0.0, 1.0, 101)


def load_reference(path: str, tokenizer, dtype: torch.dtype) -> torch.nn.Module:
    """The reference model of `mia.reference_model` (in `dtype`): its scores are compared token by token
    with the base model's, so it must read text with the same tokenizer."""
    reference_tokenizer = load_tokenizer(path, "mia.reference_model")
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"mia.reference_model: the tokenizer in {path} differs from the base model's ({len(reference_tokenizer)} vs "
            f"{len(tokenizer)} tokens, or other ids): a reference must share the base model's tokenizer"
        )
    return load_model(path, dtype).eval()


@torch.no_grad()
def membership_scores(
    model, tokenizer, prompts: list[str], methods: list[str], *, k: float, max_new_tokens: int,
    batch_size: int, reference=None,
) -> dict[str, np.ndarray]:
    """{method: scores [len(prompts)]}, higher = more likely a member of `model`'s training data."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rollout = sample(model, [encode_prompt(tokenizer, p) for p in chunk], max_new_tokens=max_new_tokens,
                         eos_ids=stop_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
        rows = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                "completion_ids": rollout.completion_ids, "mask": rollout.completion_mask}
        mask = rollout.completion_mask
        logp, mu, sigma = completion_token_stats(model, rows, S.token_statistics)  # fp32, [b, T] each
        for method in methods:
            if method == "loss":
                score = S.score_loss(logp, mask)
            elif method == "zlib":
                texts = decode(tokenizer, rollout)
                zbytes = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts])
                score = S.score_zlib(logp, mask, zbytes)
            elif method == "min_k":
                score = S.score_min_k(logp, mask, k)
            elif method == "min_k_plus_plus":
                score = S.score_min_k_plus_plus(logp, mu, sigma, mask, k)
            elif method == "reference":
                score = S.score_reference(logp, completion_logprobs(reference, rows)[0], mask)
            else:
                raise ValueError(f"unknown MIA method {method!r}; choose from {list(S.MIA_METHODS)}")
            out[method].append(score)
    return {m: torch.cat(v).double().numpy() if v else np.zeros(0) for m, v in out.items()}


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
        all_scores = membership_scores(model, tokenizer, prompts, [m.method], k=m.k, max_new_tokens=m.max_new_tokens,
                                       batch_size=m.batch_size, reference=reference)[m.method]
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


def membership_rocs(model, tokenizer, members: list[str], nonmembers: list[str], params: Params, reference=None) -> dict[str, dict]:
    """ROC of each of `eval.mia_methods` under `model`, members as positives (`mia.roc.membership_roc`)."""
    e, m = params.eval, params.mia
    if not e.mia_methods:
        return {}
    scores = membership_scores(model, tokenizer, members + nonmembers, list(e.mia_methods), k=m.k,
                               max_new_tokens=m.max_new_tokens, batch_size=m.batch_size, reference=reference)
    return {method: membership_roc(s[: len(members)], s[len(members) :]) for method, s in scores.items()}


def roc_metrics(rocs: dict[str, dict]) -> dict[str, float]:
    """`mia/<method>/auc`, `…/tpr_at_fpr_0.01`, `…/tpr_at_fpr_0.05` (un-prefixed by model)."""
    metrics = {}
    for method, roc in rocs.items():
        metrics[f"mia/{method}/auc"] = round(roc["auc"], 6)
        metrics[f"mia/{method}/tpr_at_fpr_0.01"] = round(roc["tpr@0.01"], 6)
        metrics[f"mia/{method}/tpr_at_fpr_0.05"] = round(roc["tpr@0.05"], 6)
    return metrics


def write_roc_curves(curves: dict[str, dict]) -> dict[str, pd.DataFrame]:
    """One CSV per method under metrics/mia_roc/: TPR of each model on a common FPR grid (a DVC plot)."""
    tables = {}
    for method, by_model in curves.items():
        table = pd.DataFrame({"fpr": FPR_GRID})
        for tag, roc in by_model.items():
            fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
            table[tag] = [float(tpr[fpr <= g].max()) for g in FPR_GRID]
        tables[method] = table
    with atomic_output(ROC_DIR, directory=True) as tmp:
        for method, table in tables.items():
            table.to_csv(Path(tmp) / f"{method}.csv", index=False)
    return tables


def roc_figure(curves: dict[str, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.2), squeeze=False)
    for ax, (method, by_model) in zip(axes[0], curves.items()):
        for tag, roc in by_model.items():
            ax.plot(roc["fpr"], roc["tpr"], label=f"{tag} (AUC {roc['auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set_title(method)
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
