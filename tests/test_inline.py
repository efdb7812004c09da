"""resources.launcher: inline, on a real Ray: single-worker trials train in their Tune trial process.
The same guarantees as TorchTrainer trials: a leaderboard from the kept checkpoints, diverged trials
failed with their reason, and a killed trial resumed from its last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pneumo_ray.sweep import trial_statuses
from tests.conftest import ROOT, ranked_rows, run_cli
from tests.test_faults import kill_mid_trial, reported_epochs, study_rows

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"
pytestmark = pytest.mark.slow


def inline_config(tmp_path: Path, models: dict | None = None, tracking: dict | None = None, **search) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["search"].update(search)
    raw["leaderboard"]["gradcam_images"] = 0  # no test here looks at the report's Grad-CAM figures
    raw["models"] = models or {}
    raw["tracking"] = tracking or {}
    raw["resources"] = {"launcher": "inline", "gpus_per_worker": 0}
    path = tmp_path / "inline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_inline_sweep_keeps_checkpoints_reports_startup_and_fails_diverged(tmp_path, ray_address):
    cfg = inline_config(tmp_path, num_samples=3, initial_points=[
        {"model": "mlp", "optimizer": "sgd", "lr": 1.0e6, "class_weighting": "none"}],  # blows up within steps
        tracking={"mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "inline-runs"}})
    # The config's storage is the smoke config's relative ./results, as a user's would be: the trials train
    # in Tune's working directories, yet their checkpoints and DIVERGED markers land in this one.
    result = run_cli("--config", str(cfg), "--name", "inline", "--epochs", "3", "--address", ray_address, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exp = tmp_path / "results" / "inline"

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
    rows = ranked_rows(exp)
    assert len(rows) == 2 and errored[0] not in {r["trial_id"] for r in rows}
    for row in rows:
        assert (Path(row["checkpoint"]) / "model.pt").is_file()
        assert epochs[row["trial_id"]] == list(range(1, len(epochs[row["trial_id"]]) + 1))  # ASHA may stop early
        assert any(exp.glob(f"tune_trial_{row['trial_id']}_*/checkpoint_*/meta.json"))

    check_mlflow(tmp_path / "mlruns" / "mlflow.db", exp, statuses, epochs, rows)

    first_epochs = [json.loads((d / "result.json").read_text().splitlines()[0])
                    for d in exp.glob("tune_trial_*") if statuses[d.name.split("_")[2]] == "TERMINATED"]
    for first in first_epochs:  # start-up is measured inside the trial, so it is shorter than the trial
        assert 0 < first["startup_s"] < first["time_total_s"]


def check_mlflow(store: Path, exp: Path, statuses: dict, epochs: dict, rows: list[dict]) -> None:
    """What the sweep logged to MLflow, read back through MLflow's client: a run per trial with its searched
    values and every epoch's metrics (the failed one FAILED), and the leaderboard run with its files."""
    from mlflow.tracking import MlflowClient

    tracker = MlflowClient(f"sqlite:///{store}")
    experiment = tracker.get_experiment_by_name("inline-runs")
    assert experiment.artifact_location == (store.parent / "mlflow-artifacts").as_uri()
    runs = {r.info.run_name: r for r in tracker.search_runs([experiment.experiment_id])}
    board = runs.pop("leaderboard")
    by_trial = {r.data.tags["trial_name"].split("_")[2]: r for r in runs.values()}
    assert sorted(by_trial) == sorted(statuses)
    for trial_id, run in by_trial.items():
        assert run.info.status == ("FAILED" if statuses[trial_id] == "ERROR" else "FINISHED")
        assert {"model", "optimizer", "lr", "weight_decay", "class_weighting"} <= set(run.data.params)
        if statuses[trial_id] == "TERMINATED":
            history = tracker.get_metric_history(run.info.run_id, "val_auc")
            assert [m.step for m in history] == epochs[trial_id] and all(0 <= m.value <= 1 for m in history)
    for row in rows:
        assert by_trial[row["trial_id"]].data.tags["pneumo_ray.rank"] == str(row["rank"])
    assert board.data.params["rank1_trial"] == rows[0]["trial_id"]
    assert abs(board.data.metrics["rank1_test_auc"] - rows[0]["test_auc"]) < 1e-9
    artifacts = {a.path for a in tracker.list_artifacts(board.info.run_id)}
    assert artifacts == {"leaderboard.md", "leaderboard.csv", "leaderboard.json", "report.html", "MODEL_CARD.md",
                         "manifest.json"}
    assert (store.parent / "mlflow-artifacts").is_dir()


