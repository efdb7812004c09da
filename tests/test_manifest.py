"""manifest.json: the git state of a real checkout, the data's identity (MD5 of an npz, SHA-256 over a folder's image
bytes), and --resume refusing changed data and warning about changed packages, before Ray starts."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pneumo_ray import config, manifest
from pneumo_ray.config import ConfigError, DataConfig
from pneumo_ray.data import load_splits
from pneumo_ray.sweep import prepare
from tests.conftest import ROOT, write_npz
from tests.test_data import make_kermany_tree
from tests.test_fuzz import folder_cfg, kaggle_folder

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_state_of_a_real_checkout_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git(repo, "add", "code.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")

    assert manifest.git_state(repo) == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}
    (repo / "results.json").write_text("{}")  # untracked output: not a change to the code
    assert manifest.git_state(repo)["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert manifest.git_state(repo)["dirty"] is True
    (repo / "sub").mkdir()
    assert manifest.git_state(repo / "sub") is None, "a folder inside a checkout is not the project's root"
    assert manifest.git_state(tmp_path) is None, "not a checkout (an installed package)"


def test_data_identity_is_the_files_md5_or_the_folders_bytes(tmp_path):
    npz = write_npz(tmp_path / "pm.npz")
    cfg = DataConfig(source="npz", path=str(npz))
    identity = manifest.data_identity(cfg, load_splits(cfg))
    assert identity["md5"] == hashlib.md5(npz.read_bytes()).hexdigest()
    with np.load(npz) as arrays:
        assert identity["class_counts"]["test"] == dict(zip(("normal", "pneumonia"),
                                                            np.bincount(arrays["test_labels"].ravel()).tolist()))

    folder = kaggle_folder(tmp_path / "xrays")
    first = manifest.data_identity(folder_cfg(folder), load_splits(folder_cfg(folder)))
    copy = shutil.copytree(folder, tmp_path / "copy")  # the same images elsewhere, with new mtimes
    assert manifest.data_identity(folder_cfg(copy), load_splits(folder_cfg(copy)))["sha256"] == first["sha256"]
    image = next((copy / "test" / "NORMAL").iterdir())
    image.write_bytes(image.read_bytes()[:-1] + bytes([image.read_bytes()[-1] ^ 1]))  # one bit of one file
    assert manifest.data_identity(folder_cfg(copy), load_splits(folder_cfg(copy)))["sha256"] != first["sha256"]


def test_resume_stops_on_changed_data_and_warns_on_changed_packages(tmp_path, monkeypatch, caplog):
    npz = write_npz(tmp_path / "pm.npz")
    monkeypatch.chdir(tmp_path)
    cfg = config.load(SMOKE, {"data.source": "npz", "data.path": str(npz)})
    prepared = prepare(cfg, resume=False)
    exp = Path(cfg.experiment_uri)
    exp.mkdir(parents=True)
    (exp / "pneumo_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (exp / "tuner.pkl").write_bytes(b"Tune's saved Tuner")  # what --resume checks is there before Ray starts
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    saved = {"data": prepared.data_identity, "sessions": [{"packages": manifest.packages()}]}
    (exp / "manifest.json").write_text(json.dumps(saved))

    prepare(cfg, resume=True)  # the same data and packages: resumes without a word
    original = npz.read_bytes()
    write_npz(npz, seed=1)  # other images, same shapes and file name
    with pytest.raises(ConfigError, match=rf"data: {npz}.* changed since this experiment started \(md5 was"):
        prepare(cfg, resume=True)

    npz.write_bytes(original)
    saved["sessions"][0]["packages"]["torch"] = "1.0.0"
    (exp / "manifest.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="pneumo_ray"):
        prepare(cfg, resume=True)
    assert "resuming with other package versions" in caplog.text and "torch 1.0.0 -> " in caplog.text


def test_a_folder_experiment_from_before_patient_splits_resumes_with_its_image_split(tmp_path, monkeypatch):
    """Its manifest names no split_by: its val was carved image by image, so --resume (and `pneumo-ray report`)
    carve it that way again rather than score its trials on another split; a newer experiment keeps its patient
    split."""
    folder = tmp_path / "chest_xray"
    make_kermany_tree(folder, patients=(20, 30), per_patient=4)
    monkeypatch.chdir(tmp_path)
    cfg = config.load(SMOKE, {"data.source": "folder", "data.path": str(folder), "data.cache_dir": None})
    exp = Path(cfg.experiment_uri)
    exp.mkdir(parents=True)
    (exp / "pneumo_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (exp / "tuner.pkl").write_bytes(b"Tune's saved Tuner")
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')

    by_image = DataConfig(**{**cfg.data.__dict__, "split_by": "image"})
    before = manifest.data_identity(by_image, load_splits(by_image, cfg.experiment.seed))
    del before["split_by"]  # as the manifests written before data.split_by
    (exp / "manifest.json").write_text(json.dumps({"data": before, "sessions": [{"packages": manifest.packages()}]}))
    resumed = prepare(cfg, resume=True)
    assert resumed.cfg.data.split_by == "image" and resumed.splits.patients is None
    assert manifest.as_started(cfg, cfg.experiment_uri).data.split_by == "image"  # what `pneumo-ray report` reads
    assert np.array_equal(resumed.splits.val_x, load_splits(by_image, cfg.experiment.seed).val_x)

    current = manifest.data_identity(cfg.data, load_splits(cfg.data, cfg.experiment.seed))
    assert current["split_by"] == "patient"
    (exp / "manifest.json").write_text(json.dumps({"data": current, "sessions": [{"packages": manifest.packages()}]}))
    resumed = prepare(cfg, resume=True)
    assert resumed.cfg.data.split_by == "patient" and len(np.unique(resumed.splits.patients)) == 50
