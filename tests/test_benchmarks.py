"""The benchmarks run end to end (`run_all.py --smoke`) and write results of the documented shape.
This checks the schema and that the numbers are sane measurements, never how fast anything is."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import spearmanr

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]  # each benchmark starts its own local Ray
benchmark = pytest.mark.benchmark  # the end-to-end runs: `pytest -m benchmark`


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_targets(result: dict, names: set[str]) -> None:
    assert set(result["targets"]) == names
    assert all(isinstance(v, bool) for v in result["targets"].values())


@benchmark
def test_run_all_smoke_writes_every_result(tmp_path):
    results, scratch = tmp_path / "results", tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PNEUMO_BENCH_RESULTS": str(results), "TMPDIR": str(scratch)}
    committed = {p.name: p.stat().st_mtime for p in (ROOT / "benchmarks" / "results").glob("*")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all benchmarks done" in proc.stdout
    # the committed figures are left alone, and the sweeps' folders (checkpoints) are gone
    assert {p.name: p.stat().st_mtime for p in (ROOT / "benchmarks" / "results").glob("*")} == committed
    assert not list(scratch.glob("pneumo-bench-*"))

    for name in ("epoch_cost", "startup", "search_efficiency", "ray_background", "selection"):
        result = json.loads((results / f"{name}.json").read_text())
        assert result["benchmark"] == name
        assert isinstance(result["data"], str) and "28px" in result["data"]  # says which data it measured
        assert result["machine"]["cpus"] >= 1 and result["machine"]["torch"]
        # the machine's speed at the benchmark's start and end, to tell a run in a slow hour apart
        speed = result["machine"]
        assert _positive(speed["matmul_gflops_at_start"]) and _positive(speed["matmul_gflops_at_end"])

    epoch = json.loads((results / "epoch_cost.json").read_text())
    assert _positive(epoch["matmul_gflops"])
    assert set(epoch["variants"]) == {"plain", "ray1", "ray2", "seed"}
    for variant in epoch["variants"].values():
        assert _positive(variant["epoch_s"]) and _positive(variant["images_per_s"])
        assert variant["train_images"] == 256
    for ratio in epoch["ratios"].values():
        assert _positive(ratio)
    # plain and ray1 ran alternately, twice each; their ratio is the median (here: mean) of the two pairs
    assert epoch["pairs"] == 2 and len(epoch["ray1_over_plain_pair_ratios"]) == 2
    assert epoch["ratios"]["ray1_over_plain_epoch_time"] == pytest.approx(
        statistics.median(epoch["ray1_over_plain_pair_ratios"]), rel=1e-3)
    for name in ("plain", "ray1"):
        assert len(epoch["variants"][name]["epoch_s_per_run"]) == 2
    assert _positive(epoch["data_pipeline"]["ratio"])
    _check_targets(epoch, {"ray1_over_plain_epoch_time<=1.05", "pipeline_ratio>=3", "resnet18_images_per_s>=375"})

    startup = json.loads((results / "startup.json").read_text())
    for key, workers, launcher in (("single_worker", 1, "train"), ("ddp_2_workers", 2, "train"),
                                   ("inline_single_worker", 1, "inline")):
        run = startup[key]
        assert run["workers_per_trial"] == workers and run["launcher"] == launcher and run["trials"] == 2
        assert len(run["startup_s_all"]) == 2 and all(_positive(s) for s in run["startup_s_all"])
        assert run["startup_s_first"] == pytest.approx(run["startup_s_all"][0], abs=0.01)
        assert run["startup_s_median_after_first"] == pytest.approx(run["startup_s_all"][1], abs=0.01)
        assert run["fixed_overhead_s_median"] > 0 and run["startup_in_trial_fn_s_median"] >= 0
        assert run["sweep_wall_s_per_trial"] > run["train_seconds_median"]
        assert 0 <= run["cpu_busy_pct_median"] <= 100
        assert 0 < run["training_share_of_cores_pct"] <= 100
        assert _positive(run["trial_peak_rss_mb_max"])
        stages = run["startup_stages_s_median_after_first"]
        if launcher == "train":  # Ray Train spawns the worker, starts it, then our code runs to the first batch
            assert 0 < stages["worker_spawned"] < stages["worker_ready"] < stages["first_batch"]
        else:
            assert set(stages) == {"first_batch"}
        assert _positive(stages["first_batch"])
    _check_targets(startup, {"single_startup<=3s", "inline_single_startup<=3s", "ddp_startup<=10s"})
    imports = startup["fresh_process_imports"]  # ray, then torch, then torch._dynamo, cumulative, in a new process
    assert imports["repeats"] == 1 and list(imports["cumulative_s_median"]) == ["ray", "torch", "torch._dynamo"]
    marks = list(imports["cumulative_s_median"].values())
    assert 0 < marks[0] < marks[1] < marks[2] < imports["process_s_median"]

    search = json.loads((results / "search_efficiency.json").read_text())
    assert len(search["repeats"]) == 2 and [r["seed"] for r in search["repeats"]] == [0, 1]
    for repeat in search["repeats"]:
        runs = repeat["runs"]
        assert set(runs) == {"grid", "random", "tpe_asha"}
        assert runs["grid"]["trials"] == 2  # --grid-points 2: each point once, nothing else
        assert runs["grid"]["best_val_auc"] == repeat["grid_best_val_auc"]
        assert runs["grid"]["fraction_of_grid_time"] <= 1  # the grid reaches its own best within its time
        for name, run in runs.items():
            assert run["trials"] >= 1, name
            times = [t for t, _ in run["curve"]]
            values = [v for _, v in run["curve"]]
            assert times == sorted(times) and values == sorted(values)  # best-so-far only ever improves
            assert 0 <= values[-1] <= 1 and values[-1] == run["best_val_auc"]
            if run["time_to_grid_best_s"] is not None:
                assert run["best_val_auc"] >= repeat["grid_best_val_auc"] - 1e-12
        # random search and TPE get the grid's wall time, not more (plus the last trial's and Ray's wind-down)
        assert runs["tpe_asha"]["wall_s"] < repeat["budget_s"] * 1.5 + 60
    for name, summary in search["summary"].items():
        per_seed = [r["runs"][name] for r in search["repeats"]]
        assert summary["best_val_auc_median"] == pytest.approx(sum(p["best_val_auc"] for p in per_seed) / 2)
        assert summary["reached_grid_best"] == sum(p["time_to_grid_best_s"] is not None for p in per_seed)
        if summary["reached_grid_best"] < 2:  # a seed that never got there makes the median "never"
            assert summary["fraction_of_grid_time_median"] is None
    _check_targets(search, {"tpe_asha_reaches_grid_best_in<=25%", "cpu_busy>=90%"})
    png = (results / "search_efficiency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    background = json.loads((results / "ray_background.json").read_text())
    assert set(background["variants"]) == {"running", "helpers_paused", "all_paused"}
    for variant in background["variants"].values():
        assert len(variant["images_per_s_all"]) == 2 and all(_positive(s) for s in variant["images_per_s_all"])
        assert _positive(variant["over_running_paired"])
    assert background["variants"]["running"]["over_running_paired"] == 1
    # it paused Ray Train's controller and Ray's own daemons, and resumed every one after each block
    assert "ray::TrainController" in background["paused"]["helpers"]
    assert {"raylet", "gcs_server"} <= set(background["paused"]["daemons"])
    assert background["all_resumed"] is True

    selection = json.loads((results / "selection.json").read_text())
    noise = selection["noise"]
    assert len(noise["per_seed"]) == 2 and selection["folds"] == 2
    for seed in noise["per_seed"]:  # the folds' mean is what a CV trial selects on, at its best epoch
        assert seed["cv_val_auc"] == pytest.approx(np.mean(seed["cv_fold_val_auc"]))
        assert all(0 <= seed[k] <= 1 for k in ("single_val_auc", "cv_val_auc", "single_test_auc", "cv_test_auc"))
    sds = [s["single_val_auc"] for s in noise["per_seed"]]
    assert noise["sd"]["single_val_auc"] == pytest.approx(np.std(sds, ddof=1))
    agreement = selection["agreement"]
    assert agreement["single"]["folds"] == 0 and agreement["cv"]["folds"] == 2
    for name in ("single", "cv"):
        sweep = agreement[name]
        assert 1 <= sweep["trials_scored"] == len(sweep["trials"]) <= 2 and _positive(sweep["wall_s"])
        assert all(0 <= t[k] <= 1 for t in sweep["trials"] for k in ("selection_val_auc", "test_auc"))
        if len(sweep["trials"]) == 2:  # rho is recomputed from the trials it was computed over
            expected = spearmanr([t["selection_val_auc"] for t in sweep["trials"]],
                                 [t["test_auc"] for t in sweep["trials"]]).statistic
            assert sweep["spearman_rho"] == pytest.approx(expected)
    assert set(agreement["rho_cv_minus_single"]) == {"difference", "lo", "hi"}  # None with under 4 configurations
    # the random sampler drew the same configurations for both sweeps
    assert agreement["common_trials"] == min(agreement[n]["trials_scored"] for n in ("single", "cv"))
    assert agreement["cv_over_single_wall"] == pytest.approx(agreement["cv"]["wall_s"] / agreement["single"]["wall_s"])
    _check_targets(selection, {"cv_sd<=half_single_sd", "cv_rho>=0.8", "cv_rho>single_rho"})


def test_selection_rho_difference_and_its_interval():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from selection import rho_difference

    def trial(val, test):
        return {"selection_val_auc": val, "test_auc": test}

    vals = [0.90, 0.92, 0.94, 0.96, 0.98]
    same = [(trial(v, v), trial(v, v)) for v in vals]
    assert rho_difference(same) == {"difference": 0.0, "lo": 0.0, "hi": 0.0}
    # the single split ranks test AUC backwards, CV exactly: rho -1 against +1
    flipped = [(trial(v, 1 - v), trial(v, v)) for v in vals]
    result = rho_difference(flipped)
    assert result["difference"] == pytest.approx(2.0) and result["lo"] == pytest.approx(2.0)
    assert rho_difference(same[:3])["difference"] is None  # too few configurations to say anything


@benchmark
def test_soak_smoke_leaves_nothing_behind(tmp_path):
    """benchmarks/soak.py in small: a handful of trials per launcher on its own 2-node loopback cluster.
    Its pass criteria are real checks (every trial complete in Tune and Optuna; no actor, placement group,
    /dev/shm file or temp entry of the sweep left); the RSS criterion needs the full run's 200 trials."""
    env = {**os.environ, "PNEUMO_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--trials", "4", "--concurrency",
                           "2", "--name", "soak_smoke"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "soak_smoke.json").read_text())
    assert [r["launcher"] for r in result["runs"]] == ["train", "inline"]
    for run in result["runs"]:
        assert run["passed"] == {"every_trial_completed": True, "rss_growth_below_10pct": True,
                                 "nothing_left": True}, run
        assert run["study_complete"] == run["tune_trials"] == 4 and run["left_processes"] == 0
        assert run["left_on_cluster"]["jobs_found"] == 1  # the check found the sweep's job, so it looked
        assert run["rss_curve"] and all(_positive(s["rss_mb"]) for s in run["rss_curve"])
        assert _positive(run["trials_per_min"]) and run["overhead_s"]["last_20"] is not None
    assert (tmp_path / "soak_smoke_rss.png").stat().st_size > 1000


