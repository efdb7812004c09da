"""A real 2-node cluster (head + worker, token auth, loopback in a private network namespace): the folds of a
cross-validated trial train on both nodes at once; trials are placed on both nodes; the worker node is
stopped mid-sweep; its trial moves to the head; the sweep completes."""

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
    folds = report["fold_nodes"]
    assert folds["driver_rc"] == 0, folds["tail"]
    # JSON keys: the folds of the one cross-validated trial, each trained on its own node, side by side
    assert sorted(folds["placed"].values()) == ["head", "worker"] and sorted(folds["placed"]) == ["0", "1"], folds
    assert report["placed_before_stop"] == ["head", "worker"], "trials should run on both nodes at once"
    assert report["killed_processes"] > 0
    assert report["driver_rc"] == 0, report["driver_tail"]
    epochs = report["epochs"]
    assert len(epochs) == 2 and all(rows and rows[-1][0] == 6 for rows in epochs.values()), epochs
    moved = [t for t, rows in epochs.items() if rows[0][1] == "worker" and rows[-1][1] == "head"]
    assert moved, f"a trial that started on the worker node should finish on the head: {epochs}"
    for trial in moved:
        numbers = [e for e, _ in epochs[trial]]
        assert numbers == sorted(numbers) and numbers.count(1) == 1, f"{trial} restarted instead of resuming"
    assert report["leaderboard"] and [r["row"] for r in report["leaderboard"]] == ["1", "2", "ensemble"]
    # manifest.json: both nodes as they were at the start, the worker's facts from a task that ran on it
    listed = report["manifest_nodes"]
    assert len(listed) == 2 and len({n["node_id"] for n in listed}) == 2, listed
    assert all("error" not in n and n["cores"] >= 1 and n["os"] and n["ray_resources"]["CPU"] == 2 for n in listed)
    print(f"\n[fault 3] worker node stopped ({report['killed_processes']} processes); "
          f"moved trial(s) {moved} with epochs {[epochs[t] for t in moved]}; "
          f"sweep finished {report['recovery_s']} s after the stop")
