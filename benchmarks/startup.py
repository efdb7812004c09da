"""Trial start-up: seconds from a Tune trial's start to its first training batch, and the fixed
overhead per trial, over a sweep of 1-epoch trials: single-worker and 2-worker DDP TorchTrainer
trials (resources.launcher: train), and single-worker trials trained in the Tune trial process
(resources.launcher: inline).

It also times the imports that every fresh Train worker process makes before its first optimizer
step (Ray, torch, and torch._dynamo, which torch's optimizers import on first use), each in a new
Python process on idle cores: the floor under a trial that starts its own worker.

    python benchmarks/startup.py [--trials 10] [--ddp-trials 5] [--max-train N] [--import-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import data_config, matmul_gflops, median, write_result
from sweeps_common import run_sweep, utilisation


def sweep_config(trials: int, workers: int, data_cfg, launcher: str):
    from pneumo_ray.config import Config

    cfg = Config()
    cfg.experiment.name = f"startup_{launcher}_{workers}w"
    cfg.resources.launcher = launcher
    cfg.data = data_cfg
    cfg.train.epochs, cfg.train.warmup_epochs = 1, 0
    cfg.search.model = ["cnn_bn"]
    cfg.search.num_samples = trials
    cfg.search.asha.enabled = False
    cfg.resources.workers_per_trial = workers
    cfg.resources.cpus_per_worker = 1.0
    cfg.resources.gpus_per_worker = 0.0
    # as many side by side as the cores hold (sweep.py's own rule): a queued trial would count its wait
    cfg.search.max_concurrent_trials = max(1, (os.cpu_count() or 1) // workers)
    return cfg


def measure(trials: int, workers: int, data_cfg, splits, launcher: str = "train") -> dict:
    run = run_sweep(sweep_config(trials, workers, data_cfg, launcher), splits)
    rows = sorted((r[0] for r in run["trials"].values()), key=lambda r: r["timestamp"])
    # Tune's start of the trial -> the trial's first training batch (epoch 1 starts with it).
    startups = [r["epoch_started_at"] - run["tune_start"][r["trial_id"]] for r in rows]
    in_process = [r["startup_s"] for r in rows]  # the same, from the trial function's own start
    # Everything in a trial that is not training steps: start-up (as Tune sees it), validation, checkpoint.
    overheads = [s + r["time_total_s"] - r["startup_s"] - r["train_seconds"] for s, r in zip(startups, rows)]
    result = {"trials": len(rows), "workers_per_trial": workers, "launcher": launcher, "wall_s": run["wall_s"],
              "startup_s_all": [round(s, 2) for s in startups],
              "startup_s_median_after_first": median(startups[1:]) if len(startups) > 1 else None,
              "startup_s_first": startups[0] if startups else None,
              "startup_in_trial_fn_s_median": median(in_process),
              # where it goes, from the trial function's start: Ray Train spawns the worker process, starts
              # it (Ray Train and torch imported), hands it the train function; then ours runs to a batch
              "startup_stages_s_median_after_first": {
                  stage: median(r[key] for r in rows[1:])
                  for stage, key in (("worker_spawned", "startup_worker_spawned_s"),
                                     ("worker_ready", "startup_worker_ready_s"), ("first_batch", "startup_s"))
                  if all(key in r for r in rows[1:])
              } if len(rows) > 1 else {},
              # the whole sweep (Ray start and the leaderboard included) per trial, trials running side by side
              "sweep_wall_s_per_trial": run["wall_s"] / len(rows),
              "fixed_overhead_s_median": median(overheads), "train_seconds_median": median(r["train_seconds"] for r in rows),
              **utilisation(run)}
    print(f"[{launcher}, {workers} worker(s)/trial] {len(rows)} trials in {run['wall_s']:.1f} s; start-up median after the first "
          f"{result['startup_s_median_after_first']:.2f} s (first {result['startup_s_first']:.2f} s); fixed overhead "
          f"per trial {result['fixed_overhead_s_median']:.2f} s vs {result['train_seconds_median']:.2f} s of training; "
          f"CPU busy {result['cpu_busy_pct_median']:.0f}%, training {result['training_share_of_cores_pct']:.0f}% of it")
    stages = result["startup_stages_s_median_after_first"]
    if "worker_ready" in stages:
        print(f"  start-up stages (median after the first, from the trial function's start): Train worker process "
              f"spawned {stages['worker_spawned']:.2f} s, ready to run our code {stages['worker_ready']:.2f} s, "
              f"first batch {stages['first_batch']:.2f} s")
    return result


# A new Python process importing what a Ray Train worker imports before it can take a step, one after
# the other, each timed cumulatively: (module, seconds since the first import began).
_IMPORT_PROBE = """
import json, time
start, marks = time.perf_counter(), []
for name in ("ray", "torch", "torch._dynamo"):
    __import__(name)
    marks.append((name, time.perf_counter() - start))
print(json.dumps(marks))
"""


def fresh_process_imports(repeats: int) -> dict:
    """Seconds a new Python process takes to import Ray, then torch, then torch._dynamo (cumulative), and
    the whole process, interpreter start and exit included. Medians of `repeats` processes, run before the
    benchmark starts Ray, so the cores are idle: in a sweep, another trial is training beside them."""
    runs = []
    for _ in range(repeats):
        begun = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True).stdout
        runs.append({"process_s": time.perf_counter() - begun, **dict(json.loads(out.strip().splitlines()[-1]))})
    result = {"repeats": repeats, "cumulative_s_median": {k: median(r[k] for r in runs) for k in runs[0] if k != "process_s"},
              "process_s_median": median(r["process_s"] for r in runs)}
    marks = result["cumulative_s_median"]
    print(f"[fresh process, idle cores, median of {repeats}] import ray {marks['ray']:.2f} s, + torch "
          f"{marks['torch']:.2f} s, + torch._dynamo {marks['torch._dynamo']:.2f} s (cumulative); the whole process "
          f"{result['process_s_median']:.2f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--ddp-trials", type=int, default=5)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--name", default="startup")
    parser.add_argument("--import-repeats", type=int, default=3)
    args = parser.parse_args()
    speed_at_start = matmul_gflops()
    imports = fresh_process_imports(args.import_repeats)
    data_cfg, splits, kind = data_config(args.max_train)
    single = measure(args.trials, 1, data_cfg, splits)
    ddp = measure(args.ddp_trials, 2, data_cfg, splits)
    inline = measure(args.trials, 1, data_cfg, splits, launcher="inline")
    write_result(args.name, {"data": kind, "single_worker": single, "ddp_2_workers": ddp, "inline_single_worker": inline,
                             "fresh_process_imports": imports,
                             "targets": {"single_startup<=3s": single["startup_s_median_after_first"] <= 3,
                                         "inline_single_startup<=3s": inline["startup_s_median_after_first"] <= 3,
                                         "ddp_startup<=10s": ddp["startup_s_median_after_first"] <= 10}},
                 speed_at_start)


if __name__ == "__main__":
    main()
