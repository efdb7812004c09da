"""What runs inside Ray for one trial: the Tune trial function, the Train worker entry, the inline trial.

Ray 2.60 runs Train V2, whose recommended Train-inside-Tune pattern is a Tune *function* trainable
that builds a ``TorchTrainer`` and forwards its reports to Tune with ``TuneReportCallback``. With
``resources.launcher: inline`` the Tune trial trains in its own process instead, and Tune keeps its
checkpoints. Either way the training itself is ``train.fit``, reached through a ``RaySession``.

This module imports neither torch nor the training loop at the top: a TorchTrainer trial's Tune
process and Train controller only build and watch the run, and importing the training stack would
cost each of them start-up time and memory. The workers import it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from typing import TYPE_CHECKING, Callable

from pneumo_ray import storage
from pneumo_ray.cluster import workers_per_run
from pneumo_ray.config import Config
from pneumo_ray.layout import DIVERGED_FILE, TRAIN_RUNS
from pneumo_ray.validation import selection_mode

if TYPE_CHECKING:
    from torch import nn

    from pneumo_ray.data import Splits


class TrialDiverged(RuntimeError):
    """The trial's loss became NaN/inf; Tune records the trial as failed with this message."""


# --------------------------------------------------------------------------- the Tune trial


def tune_trial(params: dict, cfg: Config, splits_holder: dict) -> None:
    """One Tune trial = one Ray Train run. Its id names the Train run, so a restored trial (after a
    driver crash) resumes the same run from its latest checkpoint. With resources.launcher: inline, the
    trial trains right here instead."""
    import ray
    from ray import tune

    started_at = time.time()  # the trial's start, for the start-up time it reports with epoch 1
    trial_id = tune.get_context().get_trial_id()
    diverged_file = storage.join(cfg.experiment_uri, TRAIN_RUNS, trial_id, DIVERGED_FILE)
    if storage.exists(diverged_file):  # Tune retrying an inline trial that diverged: it would again
        raise TrialDiverged(storage.read_text(diverged_file))
    if cfg.resources.launcher == "inline":
        inline_trial(cfg, dict(params), ray.get(splits_holder["ref"]), diverged_file, started_at)
    else:
        train_trial(cfg, params, splits_holder, trial_id, diverged_file, started_at)
    if storage.exists(diverged_file):
        raise TrialDiverged(storage.read_text(diverged_file))


