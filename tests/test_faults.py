"""Faults on a real Ray: a disk that fills up; and the helpers the other fault tests share (a Train worker killed
mid-trial: test_cv; an inline trial killed: test_inline; the driver killed and a trial diverging: test_sweep; a
node lost: test_multinode). Each test checks that nothing is lost: results, checkpoints and Optuna study rows."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pneumo_ray.sweep import trial_statuses
from tests.conftest import ROOT, ranked_rows, run_cli, start_driver

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"
pytestmark = pytest.mark.slow


def study_rows(exp_dir: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(exp_dir / "optuna.db") as db:
        return list(db.execute("SELECT number, state FROM trials ORDER BY number"))


def reported_epochs(exp_dir: Path) -> dict[str, list[int]]:
    """Trial id -> the epochs it reported to Tune, in order."""
    out = {}
    for trial_dir in exp_dir.glob("tune_trial_*"):
        lines = (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").exists() else []
        out[trial_dir.name.split("_")[2]] = [json.loads(line)["epoch"] for line in lines]
    return out


def checkpointed_epoch(exp_dir: Path) -> int:
    """The newest epoch a trial can restart from: for a TorchTrainer trial, the newest checkpoint its
    Train controller has registered (seconds before the epoch reaches Tune's result.json); for an inline
    trial, the last epoch Tune recorded, since Tune restores from the checkpoint of that result."""
    registered = []
    for snapshot in exp_dir.glob("train_runs/*/checkpoint_manager_snapshot.json"):
        try:
            registered.append(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"])
        except (ValueError, KeyError, TypeError):  # being written, or no checkpoint yet
            pass
    return max(registered or [e[-1] for e in reported_epochs(exp_dir).values() if e], default=0)


def config_file(tmp_path: Path, **search) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["search"].update(search)
    raw["leaderboard"]["gradcam_images"] = 0  # the report's Grad-CAM figures are test_report's
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_for(condition, timeout: float, what: str, driver: subprocess.Popen, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if driver.poll() is not None:
            pytest.fail(f"driver exited ({driver.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    driver.kill()
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def kill_mid_trial(tmp_path: Path, cfg: Path, name: str, address: str, is_target,
                   last_epoch: int = 8) -> tuple[int, list[int], float]:
    """Run a 1-trial, 8-epoch sweep; once it has saved a checkpoint, SIGKILL the live actor of this sweep
    that ``is_target(actor)`` picks (found through Ray's state API). Checks that the trial went on from its
    checkpoint to ``last_epoch`` (less than 8 where early stopping ends it) and the sweep completed; returns
    (epochs before the kill, epochs reported, seconds to finish)."""
    from ray.util.state import list_actors

    def live_targets():
        return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000) if is_target(a)]

    exp = tmp_path / name
    log = tmp_path / "driver.log"
    earlier = {a.actor_id for a in live_targets()}  # another sweep's actors, still shutting down
    driver = start_driver("--config", str(cfg), "--storage", str(tmp_path), "--name", name,
                          "--epochs", "8", "--address", address, log=log)
    # Find the actor first and kill it the moment a checkpoint is saved: a state-API call after that
    # could take longer, under load, than the trial's remaining epochs (about 1 s each).
    actor = wait_for(lambda: next((a for a in live_targets() if a.actor_id not in earlier), None), 240,
                     "the trial's actor", driver, log)
    killed_after = wait_for(lambda: checkpointed_epoch(exp), 240, "a checkpoint", driver, log)
    assert killed_after < last_epoch, "the trial finished before the test could kill it"
    killed_at = time.time()
    os.kill(actor.pid, signal.SIGKILL)
    assert driver.wait(timeout=400) == 0, log.read_text()[-3000:]

    (epochs,) = reported_epochs(exp).values()
    assert epochs[-1] == last_epoch and epochs == sorted(epochs), f"epochs must continue, got {epochs}"
    assert epochs.count(1) == 1, f"the retried trial restarted at epoch 1: {epochs}"
    assert [s for _, s in study_rows(exp)] == ["COMPLETE"]
    assert json.loads((exp / "leaderboard.json").read_text())[0]["epoch"] >= 1
    return killed_after, epochs, time.time() - killed_at


def test_a_full_disk_stops_the_sweep_resumably(tmp_path, ray_address):
    """The experiment's storage is a small tmpfs, mostly filled by a ballast file. A sweep that would not
    fit is refused before Ray; one that fills it stops with one line, as Ctrl+C stops it; with the space
    freed, --resume finishes it and the trials finished before are untouched."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the experiment's storage needs root")
    from pneumo_ray import config
    from pneumo_ray.model_settings import check_models
    from pneumo_ray.sweep import storage_reserve

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)], check=True)
    try:
        cfg_path = config_file(tmp_path, num_samples=5, max_concurrent_trials=1, model=["cnn_bn"])
        # Inline trials: the storage watch and the reserve are the sweep's, whichever launcher runs the trials,
        # and inline trials start in a fraction of a TorchTrainer's time.
        raw = yaml.safe_load(cfg_path.read_text())
        raw["resources"] = {"launcher": "inline", "gpus_per_worker": 0}
        cfg_path.write_text(yaml.safe_dump(raw))
        cfg = config.load(cfg_path)
        reserve = storage_reserve(cfg, check_models(cfg, cfg.data.size))
        ballast = disk / "ballast"
        args = ["--config", str(cfg_path), "--storage", str(disk), "--name", "full", "--address", ray_address]

        ballast.write_bytes(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - reserve + 2**20))
        refused = run_cli(*args)
        assert refused.returncode == 2 and "MB free, less than the" in refused.stderr, refused.stderr[-2000:]
        assert not (disk / "full").exists()

        # Room for the reserve and about one trial's checkpoints: the sweep starts, then runs short.
        ballast.write_bytes(b"\0" * (ballast.stat().st_size - 2**20 - 10 * 2**20))
        stopped = run_cli(*args)
        err = stopped.stderr.strip().splitlines()
        assert stopped.returncode == 1, stopped.stdout[-3000:] + stopped.stderr[-3000:]
        assert err[-1].startswith(f"pneumo-ray: error: experiment.storage: {disk / 'full'} has") and \
            "--resume" in err[-1], err[-3:]
        exp = disk / "full"
        finished = {t for t, s in trial_statuses(exp).items() if s == "TERMINATED"}
        assert 0 < len(finished) < 5, trial_statuses(exp)
        kept = {p: p.read_bytes() for t in finished for p in exp.glob(f"tune_trial_{t}_*/result.json")}

        ballast.unlink()
        resumed = run_cli(*args, "--resume")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert set(trial_statuses(exp).values()) == {"TERMINATED"} and len(trial_statuses(exp)) == 5
        assert {p: p.read_bytes() for p in kept} == kept, "a finished trial was run again"
        assert len(ranked_rows(exp)) == 3
        print(f"\n[fault 4a] storage ran short after {len(finished)} of 5 trials (reserve "
              f"{reserve / 2**20:.0f} MB); --resume finished the other {5 - len(finished)}")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
