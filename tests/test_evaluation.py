"""The leaderboard's statistics: threshold rules, bootstrap intervals, calibration, and the ensemble row.

Cases are built so that the right answer is known in advance. The ensemble case runs the real
leaderboard step on real checkpoints of the project's MLP, whose weights are set by hand so that each
model's logit margin for each image is chosen by the test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import expit
from scipy.stats import norm

from pneumo_ray import config
from pneumo_ray.data import Splits
from pneumo_ray.leaderboard import ENSEMBLE, write_leaderboard
from pneumo_ray.metrics import (
    binary_metrics,
    bootstrap_ci,
    expected_calibration_error,
    fit_temperature,
    paired_auc_difference,
    sensitivity_threshold,
    youden_threshold,
)
from pneumo_ray.models import build_model


def test_youden_threshold_on_a_crafted_case():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.4, 0.65, 0.6, 0.7, 0.8, 0.85, 0.9])
    # J = sensitivity + specificity - 1: at 0.6, 5/5 + 4/5 - 1 = 0.8; at 0.65, 0.6; at 0.7, 4/5 + 5/5 - 1 = 0.8.
    # A tie between 0.6 and 0.7 goes to the higher threshold.
    assert youden_threshold(labels, prob) == pytest.approx(0.7)
    prob[4] = 0.75  # a normal now scores above 0.7: J(0.6) = 0.8 beats J(0.7) = 0.6 and J(0.8) = 0.6
    assert youden_threshold(labels, prob) == pytest.approx(0.6)
    m = binary_metrics(labels, prob, threshold=0.6)
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.8)


def test_sensitivity_floor_threshold_on_a_crafted_case():
    labels = np.array([0] * 5 + [1] * 10)
    prob = np.array([0.05, 0.1, 0.2, 0.3, 0.5] + [0.15, 0.35, 0.4, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    # Sensitivity >= 0.9 needs 9 of 10 pneumonias: the highest such threshold is the 9th-highest score, 0.35.
    assert sensitivity_threshold(labels, prob, 0.9) == pytest.approx(0.35)
    assert binary_metrics(labels, prob, 0.35)["sensitivity"] == 0.9
    assert binary_metrics(labels, prob, 0.36)["sensitivity"] < 0.9
    assert sensitivity_threshold(labels, prob, 1.0) == pytest.approx(0.15)
    assert sensitivity_threshold(labels, prob, 0.5) == pytest.approx(0.7)


def test_bootstrap_intervals_cover_the_true_values_about_95_percent_of_the_time():
    """200 test sets drawn from a known population (binormal scores, fixed class counts as in a real test
    split): each one's 95% interval should contain the population value in about 95% of the sets."""
    rng = np.random.default_rng(1)
    n_neg, n_pos, shift, threshold = 120, 180, 1.5, 0.75
    truth = {"auc": norm.cdf(shift / math.sqrt(2)), "sensitivity": norm.sf(threshold - shift),
             "specificity": norm.cdf(threshold)}
    truth["acc"] = (n_pos * truth["sensitivity"] + n_neg * truth["specificity"]) / (n_pos + n_neg)
    labels = np.array([0] * n_neg + [1] * n_pos)
    covered = {m: 0 for m in truth}
    widths = []
    sets = 200
    for i in range(sets):
        scores = rng.normal(shift * labels, 1.0)
        ci = bootstrap_ci(labels, scores, threshold, n_resamples=1000, seed=i)
        for m, value in truth.items():
            covered[m] += ci[m][0] <= value <= ci[m][1]
        widths.append(ci["auc"][1] - ci["auc"][0])
    rates = {m: c / sets for m, c in covered.items()}
    print(f"\n[bootstrap] coverage of 95% intervals over {sets} test sets: {rates}; median AUC width "
          f"{np.median(widths):.3f}")
    for m, rate in rates.items():  # binomial sd at 200 sets is 0.015; percentile intervals run a little narrow
        assert 0.88 <= rate <= 0.99, (m, rate)
    # The interval is seeded: the same seed gives the same interval, another seed a different one.
    scores = rng.normal(shift * labels, 1.0)
    assert bootstrap_ci(labels, scores, threshold, seed=3) == bootstrap_ci(labels, scores, threshold, seed=3)
    assert bootstrap_ci(labels, scores, threshold, seed=3) != bootstrap_ci(labels, scores, threshold, seed=4)