def train_trial(cfg: Config, params: dict, splits_holder: dict, trial_id: str, diverged_file: str,
                started_at: float) -> None:
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from pneumo_ray.torch_trainer import torch_trainer

    metric = cfg.search.metric
    trainer = torch_trainer(
        train_worker,
        train_loop_config={"cfg": cfg, "params": dict(params), "splits_ref": splits_holder["ref"],
                           "diverged_file": diverged_file, "started_at": started_at},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=trial_id,
            storage_path=storage.join(cfg.experiment_uri, TRAIN_RUNS),
            # Keeps the best epoch by the selection metric; Ray also always keeps the latest, to resume from.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=selection_mode(metric)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def scaling_config(cfg: Config):
    """Workers per trial and what each reserves. Fractional GPUs (0.25) pack several small trials onto
    one GPU; ``use_gpu`` also makes Ray Train pick NCCL over gloo for DDP. ``gpus_per_worker`` is a
    number here: the sweep settled ``auto`` against the cluster (cluster.resolve_gpus).

    A cross-validated trial is one Ray Train run whose workers split the folds: ``workers_per_trial``
    DDP workers per fold, fold by fold in rank order. One run rather than one per fold, because then the
    folds are placed together (one placement group: all start at once, on as many nodes as they need, or
    none start), report to Tune as one stream (the fold mean, gathered each epoch), and are checkpointed
    and restored together, so a restarted trial resumes every fold from the same epoch."""
    import ray.train

    r = cfg.resources
    gpus = float(r.gpus_per_worker)
    return ray.train.ScalingConfig(num_workers=workers_per_run(cfg), use_gpu=gpus > 0,
                                   resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": gpus} if gpus else {})})


def inline_run_config(cfg: Config) -> dict:
    """Inline trials checkpoint through Tune, so Tune keeps (the best epoch, and the latest to resume
    from) and retries them. Ray Train does both itself for TorchTrainer trials: Tune must not retry those."""
    from ray import tune

    if cfg.resources.launcher != "inline":
        return {}
    metric = cfg.search.metric
    return {"checkpoint_config": tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                       checkpoint_score_order=selection_mode(metric)),
            "failure_config": tune.FailureConfig(max_failures=cfg.resources.max_failures)}


def reuse_trial_processes(cfg: Config) -> bool:
    """An inline trial's process, with torch and the model code imported, serves the next trial. Not on
    GPUs: a reused process would keep its cached GPU memory (Ray issue #32725). Never for TorchTrainer
    trials: Tune stops a trial (ASHA, or its last epoch) while ``trainer.fit()`` still runs in it.
    Without reuse Tune kills that process, and Ray ends its Train controller and workers with it; with
    reuse Tune waits only briefly (TUNE_FUNCTION_THREAD_TIMEOUT_S) for the function to return, then
    fails the next trial ("Trainable runner reuse requires reset_config() ..."), and an early-stopped
    Train run would go on training."""
    return cfg.resources.launcher == "inline" and float(cfg.resources.gpus_per_worker) == 0


# --------------------------------------------------------------------------- training under Ray


def train_worker(loop_config: dict) -> None:
    """Ray Train's entry point on each worker. The trainer holds it by reference to this light module,
    so the trial's coordinator never imports the training stack; the worker does, here."""
    import psutil  # a Ray dependency
    import ray

    worker_ready_at = time.time()  # Ray Train's own start-up ends here; ours begins
    from pneumo_ray.train import fit

    cfg = loop_config["cfg"]
    session = RaySession(threads=max(1, int(cfg.resources.cpus_per_worker)),
                         diverged_file=loop_config["diverged_file"], started_at=loop_config.get("started_at"),
                         folds=cfg.data.cv_folds)
    # Where a TorchTrainer trial's start-up goes, reported with epoch 1.
    session.startup_marks = {"worker_spawned": psutil.Process().create_time(), "worker_ready": worker_ready_at}
    fit(cfg, loop_config["params"], ray.get(loop_config["splits_ref"]), session)  # zero-copy numpy views


def inline_trial(cfg: Config, params: dict, splits: Splits, diverged_file: str, started_at: float) -> None:
    """A trial trained in the Tune trial process itself (resources.launcher: inline)."""
    from pneumo_ray.train import fit

    session = RaySession(threads=max(1, int(cfg.resources.cpus_per_worker)), diverged_file=diverged_file,
                         inline=True, started_at=started_at)
    fit(cfg, params, splits, session)


class RaySession:
    """What ``train.fit`` needs from Ray Train's worker context: DDP via ``prepare_model``, checkpoints
    via ``ray.train.report``. With ``inline=True``, the Tune trial process itself: one worker, no Ray
    Train, checkpoints via ``ray.tune.report``; Tune restores them on a retry or --resume."""

    def __init__(self, threads: int, diverged_file: str | None = None, inline: bool = False,
                 started_at: float | None = None, folds: int = 0):
        import ray
        import torch

        self.fold, self.folds, self.group = None, 1, None
        if inline:
            import ray.tune

            self._api = ray.tune
            self.rank, self.world_size, self.world_rank = 0, 1, 0
            # Ray sets CUDA_VISIBLE_DEVICES to the trial's (possibly fractional) GPU, if it has one
            self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        else:
            import ray.train
            import ray.train.torch

            self._api = ray.train
            ctx = ray.train.get_context()
            self.world_rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
            self.rank = self.world_rank
            self.device = ray.train.torch.get_device()
            if folds >= 2:  # see scaling_config: fold k's DDP workers are ranks k*W .. k*W+W-1
                per_fold = self.world_size // folds
                self.fold, self.folds = self.world_rank // per_fold, folds
                self.rank, self.world_size = self.world_rank % per_fold, per_fold
                # Every rank must create every group, in the same order; each keeps its own fold's.
                groups = [torch.distributed.new_group(list(range(k * per_fold, (k + 1) * per_fold)))
                          for k in range(folds)] if per_fold > 1 else [None] * folds
                self.group = groups[self.fold]
        self.inline = inline
        self.node_id = ray.get_runtime_context().get_node_id()
        self.threads = threads
        self.diverged_file = diverged_file
        self.started_at = started_at  # time.time() at the trial's start, to report start-up
        self.startup_marks: dict[str, float] = {}  # stage -> time.time(), reported as startup_<stage>_s

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.inline:
            return model.to(self.device)
        if self.fold is not None:  # DDP within this fold's workers only: Ray's prepare_model would span all folds
            from torch.nn.parallel import DistributedDataParallel

            model = model.to(self.device)
            if self.world_size == 1:
                return model
            return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                           process_group=self.group)
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP over gloo (CPU) or NCCL (GPU) when world > 1

    def mark_diverged(self, reason: str) -> None:
        """Leave the reason where the trial's coordinator looks after the run: Ray Train's result only
        carries metrics of checkpointed reports, and a diverged epoch has no checkpoint."""
        if self.world_rank == 0 and self.diverged_file:
            storage.write_text(self.diverged_file, reason)

    def latest_checkpoint(self):
        """A context giving the checkpoint folder to resume from (set when Ray retries or resumes this
        trial), or None. Ray's as_directory reads a local checkpoint in place, and deletes the copy it
        downloads of a cloud one when the context ends."""
        checkpoint = self._api.get_checkpoint()
        return contextlib.nullcontext(None) if checkpoint is None else checkpoint.as_directory()

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
        # DDP ranks hold identical weights: one copy is enough. Under CV each fold's first rank writes its
        # fold's folder; Ray Train merges all workers' files into one checkpoint.
        if self.rank == 0 and write_checkpoint:
            tmp = tempfile.mkdtemp(prefix="pneumo-ckpt-")
            write_checkpoint(tmp)
            checkpoint = self._api.Checkpoint.from_directory(tmp)
        # ASYNC: Ray Train copies the checkpoint to storage (then deletes tmp) in a background thread while
        # the next epoch trains, rather than stalling every epoch on the copy of the model and optimizer
        # state. Ray waits for the last upload before the run ends.
        self._api.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=self._api.CheckpointUploadMode.ASYNC)
