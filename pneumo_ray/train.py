"""The one training loop: ``fit`` trains a trial on one worker, under Ray Train DDP, inline in a Tune
trial, or in a plain process.

``fit`` talks to its surroundings only through a session (rank, device, model preparation, checkpoint
in, report out). ``trial.RaySession`` is Ray's; ``LocalSession`` runs the very same loop in one process
for the benchmarks and tests. Nothing else in the project trains a model, and nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumo_ray.augment import normalization, resized_splits, train_batch
from pneumo_ray.checkpoints import restore, write_trial_checkpoint
from pneumo_ray.config import Config
from pneumo_ray.data import Splits
from pneumo_ray.evaluate import evaluate
from pneumo_ray.layout import META_FILE, STATE_FILE, fold_dir_name
from pneumo_ray.model_settings import model_variant, trains_at
from pneumo_ray.models import build_model, freeze, head_prefix, init_weights, is_head_param, set_train_mode, unwrap
from pneumo_ray.schedule import Monitor, lr_factor, monitor_for, monitored_metric, watches
from pneumo_ray.search_space import with_trial_params

log = logging.getLogger(__name__)

VAL_METRICS = ("val_loss", "val_acc", "val_balanced_acc", "val_auc", "val_f1", "val_sensitivity", "val_specificity")


# --------------------------------------------------------------------------- sessions


@dataclass
class LocalSession:
    """One process, no Ray: for benchmarks and tests. Checkpoints go to ``checkpoint_dir`` if given."""

    threads: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint_dir: str | None = None
    history: list = field(default_factory=list)
    diverged: str | None = None  # the reason, when the loss became NaN/inf
    rank: int = 0
    world_size: int = 1
    node_id: str = "local"
    # One split, no folds: to train the folds of data.cv_folds locally, fit ``splits.fold(k)`` for each k.
    fold: int | None = None
    folds: int = 1
    world_rank: int = 0
    group = None  # a fold's DDP process group under Ray; None: all ranks
    started_at: float | None = None  # time.time() when the run began, to report start-up; None: don't
    startup_marks: dict = field(default_factory=dict)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def mark_diverged(self, reason: str) -> None:
        self.diverged = reason

    def latest_checkpoint(self):
        """A context giving the checkpoint folder to resume from, or None."""
        found = self.checkpoint_dir and Path(self.checkpoint_dir, STATE_FILE).exists()
        return contextlib.nullcontext(self.checkpoint_dir if found else None)

    def report(self, metrics: dict, write_checkpoint: Callable[[str], None] | None) -> None:
        self.history.append(metrics)
        if self.checkpoint_dir and write_checkpoint:
            Path(self.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            write_checkpoint(self.checkpoint_dir)


def make_optimizer(model: nn.Module, params: dict, cfg: Config) -> torch.optim.Optimizer:
    """Four groups: {body, head} x {decay, no decay}. Biases and norm weights get no weight decay
    (as timm does); body and head are split so head-only warm-up can hold the body still."""
    prefix = head_prefix(model)
    groups = {(h, d): [] for h in (False, True) for d in (False, True)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(is_head_param(name, prefix), p.ndim > 1)].append(p)
    param_groups = [{"params": ps, "weight_decay": params["weight_decay"] if decay else 0.0, "is_head": head}
                    for (head, decay), ps in groups.items() if ps]
    lr, name = params["lr"], params["optimizer"]
    # One fused kernel per step instead of torch's default per-parameter Python loop on CPU: several times
    # faster per step, and fewer Python-level ops also means less GIL handover to the Ray worker's main
    # thread (docs/performance.md). RMSprop has no fused kernel (its foreach form is slower on CPU).
    fused = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, **fused)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, **fused)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True, **fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(param_groups, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")  # config validation makes this unreachable


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse frequency, normalised so a balanced set gets weight 1 per class (sklearn's "balanced")."""
    from sklearn.utils.class_weight import compute_class_weight

    return torch.tensor(compute_class_weight("balanced", classes=np.array([0, 1]), y=labels), dtype=torch.float32)


