"""Can the leaderboard's ranking be trusted? Two measurements, written to benchmarks/results/selection.json.

(a) Noise. One fixed configuration trained with several seeds: the sd over seeds of its val AUC on the single
val split (what a sweep without data.cv_folds selects on), against the sd of its K-fold mean (what a sweep with
data.cv_folds: K selects on). Target (issue 25): the K-fold mean's sd at most half the single split's.

(b) Agreement, and the cost of CV. Two real sweeps of the same trials, one without CV and one with K folds:
Optuna's random sampler with one seed draws the same configurations in the same order for both, and ASHA is
off, so only the selection differs. After each sweep, and outside it, every trial's kept checkpoint is scored
on the test split (under CV: the fold-models' mean probability, as the leaderboard does), and Spearman's rho
between the selection metric and test AUC is computed over the trials. The test split is read for this
measurement only. Target: rho >= 0.8 with CV, and above the single split's. The cost is the CV sweep's wall
time over the single-split sweep's.

    python benchmarks/selection.py                        # both parts, real 28 px PneumoniaMNIST
    python benchmarks/selection.py --seeds 8 --folds 5 --epochs 6 --parts noise

(a): each run is ``train.fit`` (the sweep's own training loop) in a plain process, two at a time, one thread
each. The folds are made once (seed 0) and the training seed varies, as the val split is fixed and the
training seed varies for the single split: both numbers measure how much one run's luck moves the metric.
As in a sweep, each run is scored at its best epoch: the single split's by val AUC, the folds' by their
mean. Test AUC is recorded beside it (the single model's; the fold-models' mean probability), never used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from multiprocessing import get_context

import numpy as np
from common import data_config, matmul_gflops, median, write_result

PARAMS = {"model": "cnn_bn", "optimizer": "adamw", "lr": 5.5e-4, "weight_decay": 1e-4, "batch_size": 64,
          "class_weighting": "sampler", "freeze_depth": 0}  # the default sweep's rank 1 (docs/results.md)


def one_run(job: tuple) -> dict:
    """Train one model: seed ``seed`` on the single split (fold None) or on fold ``fold``. Returns its
    val AUC per epoch and its test pneumonia probabilities at each epoch's end."""
    import torch
    from scipy.special import expit

    from pneumo_ray.config import Config, ExperimentConfig, TrainConfig
    from pneumo_ray.data import with_folds
    from pneumo_ray.evaluate import predict_margin
    from pneumo_ray.train import LocalSession, fit

    seed, fold, folds, epochs, max_train = job
    torch.set_num_threads(1)
    data_cfg, splits, _ = data_config(max_train)  # each worker process loads the data itself
    if fold is not None:
        splits = with_folds(splits, folds, seed=0).fold(fold)
    mean, std = splits.train_mean_std()

    class Recording(LocalSession):
        """Keeps each epoch's test probabilities, so the best epoch can be scored afterwards."""

        def prepare_model(self, model):
            self.model = super().prepare_model(model)
            return self.model

        def report(self, metrics, write_checkpoint):
            super().report(metrics, write_checkpoint)
            self.test_probs.append(expit(predict_margin(self.model, splits.test_x, mean, std, True, self.device)))

    session = Recording(threads=1, device=torch.device("cpu"))
    session.test_probs = []
    cfg = Config(experiment=ExperimentConfig(seed=seed), data=data_cfg, train=TrainConfig(epochs=epochs))
    started = time.perf_counter()
    fit(cfg, PARAMS, splits, session)
    return {"seed": seed, "fold": fold, "val_auc": [h["val_auc"] for h in session.history],
            "test_probs": session.test_probs, "test_y": splits.test_y, "seconds": time.perf_counter() - started}


