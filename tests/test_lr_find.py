"""pneumo-ray lr-find: the LR range test writes its plot, suggests a search.lr range, and the range trains."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumo_ray import cli, config
from pneumo_ray.data import load_splits
from pneumo_ray.lr_find import range_test
from pneumo_ray.train import LocalSession, fit
from tests.conftest import ROOT

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"


def test_lr_find_plots_the_curve_and_its_range_contains_an_lr_that_trains(tmp_path, capsys):
    out = tmp_path / "plots" / "mlp.png"
    code = cli.main(["lr-find", "--config", str(SMOKE), "--data", "synthetic", "--model", "mlp", "--steps", "120",
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    low, high = map(float, re.search(r"suggested: search.lr: \[(\S+), (\S+)\]", printed).groups())
    assert 1e-7 < low < high < 10 and f"plot: {out}" in printed
    assert Image.open(out).size[0] > 400  # a real PNG

    # The range seeds a search: an LR in its middle trains, and one well above the range does not train as well.
    cfg = config.load(SMOKE, {"data.source": "synthetic", "train.epochs": 3, "train.warmup_epochs": 0})
    splits = load_splits(cfg.data, cfg.experiment.seed)
    params = {"model": "mlp", "optimizer": "adamw", "weight_decay": 1e-5, "batch_size": 64,
              "class_weighting": "none", "freeze_depth": 0}
    inside, above = LocalSession(threads=2), LocalSession(threads=2)
    fit(cfg, {**params, "lr": float(np.sqrt(low * high))}, splits, inside)
    fit(cfg, {**params, "lr": high * 300}, splits, above)
    assert inside.history[-1]["val_auc"] > 0.85
    assert inside.history[-1]["train_loss"] < 0.8 * inside.history[0]["train_loss"]
    assert inside.history[-1]["val_loss"] < above.history[-1]["val_loss"]


def test_the_range_test_raises_the_lr_exponentially_and_stops_when_the_loss_takes_off():
    cfg = config.load(SMOKE, {"data.source": "synthetic"})
    splits = load_splits(cfg.data, cfg.experiment.seed)
    result = range_test(cfg, splits, "mlp", steps=150, start=1e-6, end=1e3, threads=2)
    ratios = np.diff(np.log(result.lrs))
    assert result.lrs[0] == pytest.approx(1e-6) and np.allclose(ratios, ratios[0])  # geometric steps
    assert result.diverged_at is not None and len(result.lrs) < 150  # 1e3 is far past what trains
    assert max(result.losses[-5:]) > 2 * min(result.losses)
    low, high, steepest, lowest = result.suggestion()
    assert low < steepest <= lowest and high == pytest.approx(lowest / 3) and lowest < result.diverged_at


@pytest.mark.parametrize("args, expected", [
    (["--model", "resnet_19"], "--model resnet_19: unknown model 'resnet_19'"),
    (["--steps", "5"], "--steps 5: too few to read a trend from"),
    (["--data", "npz:/nowhere.npz"], "/nowhere.npz"),
])
def test_lr_find_bad_arguments_are_one_line_errors(capsys, args, expected):
    assert cli.main(["lr-find", "--config", str(SMOKE), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def test_lr_find_on_a_pretrained_model_without_weights_says_where_to_put_them(tmp_path):
    """As the sweep does, before anything trains: no minute of timm retrying the Hub, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "pneumo_ray.cli", "lr-find", "--config",
                             str(ROOT / "sweeps" / "configs" / "studies" / "study003c.yaml"), "--data", "synthetic"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith("pneumo-ray: error: model.weights_file: no pretrained weights for resnet50")
