"""The one training loop: ``fit`` runs a trial on one worker, under Ray Train DDP or in-process.

``fit`` talks to its surroundings only through a ``Session`` (rank, device,
model preparation, checkpoint in, report out). ``RaySession`` is Ray Train's
worker context; ``LocalSession`` runs the very same loop in one process for the
benchmarks and tests. Nothing else in the project trains a model.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumo_ray import config as config_mod
from pneumo_ray import storage
from pneumo_ray.augment import augment_batch, to_float
from pneumo_ray.config import Config
from pneumo_ray.data import Splits
from pneumo_ray.evaluate import evaluate
from pneumo_ray.models import build_model, freeze, head_prefix, is_head_param, set_train_mode, unwrap

MODEL_FILE = "model.pt"  # weights only: what the leaderboard and predict load
STATE_FILE = "train_state.pt"  # optimizer/scheduler/scaler: what a retried trial resumes from
META_FILE = "meta.json"  # model name, hyperparameters, normalisation, this epoch's metrics


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
    started_at: float | None = None  # time.time() when the run began, to report start-up; None: don't
    startup_marks: dict = field(default_factory=dict)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def mark_diverged(self, reason: str) -> None:
        self.diverged = reason

    def latest_checkpoint(self) -> str | None:
        return self.checkpoint_dir if self.checkpoint_dir and Path(self.checkpoint_dir, STATE_FILE).exists() else None

    def report(self, metrics: dict, write_checkpoint: Callable[[str], None] | None) -> None:
        self.history.append(metrics)
        if self.checkpoint_dir and write_checkpoint:
            Path(self.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            write_checkpoint(self.checkpoint_dir)


class RaySession:
    """Ray Train worker context: DDP via ``prepare_model``, checkpoints via ``ray.train.report``.
    With ``inline=True``, the Tune trial process itself (resources.launcher: inline): one worker, no
    Ray Train, checkpoints via ``ray.tune.report``; Tune restores them on a retry or --resume."""

    def __init__(self, threads: int, diverged_file: str | None = None, inline: bool = False,
                 started_at: float | None = None):
        import ray

        if inline:
            import ray.tune

            self._api = ray.tune
            self.rank, self.world_size = 0, 1
            # Ray sets CUDA_VISIBLE_DEVICES to the trial's (possibly fractional) GPU, if it has one
            self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        else:
            import ray.train
            import ray.train.torch

            self._api = ray.train
            ctx = ray.train.get_context()
            self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()
        self.inline = inline
        self.node_id = ray.get_runtime_context().get_node_id()
        self.threads = threads
        self.diverged_file = diverged_file
        self._restored = None
        self.started_at = started_at  # time.time() at the trial's start, to report start-up
        self.startup_marks: dict[str, float] = {}  # stage -> time.time(), reported as startup_<stage>_s

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.inline:
            return model.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP over gloo (CPU) or NCCL (GPU) when world > 1

    def mark_diverged(self, reason: str) -> None:
        """Leave the reason where the trial's coordinator looks after the run: Ray Train's result only
        carries metrics of checkpointed reports, and a diverged epoch has no checkpoint."""
        if self.rank == 0 and self.diverged_file:
            storage.write_text(self.diverged_file, reason)

    def latest_checkpoint(self) -> str | None:
        checkpoint = self._api.get_checkpoint()  # set when Ray retries or resumes this trial
        if checkpoint is None:
            return None
        self._restored = tempfile.mkdtemp(prefix="pneumo-restore-")
        return checkpoint.to_directory(self._restored)

    def report(self, metrics: dict, write_checkpoint: Callable[[str], None] | None) -> None:
        if self.inline:
            with tempfile.TemporaryDirectory(prefix="pneumo-ckpt-") as tmp:
                checkpoint = None
                if write_checkpoint:
                    write_checkpoint(tmp)
                    checkpoint = self._api.Checkpoint.from_directory(tmp)
                self._api.report(metrics, checkpoint=checkpoint)  # Tune copies the checkpoint before it returns
            return
        checkpoint = None
        if self.rank == 0 and write_checkpoint:  # DDP ranks hold identical weights: one copy is enough
            tmp = tempfile.mkdtemp(prefix="pneumo-ckpt-")
            write_checkpoint(tmp)
            checkpoint = self._api.Checkpoint.from_directory(tmp)
        # ASYNC: Ray Train copies the checkpoint to storage (then deletes tmp) in a background thread while
        # the next epoch trains; a synchronous copy of ResNet-18 with its AdamW state (~135 MB) stalls
        # every epoch by up to 0.3 s. Ray waits for the last upload before the run ends.
        self._api.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=self._api.CheckpointUploadMode.ASYNC)


def ray_train_worker(loop_config: dict) -> None:
    """Entry point of each Ray Train worker: unpacks the trial and runs ``fit``."""
    import ray

    cfg = config_mod.from_dict(loop_config["cfg"], check=False)  # validated by the driver
    splits = ray.get(loop_config["splits_ref"])  # zero-copy numpy views from the object store
    session = RaySession(threads=max(1, int(cfg.resources.cpus_per_worker)), diverged_file=loop_config["diverged_file"],
                         started_at=loop_config.get("started_at"))
    if "worker_ready_at" in loop_config:  # where a TorchTrainer trial's start-up goes, reported with epoch 1
        import psutil  # a Ray dependency

        session.startup_marks = {"worker_spawned": psutil.Process().create_time(),
                                 "worker_ready": loop_config["worker_ready_at"]}
    fit(cfg, loop_config["params"], splits, session)


def inline_trial(cfg: Config, params: dict, splits: Splits, diverged_file: str, started_at: float) -> None:
    """A trial trained in the Tune trial process itself (resources.launcher: inline)."""
    session = RaySession(threads=max(1, int(cfg.resources.cpus_per_worker)), diverged_file=diverged_file, inline=True,
                         started_at=started_at)
    fit(cfg, params, splits, session)


# --------------------------------------------------------------------------- pieces


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
    # One fused kernel per step instead of torch's default per-parameter Python loop on CPU: AdamW on
    # ResNet-18 steps in 4.7 ms instead of 34 ms here, and fewer Python-level ops also means less GIL
    # handover to the Ray worker's main thread. RMSprop has no fused kernel (its foreach form is slower on CPU).
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


def lr_factor(step: int, steps_per_epoch: int, cfg: Config, is_head: bool) -> float:
    """Linear warm-up then cosine decay to zero; the body stays at 0 during head-only warm-up."""
    epoch = step // steps_per_epoch
    if not is_head and epoch < cfg.model.head_warmup_epochs:
        return 0.0
    warmup, total = cfg.train.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse frequency, normalised so a balanced set gets weight 1 per class."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return torch.tensor(len(labels) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)


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


def _diverged(loss: torch.Tensor, world_size: int) -> bool:
    """True when the loss is NaN/inf on any rank. Collective under DDP, so every rank stops together
    instead of one leaving the others waiting in the next gradient all-reduce."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)  # stays on the loss's device (NCCL needs CUDA)
    if world_size > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bool(bad.item())