@benchmark
def test_patient_split_benchmark_compares_both_splits_on_a_kermany_folder(tmp_path):
    """benchmarks/patient_split.py on Kermany-named images the test writes (the real folder is a measurement)."""
    from tests.test_data import make_kermany_tree

    folder, results = tmp_path / "chest_xray", tmp_path / "results"
    make_kermany_tree(folder, patients=(30, 40), per_patient=3, test=(10, 10))
    env = {**os.environ, "PNEUMO_BENCH_RESULTS": str(results)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "patient_split.py"), "--folder", str(folder),
                           "--seeds", "2", "--epochs", "1", "--processes", "1"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "patient_split.json").read_text())
    assert [(r["split_by"], r["seed"]) for r in result["runs"]] == [("image", 1), ("patient", 1), ("image", 2),
                                                                     ("patient", 2)]
    for run in result["runs"]:
        assert run["val_images"] == 21 and run["epoch"] == 1
        assert run["val_patients"] == (None if run["split_by"] == "image" else 7)  # a tenth of 70 patients
        for part in ("val", "test"):
            assert 0 <= run[part]["auc"] <= 1 and 0 <= run[part]["normal_recall"] <= 1
    for split_by in ("image", "patient"):
        mine = [r for r in result["runs"] if r["split_by"] == split_by]
        assert result["median"][split_by]["auc_gap"] == pytest.approx(
            statistics.median(r["val"]["auc"] - r["test"]["auc"] for r in mine))
    # 3 X-rays a patient: an image split leaves most val images with a patient in train
    assert all(share > 0.5 for share in result["image_split_val_images_with_patient_in_train"])
