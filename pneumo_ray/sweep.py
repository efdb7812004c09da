"""The sweep: Ray Tune (Optuna TPE + ASHA) over trials that are each a Ray Train DDP run.

Ray 2.60 runs Train V2, whose recommended Train-inside-Tune pattern is a Tune
*function* trainable that builds a ``TorchTrainer`` and forwards its reports to
Tune with ``TuneReportCallback``. Everything that can be checked is checked in
``prepare`` before Ray starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pneumo_ray import config as config_mod
from pneumo_ray import storage
from pneumo_ray.config import Config, ConfigError
from pneumo_ray.data import Splits, load_splits
from pneumo_ray.storage import LEADERBOARD_OUTPUTS, TRAIN_RUNS

CONFIG_FILE = "pneumo_config.yaml"  # the resolved config, saved so --resume reruns exactly this sweep
OPTUNA_FILE = "optuna.db"
DIVERGED_FILE = "DIVERGED"  # written by a trial whose loss became NaN/inf: its reason
TRIAL_SLOT = "pneumo_trial"  # custom resource: one per concurrently running trial coordinator


def selection_mode(metric: str) -> str:
    return "min" if metric.endswith("loss") else "max"


@dataclass
class Prepared:
    cfg: Config
    splits: Splits
    resume: bool


def prepare(cfg: Config, resume: bool) -> Prepared:
    """All pre-flight checks, before Ray starts: experiment folder, data, models. Raises ConfigError."""
    exp_uri = cfg.experiment_uri
    try:
        storage.check_reachable(exp_uri)
    except Exception as err:
        raise ConfigError(f"experiment.storage: cannot open {cfg.experiment.storage} "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); check the path or URI "
                          "and, for a bucket, its credentials") from None
    saved = storage.join(exp_uri, CONFIG_FILE)
    if resume:
        if not storage.exists(saved):
            raise ConfigError(f"{exp_uri}: no experiment to resume here ({CONFIG_FILE} missing); "
                              "check --storage/--name, or drop --resume to start it")
        # Resume what was started, not today's YAML; but where it was found now, should the folder have moved.
        saved_cfg = config_mod.loads(storage.read_text(saved), saved)
        cfg = dataclasses.replace(saved_cfg, experiment=dataclasses.replace(
            saved_cfg.experiment, storage=cfg.experiment.storage))
    elif storage.has_files(exp_uri):
        raise ConfigError(f"{exp_uri}: experiment '{cfg.experiment.name}' already exists; "
                          "pass --resume to continue it or --name NEW to start another (nothing was overwritten)")
    if cfg.search.optuna_storage:
        check_study_storage(cfg.search.optuna_storage)
    splits = load_splits(cfg.data, cfg.experiment.seed)
    check_models(cfg, splits.image_size)
    return Prepared(cfg, splits, resume)


def check_study_storage(url: str) -> None:
    """Connect to the Optuna database now, so a wrong URL or a missing driver is a one-line error."""
    import optuna

    try:
        optuna.storages.RDBStorage(url)
    except ImportError as err:  # Optuna wraps SQLAlchemy's missing-driver error
        missing = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "its driver"
        raise ConfigError(f"search.optuna_storage: {url.split(':', 1)[0]} needs the Python module '{missing}'; "
                          "install it (for PostgreSQL: pip install 'pneumo-ray[postgres]')") from None
    except Exception as err:
        raise ConfigError(f"search.optuna_storage: cannot open {_hide_password(url)} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); check the URL and that the database runs") from None


def _hide_password(url: str) -> str:
    import re

    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def check_models(cfg: Config, image_size: int) -> None:
    """Build every searched model once and run a tiny batch through it, so a model that cannot take
    this image size or freeze depth fails now rather than as a failed trial an hour in."""
    import torch

    from pneumo_ray.models import build_model, max_freeze_depth

    for name in cfg.search.model:
        try:
            model = build_model(name, image_size, pretrained=cfg.model.pretrained, weights_file=cfg.model.weights_file)
            model.eval()
            with torch.no_grad():
                model(torch.zeros(2, 1, image_size, image_size))
        except Exception as err:
            raise ConfigError(f"search.model: {name!r} cannot be built for {image_size}px images "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        deepest = max_freeze_depth(model)
        if cfg.model.pretrained and max(cfg.search.freeze_depth) > deepest:
            raise ConfigError(f"search.freeze_depth: {max(cfg.search.freeze_depth)} exceeds the {deepest} "
                              f"stem/stage groups of {name}; use values 0..{deepest}")


# --------------------------------------------------------------------------- inside Ray


class TrialDiverged(RuntimeError):
    """The trial's loss became NaN/inf; Tune records the trial as failed with this message."""


