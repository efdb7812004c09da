"""The learning-rate schedule: ``lr_factor(step)``, the multiplier of each parameter group's LR.

Every schedule starts with ``train.warmup_epochs`` of linear warm-up, then:

- ``cosine``: half a cosine from the LR down to ``train.min_lr`` (torch's CosineAnnealingLR with T_max the
  epochs after warm-up and eta_min ``min_lr``, stepped per batch);
- ``constant``: the LR throughout (study 000's notebooks);
- ``step``: the LR times ``train.gamma`` every ``train.step_epochs`` epochs (torch's StepLR).

With ``model.head_warmup_epochs`` the body holds still while the head trains, then follows the schedule at
``model.finetune_lr_factor`` of the head's LR (two-stage fine-tuning).
"""

from __future__ import annotations

import math

from pneumo_ray.config import Config


def lr_factor(step: int, steps_per_epoch: int, cfg: Config, is_head: bool, lr: float) -> float:
    """The multiplier of ``lr`` at optimizer step ``step`` (0-based) for a head or body parameter group."""
    epoch = step // steps_per_epoch
    if not is_head and epoch < cfg.model.head_warmup_epochs:
        return 0.0
    t, scale = cfg.train, 1.0 if is_head else cfg.model.finetune_lr_factor
    warmup, total = t.warmup_epochs * steps_per_epoch, t.epochs * steps_per_epoch
    if step < warmup:
        return scale * (step + 1) / warmup
    if t.schedule == "constant":
        return scale
    if t.schedule == "step":
        return scale * t.gamma ** ((epoch - t.warmup_epochs) // t.step_epochs)
    floor = min(1.0, t.min_lr / lr)  # min_lr is an LR; the factor that reaches it depends on the trial's LR
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return scale * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
