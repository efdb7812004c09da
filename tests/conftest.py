"""Shared fixtures: a private RAY_TMPDIR per test, one real Ray instance per session, data makers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"


def _short_tmpdir(prefix: str) -> str:
    # Ray puts unix sockets under RAY_TMPDIR; their paths must stay under ~107 characters.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def pytest_collection_modifyitems(config, items):
    """Tests that start their own Ray cluster run first, before the shared session Ray exists: Train V2's
    placement-group cleaner finds Ray by scanning the machine and fails when two clusters are up. The
    README's smoke sweep (``smoke_experiment``) starts its own Ray too, as a user's does."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_cluster") or "smoke_experiment" in
               item.fixturenames else 1)


@pytest.fixture(autouse=True)
def private_ray_tmpdir(monkeypatch):
    """Every test (and every Ray it starts in a subprocess) gets its own RAY_TMPDIR."""
    path = _short_tmpdir("prt-")
    monkeypatch.setenv("RAY_TMPDIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: in-process tests use it, and sweeps run through the CLI
    join it with --address. Sharing saves ~10 s a start, and one Ray at a time matters: Train V2's
    placement-group cleaner looks Ray up by address and gives up when it finds several on the machine."""
    import ray

    from pneumo_ray.cluster import start_local_ray
    from pneumo_ray.config import Config

    tmp = _short_tmpdir("prs-")
    # The Ray sweep.py starts locally: 2 cores for training, plus slots for two trial coordinators.
    context = start_local_ray(Config(), log_to_driver=False, num_cpus=2, _temp_dir=tmp)
    ray.dashboard_url_for_tests = f"http://{context.dashboard_url}"
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


def wait_for_free_cpus(ray, cpus: float, timeout_s: float = 180) -> None:
    """Wait until the shared Ray has this many CPUs free. An earlier test's trial may still be giving back
    its workers' placement group; a run that needs every core would otherwise sit out Ray Train's
    worker-start timeout (600 s here) and fail with no hint of why."""
    import time

    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0) < cpus:
        if time.time() > deadline - timeout_s / 2:  # half the wait given to the normal hand-back first
            remove_orphaned_placement_groups()
        if time.time() > deadline:
            pytest.fail(f"{ray.available_resources().get('CPU', 0)} of the {cpus} CPUs this test needs are free "
                        f"after {timeout_s} s; placement groups still held: {held_placement_groups()}")
        time.sleep(0.5)


def remove_orphaned_placement_groups() -> None:
    """The sweep's own clean-up (cluster.remove_orphaned_placement_groups), between tests: a group an ended job
    left reserved holds a core of the shared Ray for good. Each removal is a warning in the test summary."""
    import warnings

    from pneumo_ray.cluster import remove_orphaned_placement_groups as remove

    for removed in remove():
        warnings.warn(f"removed placement group {removed}, left behind by an ended job")


def held_placement_groups() -> list[dict]:
    """Who holds the shared Ray's cores: each placement group not removed, with the job that made it (a
    group outlives its run only while that job lives) and the actors placed in it."""
    from ray.util.state import list_actors, list_jobs, list_placement_groups

    jobs = {j.job_id: j for j in list_jobs(limit=10_000)}
    actors = list_actors(limit=10_000, detail=True)
    held = []
    for pg in list_placement_groups(limit=10_000, detail=True):
        if pg.state == "REMOVED":
            continue
        job = jobs.get(pg.creator_job_id)
        held.append({
            "id": pg.placement_group_id, "state": pg.state, "detached": pg.is_detached,
            "bundles": [b["unit_resources"] for b in pg.bundles],
            "job": pg.creator_job_id, "job_status": getattr(job, "status", None),
            "entrypoint": (getattr(job, "entrypoint", None) or "")[-120:],
            "actors": [(a.class_name, a.state, a.job_id) for a in actors
                       if a.placement_group_id == pg.placement_group_id],
        })
    return held


def write_npz(path: Path, n=(64, 32, 32), size=28, seed=0, one_class_split: str | None = None) -> Path:
    from pneumo_ray.data import make_synthetic

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        x, y = make_synthetic(count, size, rng)
        if split == one_class_split:
            y[:] = 1
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y[:, None]
    np.savez(path, **arrays)
    return path


def start_driver(*args: str, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """The real entry point in the background. Its output goes to a file, not a pipe: a pipe that nobody
    reads until the end fills up, and the driver then blocks mid-sweep on a print."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "run.py"), *args], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def run_cli(*args: str, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def ranked_rows(exp_dir: Path) -> list[dict]:
    """The leaderboard's ranked trials, without its ensemble row."""
    return [r for r in json.loads((Path(exp_dir) / "leaderboard.json").read_text()) if r["row"] != "ensemble"]


def readme_commands() -> list[str]:
    """Every command in the README's ```bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def run_shell(command: str, cwd: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    """A README command as a user types it into bash, with this environment's python and pneumo-ray first
    on PATH (as after `. .venv/bin/activate`), and ``env`` added to the environment."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **env}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def user_workdir(tmp_path_factory) -> Path:
    """A user's working directory, as after a clone: the project's sweeps/ there, nothing else."""
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "sweeps").symlink_to(ROOT / "sweeps", target_is_directory=True)
    return cwd


@pytest.fixture(scope="session")
def smoke_experiment(user_workdir) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's smoke sweep, exactly as the README prints it (no --storage, no --address: it starts its
    own local Ray), run once from a user's working directory. Its experiment folder is read (and its report
    re-rendered) by the sweep, report, predict and README tests."""
    command = next(c for c in readme_commands() if c.startswith("python sweeps/run.py") and "smoke.yaml" in c)
    ray_tmpdir = _short_tmpdir("prr-")  # a session fixture is set up before the per-test RAY_TMPDIR
    try:
        result = run_shell(command, cwd=user_workdir, RAY_TMPDIR=ray_tmpdir)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return user_workdir / "results" / "smoke", result
