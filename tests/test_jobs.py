"""Sweeps submitted as Ray Jobs through the Jobs SDK, as `ray job submit --working-dir .` does: three at
once to one cluster, two under different names and a third under one of those names again."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, held_placement_groups, ranked_rows

pytestmark = pytest.mark.slow

DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


def trial_spans(exp: Path) -> list[tuple[float, float]]:
    """(start, end) wall-clock seconds of each trial, from the rows Tune wrote for it."""
    spans = []
    for result in exp.glob("tune_trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        spans.append((rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]))
    return spans


def test_sweeps_submitted_at_once_share_the_cluster_and_one_name_runs_once(ray_session, tmp_path):
    from ray.job_submission import JobSubmissionClient

    # One trial at a time per sweep: with the cluster's two trial slots, the sweeps can only overlap by sharing.
    cfg = yaml.safe_load((ROOT / "sweeps" / "configs" / "smoke.yaml").read_text())
    cfg["search"]["max_concurrent_trials"] = 1
    cfg["leaderboard"]["gradcam_images"] = 0  # the report's Grad-CAM figures are test_report's
    config = tmp_path / "one-at-a-time.yaml"
    config.write_text(yaml.safe_dump(cfg))

    client = JobSubmissionClient(ray_session.dashboard_url_for_tests)
    runtime_env = {"working_dir": str(ROOT), "excludes": [".venv", "results", ".git"]}
    jobs = {}
    for label, name in (("first", "first"), ("second", "second"), ("second again", "second")):
        jobs[label] = client.submit_job(
            entrypoint=f"{sys.executable} sweeps/run.py --config {config} --address auto --storage {tmp_path} "
                       f"--name {name} --num-samples 1 --epochs 1",
            runtime_env=runtime_env)
    deadline = time.time() + 500
    while any(client.get_job_status(j).value not in DONE for j in jobs.values()):
        assert time.time() < deadline, "the jobs did not finish in 500 s"
        time.sleep(1)
    status = {label: client.get_job_status(j).value for label, j in jobs.items()}
    logs = {label: client.get_job_logs(j) for label, j in jobs.items()}

    assert status["first"] == "SUCCEEDED", logs["first"][-3000:]
    assert sorted([status["second"], status["second again"]]) == ["FAILED", "SUCCEEDED"], status
    loser = "second" if status["second"] == "FAILED" else "second again"
    winner = "second again" if loser == "second" else "second"
    assert "experiment 'second' already exists" in logs[loser] and "Traceback" not in logs[loser], logs[loser][-2000:]
    assert "Test leaderboard" in logs["first"] and "Test leaderboard" in logs[winner]

    for name in ("first", "second"):  # each leaderboard whole, the winner's not touched by the loser
        rows = ranked_rows(tmp_path / name)
        assert len(rows) == 1 and 0 <= rows[0]["test_auc"] <= 1
        assert len(list((tmp_path / name).glob("tune_trial_*"))) == 1
    first, second = trial_spans(tmp_path / "first"), trial_spans(tmp_path / "second")
    assert any(max(a[0], b[0]) < min(a[1], b[1]) for a in first for b in second), \
        f"no trial of one sweep ran while a trial of the other did: {first} {second}"

    deadline = time.time() + 60  # a finished run gives its placement group back within moments
    while ours := [pg for pg in held_placement_groups() if str(tmp_path) in pg["entrypoint"]]:
        assert time.time() < deadline, f"placement groups left behind: {ours}"
        time.sleep(1)