def test_killed_inline_trial_resumes_from_its_checkpoint(tmp_path, ray_session, ray_address):
    """SIGKILL the trial's own process after its first checkpoint: Tune restarts the trial from that
    checkpoint, so the epochs continue instead of starting again at 1."""
    cfg = inline_config(tmp_path, model=["cnn_bn"], num_samples=1, optimizer=["adamw", "sgd"], max_concurrent_trials=1)
    killed_after, epochs, _ = kill_mid_trial(tmp_path, cfg, "killinline", ray_address,
                                             lambda actor: "ImplicitFunc" in actor.class_name)
    print(f"\n[inline fault] trial killed after epoch {killed_after}; reported epochs {epochs}")


def test_grid_sweep_trains_each_point_once_with_each_model_at_its_own_size(tmp_path, ray_address):
    """search.sampler: grid through a real sweep: Tune's OptunaSearch runs the grid's points, two at a time,
    each once, and the sweep ends cleanly after the last (Optuna's own grid sampler would raise there). One model
    is a labelled entry (models.<label>) at its own image size: trained, ranked, scored, ensembled with the other
    size and used by predict, each at the size it trained at."""
    cfg = inline_config(tmp_path, sampler="grid", model=["small_cnn", "mlp"], optimizer=["adamw", "sgd"],
                        lr=[1.0e-3], weight_decay=[1.0e-4], class_weighting=["none"], num_samples=4,
                        asha={"enabled": True, "grace_period": 3},  # longer than --epochs 1: capped, stops none
                        models={"small_cnn": {"arch": "cnn_bn", "head_dropout": 0.0, "size": 40}})
    result = run_cli("--config", str(cfg), "--name", "grid", "--epochs", "1", "--address", ray_address, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exp = tmp_path / "results" / "grid"
    assert sorted(s for _, s in study_rows(exp)) == ["COMPLETE"] * 4
    metas = [json.loads(p.read_text()) for p in exp.glob("tune_trial_*/checkpoint_*/meta.json")]
    assert sorted((m["model"], m["params"]["optimizer"]) for m in metas) == [
        ("mlp", "adamw"), ("mlp", "sgd"), ("small_cnn", "adamw"), ("small_cnn", "sgd")]
    # the data loads at the largest size (40 px); mlp trains at data.size (the smoke config's 28), made from those
    assert {(m["model"], m["arch"], m["image_size"]) for m in metas} == {("small_cnn", "cnn_bn", 40),
                                                                         ("mlp", "mlp", 28)}
    assert {m["head_dropout"] for m in metas if m["model"] == "small_cnn"} == {0.0}
    board = json.loads((exp / "leaderboard.json").read_text())
    assert len(board) == 4 and board[-1]["row"] == "ensemble" and all(0 <= r["test_auc"] <= 1 for r in board)

    from PIL import Image

    from pneumo_ray import predict

    image = tmp_path / "xray.png"
    Image.fromarray(np.full((90, 70), 120, np.uint8)).save(image)
    lines, errors = predict.run(exp, [str(image)], ensemble=True)  # members at 40 and 28 px
    assert not errors and 0 <= float(lines[-1].split("\t")[1]) <= 1
