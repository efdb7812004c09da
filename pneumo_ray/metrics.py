"""Binary classification metrics from sklearn. Pneumonia (label 1) is the positive class."""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn import metrics as skm

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- decision threshold


def youden_threshold(labels: np.ndarray, prob: np.ndarray) -> float:
    """The threshold that maximises Youden's J = sensitivity + specificity - 1 (ties: the highest)."""
    fpr, tpr, thresholds = skm.roc_curve(labels, prob)
    return float(min(thresholds[int(np.argmax(tpr - fpr))], 1.0))  # roc_curve's first threshold is +inf


def sensitivity_threshold(labels: np.ndarray, prob: np.ndarray, min_sensitivity: float) -> float:
    """The highest threshold whose sensitivity is still >= ``min_sensitivity``: every lower one meets the
    floor too, and this one keeps the most specificity."""
    _, tpr, thresholds = skm.roc_curve(labels, prob, drop_intermediate=False)
    return float(min(thresholds[int(np.flatnonzero(tpr >= min_sensitivity)[0])], 1.0))


# --------------------------------------------------------------------------- uncertainty and calibration

CI_METRICS = ("auc", "acc", "sensitivity", "specificity", "f1")


def bootstrap_ci(labels: np.ndarray, prob: np.ndarray, threshold: float, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of CI_METRICS from a stratified bootstrap: each resample draws the
    normals from the normals and the pneumonias from the pneumonias, with replacement, so it keeps the
    split's class counts (a resample without normals would have no specificity).

    All resamples are scored at once, as arrays: calling sklearn's metrics once per resample, a thousand
    times per row and threshold, would dominate the leaderboard's time. AUC is the Mann-Whitney U
    statistic / (n_pos x n_neg) (scipy).
    """
    from scipy.stats import mannwhitneyu

    labels = np.asarray(labels).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    rng = np.random.default_rng(seed)
    neg, pos = (prob[rng.choice(np.flatnonzero(labels == c), size=(n_resamples, int((labels == c).sum())))]
                for c in (0, 1))
    tp, fn = (pos >= threshold).sum(1), (pos < threshold).sum(1)
    tn, fp = (neg < threshold).sum(1), (neg >= threshold).sum(1)
    samples = {
        "acc": (tp + tn) / len(labels),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "f1": np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(n_resamples), where=2 * tp + fp + fn > 0),
        "auc": mannwhitneyu(pos, neg, axis=1, method="asymptotic").statistic / (pos.shape[1] * neg.shape[1]),
    }
    tail = 100 * (1 - level) / 2
    return {m: (float(np.percentile(samples[m], tail)), float(np.percentile(samples[m], 100 - tail)))
            for m in CI_METRICS}


def paired_auc_difference(labels: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray,
                          level: float = 0.95) -> tuple[float, float, float, float]:
    """AUC(a) - AUC(b) of two models scored on the same images, with DeLong's test: (difference, CI low,
    CI high, two-sided p-value).

    DeLong, DeLong & Clarke-Pearson (1988), in the fast form of Sun & Xu (2014). It is exact for the AUC,
    which is a Mann-Whitney statistic, and its variance of the difference accounts for the two models'
    errors being correlated on the same images, which comparing their separate intervals does not. It
    needs no resampling, so it is the same number on every run. Identical predictions give 0 and p = 1.
    """
    from scipy.stats import norm, rankdata

    labels = np.asarray(labels).astype(int)
    pos, neg = labels == 1, labels == 0
    m, n = int(pos.sum()), int(neg.sum())
    aucs, v10, v01 = [], [], []
    for prob in (np.asarray(prob_a, dtype=np.float64), np.asarray(prob_b, dtype=np.float64)):
        x, y = prob[pos], prob[neg]
        ranks = rankdata(np.concatenate([x, y]))  # mid-ranks: ties count a half
        aucs.append((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((ranks[:m] - rankdata(x)) / n)  # per pneumonia image: share of normals scored below it
        v01.append(1 - (ranks[m:] - rankdata(y)) / m)  # per normal image: share of pneumonias scored above it
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    difference = float(aucs[0] - aucs[1])
    if variance <= 1e-15:  # the two rank the images alike: no evidence of any difference
        return difference, difference, difference, 1.0
    se = math.sqrt(variance)
    z = norm.ppf(0.5 + level / 2)
    return difference, difference - z * se, difference + z * se, float(2 * norm.sf(abs(difference) / se))


def expected_calibration_error(labels: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the pneumonia probability: sum over equal-width bins of |observed rate - mean probability|,
    weighted by the bin's share of images. Bins as in sklearn's calibration_curve (which gives no ECE)."""
    labels = np.asarray(labels, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    bins = np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], prob)
    gap = np.bincount(bins, weights=labels, minlength=n_bins) - np.bincount(bins, weights=prob, minlength=n_bins)
    return float(np.abs(gap).sum() / len(prob))


def fit_temperature(labels: np.ndarray, margin: np.ndarray) -> float:
    """Temperature T minimising the log loss of sigmoid(margin / T), where margin = logit_pneumonia -
    logit_normal: Guo et al. 2017's temperature scaling for two classes. Fitted on val only."""
    from scipy.optimize import minimize_scalar
    from scipy.special import expit

    labels = np.asarray(labels).astype(int)
    margin = np.asarray(margin, dtype=np.float64)
    def loss(log_t: float) -> float:
        return skm.log_loss(labels, expit(margin / np.exp(log_t)), labels=[0, 1])

    low, high = -4.0, 4.0  # log T: T in [0.018, 55]
    fit = minimize_scalar(loss, bounds=(low, high), method="bounded")
    if min(loss(low), loss(high)) <= fit.fun + 1e-9:
        # At a bound the log loss was still falling: val is separated perfectly (or never), and a tiny T would make
        # every test probability 0 or 1. No temperature is better than that one.
        log.warning("temperature scaling: no interior optimum on val (T -> %.3g); using T = 1", np.exp(fit.x))
        return 1.0
    return float(np.exp(fit.x))


def decision_threshold(val_y: np.ndarray, val_prob: np.ndarray, lb) -> float:
    """leaderboard.threshold's rule, applied on val: Youden's J, or the screening point."""
    if lb.threshold == "youden":
        return youden_threshold(val_y, val_prob)
    return sensitivity_threshold(val_y, val_prob, lb.min_sensitivity)
