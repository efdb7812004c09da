"""A real 2-node cluster (head + worker, token auth, loopback in a private network namespace): the folds of a
cross-validated trial train on both nodes at once; the worker node is stopped mid-trial and a replacement joins,
as an autoscaler's would; the trial restarts its folds on the head and the new node from its last checkpoint;
the sweep completes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]


def namespaces_available() -> bool:
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def test_two_node_sweep_survives_losing_the_worker_node(tmp_path):
    if not namespaces_available():
        pytest.skip("this machine does not allow `unshare -n` (network namespaces need root)")
    run = subprocess.run(["unshare", "-n", sys.executable, "-m", "tests.multinode_scenario", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("MULTINODE_REPORT ")), None)
    assert line, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(line.split(" ", 1)[1])

    assert report["nodes"] == ["head", "worker"]
    assert report["driver_rc"] == 0, report["driver_tail"]
    # JSON keys: the folds of the one cross-validated trial, each trained on its own node, side by side
    assert sorted(report["placed_before_stop"]) == ["0", "1"], report
    assert sorted(report["placed_before_stop"].values()) == ["head", "worker"], report["placed_before_stop"]
    assert report["killed_processes"] > 0
    assert sorted(report["placed_at_end"].values()) == ["head", "replacement"], report["placed_at_end"]
    epochs = report["epochs"]
    assert epochs[-1] == 3 and epochs == sorted(epochs) and epochs.count(1) == 1, \
        f"the trial restarted at epoch 1 instead of going on from its checkpoint: {epochs}"
    assert report["leaderboard"] and report["leaderboard"][0]["row"] == "1"
    # manifest.json: both nodes as they were at the start, the worker's facts from a task that ran on it
    listed = report["manifest_nodes"]
    assert len(listed) == 2 and len({n["node_id"] for n in listed}) == 2, listed
    assert all("error" not in n and n["cores"] >= 1 and n["os"] and n["ray_resources"]["CPU"] == 2 for n in listed)
    print(f"\n[fault 3] worker node stopped ({report['killed_processes']} processes) after the folds' first "
          f"checkpoint and replaced; epochs {epochs}; sweep finished {report['recovery_s']} s after the stop")