def _write_checkpoint(directory: str, model: nn.Module, optimizer, scheduler, scaler, aug_gen, meta: dict) -> None:
    torch.save(unwrap(model).state_dict(), os.path.join(directory, MODEL_FILE))
    # RNG states too, so a resumed trial continues the very same run (same augmentations, same dropout).
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": meta["metrics"]["epoch"],
                "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state()},
               os.path.join(directory, STATE_FILE))
    Path(directory, META_FILE).write_text(json.dumps(meta, indent=1))


# --------------------------------------------------------------------------- the loop


def fit(cfg: Config, params: dict, splits: Splits, session) -> nn.Module:
    """Train one trial; report train loss and val metrics (rank 0) to the session every epoch.
    Returns the trained model (unwrapped from DDP)."""
    torch.set_num_threads(session.threads)  # the trial's CPU share, so concurrent trials don't oversubscribe
    seed = cfg.experiment.seed
    torch.manual_seed(seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    device = session.device
    use_amp = cfg.train.amp and device.type == "cuda"

    model = build_model(params["model"], splits.image_size, head_dropout=cfg.model.head_dropout,
                        pretrained=cfg.model.pretrained, weights_file=cfg.model.weights_file)
    freeze(model, params.get("freeze_depth", 0))
    model = session.prepare_model(model)
    optimizer = make_optimizer(unwrap(model), params, cfg)

    train_y = splits.train_y
    local_batch = max(2, params["batch_size"] // session.world_size)  # batch_size is global across ranks
    steps_per_epoch = max(1, math.ceil(len(train_y) / session.world_size) // local_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [
        (lambda step, head=g["is_head"]: lr_factor(step, steps_per_epoch, cfg, head)) for g in optimizer.param_groups])
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    aug_gen = torch.Generator().manual_seed(seed * 7919 + session.rank)
    start_epoch = 0
    restored = session.latest_checkpoint()
    if restored:
        unwrap(model).load_state_dict(torch.load(os.path.join(restored, MODEL_FILE), weights_only=True))
        state = torch.load(os.path.join(restored, STATE_FILE), weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        if session.rank == 0:  # the checkpoint holds rank 0's random state; other ranks draw fresh streams
            aug_gen.set_state(state["aug_rng"])
            torch.set_rng_state(state["torch_rng"])
        else:
            aug_gen.manual_seed(seed * 7919 + session.rank + 104_729 * start_epoch)

    mean, std = splits.train_mean_std()
    normalize = cfg.augment.normalize
    with warnings.catch_warnings():  # object-store arrays are read-only; we only ever index them
        warnings.simplefilter("ignore", UserWarning)
        train_x = torch.from_numpy(splits.train_x)
    loss_weight = class_weights(train_y).to(device) if params["class_weighting"] == "loss" else None
    where = {"node_id": session.node_id}  # which machine trained this epoch: shows placement and failover
    meta = {"model": params["model"], "params": params, "image_size": splits.image_size, "mean": mean, "std": std,
            "normalize": normalize, "class_names": list(splits.class_names), "head_dropout": cfg.model.head_dropout}

    started_at = None if restored else session.started_at  # trial start -> first batch, on a fresh start only
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_started_at = time.time()
        set_train_mode(unwrap(model), body_frozen=epoch < cfg.model.head_warmup_epochs)
        order = epoch_indices(train_y, params["class_weighting"], seed, epoch, session.rank, session.world_size)
        total_loss, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * local_batch:(step + 1) * local_batch]
            x = augment_batch(to_float(train_x[idx].to(device), mean, std, normalize), cfg.augment, aug_gen)
            y = torch.from_numpy(train_y[idx.numpy()]).to(device)
            with torch.autocast(device.type, enabled=use_amp):
                loss = F.cross_entropy(model(x), y, weight=loss_weight)
            if _diverged(loss, session.world_size):
                # Report it and stop, rather than raise: Ray Train retries a raised error from the last
                # checkpoint, which would only diverge again. The sweep turns this report into a failed trial.
                reason = (f"diverged: loss became {loss.item()} at epoch {epoch + 1} step {step + 1} "
                          f"(lr={params['lr']:.3g}, optimizer={params['optimizer']}, model={params['model']})")
                nan = {k: math.nan for k in ("train_loss", "val_loss", "val_acc", "val_balanced_acc", "val_auc",
                                             "val_f1", "val_sensitivity", "val_specificity")}
                session.report({"epoch": epoch + 1, **nan, "diverged": 1, **where}, write_checkpoint=None)
                session.mark_diverged(reason)
                return unwrap(model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)

        train_seconds = time.time() - epoch_started_at
        if session.world_size > 1:
            # DDP syncs gradients, not BatchNorm running stats: average them so every rank (and the
            # checkpoint, written by rank 0) holds the same model.
            from timm.utils import distribute_bn  # here, not at the top: importing timm costs a trial ~2 s

            distribute_bn(model, session.world_size, reduce=True)
        metrics = {"epoch": epoch + 1, "train_loss": total_loss / max(1, seen), "lr": optimizer.param_groups[0]["lr"],
                   "diverged": 0, "epoch_started_at": epoch_started_at, "train_seconds": train_seconds,
                   "train_images_per_s": seen * session.world_size / train_seconds,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **where}  # Linux: KiB
        if epoch == start_epoch and started_at is not None:
            metrics["startup_s"] = epoch_started_at - started_at  # trial start -> its first training batch
            metrics.update({f"startup_{stage}_s": at - started_at for stage, at in session.startup_marks.items()})
        if session.rank == 0:  # val is small; one rank evaluates it whole, the others wait at the report
            val, _ = evaluate(unwrap(model), splits.val_x, splits.val_y, mean, std, normalize, device, "val_",
                              cfg.train.eval_batch_size)
            metrics.update(val)
        session.report(metrics, lambda d: _write_checkpoint(d, model, optimizer, scheduler, scaler, aug_gen,
                                                            {**meta, "metrics": metrics}))
    return unwrap(model)
