"""Checkpoints never unpickle code; experiment names cannot escape the storage folder; local services
bind to 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pneumo_ray import cli
from pneumo_ray.checkpoints import load_model
from pneumo_ray.layout import MODEL_FILE
from pneumo_ray.models import build_model
from tests.conftest import ROOT


class Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_are_loaded_with_weights_only(tmp_path):
    meta = {"model": "mlp", "image_size": 28}
    good = tmp_path / "good"
    good.mkdir()
    torch.save(build_model("mlp", 28).state_dict(), good / MODEL_FILE)
    assert isinstance(load_model(good, meta), torch.nn.Module)

    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"weights": Payload(marker)}, bad / MODEL_FILE)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_model(bad, meta)
    assert not marker.exists(), "the checkpoint ran code while loading"


@pytest.mark.parametrize("name", ["../outside", "a/b", "/abs", "..", ".hidden", "x" * 200])
def test_experiment_names_cannot_escape_the_storage_folder(tmp_path, capsys, name):
    code = cli.main(["sweep", "--config", str(ROOT / "sweeps" / "configs" / "smoke.yaml"),
                     "--storage", str(tmp_path / "store"), "--name", name])
    assert code == 2 and "experiment.name" in capsys.readouterr().err
    assert not (tmp_path / "outside").exists() and not (tmp_path / "store").exists()


@pytest.mark.slow
@pytest.mark.own_cluster
def test_local_ray_binds_its_dashboard_to_loopback():
    script = (
        "import json, ray\n"
        "from pneumo_ray import cluster, config\n"
        "cfg = config.from_dict({'data': {'source': 'synthetic'}})\n"
        "cluster.init_ray(cfg, None)\n"
        "ctx = ray.get_runtime_context()\n"
        "print('URL', json.dumps(ray._private.worker._global_node.address_info['webui_url']))\n"
        "print('RES', json.dumps(ray.cluster_resources()))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in out.stdout.splitlines()
             if ln.startswith(("URL ", "RES "))}
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    assert lines["URL"].startswith("127.0.0.1:")
    assert lines["RES"]["pneumo_trial"] == 2 and lines["RES"]["CPU"] == (os.cpu_count() or 1)
