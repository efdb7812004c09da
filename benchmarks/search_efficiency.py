"""Search efficiency on one wall-clock budget: a seed-002-style grid, random search, and pneumo-ray's
TPE + ASHA, each a real sweep on this machine. The grid runs to the end and sets the budget; the
other two get the same budget. Records best val AUC so far against wall time, the time each needs to
reach the grid's final best, CPU busy % and peak memory, and plots the three curves.

    python benchmarks/search_efficiency.py [--epochs 4] [--max-train N] [--quick] [--grid-lrs N] [--repeats 3]

Each repeat uses another seed (weights, batch order, augmentation, samplers) for all three; the figures
are medians over the repeats, because one run each cannot tell strategies apart when val AUC is
within the val split's noise.
"""

from __future__ import annotations

import argparse
import math

from common import RESULTS, data_config, matmul_gflops, median, write_result
from sweeps_common import best_so_far, run_sweep, time_to_reach, utilisation


def grid_axes(quick: bool, lrs: int | None) -> dict[str, list]:
    """The seed-002 notebook's grid: optimizer x lr x weight decay x batch size (its first ``lrs`` LRs)."""
    return {"optimizer": ["adam", "sgd"], "lr": [1e-4, 1e-3, 1e-2][:lrs],
            "weight_decay": [1e-4] if quick else [1e-5, 1e-3], "batch_size": [128] if quick else [64, 128]}


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


def one_repeat(seed: int, data_cfg, splits, args) -> dict:
    """The grid, then random search and TPE + ASHA on the grid's wall time, all with this seed."""
    def config(name: str):
        cfg = sweep_config(f"{name}_seed{seed}", data_cfg, args.epochs, args.quick, args.launcher)
        cfg.experiment.seed = seed  # weights, batch order, augmentation and the samplers all follow it
        return cfg

    grid = config("grid")
    axes = grid_axes(args.quick, args.grid_lrs)
    grid.search.sampler, grid.search.asha.enabled = "grid", False  # search.sampler: grid, each point once
    for name, values in axes.items():
        setattr(grid.search, name, values)
    grid.search.num_samples = math.prod(len(values) for values in axes.values())
    runs = {"grid": run_sweep(grid, splits)}
    budget = runs["grid"]["wall_s"]
    print(f"[seed {seed}, grid] {grid.search.num_samples} points in {budget:.0f} s: that is the budget of the others")
    random, tpe = config("random"), config("tpe_asha")
    random.search.sampler, random.search.asha.enabled = "random", False
    for cfg in (random, tpe):
        cfg.search.num_samples, cfg.search.time_budget_s = 1000, budget
    runs["random"] = run_sweep(random, splits)
    runs["tpe_asha"] = run_sweep(tpe, splits)

    curves = {name: best_so_far(run) for name, run in runs.items()}
    grid_best = curves["grid"][-1][1]
    out = {"seed": seed, "budget_s": budget, "grid_best_val_auc": grid_best, "runs": {}}
    for name, run in runs.items():
        reach = time_to_reach(curves[name], grid_best)
        near = time_to_reach(curves[name], grid_best - NEAR)
        out["runs"][name] = {"trials": len(run["trials"]), "wall_s": run["wall_s"], "best_val_auc": curves[name][-1][1],
                             "time_to_grid_best_s": reach, "fraction_of_grid_time": reach / budget if reach else None,
                             "fraction_to_near_grid_best": near / budget if near else None,
                             "curve": curves[name], **utilisation(run)}
        reached = f"{reach:.0f} s ({reach / budget:.0%} of the grid's time)" if reach else "never"
        print(f"[seed {seed}, {name}] {len(run['trials'])} trials, best val AUC {curves[name][-1][1]:.4f}, reached the "
              f"grid's best {grid_best:.4f} after {reached}; CPU busy median {out['runs'][name]['cpu_busy_pct_median']:.0f}%")
    return out


NEAR = 0.001  # "within 0.001 of the grid's best": below the val split's resolution (524 images)


