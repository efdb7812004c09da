"""A sweep whose experiment lives in an S3 bucket and whose Optuna study lives in a password-protected
PostgreSQL: the storage a multi-node cluster needs. Both servers are real and run on loopback for the
test. The password reaches the sweep only by environment variable, and is then looked for everywhere
the sweep writes."""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

import pyarrow.fs
import pytest
import yaml

from pneumo_ray.cli import main
from tests.conftest import ROOT, run_cli
from tests.services import postgres_server, s3_server


def bucket_files(uri: str) -> set[str]:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1:] for i in infos if i.type == pyarrow.fs.FileType.File}


def study_states(url: str, name: str) -> list[str]:
    import optuna

    return [t.state.name for t in optuna.load_study(study_name=name, storage=url).get_trials()]


def write_config(tmp_path, **sections) -> str:
    cfg = yaml.safe_load((ROOT / "sweeps" / "configs" / "smoke.yaml").read_text())
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


PASSWORD = "pg@ss:W0rd/7731"  # '@', ':' and '/' must be percent-encoded in a URL


def files_holding(folder: Path, needles: list[bytes]) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.is_file() and not f.is_symlink()
            and any(n in f.read_bytes() for n in needles)]


def test_cloud_storage_needs_a_database_for_the_study(tmp_path, capsys):
    config = write_config(tmp_path, experiment={"storage": "s3://pneumo-results/sweeps"})
    assert main(["sweep", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert "search.optuna_storage" in err and "postgresql://" in err and len(err.splitlines()) == 1


def test_unreachable_study_database_fails_before_ray(tmp_path, capsys):
    with postgres_server() as url:
        dead = url.replace(url.split(":")[2].split("/")[0], "1")  # same server, port 1: nothing listens
    config = write_config(tmp_path, experiment={"storage": str(tmp_path)}, search={"optuna_storage": dead})
    assert main(["sweep", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumo-ray: error: search.optuna_storage: cannot open") and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.own_cluster  # its driver starts a local Ray, so it runs before the shared session Ray exists
def test_sweep_in_s3_bucket_with_postgres_study_then_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PNEUMO_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PNEUMO_TEST_DB_PASSWORD", PASSWORD)
    with postgres_server(password=PASSWORD) as db_url, s3_server(monkeypatch, "pneumo-results") as bucket:
        storage = f"{bucket}/sweeps"
        exp = f"{storage}/cloud"
        reference = db_url.replace(urllib.parse.quote(PASSWORD, safe=""), "${PNEUMO_TEST_DB_PASSWORD}")
        assert "${" in reference
        # Two trials at once: one wave of trials is enough to put every kind of file in the bucket.
        config = write_config(tmp_path, experiment={"storage": storage, "name": "cloud"},
                              search={"optuna_storage": reference, "num_samples": 2},
                              leaderboard={"top_k": 2, "gradcam_images": 0})
        result = run_cli("--config", config, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        output = result.stdout + result.stderr

        files = bucket_files(exp)
        for name in ("pneumo_config.yaml", "leaderboard.json", "leaderboard.csv", "leaderboard.md"):
            assert name in files, sorted(files)
        rows = json.loads(pyarrow.fs.FileSystem.from_uri(f"{exp}/leaderboard.json")[0]
                          .open_input_stream("pneumo-results/sweeps/cloud/leaderboard.json").read())
        assert [r["row"] for r in rows] == ["1", "2", "ensemble"]
        assert "report.html" in files and "evaluation.json" in files
        for row in rows[:2]:
            assert row["checkpoint"].startswith(f"{exp}/best/rank")  # the bucket copy, not the local mirror
            assert row["checkpoint"][len(exp) + 1:] + "/model.pt" in files
            assert any(f.startswith(f"train_runs/{row['trial_id']}/checkpoint_") for f in files)
        assert sum(f.startswith("tune_trial_") and f.endswith("/result.json") for f in files) == 2
        assert study_states(db_url, "cloud") == ["COMPLETE"] * 2
        assert not (tmp_path / "results").exists()  # nothing went to the config's old local default

        capsys.readouterr()
        assert main(["leaderboard", exp]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith("Threshold chosen on val") and "| rank | model | val_auc | threshold |" in printed

        # Resume a finished cloud experiment: it is restored from the bucket, nothing is re-run.
        before = {f for f in files if f.startswith("tune_trial_") and f.endswith("/result.json")}
        result = run_cli("--config", config, "--resume", cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        after = bucket_files(exp)
        assert {f for f in after if f.startswith("tune_trial_") and f.endswith("/result.json")} == before
        assert study_states(db_url, "cloud") == ["COMPLETE"] * 2
        output += printed + result.stdout + result.stderr

        # The password, raw or percent-encoded, is nowhere the sweep wrote or printed: not in the bucket
        # (config, Tune's pickles, TensorBoard events), the local mirror, Ray's temp folder or the output.
        needles = [PASSWORD.encode(), urllib.parse.quote(PASSWORD, safe="").encode()]
        fs, root = pyarrow.fs.FileSystem.from_uri(exp)
        in_bucket = [f for f in after if any(n in fs.open_input_stream(f"{root}/{f}").read() for n in needles)]
        assert in_bucket == [] and {"tuner.pkl", "pneumo_config.yaml"} <= after
        assert any(f.startswith("searcher-state") for f in after)
        assert any("events.out.tfevents" in f for f in after)
        assert files_holding(tmp_path, needles) == []
        assert files_holding(Path(os.environ["RAY_TMPDIR"]), needles) == []
        assert not any(n.decode() in output for n in needles)
        assert "${PNEUMO_TEST_DB_PASSWORD}" in fs.open_input_stream(f"{root}/pneumo_config.yaml").read().decode()
