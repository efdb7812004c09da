"""Starting or joining Ray, and what a sweep's processes reserve there.

A sweep without ``--address`` starts a Ray on this machine; with it, it joins a cluster. Either way
every Ray process of the sweep gets the same environment (``job_env_vars``), ``gpus_per_worker: auto``
is settled against what the cluster has, and each trial's Tune process reserves what it needs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

from pneumo_ray.config import Config
from pneumo_ray.torch_trainer import AUTOSCALER_REQUESTS

log = logging.getLogger(__name__)

TRIAL_SLOT = "pneumo_trial"  # custom resource: one per concurrently running trial coordinator


def job_env_vars(cfg: Config, local: bool = False) -> dict[str, str]:
    """Environment of every Ray process of a sweep; ``local`` for the Ray a sweep starts on this machine.
    Train V2 gives up on a worker group that cannot start within 60 s; a trial retried after losing a
    node, or waiting for the autoscaler, needs longer. Its controller polls workers every 2 s, so a
    finished trial would hold its cores that long before Tune can start the next; 0.5 s hands them over
    sooner (a user's own RAY_TRAIN_HEALTH_CHECK_INTERVAL_S wins). On one machine no node can be
    preempted, so the PreemptionWatcher actor Train starts for every run is one process too many there;
    a cluster keeps it (spot nodes). Nor can that Ray add nodes, so the trainer does not ask an
    autoscaler for them (torch_trainer.py); a cluster of hand-started nodes can say the same with
    PNEUMO_RAY_AUTOSCALER_REQUESTS=0 in the driver's environment. A user's own setting wins."""
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(cfg.resources.worker_start_timeout_s),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
    if local:
        for name in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", AUTOSCALER_REQUESTS):
            env[name] = os.environ.get(name, "0")
    elif AUTOSCALER_REQUESTS in os.environ:  # a cluster of hand-started nodes cannot grow either
        env[AUTOSCALER_REQUESTS] = os.environ[AUTOSCALER_REQUESTS]
    return env


def workers_per_run(cfg: Config) -> int:
    """The Ray Train workers of one trial: workers_per_trial DDP workers for each of its models (one, or
    one per fold under data.cv_folds)."""
    return cfg.resources.workers_per_trial * max(1, cfg.data.cv_folds)


def check_fits_here(cfg: Config) -> None:
    """A trial that needs more CPUs than this machine has would wait for them forever on the local Ray."""
    from pneumo_ray.errors import ConfigError

    r, cores = cfg.resources, os.cpu_count() or 1
    need = workers_per_run(cfg) * r.cpus_per_worker
    if need > cores + 1e-9:
        folds = f" ({cfg.data.cv_folds} folds x {r.workers_per_trial})" if cfg.data.cv_folds else ""
        most = math.floor(cores / workers_per_run(cfg) * 100) / 100
        fix = f"set cpus_per_worker <= {most:g}" if most >= 0.1 else "use fewer workers or folds"
        raise ConfigError(f"resources.cpus_per_worker: a trial needs {workers_per_run(cfg)} workers{folds} x "
                          f"{r.cpus_per_worker:g} CPU = {need:g} CPUs, this machine has {cores}; {fix}, or pass "
                          "--address to run on a cluster")


def check_no_other_ray() -> None:
    """A sweep without --address starts its own Ray, and one Ray per machine is all that works: Train V2's
    placement-group cleaner finds Ray by scanning the machine and gives up when there are several. Nor
    is it safe to join a Ray that another sweep started, since it stops when that sweep ends. So say
    how to share one instead. A caller that already runs Ray in this process (a notebook) uses that one."""
    import sys
    import time

    from pneumo_ray.errors import ConfigError

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    deadline = time.monotonic() + 5  # a Ray that a just-finished sweep is shutting down goes within moments
    while gcs := _running_gcs():
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if gcs:
        raise ConfigError(f"--address: a Ray instance already runs on this machine ({'; '.join(gcs)}), perhaps "
                          "another sweep's; to run sweeps side by side, start one shared Ray with `ray start "
                          "--head` and pass --address auto to each, or wait for the other sweep to end")


def _running_gcs() -> list[str]:
    """Every live Ray head on this machine, found as Ray's own ``address="auto"`` finds them."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if proc.info["name"] == "gcs_server" and proc.info["status"] != psutil.STATUS_ZOMBIE:
            ports = [a.split("=", 1)[1] for a in proc.info["cmdline"] or [] if a.startswith("--gcs_server_port=")]
            found.append(f"pid {proc.pid}" + (f", port {ports[0]}" if ports else ""))
    return found


def resolve_gpus(cfg: Config, cluster_resources: dict) -> Config:
    """A copy of ``cfg`` with gpus_per_worker: auto settled: 1 GPU per worker where the cluster has GPUs,
    else CPU training. An explicit number is kept."""
    if cfg.resources.gpus_per_worker != "auto":
        return cfg
    gpus = 1.0 if cluster_resources.get("GPU", 0) > 0 else 0.0
    return dataclasses.replace(cfg, resources=dataclasses.replace(cfg.resources, gpus_per_worker=gpus))


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
    log.info("the cluster has no '%s' resource: each trial's coordinator takes 1 CPU", TRIAL_SLOT)
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


def init_ray(cfg: Config, address: str | None) -> int:
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
    per_trial = workers_per_run(cfg) * r.cpus_per_worker
    fits = max(1, math.floor(cores / per_trial + 1e-9))
    if fits < s.max_concurrent_trials:
        log.info("%d cores fit %d trial(s) of %g CPUs at once; running %d concurrently instead of "
                 "search.max_concurrent_trials=%d", cores, fits, per_trial, fits, s.max_concurrent_trials)
    return min(fits, s.max_concurrent_trials)


def remove_orphaned_placement_groups() -> list[str]:
    """Give back cores that an ended sweep left reserved. Ray removes a run's placement groups when the run
    ends, yet a Ray Train worker group has been seen to stay reserved after its job ended (killed or not), every
    actor in it dead; on a long-lived cluster it holds those cores for good, and the next sweep's trials wait for
    them forever. Removed here: groups not detached, made by a job that has ended and has no live (detached)
    actor left, with no live actor in them.
    Returns their ids; each is logged. Without the state API (no dashboard) nothing can be seen or removed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        from ray.util.state import list_actors, list_jobs, list_placement_groups

        ended = {j.job_id for j in list_jobs(limit=10_000)
                 if j.job_id and str(getattr(j.status, "value", j.status)) in ("SUCCEEDED", "FAILED", "STOPPED")}
        live = [a for a in list_actors(limit=10_000, detail=True) if a.state != "DEAD"]
        groups = list_placement_groups(limit=10_000, detail=True)
    except Exception as err:  # the state API needs the dashboard, which a cluster may run without
        log.debug("placement groups not checked (%s: %s)", type(err).__name__, err)
        return []
    removed = []
    for pg in groups:
        # a live actor of the group's job may be its (detached) owner; a live actor in it, its user
        if (pg.state != "REMOVED" and not pg.is_detached and pg.creator_job_id in ended
                and not any(a.job_id == pg.creator_job_id or a.placement_group_id == pg.placement_group_id
                            for a in live)):
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg.placement_group_id)))
            removed.append(pg.placement_group_id)
            log.warning("removed placement group %s (%s), left reserved by the ended job %s",
                        pg.placement_group_id, [b["unit_resources"] for b in pg.bundles], pg.creator_job_id)
    return removed
