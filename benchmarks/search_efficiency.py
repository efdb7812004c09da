"""Search efficiency on one wall-clock budget: a seed-002-style grid, random search, and pneumo-ray's
TPE + ASHA, each a real sweep on this machine. The grid runs to the end and sets the budget; the
other two get the same budget. Records best val AUC so far against wall time, the time each needs to
reach the grid's final best, CPU busy % and peak memory, and plots the three curves.

    python benchmarks/search_efficiency.py [--epochs 4] [--max-train N] [--quick] [--grid-points N]
"""

from __future__ import annotations

import argparse
import itertools

from common import RESULTS, data_config, write_result
from sweeps_common import best_so_far, run_sweep, time_to_reach, utilisation


def grid_points(quick: bool) -> list[dict]:
    """The seed-002 notebook's grid: optimizer x lr x weight decay x batch size."""
    axes = {"optimizer": ["adam", "sgd"], "lr": [1e-4, 1e-3, 1e-2],
            "weight_decay": [1e-4] if quick else [1e-5, 1e-3], "batch_size": [128] if quick else [64, 128]}
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def sweep_config(name: str, data_cfg, epochs: int, quick: bool, launcher: str):
    from pneumo_ray.config import Config

    cfg = Config()
    cfg.experiment.name = name
    cfg.data = data_cfg
    cfg.train.epochs, cfg.train.warmup_epochs = epochs, 0
    s = cfg.search
    s.model, s.class_weighting = ["cnn_bn"], ["none"]
    s.optimizer, s.lr, s.weight_decay = ["adam", "sgd"], [1e-4, 1e-2], [1e-5, 1e-3]
    s.batch_size = [128] if quick else [64, 128]
    s.asha.grace_period = 1
    cfg.resources.gpus_per_worker = 0.0
    # The same launcher for all three, so that only the search strategy differs; inline, because a
    # TorchTrainer's ~20 s start-up per trial on 2 cores would leave each strategy a handful of trials.
    cfg.resources.launcher = launcher
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a 6-point grid instead of 24")
    parser.add_argument("--grid-points", type=int, default=None, help="only the grid's first N points (smoke runs)")
    parser.add_argument("--launcher", default="inline", choices=["inline", "train"], help="resources.launcher")
    parser.add_argument("--name", default="search_efficiency")
    args = parser.parse_args()
    data_cfg, splits, kind = data_config(args.max_train)

    grid = sweep_config("grid", data_cfg, args.epochs, args.quick, args.launcher)
    grid.search.initial_points = grid_points(args.quick)[:args.grid_points]  # each point tried once, in order
    grid.search.num_samples = len(grid.search.initial_points)
    grid.search.asha.enabled = False
    runs = {"grid": run_sweep(grid, splits)}
    budget = runs["grid"]["wall_s"]
    print(f"[grid] {grid.search.num_samples} points in {budget:.0f} s: that is the budget of the others")

    random = sweep_config("random", data_cfg, args.epochs, args.quick, args.launcher)
    random.search.sampler, random.search.asha.enabled = "random", False
    tpe = sweep_config("tpe_asha", data_cfg, args.epochs, args.quick, args.launcher)
    for cfg in (random, tpe):
        cfg.search.num_samples, cfg.search.time_budget_s = 1000, budget
    runs["random"] = run_sweep(random, splits)
    runs["tpe_asha"] = run_sweep(tpe, splits)

    curves = {name: best_so_far(run) for name, run in runs.items()}
    grid_best = curves["grid"][-1][1]
    summary = {}
    for name, run in runs.items():
        reach = time_to_reach(curves[name], grid_best)
        summary[name] = {"trials": len(run["trials"]), "wall_s": run["wall_s"], "best_val_auc": curves[name][-1][1],
                         "time_to_grid_best_s": reach, "fraction_of_grid_time": reach / budget if reach else None,
                         "curve": curves[name], **utilisation(run)}
        reached = f"{reach:.0f} s ({reach / budget:.0%} of the grid's time)" if reach else "never"
        print(f"[{name}] {len(run['trials'])} trials, best val AUC {curves[name][-1][1]:.4f}, reached the grid's "
              f"best {grid_best:.4f} after {reached}; CPU busy median {summary[name]['cpu_busy_pct_median']:.0f}%, "
              f"training {summary[name]['training_share_of_cores_pct']:.0f}% of the cores' time")
    plot(curves, grid_best, budget, RESULTS / f"{args.name}.png")
    tpe_fraction = summary["tpe_asha"]["fraction_of_grid_time"]
    write_result(args.name, {"data": kind, "epochs_per_trial": args.epochs, "launcher": args.launcher, "budget_s": budget,
                             "grid_best_val_auc": grid_best, "runs": summary,
                             "targets": {"tpe_asha_reaches_grid_best_in<=25%": bool(tpe_fraction and tpe_fraction <= 0.25),
                                         "cpu_busy>=90%": (summary["tpe_asha"]["cpu_busy_pct_median"] or 0) >= 90}})


def plot(curves: dict, grid_best: float, budget: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, label in (("grid", "grid (seed-002 style)"), ("random", "random search"), ("tpe_asha", "TPE + ASHA")):
        points = curves[name]
        if points:
            xs, ys = zip(*points)
            ax.step([*xs, budget], [*ys, ys[-1]], where="post", label=label)
    ax.axhline(grid_best, color="grey", lw=0.8, ls=":", label="grid's final best")
    ax.set_xlabel("wall time since sweep start (s)")
    ax.set_ylabel("best val AUC so far")
    ax.set_ylim(max(0.5, min(v for c in curves.values() for _, v in c) - 0.01), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Same machine, same wall-clock budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    print(f"[plot] {path}")


if __name__ == "__main__":
    main()
