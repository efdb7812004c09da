"""resources.launcher: inline, on a real Ray: single-worker trials train in their Tune trial process.
The same guarantees as TorchTrainer trials: a leaderboard from the kept checkpoints, diverged trials
failed with their reason, and a killed trial resumed from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from pneumo_ray.sweep import trial_statuses
from tests.conftest import ROOT, run_cli, start_driver
from tests.test_faults import reported_epochs, study_rows, wait_for

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"
pytestmark = pytest.mark.slow


def inline_config(tmp_path: Path, **search) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["search"].update(search)
    raw["resources"] = {"launcher": "inline", "gpus_per_worker": 0}
    path = tmp_path / "inline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_inline_sweep_keeps_checkpoints_reports_startup_and_fails_diverged(tmp_path, ray_address):
    cfg = inline_config(tmp_path, num_samples=3, initial_points=[
        {"model": "mlp", "optimizer": "sgd", "lr": 1.0e6, "class_weighting": "none"}])  # blows up within steps
    result = run_cli("--config", str(cfg), "--storage", str(tmp_path), "--name", "inline", "--epochs", "3",
                     "--address", ray_address)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exp = tmp_path / "inline"

    statuses = trial_statuses(exp)
    errored = [t for t, s in statuses.items() if s == "ERROR"]
    assert len(errored) == 1 and list(statuses.values()).count("TERMINATED") == 2
    error_file = next(exp.glob(f"tune_trial_{errored[0]}_*")) / "error.txt"
    assert "diverged" in error_file.read_text()
    assert sorted(s for _, s in study_rows(exp)) == ["COMPLETE", "COMPLETE", "FAIL"]
    # Tune retries a failed inline trial; the diverged one must not train again on those retries.
    epochs = reported_epochs(exp)
    assert epochs[errored[0]].count(1) <= 1

    # No Ray Train run: the checkpoints live in the Tune trial folders, and the leaderboard found them.
    assert not list((exp / "train_runs").glob("*/checkpoint_*"))
    rows = json.loads((exp / "leaderboard.json").read_text())
    assert len(rows) == 2 and errored[0] not in {r["trial_id"] for r in rows}
    for row in rows:
        assert (Path(row["checkpoint"]) / "model.pt").is_file()
        assert epochs[row["trial_id"]] == list(range(1, len(epochs[row["trial_id"]]) + 1))  # ASHA may stop early
        assert any(exp.glob(f"tune_trial_{row['trial_id']}_*/checkpoint_*/meta.json"))

    first_epochs = [json.loads((d / "result.json").read_text().splitlines()[0])
                    for d in exp.glob("tune_trial_*") if statuses[d.name.split("_")[2]] == "TERMINATED"]
    for first in first_epochs:  # start-up is measured inside the trial, so it is shorter than the trial
        assert 0 < first["startup_s"] < first["time_total_s"]


def test_killed_inline_trial_resumes_from_its_checkpoint(tmp_path, ray_session, ray_address):
    """SIGKILL the trial's own process after its first checkpoint: Tune restarts the trial from that
    checkpoint, so the epochs continue instead of starting again at 1."""
    from ray.util.state import list_actors

    cfg = inline_config(tmp_path, model=["cnn_bn"], num_samples=1, optimizer=["adamw", "sgd"], max_concurrent_trials=1)
    exp = tmp_path / "killinline"
    log = tmp_path / "driver.log"
    driver = start_driver("--config", str(cfg), "--storage", str(tmp_path), "--name", "killinline",
                          "--epochs", "8", "--address", ray_address, log=log)

    def trial_after_first_checkpoint():
        if not any(e and e[-1] >= 1 for e in reported_epochs(exp).values()):
            return None
        alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "ImplicitFunc" in a.class_name]
        return alive[0] if alive else None

    actor = wait_for(trial_after_first_checkpoint, 240, "an inline trial past epoch 1", driver, log)
    killed_after = max(e[-1] for e in reported_epochs(exp).values() if e)
    os.kill(actor.pid, signal.SIGKILL)
    assert driver.wait(timeout=400) == 0, log.read_text()[-3000:]

    (epochs,) = reported_epochs(exp).values()
    assert epochs[-1] == 8 and epochs == sorted(epochs), f"epochs must continue, got {epochs}"
    assert epochs.count(1) == 1, f"the retried trial restarted at epoch 1: {epochs}"
    assert [s for _, s in study_rows(exp)] == ["COMPLETE"]
    assert json.loads((exp / "leaderboard.json").read_text())[0]["epoch"] >= 1
    print(f"\n[inline fault] trial killed after epoch {killed_after}; reported epochs {epochs}")