def test_paired_auc_difference_on_a_case_worked_by_hand():
    """Two pneumonias, two normals. Model a ranks them perfectly (AUC 1); b puts one pneumonia (0.2) below a
    normal (0.3): AUC 0.75. DeLong's components: a's are all 1; b's pneumonias beat [1, 0.5] of the normals,
    b's normals lie below [0.5, 1] of the pneumonias. Var(diff) = var([1, .5]) / 2 + var([.5, 1]) / 2 =
    0.125 (sample variances), so z = 0.25 / sqrt(0.125) and p = 2 * (1 - Phi(z)) = 0.4795."""
    labels = np.array([1, 1, 0, 0])
    a, b = np.array([0.9, 0.8, 0.3, 0.1]), np.array([0.9, 0.2, 0.3, 0.1])
    diff, lo, hi, p = paired_auc_difference(labels, a, b)
    se = math.sqrt(0.125)
    assert diff == pytest.approx(0.25)
    assert p == pytest.approx(2 * norm.sf(0.25 / se), abs=1e-9) and p == pytest.approx(0.4795, abs=1e-4)
    assert (lo, hi) == pytest.approx((0.25 - norm.ppf(0.975) * se, 0.25 + norm.ppf(0.975) * se))
    assert paired_auc_difference(labels, b, a)[0] == pytest.approx(-0.25)  # antisymmetric
    assert paired_auc_difference(labels, a, a) == (0.0, 0.0, 0.0, 1.0)  # identical predictions


