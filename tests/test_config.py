"""Every path in the config is made absolute once, in the driver, against the directory the user ran from.

A trial runs in a working directory of Tune's, so a relative path that reached it would name another
folder there (the README's ./results once sent every checkpoint into Ray's session folder).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pneumo_ray import config
from pneumo_ray.sweep import prepare
from tests.conftest import ROOT

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"


def test_relative_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch):
    weights = tmp_path / "weights" / "r18.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = yaml.safe_dump({
        "experiment": {"storage": "./results"},
        "data": {"source": "npz", "path": "data/pm.npz", "root": "~/.medmnist"},
        "model": {"pretrained": True, "weights_file": "weights/r18.pth"},
        "models": {"r34": {"arch": "resnet34", "weights_file": "weights/r18.pth"}},
        "search": {"optuna_storage": "sqlite:///studies/optuna.db", "model": ["resnet18", "r34"]},
    })

    cfg = config.loads(text, "cfg.yaml")

    assert cfg.experiment.storage == str(tmp_path / "results")
    assert cfg.experiment_uri == str(tmp_path / "results" / "pneumo")
    assert cfg.data.path == str(tmp_path / "data" / "pm.npz")
    assert cfg.data.root == str(tmp_path / "home" / ".medmnist")
    assert cfg.model.weights_file == cfg.models["r34"]["weights_file"] == str(weights)
    assert cfg.search.optuna_storage == f"sqlite:///{tmp_path}/studies/optuna.db"
    # A config that is resolved already (the one saved in an experiment) stays as it is, wherever it is read.
    monkeypatch.chdir(tmp_path / "weights")
    assert config.loads(yaml.safe_dump(cfg.to_dict()), "saved.yaml") == cfg


@pytest.mark.parametrize("storage", ["s3://bucket/sweeps", "gs://bucket/sweeps"])
def test_bucket_uris_and_database_urls_stay_as_they_are(tmp_path, monkeypatch, storage):
    monkeypatch.chdir(tmp_path)
    url = "postgresql://optuna:${OPTUNA_DB_PASSWORD}@db-host:5432/optuna"
    cfg = config.loads(yaml.safe_dump({"experiment": {"storage": storage}, "search": {"optuna_storage": url}}),
                       "cfg.yaml")
    assert cfg.experiment.storage == storage and cfg.experiment_uri == f"{storage}/pneumo"
    assert cfg.search.optuna_storage == url


def test_command_line_storage_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(SMOKE, {"experiment.storage": "runs/today", "data.source": "synthetic"})
    assert cfg.experiment_uri == str(tmp_path / "runs" / "today" / "smoke")


def test_resume_finds_the_experiment_where_the_relative_storage_points_now(tmp_path, monkeypatch):
    """A saved experiment moved (or reached through another relative path): --resume takes the folder it
    was found in, not the one its saved config names."""
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    started = prepare(config.load(SMOKE), resume=False).cfg
    exp = Path(started.experiment_uri)
    exp.mkdir(parents=True)
    (exp / "pneumo_config.yaml").write_text(yaml.safe_dump(started.to_dict()))
    (exp / "tuner.pkl").write_bytes(b"Tune's saved Tuner")  # what --resume checks is there before Ray starts
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    moved = tmp_path / "elsewhere" / "results"
    moved.parent.mkdir()
    exp.parent.rename(moved)

    monkeypatch.chdir(tmp_path)
    resumed = prepare(config.load(SMOKE, {"experiment.storage": "elsewhere/results"}), resume=True).cfg

    assert resumed.experiment_uri == str(moved / "smoke")
    assert resumed.search == started.search and resumed.data == started.data


def test_the_field_reference_lists_every_field_with_its_default():
    """docs/config.md is written by hand; this keeps it next to the dataclasses it describes."""
    import dataclasses
    import re

    documented: dict[str, object] = {}
    section = None
    for line in (ROOT / "docs" / "config.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section and (cells := re.match(r"\| `([a-z_]+)` \| `([^`]*)` \|", line)):
            documented[f"{section}.{cells[1]}"] = yaml.safe_load(cells[2])

    # models.<label> takes any field of model (documented there) and three of its own, which default to the label
    # itself, search.freeze_depth and data.size
    defaults = {"models.arch": None, "models.freeze_depth": None, "models.size": None}
    for part in dataclasses.fields(config.Config):
        value = getattr(config.Config(), part.name)
        if part.name == "models":
            continue
        for leaf in dataclasses.fields(value):
            default = getattr(value, leaf.name)
            defaults[f"{part.name}.{leaf.name}"] = (dataclasses.asdict(default) if dataclasses.is_dataclass(default)
                                                    else default)
    assert documented == defaults
