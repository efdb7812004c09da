"""How much an idle local Ray slows the plain training loop, in one run: where the ray1/plain gap comes from.

The plain loop (``fit`` in this process, no Ray actor) runs alternately with no Ray and with an idle
``ray.init()`` beside it, ``--repeats`` times each, then once under Ray Train with 1 worker. Ray's
daemons (raylet, GCS, agents, log monitor, prestarted workers) wake up now and then. On a machine
whose cores all run the training threads, each wake-up stalls a thread the others wait for.

    python benchmarks/ray_background.py [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import psutil
from common import data_config, median, write_result
from epoch_cost import run_plain, run_ray


def ray_daemons_cpu_percent(seconds: float = 10.0) -> float:
    """CPU of every process but this one, in % of one core, while Ray idles: Ray's daemons."""
    others = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    for p in others:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    total = 0.0
    for p in others:
        try:
            total += p.cpu_percent(None)
        except psutil.Error:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per run (plus a warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    _, splits, data_kind = data_config()
    epochs = args.epochs + 2  # as epoch_cost.py: one warm-up epoch, one more start to close the last one
    runs: dict[str, list[dict]] = {"plain_no_ray": [], "plain_idle_ray": []}
    idle_cpu = None
    for _ in range(args.repeats):
        runs["plain_no_ray"].append(run_plain(args.model, epochs, splits))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            time.sleep(5)  # let start-up settle, as it has by a sweep's first epoch
            if idle_cpu is None:
                idle_cpu = ray_daemons_cpu_percent()
            runs["plain_idle_ray"].append(run_plain(args.model, epochs, splits))
        finally:
            ray.shutdown()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        runs["ray1"] = [run_ray(args.model, epochs, splits, 1)]
    finally:
        ray.shutdown()

    summary = {name: {"epoch_s": median([r["epoch_s"] for r in rs]),
                      "images_per_s": median([r["images_per_s"] for r in rs]),
                      "images_per_s_per_run": [round(r["images_per_s"], 1) for r in rs]} for name, rs in runs.items()}
    for name, s in summary.items():
        print(f"[{name:14s}] epoch {s['epoch_s']:.2f} s  train {s['images_per_s']:.0f} img/s  (runs {s['images_per_s_per_run']})")
    base = summary["plain_no_ray"]["epoch_s"]
    ratios = {"plain_idle_ray_over_plain_epoch_time": summary["plain_idle_ray"]["epoch_s"] / base,
              "ray1_over_plain_epoch_time": summary["ray1"]["epoch_s"] / base}
    print(f"[ray idle] other processes use {idle_cpu:.1f}% of one core")
    for k, v in ratios.items():
        print(f"[ratio] {k} = {v:.3f}")
    write_result("ray_background", {"data": data_kind, "model": args.model, "measured_epochs": args.epochs,
                                    "repeats": args.repeats, "idle_ray_cpu_percent_of_one_core": idle_cpu,
                                    "variants": summary, "ratios": ratios})


if __name__ == "__main__":
    main()