def tune_trial(params: dict, cfg_dict: dict, splits_holder: dict) -> None:
    """One Tune trial = one Ray Train run. Its id names the Train run, so a restored trial
    (after a driver crash) resumes the same run from its latest checkpoint. With resources.launcher:
    inline, the trial trains right here instead, and Tune keeps its checkpoints."""
    import ray
    from ray import tune

    started_at = time.time()  # the trial's start, for the start-up time it reports with epoch 1
    cfg = config_mod.from_dict(cfg_dict, check=False)  # validated by the driver; checking imports timm
    trial_id = tune.get_context().get_trial_id()
    diverged_file = storage.join(cfg.experiment_uri, TRAIN_RUNS, trial_id, DIVERGED_FILE)
    if storage.exists(diverged_file):  # Tune retrying an inline trial that diverged: it would again
        raise TrialDiverged(storage.read_text(diverged_file))
    if cfg.resources.launcher == "inline":
        from pneumo_ray.train import inline_trial

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

    r = cfg.resources
    metric = cfg.search.metric
    trainer = torch_trainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "params": dict(params), "splits_ref": splits_holder["ref"],
                           "diverged_file": diverged_file, "started_at": started_at},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=trial_id,
            storage_path=storage.join(cfg.experiment_uri, TRAIN_RUNS),
            # Keeps the best epoch by the selection metric; Ray also always keeps the latest, to resume from.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=selection_mode(metric)),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def train_worker(loop_config: dict) -> None:
    """Ray Train's entry point, by reference to this light module: the trial's coordinator then never
    imports the training stack (timm and the loop cost seconds of start-up per process); workers do."""
    loop_config["worker_ready_at"] = time.time()  # Ray Train's own start-up ends here; ours begins
    from pneumo_ray.train import ray_train_worker

    ray_train_worker(loop_config)


def scaling_config(cfg: Config):
    """Workers per trial and what each reserves. Fractional GPUs (0.25) pack several small trials onto
    one GPU; ``use_gpu`` also makes Ray Train pick NCCL over gloo for DDP."""
    import ray.train

    r = cfg.resources
    gpus = float(r.gpus_per_worker)  # "auto" was resolved against the cluster before the sweep started
    return ray.train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=gpus > 0,
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
    """An inline trial's process, with torch and the model code imported, serves the next trial: ~3.5 s
    saved per trial. Not on GPUs: a reused process would keep its cached GPU memory (Ray issue #32725).
    Never for TorchTrainer trials, though it would save ~1.4 s each: Tune stops a trial (ASHA, or its
    last epoch) while ``trainer.fit()`` still runs in it. Without reuse Tune kills that process, and Ray
    ends its Train controller and workers with it; with reuse Tune waits only 2 s
    (TUNE_FUNCTION_THREAD_TIMEOUT_S) for the function to return, then fails the next trial ("Trainable
    runner reuse requires reset_config() ..."), and an early-stopped Train run would go on training."""
    return cfg.resources.launcher == "inline" and float(cfg.resources.gpus_per_worker) == 0


def make_sampler(cfg: Config):
    """The Optuna sampler, seeded by the experiment so a sweep can be repeated.

    TPE is multivariate (it models lr together with the optimizer it suits) and a constant liar (a trial
    still running counts as a poor one, so concurrent trials are not sent to the same spot). Optuna 5
    defaults to both; Optuna 3 and 4 default to neither, and call them experimental. Said explicitly,
    so that a sweep searches the same way on every Optuna the project accepts."""
    import warnings

    import optuna

    s = cfg.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.experiment.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=cfg.experiment.seed, n_startup_trials=s.startup_trials,
                                          multivariate=True, constant_liar=True)


def job_env_vars(cfg: Config, local: bool = False) -> dict[str, str]:
    """Environment of every Ray process of a sweep; ``local`` for the Ray a sweep starts on this machine.
    Train V2 gives up on a worker group that cannot start within 60 s; a trial retried after losing a
    node, or waiting for the autoscaler, needs longer. Its controller polls workers every 2 s, so a
    finished trial lingers up to 2 s before Tune can start the next: 0.5 s saves ~1.5 s per trial
    (a user's own RAY_TRAIN_HEALTH_CHECK_INTERVAL_S wins). On one machine no node can be preempted, so
    the PreemptionWatcher actor Train starts for every run is one process too many: about 1.5 s of a trial's
    start-up on 2 cores. A cluster keeps it (spot nodes). Nor can that Ray add nodes, so the trainer
    does not ask an autoscaler for them (torch_trainer.py); a cluster of hand-started nodes can say the
    same with PNEUMO_RAY_AUTOSCALER_REQUESTS=0 in the driver's environment. A user's own setting wins."""
    from pneumo_ray.torch_trainer import AUTOSCALER_REQUESTS

    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(cfg.resources.worker_start_timeout_s),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
    if local:
        for name in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", AUTOSCALER_REQUESTS):
            env[name] = os.environ.get(name, "0")
    elif AUTOSCALER_REQUESTS in os.environ:  # a cluster of hand-started nodes cannot grow either
        env[AUTOSCALER_REQUESTS] = os.environ[AUTOSCALER_REQUESTS]
    return env