def fraction_median(values: list) -> float | None:
    """Median share of the grid's time, a repeat that never got there counting as infinitely late."""
    value = median([v if v is not None else math.inf for v in values])
    return None if math.isinf(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a 6-point grid instead of 24")
    parser.add_argument("--grid-lrs", type=int, default=None, help="only the grid's first N of its 3 LRs (smoke runs)")
    parser.add_argument("--repeats", type=int, default=3, help="seeds 0..N-1, all three strategies each")
    parser.add_argument("--launcher", default="inline", choices=["inline", "train"], help="resources.launcher")
    parser.add_argument("--name", default="search_efficiency")
    args = parser.parse_args()
    speed_at_start = matmul_gflops()
    data_cfg, splits, kind = data_config(args.max_train)
    repeats = [one_repeat(seed, data_cfg, splits, args) for seed in range(args.repeats)]

    summary = {}
    for name in ("grid", "random", "tpe_asha"):
        per_seed = [r["runs"][name] for r in repeats]
        summary[name] = {"trials_median": median(p["trials"] for p in per_seed),
                         "best_val_auc_median": median(p["best_val_auc"] for p in per_seed),
                         "reached_grid_best": sum(p["time_to_grid_best_s"] is not None for p in per_seed),
                         "fraction_of_grid_time_median": fraction_median([p["fraction_of_grid_time"] for p in per_seed]),
                         "fraction_to_near_grid_best_median":
                             fraction_median([p["fraction_to_near_grid_best"] for p in per_seed]),
                         "cpu_busy_pct_median": median(p["cpu_busy_pct_median"] for p in per_seed),
                         "trial_peak_rss_mb_max": max(p["trial_peak_rss_mb_max"] for p in per_seed)}
        m = summary[name]
        print(f"[{name}, median of {len(repeats)} seeds] {m['trials_median']:.0f} trials, best val AUC "
              f"{m['best_val_auc_median']:.4f}; reached its seed's grid best in {m['reached_grid_best']}/{len(repeats)}, "
              f"median share of the grid's time {_share(m['fraction_of_grid_time_median'])} "
              f"(within {NEAR}: {_share(m['fraction_to_near_grid_best_median'])})")
    plot(repeats, RESULTS / f"{args.name}.png")
    tpe_fraction = summary["tpe_asha"]["fraction_of_grid_time_median"]
    write_result(args.name, {"data": kind, "epochs_per_trial": args.epochs, "launcher": args.launcher,
                             "repeats": repeats, "near": NEAR, "summary": summary,
                             "targets": {"tpe_asha_reaches_grid_best_in<=25%": bool(tpe_fraction and tpe_fraction <= 0.25),
                                         "cpu_busy>=90%": summary["tpe_asha"]["cpu_busy_pct_median"] >= 90}},
                 speed_at_start)


def _share(fraction: float | None) -> str:
    return "never" if fraction is None else f"{fraction:.0%}"


def plot(repeats: list[dict], path) -> None:
    """One line per strategy and seed: best val AUC so far against the share of that seed's grid time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    styles = {"grid": ("grid (seed-002 style)", "tab:blue"), "random": ("random search", "tab:orange"),
              "tpe_asha": ("TPE + ASHA", "tab:green")}
    lowest = 1.0
    for i, repeat in enumerate(repeats):
        budget = repeat["budget_s"]
        for name, (label, colour) in styles.items():
            points = repeat["runs"][name]["curve"]
            if points:
                xs, ys = zip(*points)
                lowest = min(lowest, *ys)
                ax.step([x / budget for x in xs] + [1.0], [*ys, ys[-1]], where="post", color=colour, lw=1.2,
                        alpha=0.8, label=label if i == 0 else None)
    ax.axvline(0.25, color="grey", lw=0.8, ls=":", label="25% of the grid's time")
    ax.set_xlabel("share of the grid's wall time (each seed's own)")
    ax.set_ylabel("best val AUC so far")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(max(0.5, lowest - 0.01), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Same machine, same wall-clock budget, {len(repeats)} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    print(f"[plot] {path}")


if __name__ == "__main__":
    main()
