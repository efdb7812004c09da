"""Run a real pneumo-ray sweep in this process and read back what its trials reported."""

from __future__ import annotations

import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from common import median


class CpuSampler:
    """Machine-wide CPU busy % (all cores), sampled every second while a sweep runs."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        psutil.cpu_percent(None)
        while not self._stop.wait(1.0):
            self.samples.append(psutil.cpu_percent(None))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def start_ray() -> None:
    """One local Ray for all the sweeps of a benchmark, the one sweep.py starts (all cores, two trial
    slots, the dashboard), so that each sweep's wall time is its trials' and not Ray's start-up. Only the
    trials' console output stays here."""
    import ray

    from pneumo_ray.cluster import start_local_ray
    from pneumo_ray.config import Config

    if not ray.is_initialized():
        start_local_ray(Config(), log_to_driver=False)


def run_sweep(cfg, splits, inspect=None) -> dict:
    """sweep.run on these splits, the search alone; returns wall time, CPU samples and every trial's
    reported rows. The sweep's folder (checkpoints: tens of MB) is a temporary one, deleted after;
    ``inspect(experiment folder)``, when given, reads it first and its answer is returned as "inspected"."""
    from pneumo_ray import sweep
    from pneumo_ray.layout import LEADERBOARD_JSON
    from pneumo_ray.model_settings import check_models

    start_ray()
    with tempfile.TemporaryDirectory(prefix="pneumo-bench-") as storage:
        cfg.experiment.storage = storage
        prepared = sweep.Prepared(cfg, splits, resume=False)
        check_models(cfg, splits.image_size)
        started = time.time()
        with CpuSampler() as cpu:
            sweep.run(prepared, leaderboard=False)
        wall = time.time() - started
        exp = Path(cfg.experiment_uri)
        if (exp / LEADERBOARD_JSON).exists():
            raise RuntimeError(f"{exp}: a benchmark sweep evaluated the test split")
        trials = {}
        for result in exp.glob("tune_trial_*/result.json"):
            rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
            if rows:
                trials[rows[0]["trial_id"]] = rows
        tune_start = tune_start_times(exp)
        inspected = inspect(exp) if inspect else None
    r = cfg.resources
    return {"started": started, "wall_s": wall, "cpu_busy_samples": cpu.samples, "trials": trials,
            "cores_per_trial": r.workers_per_trial * r.cpus_per_worker, "tune_start": tune_start,
            "inspected": inspected,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def tune_start_times(exp: Path) -> dict[str, float]:
    """Trial id -> when Tune started the trial (time.time()), from its saved experiment state."""
    state = json.loads(sorted(exp.glob("experiment_state-*.json"))[-1].read_text())
    return {json.loads(trial)["trial_id"]: json.loads(meta)["start_time"] for trial, meta in state["trial_data"]}


def best_so_far(run: dict, metric: str = "val_auc") -> list[tuple[float, float]]:
    """[(seconds since sweep start, best metric so far)] over every epoch any trial reported."""
    points = sorted((row["timestamp"] - run["started"], row[metric]) for rows in run["trials"].values()
                    for row in rows if row.get(metric) == row.get(metric) and metric in row)
    curve, best = [], float("-inf")
    for t, value in points:
        if value > best:
            best = value
            curve.append((max(0.0, t), value))
    return curve


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, v in curve if v >= target - 1e-12), None)


def utilisation(run: dict) -> dict:
    busy = run["cpu_busy_samples"]
    peaks = [max(r.get("peak_rss_mb", 0) for r in rows) for rows in run["trials"].values()]
    # Busy is not useful: of the cores' time during the sweep, the share spent in training steps.
    training_core_s = sum(row["train_seconds"] for rows in run["trials"].values() for row in rows
                          if "train_seconds" in row) * run["cores_per_trial"]
    return {"cpu_busy_pct_median": median(busy) if busy else None,
            "training_share_of_cores_pct": 100 * training_core_s / (run["wall_s"] * (os.cpu_count() or 1)),
            "cpu_busy_pct_mean": sum(busy) / len(busy) if busy else None,
            "trial_peak_rss_mb_median": median(peaks) if peaks else None,
            "trial_peak_rss_mb_max": max(peaks) if peaks else None,
            "driver_peak_rss_mb": run["driver_peak_rss_mb"]}
