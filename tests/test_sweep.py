"""End to end through the real entry point: a smoke sweep, refusing to overwrite, and --resume."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import yaml

from pneumo_ray import config
from pneumo_ray.search_space import stratified_start
from pneumo_ray.sweep import trial_statuses
from tests.conftest import ROOT, ranked_rows, run_cli, start_driver

SMOKE = str(ROOT / "sweeps" / "configs" / "smoke.yaml")
pytestmark = pytest.mark.slow


def study_states(exp_dir: Path) -> list[str]:
    with sqlite3.connect(exp_dir / "optuna.db") as db:
        return [row[0] for row in db.execute("SELECT state FROM trials ORDER BY number")]


def study_states_so_far(exp_dir: Path) -> list[str]:
    """study_states while the driver runs: the file can exist a moment before Optuna has made its tables."""
    try:
        return study_states(exp_dir) if (exp_dir / "optuna.db").exists() else []
    except sqlite3.OperationalError:
        return []


def terminated_trials(exp_dir: Path) -> set[str]:
    return {t for t, status in trial_statuses(exp_dir).items() if status == "TERMINATED"}


def run_snapshot(exp_dir: Path, trial_id: str) -> tuple:
    """What a trial left behind: its Train checkpoints and its Tune result log."""
    tune_dir = next(exp_dir.glob(f"tune_trial_{trial_id}_*"))
    return sorted(p.name for p in (exp_dir / "train_runs" / trial_id).iterdir()), (tune_dir / "result.json").read_text()


def trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(p for p in exp_dir.glob("tune_trial_*") if p.is_dir())


def test_smoke_sweep_writes_leaderboard_report_tensorboard_and_study(smoke_experiment, user_workdir):
    exp, result = smoke_experiment
    tmp_path = exp.parent

    # The README's command has a relative experiment.storage (./results): every process of the sweep, the
    # trials in Tune's own working directories included, wrote into the user's working directory.
    assert exp == user_workdir / "results" / "smoke"
    saved = yaml.safe_load((exp / "pneumo_config.yaml").read_text())
    assert saved["experiment"]["storage"] == str(user_workdir.resolve() / "results")
    assert sorted(p.name for p in (exp / "train_runs").iterdir()) == sorted(
        t.name.split("_")[2] for t in trial_dirs(exp))
    assert all(list((exp / "train_runs").glob(f"{t}/checkpoint_*/model.pt")) for t in trial_statuses(exp))
    outputs = next(line for line in result.stdout.splitlines() if line.startswith("Outputs in "))
    assert outputs.startswith(f"Outputs in {exp.resolve()}: report.html") and "best/" in outputs

    trials = trial_dirs(exp)
    assert len(trials) == 3
    for trial in trials:
        assert list(trial.glob("events.out.tfevents.*")), f"no TensorBoard events in {trial.name}"
    assert study_states(exp) == ["COMPLETE"] * 3
    # TPE's start-up trials were the stratified ones: 3 trials, each choice's values 2 and 1 times
    cfg = config.load(SMOKE)
    with sqlite3.connect(exp / "optuna.db") as db:
        chosen = {}
        for number, name, value in db.execute(
                "SELECT t.number, p.param_name, p.param_value FROM trial_params p JOIN trials t USING (trial_id)"):
            chosen.setdefault(number, {})[name] = value
    points = stratified_start(cfg)
    assert len(points) == 3
    for number, point in enumerate(points):
        for name, value in point.items():
            choices = list(getattr(cfg.search, name))
            assert choices[int(chosen[number][name])] == value, (number, name)  # Optuna stores a choice's index

    rows = json.loads((exp / "leaderboard.json").read_text())
    assert [r["row"] for r in rows] == ["1", "2", "3", "ensemble"] and [r["rank"] for r in rows] == [1, 2, 3, None]
    ranked = rows[:3]
    assert [r["val_auc"] for r in ranked] == sorted((r["val_auc"] for r in ranked), reverse=True)
    for row in rows:
        for key in ("model", "optimizer", "lr", "weight_decay", "batch_size", "class_weighting", "freeze_depth",
                    "threshold", "test_acc", "test_auc", "test_f1", "test_sensitivity", "test_specificity",
                    "test_acc@0.5", "test_auc_lo", "test_auc_hi", "test_ece", "checkpoint"):
            assert key in row, key
        assert 0 <= row["test_auc"] <= 1 and 0 <= row["test_acc"] <= 1 and 0 <= row["threshold"] <= 1
    for row in ranked:
        assert (Path(row["checkpoint"]) / "model.pt").is_file()
    with open(exp / "leaderboard.csv") as f:
        assert [(r["row"], r["rank"]) for r in csv.DictReader(f)] == [
            ("1", "1"), ("2", "2"), ("3", "3"), ("ensemble", "")]
    board = (exp / "leaderboard.md").read_text()
    assert "| rank | model | val_auc | threshold | AUC |" in board and "Youden" in board
    assert "Test leaderboard" in result.stdout and "report.html" in result.stdout
    report = (exp / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 6 and "optimization history" in report
    assert "Not distinguishable from rank 1 by AUC" in report and "Not distinguishable from rank 1" in board
    assert all(0 <= r["test_auc_vs_1_p"] <= 1 and 0 <= r["val_auc_vs_1_p"] <= 1 for r in rows)

    # One progress line per ended trial, beside Tune's table; the last has no time left to estimate.
    progress = [line for line in result.stdout.splitlines() if line.startswith("[pneumo-ray] trials ")]
    assert [line.split()[2] for line in progress] == ["1/3", "2/3", "3/3"], progress
    assert "ETA ~" in progress[0] and "ETA" not in progress[-1], progress
    assert re.search(r" · best val_auc [01]\.\d{4} \(trial [0-9a-f]{8}, (cnn_bn|mlp)\) · elapsed ", progress[-1])

    # manifest.json: this checkout's commit, the packages, the one node, the session's command and outcome
    manifest = json.loads((exp / "manifest.json").read_text())
    assert manifest["data"]["source"] == "synthetic" and manifest["data"]["class_counts"]["test"] == {
        "normal": int((np.load(exp / "predictions.npz")["test_y"] == 0).sum()),
        "pneumonia": int((np.load(exp / "predictions.npz")["test_y"] == 1).sum())}
    (session,) = manifest["sessions"]
    assert "smoke.yaml" in session["command"] and session["outcome"] == "trials finished"
    assert session["started"] <= session["ended"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI's clone is one)
        assert session["git"]["commit"] == head.stdout.strip()
    assert session["packages"]["torch"] == version("torch") and session["packages"]["ray"] == version("ray")
    (node,) = session["nodes"]
    assert node["cores"] == os.cpu_count() and session["cluster_resources"]["CPU"] == os.cpu_count()
    card = (exp / "MODEL_CARD.md").read_text()
    assert "## Intended use" in card and "not a medical device" in card and f"`{session['command']}`" in card
    assert "Model card: smoke, rank 1" in report and "Known limitations" in report
    assert "Manifest (manifest.json)" in report and session["started"] in report  # the manifest, in the report

    # Re-running the same name is refused before Ray starts, and nothing is touched.
    before = {p: p.stat().st_mtime_ns for p in exp.rglob("*")}
    again = run_cli("--config", SMOKE, "--storage", str(tmp_path), "--name", "smoke")
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--resume" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in exp.rglob("*")} == before


def test_interrupted_then_killed_sweep_resumes_without_losing_or_rerunning_trials(tmp_path, ray_address):
    """A sweep whose first trial diverges; Ctrl+C once another trial has finished (exit 130, state saved), --resume
    from another working directory with a relative --storage naming the same folder, SIGKILL that driver once
    another trial has finished (its Optuna rows stay RUNNING), --resume again: every trial ran once, finished ones
    were not run again, the diverged one failed with its reason and spared the rest, and the manifest and MLflow
    show the three sessions as one experiment."""
    from tests.test_faults import study_rows, wait_for

    raw = yaml.safe_load(Path(SMOKE).read_text())
    raw["search"]["initial_points"] = [{"model": "mlp", "optimizer": "sgd", "lr": 1.0e6, "class_weighting": "none"}]
    raw["leaderboard"]["gradcam_images"] = 0
    cfg_file = tmp_path / "resumable.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    first_cwd = tmp_path / "first"
    first_cwd.mkdir()
    args = ["--config", str(cfg_file), "--name", "resumable", "--num-samples", "6", "--epochs", "2",  # MLflow store
            "--address", ray_address, "--set", "tracking.mlflow.tracking_uri=sqlite:///mlflow.db"]  # in first_cwd
    exp = first_cwd / "results" / "resumable"
    log = tmp_path / "driver.log"
    driver = start_driver(*args, "--storage", "results", log=log, cwd=first_cwd)
    wait_for(lambda: "COMPLETE" in study_states_so_far(exp), 300, "a finished trial", driver, log)
    driver.send_signal(signal.SIGINT)  # Ctrl+C
    assert driver.wait(timeout=180) == 130, log.read_text()[-3000:]
    out = log.read_text()
    assert f"--resume --storage {first_cwd.resolve() / 'results'} --name resumable" in out
    assert not (exp / "leaderboard.json").exists()
    saved = yaml.safe_load((exp / "pneumo_config.yaml").read_text())
    assert saved["experiment"]["storage"] == str(first_cwd.resolve() / "results")
    finished = terminated_trials(exp)
    assert finished, "at least one trial had finished before the interrupt"
    snapshots = {t: run_snapshot(exp, t) for t in finished}

    resume = [*args, "--storage", "first/results", "--resume"]
    driver = start_driver(*resume, log=log, cwd=tmp_path)
    wait_for(lambda: len(terminated_trials(exp)) > len(finished), 300, "another finished trial", driver, log)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    finished = terminated_trials(exp)
    snapshots.update({t: run_snapshot(exp, t) for t in finished - set(snapshots)})

    resumed = run_cli(*resume, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    statuses = trial_statuses(exp)
    (diverged,) = [t for t, s in statuses.items() if s == "ERROR"]
    # A trial the SIGKILLed driver had only just started may have left its folder empty (Tune names the folder
    # before the trial writes anything, and the kill can land between) and its Optuna row open: the last session
    # closes that row as FAIL and asks Optuna for the trial anew.
    started = [d for d in trial_dirs(exp) if any(d.iterdir())]
    cut_short = len(trial_dirs(exp)) - len(started)
    assert len(started) == 6 and cut_short <= 1 and len(terminated_trials(exp)) == 5
    states = study_states(exp)
    assert states[0] == "FAIL" and sorted(states[1:]) == ["COMPLETE"] * 5 + ["FAIL"] * cut_short, \
        f"each trial once, orphaned rows closed: {study_rows(exp)}"
    # The diverged trial's reason reached its error.txt, in the first working directory's experiment (its
    # relative storage), and the resumed driver's output; it was not run again.
    error = (next(exp.glob(f"tune_trial_{diverged}_*")) / "error.txt").read_text()
    assert "diverged" in error and "lr=1e+06" in error
    assert "failed" in resumed.stdout and "diverged" in resumed.stdout
    for trial_id, snapshot in snapshots.items():  # finished trials were not run again
        assert run_snapshot(exp, trial_id) == snapshot, trial_id
    rows = ranked_rows(exp)
    assert len(rows) == 3 and all(0 <= r["test_auc"] <= 1 for r in rows)
    assert diverged not in {r["trial_id"] for r in rows}
    assert all(Path(r["checkpoint"]).is_relative_to(exp.resolve() / "best") for r in rows)
    assert not (tmp_path / "results").exists(), "the resumed run wrote into its own working directory"

    sessions = json.loads((exp / "manifest.json").read_text())["sessions"]
    outcomes = [s["outcome"].split()[0] for s in sessions]
    # The SIGKILL lands after another trial ends; when that was the search's last, the second driver had already
    # closed its session ("trials finished") and was killed in the leaderboard step.
    assert outcomes in (["interrupted", "killed", "trials"], ["interrupted", "trials", "trials"]), outcomes
    assert (sessions[1]["ended"] is None) == (outcomes[1] == "killed")
    assert "--resume" not in sessions[0]["command"] and "--resume" in sessions[2]["command"]
    assert sessions[2]["cwd"] == str(tmp_path)
    # MLflow: the resumed sessions went on with each trial's run; one run per trial, and the leaderboard's
    from mlflow.tracking import MlflowClient

    tracker = MlflowClient(f"sqlite:///{first_cwd / 'mlflow.db'}")
    runs = tracker.search_runs([tracker.get_experiment_by_name("resumable").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names.count("leaderboard") == 1 and len(names) == 7, names
    trial_runs = [r for r in runs if r.info.run_name != "leaderboard"]
    status = {r.data.tags["trial_name"].split("_")[2]: r.info.status for r in trial_runs}
    assert status == {t: "FAILED" if t == diverged else "FINISHED" for t in statuses}
    assert [r.info.status for r in runs if r.info.run_name == "leaderboard"] == ["FINISHED"]
