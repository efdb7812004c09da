"""A short sweep submitted as a Ray Job through the Jobs SDK, as `ray job submit --working-dir .` does."""

from __future__ import annotations

import sys
import time

import pytest

from tests.conftest import ROOT, ranked_rows

pytestmark = pytest.mark.slow


def test_sweep_runs_as_a_ray_job(ray_session, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_session.dashboard_url_for_tests)
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} sweeps/run.py --config sweeps/configs/smoke.yaml --address auto "
                   f"--storage {tmp_path} --name as-a-job --num-samples 2 --epochs 1",
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv", "results", ".git"]},
    )
    deadline = time.time() + 400
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish in 400 s"
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    rows = ranked_rows(tmp_path / "as-a-job")
    assert len(rows) == 2 and all(0 <= r["test_auc"] <= 1 for r in rows)
    assert "Test leaderboard" in logs