def test_paired_auc_difference_agrees_with_a_paired_bootstrap():
    """On correlated models (b shares a's noise), DeLong's standard error is what a paired, stratified
    bootstrap of the difference estimates, and it is far below what treating the two as independent gives."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.6).astype(int)
    a = y + rng.normal(0, 1, 600)
    b = y + 0.8 * (a - y) + rng.normal(0, 0.5, 600)
    diff, lo, hi, p = paired_auc_difference(y, a, b)
    assert diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boot = []
    for _ in range(1000):
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boot.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    delong_se = (hi - lo) / (2 * norm.ppf(0.975))
    assert delong_se == pytest.approx(np.std(boot), rel=0.15)
    independent_se = math.hypot(*(np.std([roc_auc_score(y[i], m[i]) for i in (
        np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(300))]) for m in (a, b)))
    assert delong_se < 0.7 * independent_se
    # a model that is plainly better is told apart
    assert paired_auc_difference(y, 3 * y + rng.normal(0, 1, 600), b)[3] < 1e-6


def test_the_leaderboard_says_in_words_which_rows_rank_1_does_not_beat():
    from pneumo_ray.leaderboard import comparison_sentence

    rows = [{"row": "1", "rank": 1, "model": "cnn_bn", "test_auc_vs_1_p": 1.0, "val_auc_vs_1_p": 1.0},
            {"row": "2", "rank": 2, "model": "resnet18", "test_auc_vs_1_p": 0.30, "val_auc_vs_1_p": 0.01},
            {"row": "ensemble", "rank": None, "model": "mean of top 2", "test_auc_vs_1_p": 0.001,
             "val_auc_vs_1_p": 0.5}]
    assert comparison_sentence(rows) == ("Not distinguishable from rank 1 by AUC (DeLong's paired test on the same "
                                         "images, p >= 0.05): on test, #2 resnet18; on val, ensemble.")
    rows[1]["test_auc_vs_1_p"] = 0.04
    assert "on test, none;" in comparison_sentence(rows)


def test_calibration_error_and_temperature_scaling():
    rng = np.random.default_rng(0)
    margin = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < expit(margin)).astype(int)  # calibrated by construction
    assert expected_calibration_error(labels, expit(margin)) < 0.02
    overconfident = 3 * margin  # a model 3x too sure of itself
    assert expected_calibration_error(labels, expit(overconfident)) > 0.1
    temperature = fit_temperature(labels, overconfident)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(labels, expit(overconfident / temperature)) < 0.02
    separated = np.where(labels == 1, 1.0, -1.0)  # val with no overlap: the log loss falls as T -> 0
    assert fit_temperature(labels, separated) == 1.0  # refused rather than pushing every probability to 0 or 1


# --------------------------------------------------------------------------- ensemble, through the real step

SIZE = 28


def lookup_mlp(margins: np.ndarray) -> torch.nn.Module:
    """The project's MLP with weights that map image i (pixel i lit, the rest black) to logit margin
    margins[i]: hidden unit 0 carries the positive part, unit 1 the negative part, and the head
    subtracts them."""
    model = build_model("mlp", SIZE)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        first, second, head = model.body[1], model.body[4], model.head[1]
        first.weight[0, : len(margins)] = torch.from_numpy(np.maximum(margins, 0)).float()
        first.weight[1, : len(margins)] = torch.from_numpy(np.maximum(-margins, 0)).float()
        second.weight[0, 0] = second.weight[1, 1] = 1.0
        head.weight[1, 0], head.weight[1, 1] = 1.0, -1.0
    return model


def one_hot_images(first: int, count: int) -> np.ndarray:
    images = np.zeros((count, SIZE * SIZE), np.uint8)
    images[np.arange(count), first + np.arange(count)] = 255
    return images.reshape(count, SIZE, SIZE)


def save_checkpoint(exp_dir, trial_id: str, model: torch.nn.Module, val_auc: float) -> None:
    folder = exp_dir / "train_runs" / trial_id / "checkpoint_000000"
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    params = {"model": "mlp", "optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0, "batch_size": 64,
              "class_weighting": "none", "freeze_depth": 0}
    meta = {"model": "mlp", "params": params, "image_size": SIZE, "mean": 0.0, "std": 1.0, "normalize": False,
            "head_dropout": 0.0, "metrics": {"epoch": 1, "val_auc": val_auc}}
    (folder / "meta.json").write_text(json.dumps(meta))


def crafted_experiment(exp_dir, n_val: int = 150, n_test: int = 150):
    """Three checkpoints of lookup MLPs, each confidently right on two thirds of the images and mildly wrong
    on a different third. Returns (splits, {trial index: margins over val then test})."""
    rng = np.random.default_rng(0)
    val_y, test_y = (rng.random(n_val) < 0.6).astype(int), (rng.random(n_test) < 0.6).astype(int)
    labels = np.concatenate([val_y, test_y])
    sign = np.where(labels == 1, 1.0, -1.0)
    margins = {}
    for k in range(3):
        wrong = np.arange(len(labels)) % 3 == k
        margins[k] = np.where(wrong, -0.4, 2.2) * sign
        margins[k] += rng.normal(0, 0.05, len(labels))  # no exact ties between the models' val AUCs
        val_auc = binary_metrics(val_y, expit(margins[k][:n_val]))["auc"]
        save_checkpoint(exp_dir, f"trial{k}", lookup_mlp(margins[k]), val_auc)
    splits = Splits(one_hot_images(0, 8), np.array([0, 1] * 4), one_hot_images(0, n_val), val_y,
                    one_hot_images(n_val, n_test), test_y, source="crafted")
    return splits, margins


def test_ensemble_beats_every_member_when_their_mistakes_differ(tmp_path):
    """Averaging outvotes every member's mistakes, so the ensemble row must separate the classes perfectly
    while no single model can."""
    exp_dir = tmp_path / "exp"
    splits, margins = crafted_experiment(exp_dir)
    n_val, n_test, val_y, test_y = len(splits.val_y), len(splits.test_y), splits.val_y, splits.test_y
    cfg = config.from_dict({"leaderboard": {"top_k": 3}}, check=False)
    (exp_dir / "best" / "rank1_gone").mkdir(parents=True)  # a copy from an earlier ranking

    rows = write_leaderboard(exp_dir, cfg, splits)

    assert sorted(p.name for p in (exp_dir / "best").iterdir()) == sorted(f"rank{r['rank']}_{r['trial_id']}"
                                                                          for r in rows[:3])
    singles, ensemble = rows[:3], rows[3]
    assert [r["row"] for r in rows] == ["1", "2", "3", ENSEMBLE] and [r["rank"] for r in rows] == [1, 2, 3, None]
    assert ensemble["model"] == "mean of top 3"
    for key in ("test_auc", "test_acc", "test_f1", "test_acc@0.5"):
        assert ensemble[key] >= max(r[key] for r in singles), key
    assert ensemble["test_auc"] == 1.0 and ensemble["test_acc"] == 1.0
    assert max(r["test_auc"] for r in singles) < 1.0 and max(r["test_acc"] for r in singles) < 0.9
    # The checkpoints went through the real loading and inference: the saved probabilities are the designed ones.
    with np.load(exp_dir / "predictions.npz") as saved:
        by_rank = {r["row"]: int(r["trial_id"][-1]) for r in singles}
        for rank, k in by_rank.items():
            np.testing.assert_allclose(saved[f"test_{rank}"], expit(margins[k][n_val:]), atol=1e-5)
        np.testing.assert_allclose(saved["test_ensemble"], np.mean([saved[f"test_{r}"] for r in by_rank], axis=0))
        np.testing.assert_array_equal(saved["test_y"], test_y)
    # Each row's threshold was chosen on val, by Youden's J, and its intervals bracket its point values.
    for row in rows:
        with np.load(exp_dir / "predictions.npz") as saved:
            assert row["threshold"] == pytest.approx(youden_threshold(val_y, saved[f"val_{row['row']}"]))
        for m in ("acc", "auc", "sensitivity", "specificity", "f1", "acc@0.5"):
            assert row[f"test_{m}_lo"] <= row[f"test_{m}"] <= row[f"test_{m}_hi"], (row["rank"], m)
    # Each row against rank 1, paired on the same images, on val and on test: DeLong's numbers, in the
    # leaderboard and in words.
    with np.load(exp_dir / "predictions.npz") as saved:
        for row in rows:
            for split, labels in (("val", val_y), ("test", test_y)):
                expected = paired_auc_difference(labels, saved[f"{split}_{row['row']}"], saved[f"{split}_1"])
                got = tuple(row[f"{split}_auc_vs_1{s}"] for s in ("", "_lo", "_hi", "_p"))
                assert got == pytest.approx(expected), (row["row"], split)
    assert (rows[0]["test_auc_vs_1"], rows[0]["test_auc_vs_1_p"]) == (0.0, 1.0)
    assert ensemble["test_auc_vs_1"] > 0
    board = (exp_dir / "leaderboard.md").read_text()
    assert "AUC - #1 (p)" in board and "Not distinguishable from rank 1 by AUC" in board
    details = json.loads((exp_dir / "evaluation.json").read_text())
    assert details["settings"]["bootstrap_resamples"] == 1000
    assert details["settings"]["resize"] == "crop"  # the default source, medmnist: predict crops as MedMNIST did
    assert np.array(details["rows"]["ensemble"]["confusion"]["tuned"]).trace() == n_test  # all correct
    report = details["rows"]["1"]["per_class"]["tuned"]
    assert report["normal"]["support"] == (test_y == 0).sum() and report["pneumonia"]["support"] == test_y.sum()


def test_temperature_is_fitted_on_val_and_applied_to_test(tmp_path):
    exp_dir = tmp_path / "exp"
    splits, margins = crafted_experiment(exp_dir)
    n_val = len(splits.val_y)
    cfg = config.from_dict({"leaderboard": {"top_k": 3, "temperature_scaling": True, "ensemble": False}}, check=False)

    rows = write_leaderboard(exp_dir, cfg, splits)

    assert [r["rank"] for r in rows] == [1, 2, 3]
    with np.load(exp_dir / "predictions.npz") as saved:
        for row in rows:
            m = margins[int(row["trial_id"][-1])]
            assert row["temperature"] == pytest.approx(fit_temperature(splits.val_y, m[:n_val]), rel=1e-3)
            assert row["temperature"] != pytest.approx(1.0, abs=0.05)  # these margins are far from calibrated
            np.testing.assert_allclose(saved[f"test_{row['row']}"], expit(m[n_val:] / row["temperature"]),
                                       atol=1e-4)
    assert json.loads((exp_dir / "evaluation.json").read_text())["settings"]["temperature_scaling"] is True


def test_the_leaderboard_says_whether_val_foretold_test(tmp_path):
    """One model, its val and test margins drawn alike except that test's normal images are pushed towards
    pneumonia (the shift seen between Kermany's train and test folders). The leaderboard, the model card and the
    report must name what val got wrong (AUC, specificity) and nothing it got right (sensitivity); with no shift,
    they must say val foretold test."""
    from pneumo_ray.leaderboard import transfer_sentence
    from pneumo_ray.model_card import write_model_card
    from pneumo_ray.report import write_report

    rng = np.random.default_rng(1)
    n = 300
    val_y, test_y = (rng.random(n) < 0.6).astype(int), (rng.random(n) < 0.6).astype(int)
    cfg = config.from_dict({"leaderboard": {"top_k": 1}}, check=False)
    for shift, exp_dir in ((2.0, tmp_path / "shifted"), (0.0, tmp_path / "alike")):
        val_m = np.where(val_y == 1, 1.8, -1.8) + rng.normal(0, 1.0, n)
        test_m = np.where(test_y == 1, 1.8, -1.8 + shift) + rng.normal(0, 1.0, n)
        save_checkpoint(exp_dir, "trial0", lookup_mlp(np.concatenate([val_m, test_m])), 0.99)
        splits = Splits(one_hot_images(0, 8), np.array([0, 1] * 4), one_hot_images(0, n), val_y,
                        one_hot_images(n, n), test_y, source="crafted")

        row = write_leaderboard(exp_dir, cfg, splits)[0]

        with np.load(exp_dir / "predictions.npz") as saved:
            np.testing.assert_allclose(saved["val_1"], expit(val_m), atol=1e-5)
            on_val = binary_metrics(val_y, saved["val_1"], row["threshold"])
        for m in ("auc", "sensitivity", "specificity"):  # the val predictions the threshold was chosen on
            assert row[f"scored_val_{m}"] == pytest.approx(on_val[m], abs=1e-4), m
        sentence = transfer_sentence(row)
        board = (exp_dir / "leaderboard.md").read_text()
        card = write_model_card(exp_dir, cfg, splits).read_text()
        page = write_report(exp_dir, cfg, splits).read_text()
        assert sentence in board and sentence in card and sentence in page.replace("&#x27;", "'")
        if shift:
            assert sentence.startswith("Val did not foretell test for #1 mlp")
            assert row["scored_val_specificity"] > row["test_specificity_hi"]
            assert f"specificity {row['scored_val_specificity']:.3f} on val" in sentence and "AUC" in sentence
            assert "sensitivity" not in sentence.split(":", 1)[1].split(". The")[0]
        else:
            assert sentence.startswith("Val foretold test for #1 mlp (threshold ")
    # A leaderboard written before these columns says nothing rather than guessing.
    assert transfer_sentence({k: v for k, v in row.items() if not k.startswith("scored_val_")}) == ""


def test_report_without_tune_or_optuna_state_still_renders(tmp_path):
    """The report reads what the leaderboard saved; missing Tune results or study give a note, not a crash,
    and reading never creates files (opening a missing SQLite study would create an empty database)."""
    from pneumo_ray.report import write_report

    exp_dir = tmp_path / "exp"
    splits, _ = crafted_experiment(exp_dir)
    cfg = config.from_dict({"leaderboard": {"top_k": 3}}, check=False)
    write_leaderboard(exp_dir, cfg, splits)

    page = write_report(exp_dir, cfg, splits).read_text()

    assert "No optuna.db in the experiment" in page and "No Tune results found" in page
    assert "No MODEL_CARD.md in the experiment" in page  # the leaderboard step writes it; here only the rows
    assert "No ranked model has a convolutional feature map" in page  # three MLPs
    assert page.count("data:image/png;base64,") == 3  # ROC/PR, confusion matrices, reliability diagram
    assert not (exp_dir / "optuna.db").exists()
