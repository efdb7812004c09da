"""report.html in a real browser, `pneumo-ray predict`, and Grad-CAM's output (`pneumo-ray report` rebuilding the same
leaderboard is checked where the README's command runs, in test_readme).

The report and predict tests read the session's smoke sweep (a real sweep through the CLI).
The browser is Debian's chromium, driven by selenium through chromium-driver (`.ci/run` installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo_ray import config
from pneumo_ray.data import load_splits
from pneumo_ray.explain import grad_cam, overlay
from pneumo_ray.models import build_model
from tests.conftest import ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def pneumo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumo_ray.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())


@pytest.mark.parametrize("name,size", [("cnn_bn", 28), ("resnet18", 28), ("resnet18", 64)])
def test_gradcam_heatmaps_match_the_input(name, size):
    import torch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
    # Fixed weights: with whatever random state earlier tests left, an untrained ResNet can give a flat map.
    torch.manual_seed(0)
    heat = grad_cam(build_model(name, size).eval(), images, mean=0.5, std=0.25, normalize=True)
    assert heat.shape == (3, size, size) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and heat.std() > 0  # a map, not a flat square
    blended = overlay(images[0], heat[0], side=112)
    assert blended.shape == (112, 112, 3) and blended.dtype == np.uint8


def test_gradcam_batches_give_the_same_maps():
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    model = build_model("cnn_bn", 28).eval()
    np.testing.assert_allclose(grad_cam(model, images, 0.5, 0.25, True, batch_size=2),
                               grad_cam(model, images, 0.5, 0.25, True), atol=1e-5)


def test_gradcam_is_absent_for_a_model_without_feature_maps():
    assert grad_cam(build_model("mlp", 28), np.zeros((2, 28, 28), np.uint8), 0.5, 0.25, True) is None


def smoke_test_images(exp: Path):
    cfg = config.loads((exp / "pneumo_config.yaml").read_text(), "smoke config")
    splits = load_splits(cfg.data, cfg.experiment.seed)  # synthetic: the same seed gives the sweep's images
    with np.load(exp / "predictions.npz") as saved:
        probs = {k: saved[k] for k in saved.files}
    np.testing.assert_array_equal(probs["test_y"], splits.test_y)
    return splits.test_x, probs


@pytest.mark.slow  # reads the session's smoke sweep, a real one
def test_predict_png_and_jpeg_with_per_file_errors(smoke_experiment, tmp_path):
    exp, _ = smoke_experiment
    images, probs = smoke_test_images(exp)
    png = tmp_path / "case 7.png"
    Image.fromarray(images[7]).save(png)
    jpeg = tmp_path / "big.jpg"  # an RGB JPEG at 4x the size: converted and resized as training images were
    Image.fromarray(images[7]).convert("RGB").resize((112, 112), Image.BICUBIC).save(jpeg, quality=95)
    empty = tmp_path / "empty.png"
    empty.touch()
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")

    result = pneumo("predict", str(exp), str(png), str(empty), str(jpeg), str(broken))

    assert result.returncode == 2, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "empty.png" in errors[0] and "broken.jpg" in errors[1], errors
    lines = [line.split("\t") for line in result.stdout.splitlines() if not line.startswith("#")]
    assert lines[0] == ["image", "p_pneumonia", "label"]
    predicted = {path: (float(p), label) for path, p, label in lines[1:]}
    assert set(predicted) == {str(png), str(jpeg)}
    rank1 = json.loads((exp / "leaderboard.json").read_text())[0]
    p_png, label = predicted[str(png)]
    assert p_png == pytest.approx(probs["test_1"][7], abs=1e-4)  # lossless at the training size: the same number
    assert label == ("pneumonia" if probs["test_1"][7] >= rank1["threshold"] else "normal")
    assert abs(predicted[str(jpeg)][0] - p_png) < 0.15  # resampled and JPEG-compressed: close, not equal
    assert f"threshold {rank1['threshold']:.3f}" in result.stdout


def test_predict_makes_new_images_square_as_the_training_images_were(tmp_path):
    from pneumo_ray.images import read_gray
    from pneumo_ray.predict import read_images, resize_rule

    assert resize_rule({"resize": "pad", "data_source": "folder"}) == "pad"
    assert resize_rule({"data_source": "npz"}) == resize_rule({"data_source": "medmnist"}) == "crop"  # older ones
    assert resize_rule({"data_source": "folder"}) == "stretch"
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((40, 120), 255, np.uint8)).save(wide)
    (path, image), = read_images([str(wide)], 20, "pad")[0]
    assert np.array_equal(image, read_gray(wide, 20, "pad")) and image[0].max() == 0


@pytest.mark.slow  # reads the session's smoke sweep, a real one
def test_predict_ensemble_writes_gradcam_pngs(smoke_experiment, tmp_path):
    exp, _ = smoke_experiment
    images, probs = smoke_test_images(exp)
    paths = []
    for i in (0, 1):
        paths.append(tmp_path / f"x{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    cam_dir = tmp_path / "cams"

    result = pneumo("predict", str(exp), "--ensemble", "--cam", str(cam_dir), *map(str, paths))

    rows = json.loads((exp / "leaderboard.json").read_text())
    has_conv = any(r["model"] != "mlp" for r in rows if r["row"] != "ensemble")
    assert result.returncode == (0 if has_conv else 2), result.stderr
    got = [float(line.split("\t")[1]) for line in result.stdout.splitlines()[2:]]
    np.testing.assert_allclose(got, probs["test_ensemble"][:2], atol=1e-4)
    assert "ensemble of the top 3" in result.stdout
    if has_conv:
        cams = sorted(cam_dir.glob("*.png"))
        assert [p.name for p in cams] == ["x0_cam.png", "x1_cam.png"]
        assert Image.open(cams[0]).size == (224, 224) and Image.open(cams[0]).mode == "RGB"


@pytest.mark.slow  # reads the session's smoke sweep, a real one
@pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_report_renders_in_headless_chromium(smoke_experiment, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    exp, _ = smoke_experiment
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((exp / "report.html").as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height, 16000))
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()

    assert not errors, errors
    alts = [alt for alt, *_ in images]
    for wanted in ("ROC and PR curves", "confusion matrices", "reliability diagram", "training curves",
                   "optimization history", "parameter importances", "Grad-CAM: A fixed sample (seed 0)"):
        assert wanted in alts, alts
    for alt, complete, width, h in images:
        assert complete and width > 100 and h > 100, f"image {alt!r} did not decode"
    screenshot = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert screenshot.shape[0] > 2000  # the whole page, not one screen of it
    assert screenshot.std() > 20 and len(np.unique(screenshot)) > 50, "the screenshot is blank"


@pytest.mark.slow  # reads the session's smoke sweep, a real one
def test_predict_rank_outside_the_leaderboard_is_a_one_line_error(smoke_experiment, capsys):
    from pneumo_ray import cli

    exp, _ = smoke_experiment
    assert cli.main(["predict", str(exp), "--rank", "9", "whatever.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--rank 9: the leaderboard has ranks 1..3" in err and "\n" not in err
