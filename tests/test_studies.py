"""The notebook studies' presets (sweeps/configs/studies/): every one validates; those with pretrained rows stop
before Ray when no weights are at hand, naming where to put them; the -cpu ones run, shortened to 1 epoch on
synthetic data, as real sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pneumo_ray import config
from pneumo_ray.model_settings import model_variant
from tests.conftest import ROOT, ranked_rows, run_cli

STUDIES = ROOT / "sweeps" / "configs" / "studies"
PRESETS = sorted(STUDIES.glob("*.yaml"))
CPU_PRESETS = [p for p in PRESETS if p.stem.endswith("-cpu")]


def pretrained_labels(cfg) -> list[str]:
    return [label for label in dict.fromkeys(cfg.search.model) if model_variant(cfg, label)[1].pretrained]


def test_every_study_has_a_preset_and_every_preset_validates():
    assert {p.stem.rstrip("abc") for p in PRESETS if not p.stem.endswith("-cpu")} == {
        "study000", "study001", "study002", "study003", "study004"}
    for path in PRESETS:
        cfg = config.load(path)
        assert cfg.experiment.name == path.stem, path
        assert path.read_text().startswith("# Study 00") and "What differs" in path.read_text() or \
            path.stem.endswith("-cpu") and "Beside study" in path.read_text(), f"{path.name}: its header"
    for path in CPU_PRESETS:  # runnable here: no pretrained row, no GPU, and its full version beside it
        cfg = config.load(path)
        assert not pretrained_labels(cfg) and cfg.resources.gpus_per_worker == 0, path
        assert (STUDIES / path.name.replace("-cpu", "")).is_file()


def test_presets_with_pretrained_rows_stop_before_ray_saying_where_the_weights_go(tmp_path):
    """No ImageNet weights can be downloaded here, so each preset with pretrained rows must stop with one line
    naming the first such entry's weights_file. Checked in one process with an empty Hugging Face cache and the
    Hub switched off, on small synthetic images at each preset's own size."""
    presets = [p for p in PRESETS if pretrained_labels(config.load(p))]
    assert {p.stem for p in presets} == {"study000", "study001", "study002", "study003b", "study003c", "study004"}
    script = """
import sys
from pneumo_ray import config, sweep
from pneumo_ray.errors import ConfigError
for path in sys.argv[2:]:
    cfg = config.load(path, {"data.source": "synthetic", "data.synthetic_train": 64, "data.synthetic_val": 16,
                             "data.synthetic_test": 16, "experiment.storage": sys.argv[1]})
    try:
        sweep.prepare(cfg, resume=False)
        print(path, "PREPARED")
    except ConfigError as err:
        print(path, err)
"""
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "results"), *map(str, presets)],
                            capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    for path in presets:
        cfg = config.load(path)
        first = pretrained_labels(cfg)[0]
        section = f"models.{first}" if first in cfg.models else "model"
        arch = model_variant(cfg, first)[0]
        expected = f"{section}.weights_file: no pretrained weights for {arch} on this machine"
        assert lines[str(path)].startswith(expected), (path.name, lines[str(path)])
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_cpu_presets_run_shortened_to_one_epoch_on_synthetic_data(tmp_path, ray_address):
    """Each -cpu preset as it is, but for its data (synthetic images at its size, a few dozen) and 1 epoch: a real
    sweep to the leaderboard, with a row for every model it names."""
    for path in CPU_PRESETS:
        raw = yaml.safe_load(path.read_text())
        raw["data"] = {**raw["data"], "source": "synthetic", "synthetic_train": 48, "synthetic_val": 24,
                       "synthetic_test": 24}
        raw["train"].update(epochs=1, early_stopping_patience=None)
        raw["leaderboard"].update(bootstrap_resamples=1000, gradcam_images=0)
        short = tmp_path / path.name
        short.write_text(yaml.safe_dump(raw))
        result = run_cli("--config", str(short), "--storage", str(tmp_path / "results"), "--address", ray_address)
        assert result.returncode == 0, f"{path.name}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        exp = tmp_path / "results" / raw["experiment"]["name"]
        rows = ranked_rows(exp)
        assert sorted(r["model"] for r in rows) == sorted(raw["search"]["model"]), path.name
        assert all(r["last_epoch"] == 1 for r in rows)
        saved = json.loads(json.dumps(yaml.safe_load((exp / "pneumo_config.yaml").read_text())))
        assert saved["search"]["sampler"] == raw["search"]["sampler"]