def resolve_gpus(cfg: Config, cluster_resources: dict) -> None:
    """gpus_per_worker: auto -> 1 GPU per worker where the cluster has GPUs, else CPU training."""
    if cfg.resources.gpus_per_worker == "auto":
        cfg.resources.gpus_per_worker = 1.0 if cluster_resources.get("GPU", 0) > 0 else 0.0


def trial_resources(cfg: Config, cluster_resources: dict):
    """What each trial's Tune coordinator reserves. It only waits on its TorchTrainer, so where the
    cluster offers the TRIAL_SLOT resource (a local Ray, and cluster.yaml's head) it takes a slot and no
    CPU; elsewhere Tune's default of 1 CPU. An inline trial trains itself: it reserves the worker's share."""
    from ray import tune

    r = cfg.resources
    if r.launcher == "inline":
        gpus = float(r.gpus_per_worker)
        return tune.PlacementGroupFactory([{"CPU": r.cpus_per_worker, **({"GPU": gpus} if gpus else {})}])
    if cluster_resources.get(TRIAL_SLOT, 0) >= 1:
        return tune.PlacementGroupFactory([{TRIAL_SLOT: 1}])
    print(f"[pneumo-ray] the cluster has no '{TRIAL_SLOT}' resource: each trial's coordinator takes 1 CPU")
    return tune.PlacementGroupFactory([{"CPU": 1}])


def start_local_ray(cfg: Config, log_to_driver: bool = True, num_cpus: int | None = None, **init_kwargs):
    """Ray on this machine, as a sweep without --address starts it (the benchmarks and the test session
    start the same one): every core for training, one TRIAL_SLOT per concurrent trial for the trials'
    coordinators, and the dashboard on loopback only. The dashboard stays on because Train V2's
    placement-group cleaner asks its state API whether a stopped trial's controller is gone; without it
    an ASHA-stopped trial keeps its cores reserved. Returns ray.init's context."""
    import ray

    return ray.init(num_cpus=num_cpus or os.cpu_count() or 1, resources={TRIAL_SLOT: cfg.search.max_concurrent_trials},
                    dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                    runtime_env={"env_vars": job_env_vars(cfg, local=True)}, **init_kwargs)


def _init_ray(cfg: Config, address: str | None) -> int:
    """Connect to a cluster, or start a local Ray. Returns the number of trials that can run at once."""
    import ray

    s, r = cfg.search, cfg.resources
    if ray.is_initialized():  # a caller (a test session, a notebook) already runs Ray: use it as it is
        return s.max_concurrent_trials
    if address:
        ray.init(address=address, runtime_env={"env_vars": job_env_vars(cfg)})
        return s.max_concurrent_trials
    start_local_ray(cfg)
    cores = os.cpu_count() or 1
    per_trial = r.workers_per_trial * r.cpus_per_worker
    fits = max(1, math.floor(cores / per_trial + 1e-9))
    if fits < s.max_concurrent_trials:
        print(f"[pneumo-ray] {cores} cores fit {fits} trial(s) of {per_trial:g} CPUs at once; "
              f"running {fits} concurrently instead of search.max_concurrent_trials={s.max_concurrent_trials}")
    return min(fits, s.max_concurrent_trials)


def close_orphaned_study_trials(exp_dir: Path, storage_url: str, study_name: str) -> list[int]:
    """After a driver crash, Optuna rows of trials that Tune never saved stay RUNNING forever. Tune will
    not run them again (it re-asks the searcher instead), so mark them FAIL. Rows the saved searcher still
    tracks are left alone: the restored trials will complete them."""
    import pickle

    import optuna

    states = sorted(exp_dir.glob("searcher-state-*.pkl"))  # newest session last, by the name's timestamp
    if not states:
        return []
    with open(states[-1], "rb") as f:
        tracked = {t.number for t in pickle.load(f).get("_ot_trials", {}).values()}
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.number not in tracked]
    for number in orphans:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return orphans


