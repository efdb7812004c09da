"""How noisy is the selection metric? One fixed configuration trained with several seeds: the sd over seeds of
its val AUC on the single val split (the baseline: what a sweep without data.cv_folds selects on), against
the sd of its K-fold mean (what a sweep with data.cv_folds: K selects on).

    python benchmarks/selection.py                        # 5 seeds, 3 folds, 3 epochs, real 28 px PneumoniaMNIST
    python benchmarks/selection.py --seeds 8 --folds 5 --epochs 6

Each run is ``train.fit`` (the sweep's own training loop) in a plain process, two at a time, one thread
each. The folds are made once (seed 0) and the training seed varies, as the val split is fixed and the
training seed varies for the single split: both numbers measure how much one run's luck moves the metric.
As in a sweep, each run is scored at its best epoch: the single split's by val AUC, the folds' by their
mean. Test AUC is recorded beside it (the single model's; the fold-models' mean probability), never used.
Writes benchmarks/results/selection.json. Target (issue 25): the K-fold mean's sd at most half the single
split's.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N train images")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--name", default="selection")
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score

    speed = matmul_gflops()
    _, _, kind = data_config(args.max_train)
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
    write_result(args.name, {"data": kind, "params": PARAMS, "seeds": args.seeds, "folds": args.folds,
                             "epochs": args.epochs, "sd": sd, "cv_over_single_sd": ratio, "per_seed": per_seed,
                             "run_seconds_median": median(r["seconds"] for r in runs), "wall_s": wall,
                             "targets": {"cv_sd<=half_single_sd": bool(ratio <= 0.5)}}, speed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
