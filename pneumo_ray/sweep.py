"""The sweep: Ray Tune (Optuna TPE + ASHA) over trials, then the test leaderboard and the report.

``prepare`` checks everything that can be checked before Ray starts (the experiment folder, the
study's database, the data, every searched model); ``run`` searches; ``finish`` ranks the kept trials
on test, once, and writes the report. What runs inside Ray for each trial is ``trial.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pneumo_ray import cluster, credentials, manifest, storage
from pneumo_ray import config as config_mod
from pneumo_ray.config import Config, ConfigError
from pneumo_ray.data import Splits, load_splits
from pneumo_ray.errors import StorageFull
from pneumo_ray.layout import CONFIG_FILE, LEADERBOARD_OUTPUTS, SEARCHER_STATE_GLOB, TUNE_STATE_GLOB, default_study_url
from pneumo_ray.repeats import run_repeats
from pneumo_ray.validation import selection_mode, trial_epochs

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    cfg: Config
    splits: Splits
    resume: bool
    storage_reserve: int = 0  # bytes the running trials may still write; 0: not watched
    data_identity: dict | None = None  # manifest.json's "data": checked on --resume, recorded on a new start


def prepare(cfg: Config, resume: bool, local: bool = False, check_ray: bool = True) -> Prepared:
    """All pre-flight checks, before Ray starts: experiment folder (and on --resume its saved state), the
    study's database, data, models, free space, and for a sweep on this machine (``local``), that one
    trial fits its cores and (``check_ray``) that no other Ray runs here. Raises ConfigError."""
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
        try:
            saved_cfg = config_mod.loads(storage.read_text(saved), saved)
        except ConfigError as err:
            raise ConfigError(f"{err} -- the experiment's saved config is damaged: restore {CONFIG_FILE} from a "
                              "copy, or start the sweep again under --name NEW") from None
        check_tune_state(exp_uri)
        cfg = dataclasses.replace(saved_cfg, experiment=dataclasses.replace(
            saved_cfg.experiment, storage=cfg.experiment.storage))
        cfg = manifest.as_started(cfg, exp_uri)
    elif storage.has_files(exp_uri):
        raise ConfigError(f"{exp_uri}: experiment '{cfg.experiment.name}' already exists; "
                          "pass --resume to continue it or --name NEW to start another (nothing was overwritten)")
    if cfg.search.optuna_storage:
        check_study_storage(cfg.search.optuna_storage)
    if cfg.tracking.mlflow.tracking_uri:
        from pneumo_ray import tracking

        tracking.check(cfg)
    from pneumo_ray.model_settings import check_models

    splits = load_sweep_splits(cfg)
    identity = manifest.data_identity(cfg.data, splits)
    if resume:
        manifest.check_resume(exp_uri, identity)
    if local:
        cluster.check_fits_here(cfg)
    reserve = storage_reserve(cfg, check_models(cfg, splits.image_size))
    free = storage.free_bytes(exp_uri)
    if free is not None and free < reserve:
        raise ConfigError(f"{low_space(exp_uri, free, reserve)}; free some space or choose another --storage")
    if local and check_ray:  # last: whatever is wrong with the input is said first
        cluster.check_no_other_ray()
    return Prepared(cfg, splits, resume, reserve, identity)


def load_sweep_splits(cfg: Config) -> Splits:
    """The sweep's data, at the largest size any of its models trains at (models.<label>.size)."""
    from pneumo_ray.model_settings import loaded_size

    return load_splits(dataclasses.replace(cfg.data, size=loaded_size(cfg)), cfg.experiment.seed)


def storage_reserve(cfg: Config, model_bytes: int) -> int:
    """What the running trials may still write: each fold-model's checkpoints (weights plus optimizer
    state, up to three times the weights; Ray keeps the best and the latest while it writes the next),
    for every trial at once, plus room for Tune's logs and state."""
    return 9 * model_bytes * max(1, cfg.data.cv_folds) * cfg.search.max_concurrent_trials + 32 * 2**20