def noise(args) -> dict:
    """(a): the fixed configuration, each seed on the single split and on every fold."""
    from sklearn.metrics import roc_auc_score

    jobs = [(seed, fold, args.folds, args.epochs, args.max_train)
            for seed in range(1, args.seeds + 1) for fold in (None, *range(args.folds))]
    started = time.perf_counter()
    with get_context("spawn").Pool(args.processes) as pool:
        runs = pool.map(one_run, jobs)
    wall = time.perf_counter() - started

    per_seed = []
    for seed in range(1, args.seeds + 1):
        single = next(r for r in runs if r["seed"] == seed and r["fold"] is None)
        folds = sorted((r for r in runs if r["seed"] == seed and r["fold"] is not None), key=lambda r: r["fold"])
        best = int(np.argmax(single["val_auc"]))
        fold_mean = np.mean([f["val_auc"] for f in folds], axis=0)  # per epoch, as a CV trial reports it
        best_cv = int(np.argmax(fold_mean))
        test_cv = np.mean([f["test_probs"][best_cv] for f in folds], axis=0)
        per_seed.append({"seed": seed, "single_val_auc": single["val_auc"][best], "single_epoch": best + 1,
                         "single_test_auc": float(roc_auc_score(single["test_y"], single["test_probs"][best])),
                         "cv_val_auc": float(fold_mean[best_cv]), "cv_epoch": best_cv + 1,
                         "cv_fold_val_auc": [f["val_auc"][best_cv] for f in folds],
                         "cv_test_auc": float(roc_auc_score(single["test_y"], test_cv))})
        p = per_seed[-1]
        print(f"[seed {seed}] single val AUC {p['single_val_auc']:.4f} (test {p['single_test_auc']:.4f}); "
              f"{args.folds}-fold mean {p['cv_val_auc']:.4f} (test {p['cv_test_auc']:.4f})")
    sd = {k: float(np.std([p[k] for p in per_seed], ddof=1)) for k in ("single_val_auc", "cv_val_auc",
                                                                          "single_test_auc", "cv_test_auc")}
    ratio = sd["cv_val_auc"] / sd["single_val_auc"] if sd["single_val_auc"] > 0 else float("nan")
    print(f"[noise] sd over {args.seeds} seeds: single val split {sd['single_val_auc']:.4f}, {args.folds}-fold "
          f"mean {sd['cv_val_auc']:.4f} (ratio {ratio:.2f}; target <= 0.5); test AUC sd single "
          f"{sd['single_test_auc']:.4f}, CV {sd['cv_test_auc']:.4f}; {len(jobs)} runs in {wall:.0f} s")
    return {"params": PARAMS, "seeds": args.seeds, "epochs": args.epochs, "sd": sd, "cv_over_single_sd": ratio,
            "per_seed": per_seed, "run_seconds_median": median(r["seconds"] for r in runs), "wall_s": wall}


def agreement_config(data_cfg, folds: int, args):
    """The sweep both halves of (b) run: the default sweep's space on cnn_bn, drawn at random (the same draws
    for both), every trial to its last epoch. Under CV a trial's K fold workers share the cores."""
    from pneumo_ray.config import Config

    cfg = Config()
    cfg.experiment.name = f"agreement_cv{folds}"
    cfg.data = dataclasses.replace(data_cfg, cv_folds=folds)
    cfg.train.epochs, cfg.train.warmup_epochs = args.epochs, 0
    s = cfg.search
    s.model, s.optimizer, s.lr, s.weight_decay = ["cnn_bn"], ["adamw", "sgd"], [1e-4, 3e-2], [1e-6, 1e-3]
    s.batch_size, s.class_weighting = [64, 128], ["none", "loss", "sampler"]
    s.sampler, s.asha.enabled, s.num_samples = "random", False, args.trials
    cfg.resources.gpus_per_worker = 0.0
    cores = os.cpu_count() or 1
    # Rounded down: K workers of cores/K each, rounded to the nearest, can add up to more than the cores, and a
    # trial that does not fit waits forever.
    cfg.resources.cpus_per_worker = 1.0 if not folds else round(min(1.0, cores / folds) - 0.005, 2)
    return cfg


def score_trials(exp, cfg, splits) -> list[dict]:
    """Each trial's kept checkpoint (its best epoch by the selection metric, as the leaderboard picks it):
    the metric it was selected on, and its test AUC, read here and never by the sweep."""
    from sklearn.metrics import roc_auc_score

    from pneumo_ray.checkpoints import best_per_trial, load_members
    from pneumo_ray.evaluate import kept_probabilities

    scored = []
    for cand in best_per_trial(exp, cfg.search.metric):
        meta = cand["meta"]
        _, _, test_prob = kept_probabilities(load_members(cand["checkpoint_dir"], meta), cfg=cfg, splits=splits)
        scored.append({"params": meta["params"], "selection_val_auc": meta["metrics"][cfg.search.metric],
                       "test_auc": float(roc_auc_score(splits.test_y, test_prob))})
    return scored


