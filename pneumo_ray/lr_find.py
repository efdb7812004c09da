"""``pneumo-ray lr-find``: an LR range test, to seed ``search.lr`` before a sweep.

Leslie Smith's test, as fastai's ``lr_find`` and study 002 ran it: train one model for a few hundred
steps while the LR rises exponentially, and watch the loss. Where it falls fastest, the LR is doing the
most; where it turns up, the LR is too high. The model, its optimizer, freezing and batches are the
sweep's own (``train.build_run``, ``augment.train_batch``), so the range fits what the trials will train.
The test runs in this process, on the train split only: no Ray, no val or test images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pneumo_ray.augment import normalization, resized_splits, train_batch
from pneumo_ray.config import Config
from pneumo_ray.data import Splits
from pneumo_ray.model_settings import model_variant, trains_at
from pneumo_ray.search_space import with_trial_params
from pneumo_ray.train import LocalSession, build_run, class_weights, epoch_indices

SMOOTHING = 0.98  # the loss's exponential moving average: one batch's loss is too noisy to read a trend from
DIVERGED = 4.0  # the test stops once the smoothed loss is this many times its lowest


@dataclass
class RangeTest:
    label: str
    params: dict  # the trial parameters the model trained with, lr aside
    lrs: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # smoothed, one per step
    diverged_at: float | None = None  # the LR at which the loss took off, if it did

    def suggestion(self) -> tuple[float, float, float, float]:
        """(low, high, steepest, lowest): the LR where the smoothed loss fell fastest (per decade of LR)
        and where it was lowest; the range starts a decade below the first and ends a third of the second,
        short of where the loss turns up. The slope is taken across a window of a twentieth of the steps,
        and not over the first tenth, where the moving average is still settling: single steps are noise."""
        log_lrs, losses = np.log10(self.lrs), np.array(self.losses)
        lowest = int(np.argmin(losses))
        window, first = max(1, len(losses) // 20), len(losses) // 10
        slopes = {i: (losses[i + window] - losses[i - window]) / (log_lrs[i + window] - log_lrs[i - window])
                  for i in range(max(first, window), lowest - window + 1)}
        steepest = float(10 ** log_lrs[min(slopes, key=slopes.get)]) if slopes else float(10 ** log_lrs[lowest])
        high = float(10 ** log_lrs[lowest]) / 3
        return min(steepest, high) / 10, high, steepest, float(10 ** log_lrs[lowest])


def trial_params(cfg: Config, label: str) -> dict:
    """One trial's parameters for ``label``: the first value of every searched choice, the low end of the
    weight-decay range, and the LR left to the test."""
    s = cfg.search
    _, model, depths = model_variant(cfg, label)
    return {"model": label, "optimizer": s.optimizer[0], "lr": 1.0, "weight_decay": float(s.weight_decay[0]),
            "batch_size": s.batch_size[0], "class_weighting": s.class_weighting[0],
            "freeze_depth": depths[0] if model.pretrained else 0}


def range_test(cfg: Config, splits: Splits, label: str, steps: int = 200, start: float = 1e-7,
               end: float = 10.0, threads: int | None = None) -> RangeTest:
    params = trial_params(cfg, label)
    cfg = with_trial_params(cfg, params)
    splits = resized_splits(splits, trains_at(cfg, label, splits.image_size))
    session = LocalSession(threads=threads or torch.get_num_threads())
    torch.set_num_threads(session.threads)
    run = build_run(cfg, params, splits, session)
    run.model.train()
    mean, std = normalization(cfg.augment.normalize, splits)
    train_x = torch.from_numpy(np.ascontiguousarray(splits.train_x))
    device = session.device
    weight = class_weights(splits.train_y).to(device) if params["class_weighting"] == "loss" else None
    result, average, best, epoch, order = RangeTest(label, params), 0.0, math.inf, 0, torch.empty(0, dtype=torch.long)
    for step in range(steps):
        lr = start * (end / start) ** (step / max(1, steps - 1))
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if len(order) < run.local_batch:  # the next epoch's order, as the trials draw it
            order = epoch_indices(splits.train_y, params["class_weighting"], cfg.experiment.seed, epoch, 0, 1)
            epoch += 1
        idx, order = order[:run.local_batch], order[run.local_batch:]
        x = train_batch(train_x[idx].to(device), mean, std, cfg.augment, run.aug_gen)
        y = torch.from_numpy(splits.train_y[idx.numpy()]).to(device)
        loss = F.cross_entropy(run.model(x), y, weight=weight, label_smoothing=cfg.train.label_smoothing)
        if not torch.isfinite(loss):
            result.diverged_at = lr
            break
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
        run.optimizer.step()
        average = SMOOTHING * average + (1 - SMOOTHING) * loss.item()
        smoothed = average / (1 - SMOOTHING ** (step + 1))  # bias-corrected: the average starts at 0
        result.lrs.append(lr)
        result.losses.append(smoothed)
        best = min(best, smoothed)
        if step > 10 and smoothed > DIVERGED * best:
            result.diverged_at = lr
            break
    return result


def plot(result: RangeTest, path: Path) -> None:
    from matplotlib.figure import Figure

    low, high, steepest, lowest = result.suggestion()
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="#1f77b4", label="training loss (smoothed)")
    ax.axvspan(low, high, color="#2ca02c", alpha=0.15, label=f"suggested search.lr [{low:.1e}, {high:.1e}]")
    ax.axvline(steepest, color="#ff7f0e", ls="--", lw=1, label=f"steepest fall, {steepest:.1e}")
    ax.axvline(lowest, color="#d62728", ls=":", lw=1, label=f"lowest loss, {lowest:.1e}")
    ax.set_xscale("log")
    lowest_at = int(np.argmin(result.losses))  # up to the take-off: it would squash the rest
    ax.set_ylim(top=1.05 * max(result.losses[:lowest_at + 1]))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(f"LR range test: {result.label} ({result.params['optimizer']}, batch {result.params['batch_size']})")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def summary(result: RangeTest, splits: Splits, path: Path) -> str:
    low, high, steepest, lowest = result.suggestion()
    p = result.params
    took_off = f"; it took off at {result.diverged_at:.1e}" if result.diverged_at else ""
    return (f"lr-find: {result.label} ({p['optimizer']}, batch {p['batch_size']}, weight decay {p['weight_decay']:g}), "
            f"{len(result.lrs)} steps from {result.lrs[0]:.0e} on {len(splits.train_y):,} train images\n"
            f"the loss fell fastest at lr {steepest:.1e} and was lowest at {lowest:.1e}{took_off}\n"
            f"suggested: search.lr: [{low:.1e}, {high:.1e}]\n"
            f"plot: {path}")
