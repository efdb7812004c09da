"""Top-k trials by the val selection metric, each evaluated once on the test split, plus their ensemble.

This is the only place the test split is read, and it runs after the search has
finished: no test number can influence which trial is kept. Everything that is
chosen (the decision threshold, the temperature) is chosen on val, then applied
to test. Each test metric comes with a stratified-bootstrap 95% interval.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np

from pneumo_ray import storage
from pneumo_ray.checkpoints import (
    best_copy,
    best_per_trial,
    load_members,
    trials_that_trained,
)
from pneumo_ray.config import Config, LeaderboardConfig
from pneumo_ray.data import CLASS_NAMES, Splits
from pneumo_ray.errors import NothingToRank
from pneumo_ray.evaluate import kept_probabilities, selection_labels
from pneumo_ray.layout import (
    BEST_DIR,
    CHECKPOINT_GLOB,
    EVALUATION_FILE,
    LEADERBOARD_CSV,
    LEADERBOARD_JSON,
    LEADERBOARD_MD,
    PREDICTIONS_FILE,
    TRAIN_RUNS,
    TRIAL_ERROR_FILE,
)
from pneumo_ray.metrics import (
    CI_METRICS,
    binary_metrics,
    bootstrap_ci,
    decision_threshold,
    expected_calibration_error,
    paired_auc_difference,
)
from pneumo_ray.repeats import rank_on_repeats, runs_table, summarize_runs

HYPERPARAMS = ("optimizer", "lr", "weight_decay", "batch_size", "class_weighting", "freeze_depth", "head_dropout",
               "label_smoothing", "rotation_deg", "crop_scale", "epochs")
ENSEMBLE = "ensemble"  # the ensemble row's label; its rank is None, since it is no trial
HALF = "@0.5"  # suffix of the metrics at the naive 0.5 threshold


def is_ensemble(row: dict) -> bool:
    return row["row"] == ENSEMBLE


def trial_rows(rows: list[dict]) -> list[dict]:
    """The leaderboard's ranked trials, without its ensemble row."""
    return [r for r in rows if not is_ensemble(r)]