def rho_difference(both: list[tuple[dict, dict]], resamples: int = 2000) -> dict:
    """CV's rho minus the single split's over the configurations both sweeps kept, with a 95% interval from a
    paired bootstrap over configurations (seeded): a dozen trials cannot pin rho down, and this says how far."""
    from scipy.stats import spearmanr

    def rho(pairs, side):
        return spearmanr([p[side]["selection_val_auc"] for p in pairs], [p[side]["test_auc"] for p in pairs]).statistic

    if len(both) < 4:
        return {"difference": None, "lo": None, "hi": None}
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(resamples):
        sample = [both[i] for i in rng.integers(0, len(both), len(both))]
        if len({id(p) for p in sample}) >= 4:  # fewer distinct points make rho meaningless (or undefined)
            diffs.append(rho(sample, 1) - rho(sample, 0))
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return {"difference": float(rho(both, 1) - rho(both, 0)), "lo": float(lo), "hi": float(hi)}


def agreement(args, data_cfg, splits) -> dict:
    """(b) and the cost: the single-split sweep, then the CV sweep, of the same trials."""
    from scipy.stats import spearmanr
    from sweeps_common import run_sweep

    from pneumo_ray.data import with_folds

    out = {"trials": args.trials, "epochs": args.epochs}
    for name, folds in (("single", 0), ("cv", args.folds)):
        cfg = agreement_config(data_cfg, folds, args)
        sweep_splits = with_folds(splits, folds, cfg.experiment.seed) if folds else splits
        run = run_sweep(cfg, sweep_splits, inspect=lambda exp: score_trials(exp, cfg, sweep_splits))
        trials = run["inspected"]
        rho = spearmanr([t["selection_val_auc"] for t in trials], [t["test_auc"] for t in trials]).statistic
        out[name] = {"folds": folds, "wall_s": run["wall_s"], "trials_scored": len(trials),
                     "spearman_rho": float(rho), "trials": trials}
        print(f"[agreement, {name}] {len(trials)} trials in {run['wall_s']:.0f} s: Spearman rho(selection val AUC, "
              f"test AUC) = {rho:.3f}")
    # The random sampler draws the same configurations for both sweeps; rho over the ones both kept.
    key = lambda t: json.dumps(t["params"], sort_keys=True)  # noqa: E731
    cv_by_params = {key(t): t for t in out["cv"]["trials"]}
    both = [(t, cv_by_params[key(t)]) for t in out["single"]["trials"] if key(t) in cv_by_params]
    out["common_trials"] = len(both)
    out["rho_cv_minus_single"] = rho_difference(both)
    out["cv_over_single_wall"] = out["cv"]["wall_s"] / out["single"]["wall_s"]
    d = out["rho_cv_minus_single"]
    if d["difference"] is not None:
        print(f"[agreement] rho with CV minus rho on the single split: {d['difference']:+.3f} "
              f"[{d['lo']:+.3f}, {d['hi']:+.3f}] (95% paired bootstrap over the configurations)")
    print(f"[cost] the {args.folds}-fold sweep took {out['cv_over_single_wall']:.2f}x the single split's wall time "
          f"({out['cv']['wall_s']:.0f} s against {out['single']['wall_s']:.0f} s; {len(both)} configurations in both)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["noise", "agreement"], default=["noise", "agreement"])
    parser.add_argument("--seeds", type=int, default=5, help="(a) training seeds of the fixed configuration")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12, help="(b) trials in each of the two sweeps")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N train images")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--name", default="selection")
    args = parser.parse_args()

    speed = matmul_gflops()
    data_cfg, splits, kind = data_config(args.max_train)  # the noise runs' processes load their own
    result = {"data": kind, "folds": args.folds, "targets": {}}
    if "noise" in args.parts:
        result["noise"] = noise(args)
        result["targets"]["cv_sd<=half_single_sd"] = bool(result["noise"]["cv_over_single_sd"] <= 0.5)
    if "agreement" in args.parts:
        result["agreement"] = agreement(args, data_cfg, splits)
        rho = {name: result["agreement"][name]["spearman_rho"] for name in ("single", "cv")}
        result["targets"]["cv_rho>=0.8"] = bool(rho["cv"] >= 0.8)
        result["targets"]["cv_rho>single_rho"] = bool(rho["cv"] > rho["single"])
    write_result(args.name, result, speed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
