"""Checkpoints never unpickle code; experiment names cannot escape the storage folder; passwords stay
out of configs, pickles and messages; local services bind to 127.0.0.1. (The end-to-end password check,
a sweep against a password-protected PostgreSQL, is in test_cloud_storage.py.)"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from pneumo_ray import cli, credentials
from pneumo_ray.checkpoints import load_model
from pneumo_ray.errors import ConfigError
from pneumo_ray.layout import MODEL_FILE
from pneumo_ray.models import build_model
from tests.conftest import ROOT


class Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_are_loaded_with_weights_only(tmp_path):
    meta = {"model": "mlp", "image_size": 28}
    good = tmp_path / "good"
    good.mkdir()
    torch.save(build_model("mlp", 28).state_dict(), good / MODEL_FILE)
    assert isinstance(load_model(good, meta), torch.nn.Module)

    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"weights": Payload(marker)}, bad / MODEL_FILE)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_model(bad, meta)
    assert not marker.exists(), "the checkpoint ran code while loading"


@pytest.mark.parametrize("name", ["../outside", "a/b", "/abs", "..", ".hidden", "x" * 200])
def test_experiment_names_cannot_escape_the_storage_folder(tmp_path, capsys, name):
    code = cli.main(["sweep", "--config", str(ROOT / "sweeps" / "configs" / "smoke.yaml"),
                     "--storage", str(tmp_path / "store"), "--name", name])
    assert code == 2 and "experiment.name" in capsys.readouterr().err
    assert not (tmp_path / "outside").exists() and not (tmp_path / "store").exists()


PASSWORD = "pg@ss:W0rd/7%"  # every character that needs percent-encoding in a URL's password


def smoke_config_with(tmp_path, **sections) -> str:
    cfg = yaml.safe_load((ROOT / "sweeps" / "configs" / "smoke.yaml").read_text())
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("field, value", [
    ("search.optuna_storage", "postgresql://optuna:hunter2@db-host/optuna"),
    ("search.optuna_storage", "postgresql://optuna:p%40ss@db-host/optuna"),
    ("experiment.storage", "s3://AKIAKEY:secretkey@bucket/sweeps"),
])
def test_a_password_written_into_the_config_is_refused(tmp_path, capsys, field, value):
    sections = {"experiment": {"storage": str(tmp_path / "store")}, "search": {}}
    if field == "experiment.storage":  # a bucket needs a study database (its own check comes later)
        sections["search"]["optuna_storage"] = "postgresql://optuna@db-host/optuna"
    section, key = field.split(".")
    sections[section][key] = value
    assert cli.main(["sweep", "--config", smoke_config_with(tmp_path, **sections)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pneumo-ray: error: {field}: holds") and len(err.splitlines()) == 1
    assert "hunter2" not in err and "secretkey" not in err and "p%40ss" not in err
    assert not (tmp_path / "store").exists()


def test_an_unset_password_variable_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PNEUMO_TEST_DB_PASSWORD", raising=False)
    config = smoke_config_with(tmp_path, experiment={"storage": str(tmp_path / "store")},
                               search={"optuna_storage": "postgresql://u:${PNEUMO_TEST_DB_PASSWORD}@127.0.0.1:1/db"})
    assert cli.main(["sweep", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert "search.optuna_storage: environment variable PNEUMO_TEST_DB_PASSWORD is not set" in err
    assert len(err.splitlines()) == 1


def test_a_password_reference_takes_the_raw_password(monkeypatch):
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("PNEUMO_TEST_DB_PASSWORD", PASSWORD)
    monkeypatch.setenv("PNEUMO_TEST_DB_HOST", "db-host")
    url = credentials.expand("postgresql://u:${PNEUMO_TEST_DB_PASSWORD}@${PNEUMO_TEST_DB_HOST}:5432/optuna", "f")
    parsed = make_url(url)
    assert (parsed.password, parsed.host, parsed.database) == (PASSWORD, "db-host", "optuna")
    assert PASSWORD not in credentials.masked(url) and credentials.masked(url).startswith("postgresql://u:***@")
    assert not credentials.clear_text_password("postgresql://u:${PNEUMO_TEST_DB_PASSWORD}@h/db")
    assert credentials.clear_text_password(url)


def test_the_study_storage_pickles_as_its_reference(tmp_path, monkeypatch):
    """Tune pickles the searcher, and so the study's storage, into the experiment folder; the pickle holds
    the reference, and unpickling (on --resume) reads the variable again."""
    import optuna

    secret_db = tmp_path / "secret-name-7731.db"
    monkeypatch.setenv("PNEUMO_TEST_DB_URL", f"sqlite:///{secret_db}")
    stored = credentials.ReferencedRDBStorage("${PNEUMO_TEST_DB_URL}")
    study = optuna.create_study(storage=stored, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    blob = pickle.dumps({"storage": stored, "study": study, "trial": study.trials[0]})
    assert b"secret-name-7731" not in blob and b"${PNEUMO_TEST_DB_URL}" in blob

    restored = pickle.loads(blob)
    assert restored["storage"].url == f"sqlite:///{secret_db}"
    assert len(optuna.load_study(study_name="s", storage=restored["storage"]).trials) == 2
    monkeypatch.delenv("PNEUMO_TEST_DB_URL")
    with pytest.raises(ConfigError, match="PNEUMO_TEST_DB_URL is not set"):
        pickle.loads(blob)


@pytest.mark.slow
@pytest.mark.own_cluster
def test_local_ray_binds_its_dashboard_to_loopback():
    script = (
        "import json, ray\n"
        "from pneumo_ray import cluster, config\n"
        "cfg = config.from_dict({'data': {'source': 'synthetic'}})\n"
        "cluster.init_ray(cfg, None)\n"
        "ctx = ray.get_runtime_context()\n"
        "print('URL', json.dumps(ray._private.worker._global_node.address_info['webui_url']))\n"
        "print('RES', json.dumps(ray.cluster_resources()))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in out.stdout.splitlines()
             if ln.startswith(("URL ", "RES "))}
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    assert lines["URL"].startswith("127.0.0.1:")
    assert lines["RES"]["pneumo_trial"] == 2 and lines["RES"]["CPU"] == (os.cpu_count() or 1)
