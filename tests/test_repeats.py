"""leaderboard.repeats: the top configurations trained again with new seeds, as Ray trials of their own, and
the leaderboard ranked on their mean over runs."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import yaml

from pneumo_ray.storage import saved_trials
from tests.conftest import ROOT, ranked_rows, run_cli

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"
pytestmark = pytest.mark.slow


def test_repeats_retrain_the_top_configurations_and_rank_on_their_mean(tmp_path, ray_address):
    raw = yaml.safe_load(SMOKE.read_text())
    raw["search"].update(num_samples=2, model=["cnn_bn"], asha={"enabled": False})
    raw["train"]["epochs"] = 1
    raw["leaderboard"].update(top_k=2, repeats=2, gradcam_images=0)  # Grad-CAM figures are test_report's
    # Inline trials: the repeats are launched as any trial is, and inline trials start in a fraction of a
    # TorchTrainer's time; the TorchTrainer path has its own tests (test_sweep, test_faults).
    raw["resources"] = {"launcher": "inline", "gpus_per_worker": 0}
    cfg_file = tmp_path / "repeats.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    result = run_cli("--config", str(cfg_file), "--storage", str(tmp_path), "--name", "rep", "--address", ray_address)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exp = tmp_path / "rep"

    # The search is untouched: two trials, two Optuna rows. The repeats are a Tune run of their own in
    # repeats/: 2 configurations x 2 new seeds, every one finished.
    search_ids = {t["trial_id"] for t in saved_trials(exp)}
    assert len(search_ids) == 2 and {p.name.split("_")[2] for p in exp.glob("tune_trial_*")} == search_ids
    with sqlite3.connect(exp / "optuna.db") as db:
        assert db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 2
    repeats = saved_trials(exp / "repeats")
    assert len(repeats) == 4 and {t["status"] for t in repeats} == {"TERMINATED"}
    metas = [json.loads(p.read_text()) for p in (exp / "repeats").glob("repeat_trial_*/checkpoint_*/meta.json")]
    runs = {(m["params"]["repeat_of"], m["params"]["seed"]) for m in metas}
    assert runs == {(t, s) for t in search_ids for s in (1, 2)}, "each kept configuration, with seeds 1 and 2"

    rows = ranked_rows(exp)
    details = json.loads((exp / "evaluation.json").read_text())["rows"]
    assert [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["val_auc_runs_mean"] >= rows[1]["val_auc_runs_mean"], "ranked on the mean over runs"
    for row in rows:
        assert row["runs"] == 3 and row["runs_seeds"] == [0, 1, 2]
        per_run = details[row["row"]]["runs"]
        # the search's own run first, then the repeats' best epochs, as their checkpoints recorded them
        assert per_run["val_auc"][0] == row["val_auc"] and per_run["test_auc"][0] == pytest.approx(row["test_auc"])
        repeat_values = sorted(m["metrics"]["val_auc"] for m in metas if m["params"]["repeat_of"] == row["trial_id"])
        assert sorted(per_run["val_auc"][1:]) == pytest.approx(repeat_values)
        for key in ("val_auc", "test_auc", "test_acc", "test_sensitivity", "test_specificity"):
            assert row[f"{key}_runs_mean"] == pytest.approx(np.mean(per_run[key]))
            assert row[f"{key}_runs_sd"] == pytest.approx(np.std(per_run[key], ddof=1))
    assert "Over each configuration's runs" in (exp / "leaderboard.md").read_text()
    assert "leaderboard.repeats" in (exp / "report.html").read_text()