def run(prepared: Prepared, address: str | None = None, leaderboard: bool = True):
    """Run (or resume) the sweep, then write the test leaderboard and report. Returns the leaderboard rows,
    or None when the sweep was interrupted before every trial finished. The benchmarks pass
    leaderboard=False: they compare searches, so the test split stays untouched, and each sweep is
    spared the 9-12 s (measured on a 2-trial sweep) of test evaluation, bootstrap and report figures."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pneumo_ray.leaderboard import write_leaderboard
    from pneumo_ray.report import write_report
    from pneumo_ray.search_space import DefineByRun, stratified_start

    cfg, splits = prepared.cfg, prepared.splits
    exp_uri = cfg.experiment_uri
    if not prepared.resume:
        storage.write_text(storage.join(exp_uri, CONFIG_FILE), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"[pneumo-ray] data {splits.summary()}")
    print(f"[pneumo-ray] experiment {exp_uri}  (tensorboard --logdir {exp_uri})")

    sweep_started = time.time()
    owns_ray = not ray.is_initialized()
    concurrency = _init_ray(cfg, address)
    try:
        s = cfg.search
        mode = selection_mode(s.metric)
        cluster = ray.cluster_resources()
        resolve_gpus(cfg, cluster)
        trainable = tune.with_parameters(tune_trial, cfg_dict=cfg.to_dict(), splits_holder={"ref": ray.put(splits)})
        trainable = tune.with_resources(trainable, trial_resources(cfg, cluster))
        storage_url = s.optuna_storage or f"sqlite:///{storage.join(exp_uri, OPTUNA_FILE)}"  # local only
        if prepared.resume:
            orphans = close_orphaned_study_trials(storage.mirror(exp_uri), storage_url, cfg.experiment.name)
            if orphans:
                print(f"[pneumo-ray] closed {len(orphans)} Optuna trial(s) left RUNNING by the crash: {orphans}")
            tuner = tune.Tuner.restore(exp_uri, trainable=trainable, resume_unfinished=True)
        else:
            searcher = OptunaSearch(
                space=DefineByRun(cfg), metric=s.metric, mode=mode,
                points_to_evaluate=[dict(p) for p in s.initial_points] + stratified_start(cfg) or None,
                sampler=make_sampler(cfg),
                study_name=cfg.experiment.name, storage=optuna.storages.RDBStorage(storage_url))
            scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=s.asha.grace_period,
                                       reduction_factor=s.asha.reduction_factor)
                         if s.asha.enabled else FIFOScheduler())
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(metric=s.metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                            num_samples=s.num_samples, max_concurrent_trials=concurrency,
                                            time_budget_s=s.time_budget_s,
                                            reuse_actors=reuse_trial_processes(cfg)),
                run_config=tune.RunConfig(name=cfg.experiment.name, storage_path=exp_uri.rsplit("/", 1)[0],
                                          **inline_run_config(cfg)),
            )
        results = tuner.fit()
        if results.num_errors:
            print(f"[pneumo-ray] {results.num_errors} trial(s) failed:")
            for r in results:
                if r.error:
                    print(f"  {r.path.rsplit('/', 1)[-1][:40]}: {str(r.error).strip().splitlines()[-1][:300]}")
    finally:
        if owns_ray:
            ray.shutdown()
    exp_dir = storage.mirror(exp_uri)  # the folder itself, or a local copy of a cloud experiment
    statuses = trial_statuses(exp_dir)
    finished = [s for s in statuses.values() if s in ("TERMINATED", "ERROR")]
    out_of_time = cfg.search.time_budget_s is not None and time.time() - sweep_started >= cfg.search.time_budget_s
    if len(finished) < cfg.search.num_samples and not out_of_time:
        return None  # interrupted (Ctrl+C): Tune saved its state; the test split stays untouched
    if not leaderboard:
        return []
    rows = write_leaderboard(exp_dir, cfg, splits)
    write_report(exp_dir, cfg, splits)
    storage.publish(exp_dir, exp_uri, LEADERBOARD_OUTPUTS)
    return rows


def trial_statuses(exp_dir: Path) -> dict[str, str]:
    """Trial id -> status as Tune last saved it. This saved state, not the in-memory ResultGrid, tells
    an interrupted sweep apart: on Ctrl+C Tune marks running trials TERMINATED in memory, but saves them
    as RUNNING/PENDING so that a restore runs them again."""
    return {t["trial_id"]: t["status"] for t in storage.saved_trials(exp_dir)}