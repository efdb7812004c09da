"""Cross-validated selection (data.cv_folds): the folds, what Tune and Optuna see, the fold checkpoints, and
the out-of-fold predictions the leaderboard chooses thresholds on."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import yaml
from scipy.special import expit

from pneumo_ray.config import DataConfig
from pneumo_ray.data import load_splits, with_folds
from tests.conftest import ROOT, ranked_rows

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"


def test_folds_are_disjoint_stratified_seeded_and_cover_the_pool():
    splits = load_splits(DataConfig(source="synthetic", synthetic_train=230, synthetic_val=61), seed=0)
    folds = with_folds(splits, 5, seed=3)
    pool_x, pool_y = folds.pool()
    assert len(folds.folds) == len(pool_y) == 291 and set(folds.folds) == set(range(5)) and folds.cv_folds == 5
    for label in (0, 1):  # stratified: each class spread evenly over the folds
        per_fold = np.bincount(folds.folds[pool_y == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, per_fold
    seen = np.zeros(len(pool_y), dtype=int)
    for k in range(5):
        fold = folds.fold(k)
        held_out = folds.folds == k
        seen += held_out
        # fold k validates on exactly its held-out images and trains on every other pooled image; test is untouched
        assert np.array_equal(fold.val_x, pool_x[held_out]) and np.array_equal(fold.val_y, pool_y[held_out])
        assert np.array_equal(fold.train_x, pool_x[~held_out]) and len(fold.train_y) + len(fold.val_y) == 291
        assert np.array_equal(fold.test_x, splits.test_x) and fold.folds is None
    assert (seen == 1).all(), "every pooled image is held out by exactly one fold"
    assert np.array_equal(with_folds(splits, 5, seed=3).folds, folds.folds), "the same seed makes the same folds"
    assert not np.array_equal(with_folds(splits, 5, seed=4).folds, folds.folds)
    assert load_splits(DataConfig(source="synthetic", synthetic_train=230, synthetic_val=61, cv_folds=5),
                       seed=0).folds.tolist() == with_folds(splits, 5, seed=0).folds.tolist()


@pytest.mark.slow
def test_cross_validated_sweep_selects_on_the_fold_mean_thresholds_out_of_fold_and_survives_a_killed_worker(
        tmp_path, ray_session, ray_address):
    """One real cross-validated sweep (data.cv_folds: 2, one Train worker per fold), with a fold's worker
    SIGKILLed after the trial's first checkpoint: the trial restarts its workers and every fold goes on from the
    shared checkpoint (not from epoch 1), so the folds stay in step; early stopping, decided on the fold mean,
    ends them together; then what Tune, Optuna and the leaderboard saw."""
    from pneumo_ray.checkpoints import load_ranked
    from pneumo_ray.predict import load_predictor
    from tests.test_faults import kill_mid_trial

    raw = yaml.safe_load(SMOKE.read_text())
    raw["data"].update(cv_folds=2, synthetic_test=96)
    raw["search"].update(num_samples=1, max_concurrent_trials=1, model=["cnn_bn"], asha={"enabled": False})
    # min_delta 1: nothing after epoch 1 counts as better, so with patience 4 the trial stops after epoch 5 of 8,
    # whenever the kill lands in between (the restarted workers restore the wait from the checkpoint).
    raw["train"].update(early_stopping_patience=4, min_delta=1.0)
    raw["leaderboard"]["gradcam_images"] = 0
    cfg_file = tmp_path / "cv.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    killed_after, reported, seconds = kill_mid_trial(tmp_path, cfg_file, "cv", ray_address,
                                                     lambda actor: actor.class_name == "RayTrainWorker", last_epoch=5)
    exp = tmp_path / "cv"

    # What Tune (and ASHA) saw each epoch is the mean over the folds, with their sd beside it ...
    last_reported = {}
    for log in exp.glob("tune_trial_*/result.json"):
        epochs = [json.loads(line) for line in log.read_text().splitlines()]
        assert [e["early_stopped"] for e in epochs] == [0] * (len(epochs) - 1) + [1]
        for e in epochs:
            per_fold = [e["val_auc_fold0"], e["val_auc_fold1"]]
            assert e["val_auc"] == pytest.approx(np.mean(per_fold)) and e["val_auc_sd"] == pytest.approx(
                np.std(per_fold, ddof=1))
        last_reported[epochs[-1]["trial_id"]] = epochs[-1]["val_auc"]
    # ... and so is what Optuna recorded for each trial.
    with sqlite3.connect(exp / "optuna.db") as db:
        values = sorted(v for (v,) in db.execute("SELECT value FROM trial_values"))
    assert values == pytest.approx(sorted(last_reported.values()))

    rows = ranked_rows(exp)
    assert len(rows) == 1 and all(r["last_epoch"] == 5 and r["stopped_early"] for r in rows)
    assert "| last_epoch | stopped_early |" in (exp / "leaderboard.md").read_text()
    saved = yaml.safe_load((exp / "pneumo_config.yaml").read_text())
    splits = load_splits(DataConfig(**saved["data"]), seed=saved["experiment"]["seed"])
    pool_x, pool_y = splits.pool()
    predictions = np.load(exp / "predictions.npz")
    assert np.array_equal(predictions["val_y"], pool_y), "val columns are over the whole pool, out of fold"
    for row in rows:
        members = load_ranked(exp, row)  # the leaderboard's copy: one model per fold, each with its own meta
        assert [meta["fold"] for _, meta in members] == [0, 1]
        top_meta = json.loads((exp / "best" / f"rank{row['rank']}_{row['trial_id']}" / "meta.json").read_text())
        assert top_meta["cv_folds"] == 2 and row["val_auc"] == top_meta["metrics"]["val_auc"]
        # the kept folds come from one epoch, the row's
        assert [meta["metrics"]["epoch"] for _, meta in members] == [top_meta["metrics"]["epoch"]] * 2 == \
            [row["epoch"]] * 2
        out_of_fold, test = np.full(len(pool_y), np.nan), []
        for model, meta in members:
            # Each pooled image is predicted by the one fold-model that did not train on it.
            held_out = splits.folds == meta["fold"]
            assert meta["metrics"]["val_auc"] == top_meta["metrics"][f"val_auc_fold{meta['fold']}"]
            out_of_fold[held_out] = expit(margins(model, meta, pool_x[held_out]) / row["temperature"])
            test.append(expit(margins(model, meta, splits.test_x) / row["temperature"]))
        assert not np.isnan(out_of_fold).any()
        assert np.allclose(predictions[f"val_{row['row']}"], out_of_fold, atol=1e-6)
        # On test, a cross-validated trial is the mean of its fold-models.
        assert np.allclose(predictions[f"test_{row['row']}"], np.mean(test, axis=0), atol=1e-6)

    assert "2-fold cross-validation" in (exp / "leaderboard.md").read_text()
    predictor = load_predictor(exp, rank=1)
    assert len(predictor.members) == 2
    assert np.allclose(predictor.probabilities(splits.test_x), predictions["test_1"], atol=1e-6)
    print(f"\n[fault 1] a fold's worker killed after epoch {killed_after}; reported epochs {reported}; "
          f"sweep finished {seconds:.0f} s after the kill")


def margins(model, meta, images):
    import torch

    from pneumo_ray.evaluate import predict_margin

    return predict_margin(model, images, meta["mean"], meta["std"], meta["normalize"], torch.device("cpu"))



SHARED_FOLDER = ROOT.parent / "shared" / "data" / "chest_xray"


def test_readme_chest_xray_sweep_passes_every_check_before_ray(tmp_path, monkeypatch):
    """The README's real-image sweep, up to where Ray would start: its config validates, the Kaggle folder
    loads at 64 px into 3 stratified folds over all of train, its models build, and its 3 fold workers fit
    2 cores. The hour-long sweep itself is a measurement (docs/results.md), not a test."""
    import shlex

    from pneumo_ray import config, sweep
    from tests.conftest import readme_commands

    command = next(c for c in readme_commands() if "chest_xray.yaml" in c)
    args = shlex.split(command)
    assert args[:2] == ["python", "sweeps/run.py"] and (ROOT / args[args.index("--config") + 1]).is_file()
    if not SHARED_FOLDER.is_dir():
        pytest.skip(f"no Kaggle chest X-ray folder at {SHARED_FOLDER}: the README's real-image sweep needs it")
    monkeypatch.chdir(ROOT)  # the README's commands run from the project's root, where ../shared/data resolves
    # its own storage and decode cache: the test leaves the user's results/ and ~/.cache alone
    cfg = config.load(args[args.index("--config") + 1], {"experiment.storage": str(tmp_path / "results"),
                                                        "data.cache_dir": str(tmp_path / "cache")})
    prepared = sweep.prepare(cfg, resume=False, local=True)
    splits = prepared.splits
    assert splits.image_size == 64 and splits.cv_folds == 3 and len(splits.test_y) == 624
    assert len(splits.folds) == len(splits.pool()[1]) == 5216  # every train image, val carved from it included
    # Kermany's 5,216 train X-rays are of 2,846 patients; none of them is split across two folds
    assert prepared.data_identity["split_by"] == "patient" and len(np.unique(splits.patients)) == 2846
    assert len(set(zip(splits.patients, splits.folds))) == 2846, "a patient's X-rays sit in two folds"