def epoch_indices(labels: np.ndarray, weighting: str, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's sample order for one epoch. All ranks draw the same permutation (same seed),
    then take disjoint strides of it, padded so every rank runs the same number of steps."""
    n = len(labels)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weighting == "sampler":
        per_sample = class_weights(labels)[torch.from_numpy(labels)]
        order = torch.multinomial(per_sample, n, replacement=True, generator=g)
    else:
        order = torch.randperm(n, generator=g)
    per_rank = math.ceil(n / world)
    order = torch.cat([order, order[: per_rank * world - n]])
    return order[rank::world]


def _diverged(loss: torch.Tensor, session) -> bool:
    """True when the loss is NaN/inf on any rank of this model. Collective under DDP, so every rank stops
    together instead of one leaving the others waiting in the next gradient all-reduce."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)  # stays on the loss's device (NCCL needs CUDA)
    if session.world_size > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=session.group)
    return bool(bad.item())


def average_bn_stats(model: nn.Module, session) -> None:
    """DDP syncs gradients, not BatchNorm running stats: average them over this model's ranks so that every
    rank (and the checkpoint, written by its first rank) holds the same model. timm's ``distribute_bn`` does
    the same over all ranks; cross-validated trials need it within one fold's ranks."""
    for name, buf in unwrap(model).named_buffers():
        if name.endswith(("running_mean", "running_var")):
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM, group=session.group)
            buf /= session.world_size


def _any_worker(flag: bool) -> bool:
    """``flag`` on any worker of the trial (all of them, across folds); just ``flag`` without DDP."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([float(flag)])  # gloo and NCCL both reduce a CPU tensor through the default group here
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def fold_summary(val: dict | None, metric: str, session) -> dict:
    """The val metrics of all folds' models, gathered from each fold's first rank (``val``; None on the
    others): their mean under each metric's own name, which is what Tune, ASHA and Optuna see, their sd as
    ``<name>_sd``, and the selection metric of each fold as ``<metric>_fold<k>``. Collective over every
    worker of the trial, so it also keeps the folds in step, epoch by epoch."""
    mine = torch.tensor([val[k] if val else math.nan for k in VAL_METRICS], dtype=torch.float64,
                        device=session.device)
    gathered = [torch.empty_like(mine) for _ in range(session.world_size * session.folds)]
    torch.distributed.all_gather(gathered, mine)
    per_fold = torch.stack(gathered).cpu().numpy()[:: session.world_size]  # ranks are ordered fold by fold
    out = {f"{key}{stat}": float(f(per_fold[:, i])) for i, key in enumerate(VAL_METRICS)
           for stat, f in (("", np.mean), ("_sd", lambda v: np.std(v, ddof=1)))}
    out.update({f"{metric}_fold{k}": float(v) for k, v in enumerate(per_fold[:, VAL_METRICS.index(metric)])})
    return out


def any_fold_diverged(reason: str | None, session) -> str | None:
    """Every fold stops when one diverges: ``reason`` on the folds that did, a note naming it on the others.
    Collective over every worker of the trial."""
    flag = torch.tensor([session.fold + 1 if reason else 0], dtype=torch.float64, device=session.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return reason or (f"diverged: the loss of fold {int(flag.item()) - 1} became NaN/inf" if flag.item() else None)


# --------------------------------------------------------------------------- the loop


class LossDiverged(Exception):
    """The loss became NaN/inf; the message is the reason a trial reports."""


@dataclass
class Run:
    """One trial's training state: what a checkpoint saves and a restart restores."""

    model: nn.Module  # wrapped in DDP when the session has several workers
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    aug_gen: torch.Generator
    steps_per_epoch: int
    local_batch: int
    monitor: Monitor  # the watched val metric's course: plateau schedule, early stopping
    epoch: int = 0  # epochs done


