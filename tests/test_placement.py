"""Per-trial resources from config: GPU auto-detection, fractional GPUs, coordinator slots."""

from __future__ import annotations

import pytest

from pneumo_ray import config
from pneumo_ray.cluster import TRIAL_SLOT, job_env_vars, resolve_gpus, trial_resources
from pneumo_ray.torch_trainer import AUTOSCALER_REQUESTS
from pneumo_ray.trial import reuse_trial_processes, scaling_config


def cfg_with(**resources):
    return config.from_dict({"data": {"source": "synthetic"}, "resources": resources})


@pytest.mark.parametrize("cluster, expected", [({"CPU": 8}, 0.0), ({"CPU": 8, "GPU": 4}, 1.0)])
def test_gpus_auto_follows_the_cluster(cluster, expected):
    given = cfg_with()
    assert given.resources.gpus_per_worker == "auto"
    cfg = resolve_gpus(given, cluster)
    assert cfg.resources.gpus_per_worker == expected
    assert given.resources.gpus_per_worker == "auto", "a new config, not the one given changed in place"
    scaling = scaling_config(cfg)
    assert scaling.use_gpu == (expected > 0)
    assert scaling.resources_per_worker.get("GPU", 0) == expected


def test_fractional_gpus_pack_four_trials_per_gpu():
    cfg = resolve_gpus(cfg_with(gpus_per_worker=0.25, cpus_per_worker=0.5, workers_per_trial=1),
                       {"GPU": 1})  # an explicit number is kept
    scaling = scaling_config(cfg)
    assert scaling.use_gpu and scaling.resources_per_worker == {"CPU": 0.5, "GPU": 0.25}
    assert int(1 / scaling.resources_per_worker["GPU"]) == 4


def test_multi_gpu_ddp_trial():
    scaling = scaling_config(cfg_with(gpus_per_worker=1, workers_per_trial=4, cpus_per_worker=8))
    assert scaling.num_workers == 4 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 8, "GPU": 1}


def test_bad_gpu_values_are_rejected():
    with pytest.raises(config.ConfigError, match="resources.gpus_per_worker: expected auto"):
        cfg_with(gpus_per_worker="some")
    with pytest.raises(config.ConfigError, match="above 1 must be a whole number"):
        cfg_with(gpus_per_worker=1.5)


def test_trial_coordinators_take_a_slot_not_a_cpu():
    cfg = cfg_with()
    assert trial_resources(cfg, {"CPU": 2, TRIAL_SLOT: 2}).bundles == [{TRIAL_SLOT: 1}]
    assert trial_resources(cfg, {"CPU": 2}).bundles == [{"CPU": 1}]


@pytest.mark.parametrize("gpus, bundle, reuse", [(0, {"CPU": 1.0}, True), (0.25, {"CPU": 1.0, "GPU": 0.25}, False)])
def test_inline_trials_reserve_the_workers_share_and_reuse_processes_only_on_cpu(gpus, bundle, reuse):
    cfg = cfg_with(launcher="inline", gpus_per_worker=gpus)
    # an inline trial trains itself, so it takes the worker's CPU (and GPU share), not a coordinator slot
    assert trial_resources(cfg, {"CPU": 2, "GPU": 1, TRIAL_SLOT: 2}).bundles == [bundle]
    assert reuse_trial_processes(cfg) is reuse  # a reused process would keep its cached GPU memory
    assert reuse_trial_processes(cfg_with(gpus_per_worker=gpus)) is False  # TorchTrainer trials: never


def test_only_a_cluster_asks_an_autoscaler_for_nodes_unless_told_not_to(monkeypatch):
    """The Ray a sweep starts on one machine cannot grow, so its trials send no autoscaler requests (and Ray
    Data's AutoscalingCoordinator never starts: test_train.py); a cluster's do, unless the user says so."""
    cfg = config.Config()
    monkeypatch.delenv(AUTOSCALER_REQUESTS, raising=False)
    assert job_env_vars(cfg, local=True)[AUTOSCALER_REQUESTS] == "0"
    assert AUTOSCALER_REQUESTS not in job_env_vars(cfg)
    monkeypatch.setenv(AUTOSCALER_REQUESTS, "0")  # hand-started nodes, no autoscaler
    assert job_env_vars(cfg)[AUTOSCALER_REQUESTS] == "0"
    monkeypatch.setenv(AUTOSCALER_REQUESTS, "1")
    assert job_env_vars(cfg, local=True)[AUTOSCALER_REQUESTS] == "1"


OWNER_DRIVER = """
import sys, ray
from ray.util.placement_group import placement_group

ray.init(address=sys.argv[1], namespace="orphans", logging_level="ERROR")

@ray.remote(num_cpus=0)
class Owner:
    def reserve(self):
        self.group = placement_group([{"CPU": 0.01}])
        ray.get(self.group.ready(), timeout=60)
        return self.group.id.hex()

owner = Owner.options(name="owner", lifetime="detached").remote()
print(ray.get(owner.reserve.remote()))
"""


@pytest.mark.slow
def test_orphan_clean_up_spares_groups_that_a_live_job_or_a_detached_owner_holds(ray_session, ray_address, tmp_path):
    """What a sweep removes at its start must never be a group still in use: one this (running) job holds, and one
    made by a job that has ended whose detached actor still owns it. (A group Ray itself leaked, its job ended
    and every actor dead, is what it removes; Ray leaves one behind only now and then, so that case was checked
    on the suite's own leaks, not made here.)"""
    import subprocess
    import sys
    import time

    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.state import get_placement_group, list_jobs

    from pneumo_ray.cluster import remove_orphaned_placement_groups

    mine = placement_group([{"CPU": 0.01}])
    ray_session.get(mine.ready(), timeout=60)
    script = tmp_path / "owner.py"
    script.write_text(OWNER_DRIVER)
    done = subprocess.run([sys.executable, str(script), ray_address], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    owned = done.stdout.strip().splitlines()[-1]
    creator = get_placement_group(owned).creator_job_id
    deadline = time.time() + 60
    while not any(j.job_id == creator and str(j.status.value) == "SUCCEEDED" for j in list_jobs(limit=10_000)):
        assert time.time() < deadline, "the owner's driver never ended"
        time.sleep(0.5)
    try:
        removed = remove_orphaned_placement_groups()
        assert mine.id.hex() not in removed and owned not in removed
        assert get_placement_group(mine.id.hex()).state == "CREATED"
        assert get_placement_group(owned).state == "CREATED", "a live detached owner's group was removed"
    finally:
        ray_session.kill(ray_session.get_actor("owner", namespace="orphans"))
        remove_placement_group(mine)