def low_space(where: str, free: int, reserve: int) -> str:
    return (f"experiment.storage: {where} has {free / 2**20:.0f} MB free, less than the {reserve / 2**20:.0f} MB "
            "the running trials may need")


def check_tune_state(exp_uri: str) -> None:
    """--resume restores Tune's saved state: the Tuner (tuner.pkl) and the newest experiment state. A
    copy that lost them, or a state file cut short, would fail deep in Tune after Ray started."""
    import json

    exp_dir = storage.mirror(exp_uri)
    states = sorted(exp_dir.glob(TUNE_STATE_GLOB))
    problem = None if (exp_dir / "tuner.pkl").is_file() else "tuner.pkl is missing"
    if problem is None and not states:
        problem = f"no {TUNE_STATE_GLOB}"
    if problem is None:
        try:
            json.loads(states[-1].read_text())["trial_data"]
        except (ValueError, KeyError, OSError) as err:
            problem = f"{states[-1].name} is unreadable ({type(err).__name__})"
    if problem:
        raise ConfigError(f"{exp_uri}: cannot resume, Tune's saved state is damaged ({problem}); start the "
                          "sweep again under --name NEW (this folder and its finished trials are left as they are)")


def claim_experiment(cfg: Config) -> None:
    """Make this the one sweep of its name, and save its config. Two sweeps started at once under one
    name both pass prepare's "already exists" check, so the claim itself must be atomic: locally the
    config file is created exclusively (O_EXCL). A bucket has no such write through pyarrow, but a
    bucket's study lives in a database (validated), and there the study is created exclusively instead:
    the database's unique study name decides. Raises ConfigError for the one that lost, before Ray."""
    import optuna

    exp_uri, name = cfg.experiment_uri, cfg.experiment.name
    lost = ConfigError(f"{exp_uri}: experiment '{name}' already exists (another sweep just started it, or its "
                       "Optuna study is in search.optuna_storage); pass --resume to continue it or --name NEW to "
                       "start another (nothing was overwritten)")
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    config_file = storage.join(exp_uri, CONFIG_FILE)
    if not storage.is_remote(exp_uri):
        Path(exp_uri).mkdir(parents=True, exist_ok=True)
        try:
            with open(config_file, "x") as f:
                f.write(text)
        except FileExistsError:
            raise lost from None
    if cfg.search.optuna_storage:  # a database outlives any one folder: a new experiment needs a new study
        try:
            optuna.create_study(study_name=name, storage=credentials.ReferencedRDBStorage(cfg.search.optuna_storage),
                                direction="minimize" if selection_mode(cfg.search.metric) == "min" else "maximize")
        except optuna.exceptions.DuplicatedStudyError:
            if not storage.is_remote(exp_uri):
                Path(config_file).unlink()  # the file this sweep just created, and nothing else
            raise lost from None
    if storage.is_remote(exp_uri):
        storage.write_text(config_file, text)


def check_study_storage(reference: str) -> None:
    """Connect to the Optuna database now, so a wrong URL, a missing driver or an unset environment
    variable is a one-line error."""
    import optuna

    url = credentials.expand(reference, "search.optuna_storage")
    try:
        optuna.storages.RDBStorage(url)
    except ImportError as err:  # Optuna wraps SQLAlchemy's missing-driver error
        missing = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "its driver"
        raise ConfigError(f"search.optuna_storage: {url.split(':', 1)[0]} needs the Python module '{missing}'; "
                          "install it (for PostgreSQL: pip install 'pneumo-ray[postgres]')") from None
    except Exception as err:
        message = str(err).splitlines()[0][:200].replace(url, credentials.masked(url))
        raise ConfigError(f"search.optuna_storage: cannot open {credentials.masked(url)} ({type(err).__name__}: "
                          f"{message}); check the URL and that the database runs") from None