def write_leaderboard(exp_dir: Path, cfg: Config, splits: Splits) -> list[dict]:
    """Rank the kept trials, copy their checkpoints to best/, score them and their ensemble on test."""
    metric, lb = cfg.search.metric, cfg.leaderboard
    top = best_per_trial(exp_dir, metric)[: lb.top_k]
    if top and lb.repeats:  # the same configurations, ranked on their mean over seeds
        top = rank_on_repeats(top, exp_dir, metric)
    if not top:
        trained = trials_that_trained(exp_dir)
        where = cfg.experiment_uri if storage.is_remote(cfg.experiment_uri) else str(exp_dir)
        if trained:  # the checkpoints went somewhere else, or were deleted: say where they should be
            raise NothingToRank(f"{trained} trial(s) reported epochs but no checkpoint was found under "
                                f"{storage.join(where, TRAIN_RUNS)}/*/{CHECKPOINT_GLOB} or {where}/*/{CHECKPOINT_GLOB}")
        raise NothingToRank(f"no trial finished an epoch, so there is nothing to rank; each failed trial's "
                            f"reason is in {where}/*/{TRIAL_ERROR_FILE}")
    keep_names = {best_copy(exp_dir, rank, c["trial_id"]).name for rank, c in enumerate(top, start=1)}
    for stale in (exp_dir / BEST_DIR).glob("rank*_*"):  # copies from an earlier ranking (a resume, a report re-run)
        if stale.name not in keep_names:
            shutil.rmtree(stale)
    rows, probs, runs, val_y = [], {}, {}, selection_labels(splits)
    stopped = storage.last_results(exp_dir)
    for rank, cand in enumerate(top, start=1):
        meta = cand["meta"]
        keep = best_copy(exp_dir, rank, cand["trial_id"])
        if keep.exists():  # a resumed sweep rebuilds the leaderboard: a fresh copy of the same checkpoint
            shutil.rmtree(keep)
        shutil.copytree(cand["checkpoint_dir"], keep)
        if meta.get("cv_folds", 0) != splits.cv_folds:
            raise NothingToRank(f"{cand['checkpoint_dir']}: trained with data.cv_folds {meta.get('cv_folds', 0)}, "
                                f"but the data was split into {splits.cv_folds}; report with the experiment's own "
                                "config")
        temperature, *probs[str(rank)] = kept_probabilities(load_members(keep, meta), splits, cfg)
        # row: the label each output knows the row by (predictions.npz, evaluation.json, the report)
        row = {"row": str(rank), "rank": rank, "trial_id": cand["trial_id"], "model": meta["model"]}
        row.update({h: meta["params"].get(h) for h in HYPERPARAMS})
        row.update({"epoch": meta["metrics"]["epoch"], metric: meta["metrics"][metric], "temperature": temperature})
        last = stopped.get(cand["trial_id"], {})  # where the trial stopped: its planned end, ASHA, early stopping
        row.update({"last_epoch": last.get("epoch"), "stopped_early": True if last.get("early_stopped") else None})
        if lb.repeats:
            summary, runs[str(rank)] = summarize_runs(cand, tuple(probs[str(rank)]), splits, cfg)
            row.update(summary)
        # Where the copy lives for the user: the bucket for a cloud experiment, not this machine's mirror.
        row["checkpoint"] = storage.join(cfg.experiment_uri, BEST_DIR, keep.name) if storage.is_remote(
            cfg.experiment_uri) else str(keep)
        rows.append(row)
    if lb.ensemble and len(rows) >= 2:
        probs[ENSEMBLE] = [np.mean([p[i] for p in probs.values()], axis=0) for i in (0, 1)]  # val, test
        val_metrics = binary_metrics(val_y, probs[ENSEMBLE][0], prefix="val_")  # no val_loss: stays empty
        rows.append({**dict.fromkeys(rows[0]), "row": ENSEMBLE, "trial_id": "+".join(r["trial_id"] for r in rows),
                     "model": f"mean of top {len(rows)}", metric: val_metrics.get(metric), "checkpoint": ""})
    details = {}
    for row in rows:
        summary, details[row["row"]] = score(val_y, probs[row["row"]][0], splits.test_y,
                                             probs[row["row"]][1], lb, cfg.experiment.seed)
        summary.update(compare_with_first(probs[row["row"]], probs["1"], val_y, splits.test_y))
        checkpoint = row.pop("checkpoint")
        row.update(summary, checkpoint=checkpoint)  # checkpoint stays the last column
        if row["row"] in runs:  # leaderboard.repeats: each metric run by run (the search's run first)
            details[row["row"]]["runs"] = runs[row["row"]]
    settings = {"selection_metric": metric, "threshold_rule": lb.threshold, "min_sensitivity": lb.min_sensitivity,
                "bootstrap_resamples": lb.bootstrap_resamples, "bootstrap_seed": cfg.experiment.seed,
                "confidence_level": 0.95, "flip_tta": lb.flip_tta, "temperature_scaling": lb.temperature_scaling,
                "data_source": cfg.data.source,
                # predict makes new images square the way the training images were made: MedMNIST cropped them
                "resize": "crop" if cfg.data.source in ("medmnist", "npz") else cfg.data.resize,
                "cv_folds": splits.cv_folds}  # > 0: "val" is out-of-fold over train+val, test the fold-models' mean
    (exp_dir / EVALUATION_FILE).write_text(json.dumps({"settings": settings, "rows": details}, indent=1))
    np.savez(exp_dir / PREDICTIONS_FILE, val_y=val_y, test_y=splits.test_y,
             **{f"{split}_{key}": p[i] for key, p in probs.items() for i, split in enumerate(("val", "test"))})
    save_rows(exp_dir, rows, settings)
    return rows


def compare_with_first(row_probs: list, first_probs: list, val_y: np.ndarray, test_y: np.ndarray) -> dict:
    """The row's AUC minus rank 1's on the same val images and the same test images, each with its 95%
    interval and p-value from DeLong's paired test (``<split>_auc_vs_1``, ``_lo``, ``_hi``, ``_p``)."""
    out = {}
    for split, labels, mine, first in (("val", val_y, row_probs[0], first_probs[0]),
                                       ("test", test_y, row_probs[1], first_probs[1])):
        key = f"{split}_auc_vs_1"
        out[key], out[f"{key}_lo"], out[f"{key}_hi"], out[f"{key}_p"] = paired_auc_difference(labels, mine, first)
    return out


def not_told_apart(rows: list[dict], split: str, alpha: float = 0.05) -> list[str]:
    """The rows whose AUC DeLong's test cannot tell from rank 1's on ``split`` (p >= alpha)."""
    return [label_of(r) for r in rows if r["rank"] != 1 and r[f"{split}_auc_vs_1_p"] >= alpha]


def label_of(row: dict) -> str:
    return ENSEMBLE if is_ensemble(row) else f"#{row['rank']} {row['model']}"


