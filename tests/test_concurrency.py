"""Sweeps side by side: one name is claimed by exactly one sweep (a local folder, a bucket, a shared
study database), and a second local sweep does not start a second Ray on a machine that runs one.
Two sweeps submitted to one cluster at once are in test_jobs.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import optuna
import yaml

from pneumo_ray import config, storage, sweep
from pneumo_ray.errors import ConfigError
from tests.conftest import ROOT, run_cli
from tests.services import postgres_server, s3_server

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"


def claim_at_once(cfg, racers: int = 4) -> list[str]:
    """``racers`` threads claim one experiment at the same moment; returns 'won' or the error of each."""
    start, outcomes = threading.Barrier(racers), []

    def race():
        start.wait()
        try:
            sweep.claim_experiment(cfg)
            outcomes.append("won")
        except ConfigError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == racers, f"a claim crashed: {outcomes}"
    return outcomes


def test_one_name_started_at_once_in_a_folder_goes_to_exactly_one_sweep(tmp_path):
    cfg = config.load(SMOKE, {"experiment.storage": str(tmp_path), "experiment.name": "same"})
    outcomes = claim_at_once(cfg)
    assert outcomes.count("won") == 1, outcomes
    assert all("experiment 'same' already exists" in o and "--resume" in o for o in outcomes if o != "won")
    saved = config.loads((tmp_path / "same" / "pneumo_config.yaml").read_text(), "saved")
    assert saved == cfg  # written whole, by the winner alone


def test_one_name_started_at_once_in_a_bucket_goes_to_exactly_one_sweep(tmp_path, monkeypatch):
    with postgres_server() as db_url, s3_server(monkeypatch, "claims") as bucket:
        cfg = config.load(SMOKE, {"experiment.storage": f"{bucket}/sweeps", "experiment.name": "same",
                                  "search.optuna_storage": db_url})
        sweep.check_study_storage(db_url)  # as each sweep's prepare does: the tables exist before the race
        outcomes = claim_at_once(cfg)
        assert outcomes.count("won") == 1, outcomes
        assert all("already exists" in o for o in outcomes if o != "won")
        assert config.loads(storage.read_text(f"{bucket}/sweeps/same/pneumo_config.yaml"), "saved") == cfg
        assert [s.study_name for s in optuna.get_all_study_summaries(db_url)] == ["same"]


def test_a_new_experiment_does_not_reuse_an_old_study_in_a_shared_database(tmp_path):
    """A study database outlives folders: a new experiment under an old name would silently feed the old
    trials to the sampler. It is refused, and the folder it had claimed is given back."""
    with postgres_server() as db_url:
        optuna.create_study(study_name="reused", storage=db_url)
        cfg = config.load(SMOKE, {"experiment.storage": str(tmp_path), "experiment.name": "reused",
                                  "search.optuna_storage": db_url})
        assert claim_at_once(cfg, racers=1) != ["won"]
        assert not (tmp_path / "reused" / "pneumo_config.yaml").exists()


def test_a_second_local_sweep_does_not_start_a_second_ray(ray_session, tmp_path):
    """The session's Ray plays the sweep already running on this machine."""
    cfg = yaml.safe_load(SMOKE.read_text())
    result = run_cli("--config", str(SMOKE), "--storage", str(tmp_path), "--name", "second")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "a Ray instance already runs on this machine" in err
    assert "--address auto" in err and "ray start --head" in err
    assert not (tmp_path / "second").exists() and cfg["experiment"]["name"] != "second"
    assert not any(Path(os.environ["RAY_TMPDIR"]).iterdir()), "a second Ray was started"