def build_run(cfg: Config, params: dict, splits: Splits, session) -> Run:
    """The model, its optimizer, LR schedule and grad scaler, from scratch."""
    seed, m = cfg.experiment.seed, cfg.model  # m: the trial's model's own settings (with_trial_params)
    torch.manual_seed(seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    model = build_model(model_variant(cfg, params["model"])[0], splits.image_size, head_dropout=m.head_dropout,
                        pretrained=m.pretrained, weights_file=m.weights_file, head_hidden=m.head_hidden)
    if m.init != "default" and not m.pretrained:
        init_weights(model, m.init)
    freeze(model, params.get("freeze_depth", 0))
    model = session.prepare_model(model)
    optimizer = make_optimizer(unwrap(model), params, cfg)
    local_batch = max(2, params["batch_size"] // session.world_size)  # batch_size is global across ranks
    steps_per_epoch = max(1, math.ceil(len(splits.train_y) / session.world_size) // local_batch)
    monitor = monitor_for(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        (lambda step, head=g["is_head"]: lr_factor(step, steps_per_epoch, cfg, head, params["lr"]) * monitor.lr_scale)
        for g in optimizer.param_groups])
    scaler = torch.amp.GradScaler(session.device.type, enabled=cfg.train.amp and session.device.type == "cuda")
    aug_gen = torch.Generator().manual_seed(seed * 7919 + session.rank)
    return Run(model, optimizer, scheduler, scaler, aug_gen, steps_per_epoch, local_batch, monitor)


def train_epoch(run: Run, cfg: Config, params: dict, train_x: torch.Tensor, train_y: np.ndarray, mean: float,
                std: float, loss_weight: torch.Tensor | None, session) -> tuple[float, int]:
    """One epoch of steps on this rank's shard. Returns the summed loss and the images seen; raises
    LossDiverged when the loss turns NaN/inf on any rank."""
    device, use_amp = session.device, run.scaler.is_enabled()
    order = epoch_indices(train_y, params["class_weighting"], cfg.experiment.seed, run.epoch, session.rank,
                          session.world_size)
    total_loss, seen = 0.0, 0
    for step in range(run.steps_per_epoch):
        idx = order[step * run.local_batch:(step + 1) * run.local_batch]
        x = train_batch(train_x[idx].to(device), mean, std, cfg.augment, run.aug_gen)
        y = torch.from_numpy(train_y[idx.numpy()]).to(device)
        with torch.autocast(device.type, enabled=use_amp):
            loss = F.cross_entropy(run.model(x), y, weight=loss_weight, label_smoothing=cfg.train.label_smoothing)
        if _diverged(loss, session):
            raise LossDiverged(f"diverged: loss became {loss.item()} at epoch {run.epoch + 1} step {step + 1} "
                               f"(lr={params['lr']:.3g}, optimizer={params['optimizer']}, model={params['model']})")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        total_loss += loss.item() * len(idx)
        seen += len(idx)
    return total_loss, seen


def fit(cfg: Config, params: dict, splits: Splits, session) -> nn.Module:
    """Train one trial; report train loss and val metrics (rank 0) to the session every epoch, with a
    checkpoint. A diverged loss is reported and stops the trial. Returns the model, unwrapped from DDP.

    Under cross-validation (``session.fold`` set) this worker trains fold ``session.fold`` of ``splits``,
    the report carries the mean and sd over all folds, and the checkpoint is written to its fold's folder."""
    torch.set_num_threads(session.threads)  # the trial's CPU share, so concurrent trials don't oversubscribe
    cfg = with_trial_params(cfg, params)  # the optional dimensions this trial searched, in their fields
    splits = resized_splits(splits, trains_at(cfg, params["model"], splits.image_size))  # models.<label>.size
    folded = session.fold is not None
    if folded:
        splits = splits.fold(session.fold)
    run = build_run(cfg, params, splits, session)
    with session.latest_checkpoint() as restored:
        folder = os.path.join(restored, fold_dir_name(session.fold)) if restored and folded else restored
        problem = restore(run, folder, cfg.experiment.seed, session.rank) if restored else None
    if _any_worker(problem is not None):  # all start over, or the ranks' collectives would fall out of step
        log.warning("%s; training this trial again from epoch 1", problem or "a checkpoint on another rank is bad")
        run = build_run(cfg, params, splits, session)  # a half-read checkpoint may have loaded some of its state

    mean, std = normalization(cfg.augment.normalize, splits)  # (0, 1) for none: every image is standardised
    with warnings.catch_warnings():  # object-store arrays are read-only; we only ever index them
        warnings.simplefilter("ignore", UserWarning)
        train_x = torch.from_numpy(splits.train_x)
    loss_weight = class_weights(splits.train_y).to(session.device) if params["class_weighting"] == "loss" else None
    where = {"node_id": session.node_id}  # which machine trained this epoch: shows placement and failover
    meta = {"model": params["model"], "params": params, "image_size": splits.image_size, "mean": mean, "std": std,
            "normalize": True, "class_names": list(splits.class_names),
            "head_dropout": cfg.model.head_dropout, "arch": model_variant(cfg, params["model"])[0],
            "head_hidden": cfg.model.head_hidden}

    def write_checkpoint(directory: str, metrics: dict, fold_val: dict | None) -> None:
        if not folded:
            return write_trial_checkpoint(directory, run, {**meta, "metrics": metrics})
        fold_dir = os.path.join(directory, fold_dir_name(session.fold))
        os.makedirs(fold_dir)
        write_trial_checkpoint(fold_dir, run, {**meta, "fold": session.fold, "metrics": {**metrics, **fold_val}})
        if session.world_rank == 0:  # the trial's own meta.json: what it is ranked by, and how many folds
            Path(directory, META_FILE).write_text(json.dumps({**meta, "cv_folds": session.folds, "metrics": metrics},
                                                             indent=1))

    started_at = None if restored else session.started_at  # trial start -> first batch, on a fresh start only
    first_epoch = run.epoch
    while run.epoch < cfg.train.epochs:
        epoch_started_at = time.time()
        set_train_mode(unwrap(run.model), run.epoch < cfg.model.head_warmup_epochs, cfg.model.freeze_bn)
        try:
            total_loss, seen = train_epoch(run, cfg, params, train_x, splits.train_y, mean, std, loss_weight, session)
            diverged = None
        except LossDiverged as err:
            diverged = str(err)
        if folded:
            diverged = any_fold_diverged(diverged, session)
        if diverged:
            # Report it and stop, rather than raise: Ray Train retries a raised error from the last
            # checkpoint, which would only diverge again. The trial turns this report into a failure.
            nan = dict.fromkeys(("train_loss", *VAL_METRICS), math.nan)
            session.report({"epoch": run.epoch + 1, **nan, "diverged": 1, **where}, write_checkpoint=None)
            session.mark_diverged(diverged)
            return unwrap(run.model)
        train_seconds = time.time() - epoch_started_at
        if session.world_size > 1:
            average_bn_stats(run.model, session)
        run.epoch += 1
        metrics = {"epoch": run.epoch, "train_loss": total_loss / max(1, seen),
                   "lr": run.optimizer.param_groups[0]["lr"], "diverged": 0, "epoch_started_at": epoch_started_at,
                   "train_seconds": train_seconds, "train_images_per_s": seen * session.world_size / train_seconds,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **where}  # Linux: KiB
        if run.epoch - 1 == first_epoch and started_at is not None:
            metrics["startup_s"] = epoch_started_at - started_at  # trial start -> its first training batch
            metrics.update({f"startup_{stage}_s": at - started_at for stage, at in session.startup_marks.items()})
        val = None
        if session.rank == 0:  # val is small; one rank evaluates it whole, the others wait at the report
            val, _ = evaluate(unwrap(run.model), splits.val_x, splits.val_y, mean, std, True,
                              session.device, "val_", cfg.train.eval_batch_size)
        metrics.update(fold_summary(val, cfg.search.metric, session) if folded else val or {})
        stop = watches(cfg) and watch(run, metrics, cfg, params, session)
        session.report({**metrics, "early_stopped": int(stop)}, lambda d: write_checkpoint(d, metrics, val))
        if stop:
            break
    return unwrap(run.model)


def watch(run: Run, metrics: dict, cfg: Config, params: dict, session) -> bool:
    """Feed the monitor rank 0's watched metric (on every rank: all cut and stop together). True: stop."""
    value = torch.tensor([metrics.get(monitored_metric(cfg), math.nan)], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(value, src=0)
    run.monitor.update(float(value.item()), cfg, params["lr"])
    for group, base, factor in zip(run.optimizer.param_groups, run.scheduler.base_lrs, run.scheduler.lr_lambdas):
        group["lr"] = base * factor(run.scheduler.last_epoch)  # the next step's LR, with any cut just made
    return run.monitor.should_stop(cfg)
