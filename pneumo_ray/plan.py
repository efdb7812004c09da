"""``pneumo-ray validate``: what a sweep would do, without starting Ray. The config, data and models are checked
as a sweep checks them (``sweep.prepare``); then the plan (trials, concurrency, resources per trial) and an
estimate of the time, from a few steps of each model timed here with the training loop itself (``train_epoch``).

The estimate is an upper bound for the trials' compute on this machine: no trial stopped early by ASHA or early
stopping, Ray's start-up per trial and the leaderboard not counted. A GPU cluster's workers run faster than
this machine's CPU; the plan says so rather than guess by how much.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
import torch

from pneumo_ray.augment import normalization, resized_splits
from pneumo_ray.cluster import workers_per_run
from pneumo_ray.config import Config
from pneumo_ray.data import Splits
from pneumo_ray.evaluate import predict_logits
from pneumo_ray.lr_find import trial_params
from pneumo_ray.model_settings import trains_at
from pneumo_ray.progress import duration
from pneumo_ray.search_space import with_trial_params
from pneumo_ray.train import LocalSession, build_run, train_epoch
from pneumo_ray.validation import trial_epochs

TIMED_STEPS = 4  # after one untimed step, which pays for allocation and the first kernels' set-up


def seconds_per_image(cfg: Config, splits: Splits, label: str, threads: int) -> tuple[float, float]:
    """(training, evaluation) seconds per image for ``label`` at its first batch size, in this process."""
    params = {**trial_params(cfg, label), "lr": float(cfg.search.lr[0])}
    cfg = with_trial_params(cfg, params)
    splits = resized_splits(splits, trains_at(cfg, label, splits.image_size))
    batch = params["batch_size"]
    torch.set_num_threads(threads)
    session = LocalSession(threads=threads)
    mean, std = normalization(cfg.augment.normalize, splits)

    def epoch_of(steps: int) -> float:
        n = min(len(splits.train_y), steps * batch)
        # Spread over the whole split: a folder's train images come class by class, and a one-class slice would
        # leave nothing for class weighting to balance.
        some = np.linspace(0, len(splits.train_y) - 1, n).round().astype(int)
        small = dataclasses.replace(splits, train_x=splits.train_x[some], train_y=splits.train_y[some])
        run = build_run(cfg, params, small, session)
        train_x = torch.from_numpy(np.ascontiguousarray(small.train_x))
        started = time.perf_counter()
        train_epoch(run, cfg, params, train_x, small.train_y, mean, std, None, session)
        return (time.perf_counter() - started) / (run.steps_per_epoch * run.local_batch)

    epoch_of(1)
    train_s = epoch_of(TIMED_STEPS)
    model = build_run(cfg, params, splits, session).model
    images = splits.val_x[:TIMED_STEPS * batch]
    started = time.perf_counter()
    predict_logits(model, images, mean, std, True, session.device, cfg.train.eval_batch_size)
    return train_s, (time.perf_counter() - started) / len(images)


def concurrency_here(cfg: Config) -> int:
    """Trials at once on this machine, as cluster.init_ray decides it for a sweep without --address."""
    per_trial = workers_per_run(cfg) * cfg.resources.cpus_per_worker
    return min(cfg.search.max_concurrent_trials, max(1, math.floor((os.cpu_count() or 1) / per_trial + 1e-9)))


def asha_line(s, epochs: int) -> str:
    """A grace period as long as the trials leaves ASHA nothing to stop: the sweep caps it at their length."""
    if s.asha.grace_period >= epochs:
        return f"ASHA stops none: its grace period ({s.asha.grace_period} epochs) is not shorter than the trials"
    return f"ASHA after {s.asha.grace_period} epochs, reduction factor {s.asha.reduction_factor}"


def plan_lines(cfg: Config, splits: Splits, local: bool) -> list[str]:
    s, r, k = cfg.search, cfg.resources, max(1, cfg.data.cv_folds)
    concurrency = concurrency_here(cfg) if local else s.max_concurrent_trials
    gpus = (f"{r.gpus_per_worker:g} GPU" if r.gpus_per_worker != "auto" else
            "a GPU where the cluster has them (gpus_per_worker: auto)")
    epochs = max(trial_epochs(cfg))
    extra = cfg.leaderboard.repeats * cfg.leaderboard.top_k if cfg.leaderboard.repeats else 0
    lines = [
        f"data: {splits.summary()}",
        f"trials: {s.num_samples} ({s.sampler} sampler over {', '.join(dict.fromkeys(s.model))})"
        + (f", then {extra} repeat trials (top {cfg.leaderboard.top_k} x {cfg.leaderboard.repeats} seeds)" if extra
           else ""),
        f"each trial: up to {epochs} epochs, {k} model(s) x {r.workers_per_trial} worker(s) = {workers_per_run(cfg)} "
        f"worker(s) of {r.cpus_per_worker:g} CPU and {gpus} each ({r.launcher} launcher)",
        f"at once: {concurrency} trial(s) " + (
            "(what this machine's cores fit, at most search.max_concurrent_trials)" if local
            else "(search.max_concurrent_trials; the cluster's room decides)"),
        "early stopping: " + (asha_line(s, epochs) if s.asha.enabled else "no ASHA")
        + (f"; a time budget of {duration(s.time_budget_s)}" if s.time_budget_s else ""),
    ]
    threads = max(1, int(r.cpus_per_worker))
    # A fold-model trains on (k-1)/k of the pool and validates on the rest; folds run side by side.
    pool = len(splits.train_y) + (len(splits.val_y) if cfg.data.cv_folds else 0)
    n_train, n_val = (pool * (k - 1) / k, pool / k) if cfg.data.cv_folds else (len(splits.train_y), len(splits.val_y))
    per_trial = {}
    for label in dict.fromkeys(s.model):
        train_s, eval_s = seconds_per_image(cfg, splits, label, threads)
        per_trial[label] = epochs * (n_train * train_s / r.workers_per_trial + n_val * eval_s)
    mean_trial = float(np.mean(list(per_trial.values())))
    total = (s.num_samples + extra) * mean_trial / concurrency
    if s.time_budget_s:
        total = min(total, s.time_budget_s)
    lines.append("estimate: " + ", ".join(f"{label} ~{duration(t)}" for label, t in per_trial.items())
                 + f" per trial; the sweep ~{duration(total)} at most, from {TIMED_STEPS} timed steps per model in "
                 f"this process at {threads} thread(s). Not counted: trials ASHA stops early (it saves much of this), "
                 "Ray's start-up per trial, the leaderboard."
                 + (" GPU workers run faster than this CPU estimate."
                    if not local or r.gpus_per_worker not in (0, "auto") else ""))
    return lines
