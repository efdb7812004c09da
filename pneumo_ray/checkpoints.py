"""Checkpoints: a running trial's (written each epoch, read to resume) and an experiment's kept ones
(which trial kept which epochs, the best of each, and their models).

Ray Train keeps a TorchTrainer trial's checkpoints in ``train_runs/<trial id>/``; Tune keeps an inline
trial's beside its result log. The leaderboard ranks them; predict and the report load its copies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from pneumo_ray import storage
from pneumo_ray.layout import (
    BEST_DIR,
    CHECKPOINT_GLOB,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    TRAIN_RUNS,
    TRIAL_RESULT_FILE,
    best_copy_name,
    fold_dir_name,
)
from pneumo_ray.models import build_model, unwrap


def trials_that_trained(exp_dir: Path) -> int:
    """How many Tune trials reported at least one epoch that did not diverge (each such epoch was
    checkpointed), from the trials' own result logs."""
    count = 0
    for log in exp_dir.glob(f"*/{TRIAL_RESULT_FILE}"):
        lines = log.read_text().splitlines()
        count += any(json.loads(line).get("diverged", 1) == 0 for line in lines if line.strip())
    return count


def trial_checkpoints(exp_dir: Path) -> dict[str, list[tuple[Path, dict]]]:
    """trial id -> [(checkpoint dir, its meta.json)] for every checkpoint Ray kept: Ray Train's, in
    train_runs/<trial id>/, and Tune's (inline trials), in the Tune trial folder beside its result.json."""
    found: dict[str, list] = {}
    for meta_file in sorted((exp_dir / TRAIN_RUNS).glob(f"*/{CHECKPOINT_GLOB}/{META_FILE}")):
        found.setdefault(meta_file.parent.parent.name, []).append((meta_file.parent, json.loads(meta_file.read_text())))
    trial_ids = {t["relative_logdir"]: t["trial_id"] for t in storage.saved_trials(exp_dir)}
    for meta_file in sorted(exp_dir.glob(f"*/{CHECKPOINT_GLOB}/{META_FILE}")):
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
    # "arch": the architecture of a labelled search.model entry (models.<label>); older checkpoints lack it
    model = build_model(meta.get("arch") or meta["model"], meta["image_size"],
                        head_dropout=meta.get("head_dropout", 0.0), head_hidden=meta.get("head_hidden"))
    model.load_state_dict(torch.load(checkpoint_dir / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval()


def load_members(checkpoint_dir: Path, meta: dict) -> list[tuple[torch.nn.Module, dict]]:
    """The models of one checkpoint, each with its meta.json: the trial's model, or its fold-models in fold
    order when it was cross-validated (meta.json's ``cv_folds``)."""
    if not meta.get("cv_folds"):
        return [(load_model(checkpoint_dir, meta), meta)]
    members = []
    for fold in range(meta["cv_folds"]):
        folder = checkpoint_dir / fold_dir_name(fold)
        fold_meta = json.loads((folder / META_FILE).read_text())
        members.append((load_model(folder, fold_meta), fold_meta))
    return members


def best_copy(exp_dir: Path, rank: int, trial_id: str) -> Path:
    """Where the leaderboard keeps the checkpoint of rank ``rank``: best/rank<N>_<trial id>."""
    return exp_dir / BEST_DIR / best_copy_name(rank, trial_id)


def load_ranked(exp_dir: Path, row: dict) -> list[tuple[torch.nn.Module, dict]]:
    """The models of a leaderboard row (one, or one per fold), each with its meta.json, from the
    leaderboard's own copy."""
    folder = best_copy(exp_dir, row["rank"], row["trial_id"])
    return load_members(folder, json.loads((folder / META_FILE).read_text()))


def write_trial_checkpoint(directory: str, run, meta: dict) -> None:
    """A running trial's checkpoint: weights, meta.json, and the training state (``train.Run``) to resume."""
    torch.save(unwrap(run.model).state_dict(), os.path.join(directory, MODEL_FILE))
    # RNG states too, so a resumed trial continues the very same run (same augmentations, same dropout).
    torch.save({"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(), "epoch": run.epoch, "monitor": dataclasses.asdict(run.monitor),
                "aug_rng": run.aug_gen.get_state(), "torch_rng": torch.get_rng_state()},
               os.path.join(directory, STATE_FILE))
    Path(directory, META_FILE).write_text(json.dumps(meta, indent=1))


def restore(run, checkpoint_dir: str, seed: int, rank: int) -> str | None:
    """Continue ``train.Run`` from a checkpoint: weights, optimizer, schedule, scaler and (rank 0's) random
    state. Returns None, or what made the checkpoint unreadable (a file cut short by a full disk or an
    interrupted copy): the caller then starts the trial over rather than fail it."""
    try:
        unwrap(run.model).load_state_dict(torch.load(os.path.join(checkpoint_dir, MODEL_FILE), weights_only=True))
        state = torch.load(os.path.join(checkpoint_dir, STATE_FILE), weights_only=True)
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        run.epoch = state["epoch"]
        # In place: the LR schedule's lambdas hold this very Monitor. Older checkpoints have none: a fresh one.
        run.monitor.__dict__.update(state.get("monitor", {}))
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle and zip errors for damaged files
        return f"checkpoint {checkpoint_dir} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if rank == 0:  # the checkpoint holds rank 0's random state; other ranks draw fresh streams
        run.aug_gen.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
    else:
        run.aug_gen.manual_seed(seed * 7919 + rank + 104_729 * run.epoch)
    return None