def comparison_sentence(rows: list[dict]) -> str:
    """In words: which rows the data cannot rank below rank 1."""
    if len(rows) < 2:
        return ""
    parts = []
    for split in ("test", "val"):
        same = not_told_apart(rows, split)
        parts.append(f"on {split}, {', '.join(same) if same else 'none'}")
    return ("Not distinguishable from rank 1 by AUC (DeLong's paired test on the same images, p >= 0.05): "
            + "; ".join(parts) + ".")


TRANSFER_METRICS = ("auc", "sensitivity", "specificity")
SLACK = 0.01  # a saturated metric's interval shrinks to one point (e.g. [1.000, 1.000]): no warning over a hair


def transfer_sentence(row: dict) -> str:
    """In words: whether val, on which the row was chosen and its threshold set, foretold its test numbers, i.e.
    whether each of its val AUC, sensitivity and specificity (at its threshold) lies within test's 95% interval
    (give or take SLACK).
    Where one does not, the test images differ from val's in a way no choice made on val could see."""
    if row.get("scored_val_auc") is None:  # a leaderboard written before these columns
        return ""
    outside = [f"{METRIC_TITLES[m]} {row[f'scored_val_{m}']:.3f} on val against {with_ci(row, f'test_{m}')} on test"
               for m in TRANSFER_METRICS if not math.isnan(row[f"scored_val_{m}"])  # nan: val lacks a class
               and not row[f"test_{m}_lo"] - SLACK <= row[f"scored_val_{m}"] <= row[f"test_{m}_hi"] + SLACK]
    who = f"{label_of(row)} (threshold {row['threshold']:.3f})"
    if not outside:
        return f"Val foretold test for {who}: its val AUC, sensitivity and specificity lie within test's 95% intervals."
    return (f"Val did not foretell test for {who}: " + "; ".join(outside) + ". The test images differ from those "
            "the model and its threshold were chosen on, so these choices may not hold on new data either; "
            "pneumo-ray's docs/selection.md explains.")


def score(val_y: np.ndarray, val_prob: np.ndarray, test_y: np.ndarray, test_prob: np.ndarray,
          lb: LeaderboardConfig, seed: int) -> tuple[dict, dict]:
    """One row's test numbers: the threshold chosen on val, then metrics at it and at 0.5 with bootstrap
    intervals, and calibration. Returns (flat columns for the table, details for evaluation.json)."""
    from sklearn.metrics import (
        brier_score_loss,
        classification_report,
        confusion_matrix,
    )

    threshold = decision_threshold(val_y, val_prob, lb)
    flat: dict = {"threshold": threshold}
    # The same numbers on the predictions the threshold was chosen on, so the leaderboard can say whether val
    # foretold test (transfer_sentence). Named scored_val_* so that no column is mistaken for the search metric.
    on_val = binary_metrics(val_y, val_prob, threshold)
    flat.update({f"scored_val_{m}": on_val[m] for m in TRANSFER_METRICS})
    details: dict = {"threshold": threshold, "confusion": {}, "per_class": {}}
    for suffix, t in (("", threshold), (HALF, 0.5)):
        point = binary_metrics(test_y, test_prob, t)
        ci = bootstrap_ci(test_y, test_prob, t, lb.bootstrap_resamples, seed)
        for m in CI_METRICS:
            if m == "auc" and suffix:
                continue  # AUC does not depend on the threshold
            key = f"test_{m}{suffix}"
            flat.update({key: point[m], f"{key}_lo": ci[m][0], f"{key}_hi": ci[m][1]})
        pred = (test_prob >= t).astype(int)
        details["confusion"][suffix or "tuned"] = confusion_matrix(test_y, pred, labels=[0, 1]).tolist()
        details["per_class"][suffix or "tuned"] = classification_report(
            test_y, pred, labels=[0, 1], target_names=list(CLASS_NAMES), output_dict=True, zero_division=0)
    flat["test_ece"] = expected_calibration_error(test_y, test_prob)
    flat["test_brier"] = float(brier_score_loss(test_y, test_prob))
    return flat, details


