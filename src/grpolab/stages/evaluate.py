"""`evaluate` stage: greedy and sampled completions on the eval prompts, scored by answer match
and format, and membership attacks (train prompts vs eval prompts), for the base and the trained
model. Its metrics (namespaced keys) are its headline, which `stages.run_stage` writes to
metrics/eval.json; it writes the sample completions and the ROC curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from transformers import AutoConfig

from grpolab.config import Params
from grpolab.data.tokenizer import load_tokenizer
from grpolab.runtime.device import working_dtype
from grpolab.runtime.fsutil import atomic_output, atomic_write_text
from grpolab.mia.attack import load_reference, membership_scores
from grpolab.mia.roc import membership_roc
from grpolab.models import load_model
from grpolab.paths import BASE_DIR, EVAL_FILE, ROC_DIR, SAMPLES_FILE, TRAIN_FILE, TRAINED_DIR
from grpolab.rewards import Rewarder, format_reward
from grpolab.samplers import Completions, Sampler, check_room, generate, make_sampler

FPR_GRID = np.linspace(0.0, 1.0, 101)


def score(completions: Completions, rows: list[dict], rewarder: Rewarder) -> dict[str, np.ndarray]:
    """Per-completion success, format and length; `rows` (eval data rows) aligned with the completions."""
    return {
        "success": np.array(rewarder.success(rows, completions.texts, str(EVAL_FILE))),
        "format": np.array([format_reward(c, r["ground_truth"]) for c, r in zip(completions.texts, rows)]),
        "length": np.array(completions.lengths, dtype=float),
    }


def evaluate_model(sampler: Sampler, tokenizer, eval_data: pd.DataFrame, params: Params, rewarder: Rewarder) -> tuple[dict[str, float], list[dict]]:
    """Metrics (un-prefixed keys) and per-prompt sample rows for one model, its completions from `sampler`."""
    e = params.eval
    prompts, truths = eval_data["prompt"].tolist(), eval_data["ground_truth"].tolist()
    rows = eval_data.to_dict("records")
    greedy = generate(sampler, tokenizer, prompts, max_new_tokens=e.max_new_tokens)
    sampled = generate(
        sampler, tokenizer, prompts, max_new_tokens=e.max_new_tokens, n_per_prompt=e.num_samples,
        do_sample=True, temperature=e.temperature, top_p=e.top_p, seed=params.seed,
    )
    g = score(greedy, rows, rewarder)
    s = score(sampled, [r for r in rows for _ in range(e.num_samples)], rewarder)
    metrics = {
        "success_rate": g["success"].mean(),
        "format_rate": g["format"].mean(),
        "completion_length": g["length"].mean(),
        "sampled/success_rate": s["success"].mean(),
        "sampled/format_rate": s["format"].mean(),
        "sampled/completion_length": s["length"].mean(),
        f"sampled/pass_at_{e.num_samples}": s["success"].reshape(len(prompts), e.num_samples).max(axis=1).mean(),
    }
    samples = [
        {
            "prompt": prompts[i],
            "ground_truth": truths[i],
            "greedy": greedy.texts[i],
            "greedy_success": float(g["success"][i]),
            "sampled": sampled.texts[i * e.num_samples],
            "sampled_success": float(s["success"][i * e.num_samples]),
        }
        for i in range(min(e.num_logged_samples, len(prompts)))
    ]
    return {k: round(float(v), 6) for k, v in metrics.items()}, samples


def membership_rocs(model, tokenizer, members: list[str], nonmembers: list[str], params: Params, sampler: Sampler,
                    reference=None) -> dict[str, dict]:
    """ROC of each of `eval.mia_methods` under `model`, members as positives (`mia.roc.membership_roc`)."""
    e, m = params.eval, params.mia
    if not e.mia_methods:
        return {}
    scores = membership_scores(model, tokenizer, members + nonmembers, list(e.mia_methods), k=m.k,
                               max_new_tokens=m.max_new_tokens, batch_size=m.batch_size, sampler=sampler, reference=reference,
                               chunk_tokens=params.model.logit_chunk_tokens)
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


def evaluate(params: Params, tracker=None) -> dict[str, float]:
    eval_data = pd.read_parquet(EVAL_FILE)
    # membership: train prompts are the members, eval prompts the non-members
    members, nonmembers = pd.read_parquet(TRAIN_FILE)["prompt"].tolist(), eval_data["prompt"].tolist()
    rewarder = Rewarder(params, judge=False)  # success is the row's scorer or your reward file
    rewarder.check(eval_data.to_dict("records"), str(EVAL_FILE))
    base_tokenizer = load_tokenizer(str(BASE_DIR))
    check_room(AutoConfig.from_pretrained(BASE_DIR), base_tokenizer, eval_data["prompt"].tolist(), params.eval.max_new_tokens,
               "eval.max_new_tokens", str(EVAL_FILE))  # before the first generation
    dtype = working_dtype(params.model.dtype)
    reference = load_reference(params.mia.reference_model, base_tokenizer, dtype) if "reference" in params.eval.mia_methods else None
    metrics: dict[str, float] = {}
    sample_rows: list[dict] = []
    curves: dict[str, dict] = {}  # method -> model -> ROC
    for tag, model_dir in {"base": BASE_DIR, "trained": TRAINED_DIR}.items():
        model, tokenizer = load_model(model_dir, dtype), load_tokenizer(str(model_dir))
        sampler = make_sampler(params.train.rollout.backend, model, tokenizer, batch_size=params.eval.batch_size,
                               settings=params.train.rollout, model_dir=model_dir, seed=params.seed)
        model_metrics, samples = evaluate_model(sampler, tokenizer, eval_data, params, rewarder)
        rocs = membership_rocs(model, tokenizer, members, nonmembers, params, sampler, reference)
        sampler.close()
        model_metrics.update(roc_metrics(rocs))
        for method, roc in rocs.items():
            curves.setdefault(method, {})[tag] = roc
        metrics.update({f"{tag}/{k}": v for k, v in model_metrics.items()})
        sample_rows += [{"model": tag, **row} for row in samples]
    write_roc_curves(curves)

    atomic_write_text(SAMPLES_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in sample_rows))
    if tracker:
        tracker.table(pd.DataFrame(sample_rows), "eval_samples.json")
        if curves:
            tracker.figure(roc_figure(curves), "mia_roc.png")
            tracker.artifacts(ROC_DIR, "mia_roc")
    return metrics
