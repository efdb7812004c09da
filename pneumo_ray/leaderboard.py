"""Top-k trials by the val selection metric, each evaluated once on the test split.

This is the only place the test split is read, and it runs after the search has
finished: no test number can influence which trial is kept.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import torch

from pneumo_ray import storage
from pneumo_ray.storage import BEST_DIR, TRAIN_RUNS
from pneumo_ray.config import Config
from pneumo_ray.data import Splits
from pneumo_ray.evaluate import evaluate
from pneumo_ray.models import build_model
from pneumo_ray.train import MODEL_FILE

HYPERPARAMS = ("optimizer", "lr", "weight_decay", "batch_size", "class_weighting", "freeze_depth")
TEST_COLUMNS = ("test_acc", "test_auc", "test_f1", "test_sensitivity", "test_specificity")


def trial_checkpoints(exp_dir: Path) -> dict[str, list[tuple[Path, dict]]]:
    """trial id -> [(checkpoint dir, its meta.json)] for every checkpoint Ray kept: Ray Train's, in
    train_runs/<trial id>/, and Tune's (inline trials), in the Tune trial folder beside its result.json."""
    found: dict[str, list] = {}
    for meta_file in sorted((exp_dir / TRAIN_RUNS).glob("*/checkpoint_*/meta.json")):
        found.setdefault(meta_file.parent.parent.name, []).append((meta_file.parent, json.loads(meta_file.read_text())))
    trial_ids = {t["relative_logdir"]: t["trial_id"] for t in storage.saved_trials(exp_dir)}
    for meta_file in sorted(exp_dir.glob("*/checkpoint_*/meta.json")):
        trial_id = trial_ids.get(meta_file.parent.parent.name)
        if trial_id:
            found.setdefault(trial_id, []).append((meta_file.parent, json.loads(meta_file.read_text())))
    return found


def best_per_trial(exp_dir: Path, metric: str) -> list[dict]:
    """One candidate per trial: its best kept epoch by ``metric``, sorted best first."""
    sign = -1.0 if metric.endswith("loss") else 1.0
    candidates = []
    for trial_id, checkpoints in trial_checkpoints(exp_dir).items():
        scored = [(c, m) for c, m in checkpoints if not math.isnan(m["metrics"].get(metric, math.nan))]
        if not scored:
            continue
        ckpt, meta = max(scored, key=lambda cm: sign * cm[1]["metrics"][metric])
        candidates.append({"trial_id": trial_id, "checkpoint_dir": ckpt, "meta": meta})
    return sorted(candidates, key=lambda c: -sign * c["meta"]["metrics"][metric])


def load_model(checkpoint_dir: Path, meta: dict) -> torch.nn.Module:
    model = build_model(meta["model"], meta["image_size"], head_dropout=meta.get("head_dropout", 0.0))
    model.load_state_dict(torch.load(checkpoint_dir / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval()


def write_leaderboard(exp_dir: Path, cfg: Config, splits: Splits) -> list[dict]:
    metric = cfg.search.metric
    top = best_per_trial(exp_dir, metric)[: cfg.leaderboard.top_k]
    best_dir = exp_dir / BEST_DIR
    rows = []
    for rank, cand in enumerate(top, start=1):
        meta = cand["meta"]
        keep = best_dir / f"rank{rank}_{cand['trial_id']}"
        if keep.exists():  # a resumed sweep rebuilds the leaderboard; replace only our own copy
            shutil.rmtree(keep)
        shutil.copytree(cand["checkpoint_dir"], keep)
        model = load_model(keep, meta)
        test, _ = evaluate(model, splits.test_x, splits.test_y, meta["mean"], meta["std"], meta["normalize"],
                           torch.device("cpu"), prefix="test_")
        row = {"rank": rank, "trial_id": cand["trial_id"], "model": meta["model"]}
        row.update({h: meta["params"].get(h) for h in HYPERPARAMS})
        row.update({"epoch": meta["metrics"]["epoch"], metric: meta["metrics"][metric]})
        row.update({k: test[k] for k in TEST_COLUMNS})
        # Where the copy lives for the user: the bucket for a cloud experiment, not this machine's mirror.
        row["checkpoint"] = storage.join(cfg.experiment_uri, BEST_DIR, keep.name) if storage.is_remote(
            cfg.experiment_uri) else str(keep)
        rows.append(row)
    save_rows(exp_dir, rows)
    return rows


def save_rows(exp_dir: Path, rows: list[dict]) -> None:
    (exp_dir / "leaderboard.json").write_text(json.dumps(rows, indent=1))
    if not rows:
        (exp_dir / "leaderboard.md").write_text("No trial finished an epoch; nothing to rank.\n")
        (exp_dir / "leaderboard.csv").write_text("")
        return
    with open(exp_dir / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (exp_dir / "leaderboard.md").write_text(to_markdown(rows))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def to_markdown(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c != "checkpoint"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n\nCheckpoints: " + ", ".join(f"rank {r['rank']}: `{r['checkpoint']}`" for r in rows) + "\n"
