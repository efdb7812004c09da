"""The learning-rate schedule: ``lr_factor(step)``, the multiplier of each parameter group's LR.

Every schedule starts with ``train.warmup_epochs`` of linear warm-up, then:

- ``cosine``: half a cosine from the LR down to ``train.min_lr`` (torch's CosineAnnealingLR with T_max the
  epochs after warm-up and eta_min ``min_lr``, stepped per batch);
- ``constant``: the LR throughout (study 000's notebooks);
- ``step``: the LR times ``train.gamma`` every ``train.step_epochs`` epochs (torch's StepLR);
- ``plateau``: the LR times ``train.plateau_factor`` once ``train.monitor`` has not improved for more than
  ``train.plateau_patience`` epochs, never below ``train.min_lr`` (torch's ReduceLROnPlateau, absolute
  threshold ``train.min_delta``, no cooldown). ``Monitor`` keeps that count, and early stopping's.

With ``model.head_warmup_epochs`` the body holds still while the head trains, then follows the schedule at
``model.finetune_lr_factor`` of the head's LR (two-stage fine-tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pneumo_ray.config import Config
from pneumo_ray.validation import selection_mode


def lr_factor(step: int, steps_per_epoch: int, cfg: Config, is_head: bool, lr: float) -> float:
    """The multiplier of ``lr`` at optimizer step ``step`` (0-based) for a head or body parameter group."""
    epoch = step // steps_per_epoch
    if not is_head and epoch < cfg.model.head_warmup_epochs:
        return 0.0
    t, scale = cfg.train, 1.0 if is_head else cfg.model.finetune_lr_factor
    warmup, total = t.warmup_epochs * steps_per_epoch, t.epochs * steps_per_epoch
    if step < warmup:
        return scale * (step + 1) / warmup
    if t.schedule in ("constant", "plateau"):  # plateau: Monitor.lr_scale does the cutting
        return scale
    if t.schedule == "step":
        return scale * t.gamma ** ((epoch - t.warmup_epochs) // t.step_epochs)
    floor = min(1.0, t.min_lr / lr)  # min_lr is an LR; the factor that reaches it depends on the trial's LR
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return scale * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Monitor:
    """How the watched val metric has gone, epoch by epoch: what the plateau schedule and early stopping
    decide on. Saved with each checkpoint, so that a resumed trial remembers how long it has waited."""

    maximize: bool
    min_delta: float = 0.0
    best: float | None = None
    since_best: int = 0  # epochs without improvement: early stopping's wait
    since_cut: int = 0  # the same, reset when the plateau schedule cuts the LR (ReduceLROnPlateau's count)
    lr_scale: float = 1.0  # the plateau schedule's cuts so far, multiplied

    def update(self, value: float, cfg: Config, lr: float) -> None:
        """Record ``value`` of the epoch; under the plateau schedule, cut ``lr_scale`` when it is time."""
        delta = (value - self.best if self.maximize else self.best - value) if self.best is not None else math.inf
        if delta > self.min_delta and not math.isnan(value):
            self.best, self.since_best, self.since_cut = value, 0, 0
        else:
            self.since_best, self.since_cut = self.since_best + 1, self.since_cut + 1
        t = cfg.train
        if t.schedule == "plateau" and self.since_cut > t.plateau_patience:
            self.lr_scale = max(self.lr_scale * t.plateau_factor, min(1.0, t.min_lr / lr))
            self.since_cut = 0

    def should_stop(self, cfg: Config) -> bool:
        patience = cfg.train.early_stopping_patience
        return patience is not None and self.since_best >= patience


def monitored_metric(cfg: Config) -> str:
    return cfg.train.monitor or cfg.search.metric


def monitor_for(cfg: Config) -> Monitor:
    return Monitor(maximize=selection_mode(monitored_metric(cfg)) == "max", min_delta=cfg.train.min_delta)


def watches(cfg: Config) -> bool:
    """Whether a trial needs the monitored metric on every rank each epoch (a collective)."""
    return cfg.train.schedule == "plateau" or cfg.train.early_stopping_patience is not None