def close_orphaned_study_trials(exp_dir: Path, study_storage, study_name: str) -> list[int]:
    """After a driver crash, Optuna rows of trials that Tune never saved stay RUNNING forever. Tune will
    not run them again (it re-asks the searcher instead), so mark them FAIL. Rows the saved searcher still
    tracks are left alone: the restored trials will complete them."""
    import pickle

    import optuna

    states = sorted(exp_dir.glob(SEARCHER_STATE_GLOB))  # newest session last, by the name's timestamp
    if not states:
        return []
    with open(states[-1], "rb") as f:
        tracked = {t.number for t in pickle.load(f).get("_ot_trials", {}).values()}
    study = optuna.load_study(study_name=study_name, storage=study_storage)
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.number not in tracked]
    for number in orphans:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return orphans


@dataclass
class Outcome:
    """What ``run`` ends with. ``finished`` is False when the sweep was interrupted (Ctrl+C) before every
    trial ended: Tune saved its state, ``--resume`` goes on, and the test split stays untouched. ``rows``
    are the leaderboard's, empty unless the sweep finished and was asked for a leaderboard."""

    finished: bool
    rows: list[dict]


def run(prepared: Prepared, address: str | None = None, leaderboard: bool = True) -> Outcome:
    """Run (or resume) the sweep, then ``finish`` it. The benchmarks pass leaderboard=False: they compare
    searches, so the test split stays untouched and no sweep pays for test evaluation and the report."""
    import ray

    cfg, splits = prepared.cfg, prepared.splits
    exp_uri = cfg.experiment_uri
    if not prepared.resume:
        claim_experiment(cfg)
    if cfg.tracking.mlflow.tracking_uri:
        from pneumo_ray.tracking import ensure_experiment

        ensure_experiment(cfg)
    log.info("data %s", splits.summary())
    log.info("experiment %s  (tensorboard --logdir %s)", exp_uri, exp_uri)

    sweep_started = time.time()
    owns_ray = not ray.is_initialized()
    concurrency = cluster.init_ray(cfg, address)
    cluster.remove_orphaned_placement_groups()  # cores a killed or finished run left reserved
    outcome = "failed"
    try:
        manifest.begin_session(cfg, prepared.data_identity or manifest.data_identity(cfg.data, splits))
        cfg = cluster.resolve_gpus(cfg, ray.cluster_resources())
        results = make_tuner(cfg, splits, prepared.resume, concurrency, prepared.storage_reserve).fit()
        for result in results:
            if result.error:
                log.info("trial %s failed: %s", result.path.rsplit("/", 1)[-1][:40],
                         str(result.error).strip().splitlines()[-1][:300])
        finished = search_finished(cfg, sweep_started)
        free = storage.free_bytes(exp_uri)
        if not finished and free is not None and free < prepared.storage_reserve:
            exp = cfg.experiment
            raise StorageFull(f"{low_space(exp_uri, free, prepared.storage_reserve)}: the sweep stopped and saved "
                              f"its state; free some space, then continue it with `python sweeps/run.py --resume "
                              f"--storage {exp.storage} --name {exp.name}`")
        if finished and cfg.leaderboard.repeats:
            log.info("search done; training the top %d configurations %d more time(s) each, with new seeds",
                     cfg.leaderboard.top_k, cfg.leaderboard.repeats)
            finished = run_repeats(cfg, splits, concurrency)
        outcome = "trials finished" if finished else "interrupted"
    finally:
        manifest.end_session(exp_uri, outcome)
        if owns_ray:
            ray.shutdown()
    if not finished:
        return Outcome(finished=False, rows=[])
    exp_dir = storage.mirror(exp_uri)  # the folder itself, or a local copy of a cloud experiment
    return Outcome(finished=True, rows=finish(exp_dir, exp_uri, cfg, splits) if leaderboard else [])


def search_finished(cfg: Config, started_at: float) -> bool:
    """Every trial ended, or the search's time budget ran out. False after Ctrl+C (see Outcome)."""
    ended = [s for s in trial_statuses(storage.mirror(cfg.experiment_uri)).values() if s in ("TERMINATED", "ERROR")]
    out_of_time = cfg.search.time_budget_s is not None and time.time() - started_at >= cfg.search.time_budget_s
    return len(ended) >= cfg.search.num_samples or out_of_time


