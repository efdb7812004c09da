"""cluster.yaml and cluster.local.yaml pass Ray's own cluster-config schema, offline, and are locked down."""

from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import ROOT

CLUSTER_FILES = ["cluster.yaml", "cluster.local.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_passes_rays_schema(name):
    validate_config(prepare_config(load(name)))  # raises on a schema violation


def test_the_schema_check_can_fail():
    broken = copy.deepcopy(load("cluster.yaml"))
    broken["available_node_types"]["head"]["min_workers"] = "zero"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_opens_nothing_to_the_world_and_uses_token_auth(name):
    text = (ROOT / name).read_text()
    assert "0.0.0.0" not in text
    cfg = load(name)
    for command in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_aws_cluster_has_a_cpu_head_and_single_and_multi_gpu_workers():
    cfg = load("cluster.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["resources"]
    assert head["GPU"] == 0 and head["CPU"] == 0, "the head coordinates; it must not train"
    assert head["pneumo_trial"] >= 1, "trial coordinators need their slots on the head"
    gpus = sorted(t["resources"]["GPU"] for name, t in types.items() if name != cfg["head_node_type"])
    assert gpus[0] == 1 and gpus[-1] > 1
    for name, node in types.items():
        assert node["min_workers"] <= node["max_workers"]
    assert any("pip install" in c and "pneumo-ray" in c for c in cfg["setup_commands"])
