"""Run every benchmark, one process each, and print where the figures went.

    python benchmarks/run_all.py            # full: whole train split, 24-point grid on 3 seeds (about 2 h on 2 cores)
    python benchmarks/run_all.py --quick    # under 10 min: train subsets, fewer trials, a 4-point grid
    python benchmarks/run_all.py --smoke    # the least work per benchmark, for the tests: checks they run

Results: benchmarks/results/<name>.json (and search_efficiency.png, search_lowdata.png), or $PNEUMO_BENCH_RESULTS.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PLANS = {
    "full": [["epoch_cost.py", "--epochs", "3"],
             ["startup.py", "--trials", "10", "--ddp-trials", "5"],
             ["search_efficiency.py", "--epochs", "3", "--repeats", "3"],
             # the same search on about a tenth of the train split, 5 epochs a trial: a harder problem (30 min)
             ["search_efficiency.py", "--epochs", "5", "--max-train", "500", "--repeats", "5", "--name", "search_lowdata"],
             ["ray_background.py"],
             # the real chest X-ray folder, decoded against read from the cache (skips itself without the folder)
             ["folder_cache.py", "--sizes", "64", "128", "224"],
             # one configuration, 5 seeds: the single val split's noise against the 3-fold mean's; then 12
             # trials swept with and without 3-fold CV: how well each selection metric ranks test AUC
             ["selection.py", "--seeds", "5", "--folds", "3", "--epochs", "3", "--trials", "12"],
             # the chest X-ray folder's val carved by image and by patient: which grades models as test does
             ["patient_split.py", "--seeds", "5", "--epochs", "6"]],
    # 574 s in the slowest hour yet measured (fp32 matmul 91-162 GFLOP/s, against 196-225 usually), since the
    # benchmark sweeps stop after the search (f48ca92: no test leaderboard or report, 9-12 s a sweep). Before that,
    # 551 s at the usual speed and 703 s in a slow hour (matmul 135). A 256-image search (749 s) or 2 seeds (676 s)
    # saved little in slow hours: the grid's time is mostly per-trial overhead, not training. No ray_background.py.
    "quick": [["epoch_cost.py", "--epochs", "1", "--max-train", "512", "--pairs", "2"],
              ["startup.py", "--trials", "3", "--ddp-trials", "2", "--max-train", "512"],
              ["search_efficiency.py", "--epochs", "2", "--max-train", "512", "--quick", "--grid-lrs", "2",
               "--repeats", "3"],
              ["folder_cache.py", "--sizes", "64", "--repeats", "1"]],
    "smoke": [["epoch_cost.py", "--epochs", "1", "--max-train", "256", "--model", "cnn_bn", "--pairs", "2"],
              ["startup.py", "--trials", "2", "--ddp-trials", "2", "--max-train", "256", "--import-repeats", "1"],
              ["search_efficiency.py", "--quick", "--grid-lrs", "1", "--epochs", "1", "--max-train", "256",
               "--repeats", "2"],
              ["ray_background.py", "--model", "cnn_bn", "--rounds", "2", "--steps", "2", "--max-train", "256"],
              ["selection.py", "--seeds", "2", "--folds", "2", "--epochs", "1", "--max-train", "128", "--trials", "2"]],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    plan = PLANS["quick" if args.quick else "smoke" if args.smoke else "full"]
    started = time.time()
    for command in plan:
        print(f"\n=== {' '.join(command)}", flush=True)
        begun = time.time()
        code = subprocess.call([sys.executable, str(HERE / command[0]), *command[1:]], cwd=HERE)
        print(f"=== {command[0]} exit {code} after {time.time() - begun:.0f} s", flush=True)
        if code:
            return code
    print(f"\nall benchmarks done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