def make_tuner(cfg: Config, splits: Splits, resume: bool, concurrency: int, storage_reserve: int = 0):
    """The Tuner of a new sweep (OptunaSearch + ASHA), or the one Tune saved, for --resume (which keeps
    the storage watch it was saved with)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pneumo_ray.progress import ProgressLine
    from pneumo_ray.search_space import DefineByRun, make_sampler, stratified_start
    from pneumo_ray.storage_watch import StorageWatch
    from pneumo_ray.tracking import callbacks
    from pneumo_ray.trial import inline_run_config, reuse_trial_processes, tune_trial

    s, exp_uri = cfg.search, cfg.experiment_uri
    trainable = tune.with_parameters(tune_trial, cfg=cfg, splits_holder={"ref": ray.put(splits)})
    trainable = tune.with_resources(trainable, cluster.trial_resources(cfg, ray.cluster_resources()))
    # The config's reference, not the expanded URL: Tune pickles the searcher into the experiment folder.
    study_storage = credentials.ReferencedRDBStorage(s.optuna_storage or default_study_url(exp_uri))
    if resume:
        orphans = close_orphaned_study_trials(storage.mirror(exp_uri), study_storage, cfg.experiment.name)
        if orphans:
            log.info("closed %d Optuna trial(s) left RUNNING by the crash: %s", len(orphans), orphans)
        return tune.Tuner.restore(exp_uri, trainable=trainable, resume_unfinished=True)
    mode = selection_mode(s.metric)
    searcher = OptunaSearch(
        space=DefineByRun(cfg), metric=s.metric, mode=mode,
        points_to_evaluate=[dict(p) for p in s.initial_points] + stratified_start(cfg) or None,
        sampler=make_sampler(cfg), study_name=cfg.experiment.name, storage=study_storage)
    # Tune refuses a grace period longer than the trials (a config's 3 epochs under `--epochs 2`); capped, ASHA
    # simply stops nothing early, as the plan says.
    max_t = max(trial_epochs(cfg))
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(s.asha.grace_period, max_t),
                               reduction_factor=s.asha.reduction_factor) if s.asha.enabled else FIFOScheduler())
    watch = [StorageWatch(exp_uri, storage_reserve)] if storage_reserve and not storage.is_remote(exp_uri) else []
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=s.metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=s.num_samples, max_concurrent_trials=concurrency,
                                    time_budget_s=s.time_budget_s, reuse_actors=reuse_trial_processes(cfg)),
        run_config=tune.RunConfig(name=cfg.experiment.name, storage_path=exp_uri.rsplit("/", 1)[0],
                                  callbacks=[ProgressLine(s.num_samples, s.metric, mode, s.time_budget_s),
                                             *callbacks(cfg), *watch], **inline_run_config(cfg)),
    )


def finish(exp_dir: Path, exp_uri: str, cfg: Config, splits: Splits) -> list[dict]:
    """The end of a sweep, and all of ``pneumo-ray report``: rank the kept trials and score them on test
    (the only read of the test split), write the report, and upload both to a cloud experiment.
    ``exp_dir`` is the experiment folder, or the local copy of the cloud one at ``exp_uri``."""
    from pneumo_ray.leaderboard import write_leaderboard
    from pneumo_ray.model_card import write_model_card
    from pneumo_ray.report import write_report

    rows = write_leaderboard(exp_dir, cfg, splits)
    write_model_card(exp_dir, cfg, splits)
    write_report(exp_dir, cfg, splits)
    if cfg.tracking.mlflow.tracking_uri:
        from pneumo_ray import tracking

        tracking.log_leaderboard(cfg, exp_dir, rows)
    storage.publish(exp_dir, exp_uri, LEADERBOARD_OUTPUTS)
    return rows


def trial_statuses(exp_dir: Path) -> dict[str, str]:
    """Trial id -> status as Tune last saved it. This saved state, not the in-memory ResultGrid, tells
    an interrupted sweep apart: on Ctrl+C Tune marks running trials TERMINATED in memory, but saves them
    as RUNNING/PENDING so that a restore runs them again."""
    return {t["trial_id"]: t["status"] for t in storage.saved_trials(exp_dir)}