def save_rows(exp_dir: Path, rows: list[dict], settings: dict | None = None) -> None:
    (exp_dir / LEADERBOARD_JSON).write_text(json.dumps(rows, indent=1))
    with open(exp_dir / LEADERBOARD_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (exp_dir / LEADERBOARD_MD).write_text(to_markdown(rows, settings))


def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def with_ci(row: dict, key: str) -> str:
    """``0.912 [0.889, 0.934]``: the value and its 95% interval, at 3 decimals."""
    return f"{row[key]:.3f} [{row[key + '_lo']:.3f}, {row[key + '_hi']:.3f}]"


METRIC_TITLES = {"auc": "AUC", "acc": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
                 "f1": "F1"}


def describe(settings: dict | None) -> str:
    if not settings:
        return ""
    rule = ("Youden's J (max sensitivity + specificity)" if settings["threshold_rule"] == "youden"
            else f"the highest with sensitivity >= {settings['min_sensitivity']}")
    extras = [text for flag, text in (("temperature_scaling", "temperature scaling fitted on val"),
                                      ("flip_tta", "flip test-time augmentation")) if settings.get(flag)]
    if extras:  # the members' val metric is the one training recorded, which had neither
        extras.append("the ensemble's val metric includes them, its members' (from training) do not")
    folds = settings.get("cv_folds", 0)
    cv = (f"Selection by {folds}-fold cross-validation over train+val: each trial's val metric is its {folds} "
          f"fold-models' mean; val thresholds, temperatures and val columns come from their out-of-fold "
          f"predictions (every pooled image predicted once, by the fold-model that did not train on it); test "
          f"probabilities are the mean of the {folds} fold-models'. ") if folds else ""
    return (cv + f"Threshold chosen on val: {rule}. Brackets: 95% intervals from a stratified bootstrap of the test "
            "split "
            f"({settings['bootstrap_resamples']} resamples, seed {settings['bootstrap_seed']}), except AUC - #1: the "
            "row's test AUC minus rank 1's on the same images, with DeLong's paired interval and p-value"
            + (f"; {', '.join(extras)}" if extras else "") + ". The test split is read once, here.")


CONFIG_COLUMNS = ("rank", "trial_id", *HYPERPARAMS, "epoch", "last_epoch", "stopped_early", "temperature")


def results_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The leaderboard's main table as a header and text cells: leaderboard.md and report.html both show it."""
    metric = next(k for k in rows[0] if k.startswith("val_"))
    header = ["rank", "model", metric, "threshold", *(METRIC_TITLES[m] for m in CI_METRICS), "AUC - #1 (p)",
              *(f"{METRIC_TITLES[m]} @0.5" for m in CI_METRICS if m != "auc"), "ECE", "Brier"]
    body = [[r["row"], r["model"], format_value(r[metric]), f"{r['threshold']:.3f}",
             *(with_ci(r, f"test_{m}") for m in CI_METRICS), versus_first(r),
             *(f"{r[f'test_{m}{HALF}']:.3f}" for m in CI_METRICS if m != "auc"),
             f"{r['test_ece']:.3f}", f"{r['test_brier']:.3f}"] for r in rows]
    return header, body


def versus_first(row: dict) -> str:
    """``-0.012 [-0.030, 0.006] p=0.19``: the row's test AUC minus rank 1's, paired; empty for rank 1."""
    if row["rank"] == 1:
        return ""
    key = "test_auc_vs_1"
    return f"{row[key]:+.3f} [{row[key + '_lo']:+.3f}, {row[key + '_hi']:+.3f}] p={row[key + '_p']:.2f}"


def configs_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Each ranked trial's hyperparameters, kept (best) and last epoch, and temperature; a column no trial
    has a value in (an optional dimension the sweep did not search, no early stop) is left out."""
    ranked = trial_rows(rows)
    columns = [c for c in CONFIG_COLUMNS if any(r[c] is not None for r in ranked)]
    return columns, [[format_value(r[c]) for c in columns] for r in ranked]


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in body]


def to_markdown(rows: list[dict], settings: dict | None = None) -> str:
    lines = markdown_table(*results_table(rows)) + [""] + markdown_table(*configs_table(rows))
    runs = runs_table(rows, next(k for k in rows[0] if k.startswith("val_")))
    if runs:  # leaderboard.repeats: each configuration over its seeds
        lines += ["", "Over each configuration's runs (its own and its repeats, each at its own val threshold):",
                  "", *markdown_table(*runs)]
    text = describe(settings) + "\n\n" + "\n".join(lines) if settings else "\n".join(lines)
    for sentence in (comparison_sentence(rows), transfer_sentence(rows[0])):
        text += "\n\n" + sentence if sentence else ""
    return text + "\n\nCheckpoints: " + ", ".join(f"rank {r['rank']}: `{r['checkpoint']}`"
                                                for r in trial_rows(rows)) + "\n"
