"""How well scores separate members from non-members: ROC curve, AUC, TPR at a fixed FPR."""

from __future__ import annotations

import numpy as np


def membership_roc(member_scores: np.ndarray, nonmember_scores: np.ndarray, fprs: tuple[float, ...] = (0.01, 0.05)) -> dict:
    """{"auc", "tpr@<fpr>" for each fpr, "fpr": [...], "tpr": [...]} with members as positives.

    TPR at FPR f is the best TPR among thresholds whose FPR is at most f."""
    from sklearn.metrics import roc_auc_score, roc_curve  # scikit-learn loads with the stages that score ROCs only

    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    scores = np.r_[member_scores, nonmember_scores].astype(np.float64)
    fpr, tpr, _ = roc_curve(labels, scores)
    out = {"auc": float(roc_auc_score(labels, scores)), "fpr": fpr.tolist(), "tpr": tpr.tolist()}
    for f in fprs:
        out[f"tpr@{f:g}"] = float(tpr[fpr <= f].max())
    return out
