"""Binary classification metrics from sklearn. Pneumonia (label 1) is the positive class."""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm


def binary_metrics(labels: np.ndarray, prob_pneumonia: np.ndarray, threshold: float = 0.5,
                   prefix: str = "") -> dict[str, float]:
    """acc, balanced acc, AUC, F1, sensitivity (pneumonia recall), specificity (normal recall)."""
    labels = np.asarray(labels).astype(int)
    prob = np.asarray(prob_pneumonia, dtype=np.float64)
    pred = (prob >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    both_classes = len(np.unique(labels)) == 2
    out = {
        "acc": skm.accuracy_score(labels, pred),
        "balanced_acc": skm.balanced_accuracy_score(labels, pred) if both_classes else math.nan,
        "auc": skm.roc_auc_score(labels, prob) if both_classes else math.nan,
        "f1": skm.f1_score(labels, pred, zero_division=0),
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
    }
    return {f"{prefix}{k}": float(v) for k, v in out.items()}
