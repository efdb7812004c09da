"""Does a val split carved by patient grade models as the test set will? Writes benchmarks/results/patient_split.json.

The Kermany folder has no val split, so one is carved from train. Its pneumonia X-rays come several to a patient:
carved image by image (the baseline, and what every sweep did before data.split_by), most val patients also have
X-rays in train, and val grades models on patients they trained on. The official test set is other patients. Each
seed carves val both ways (data.split_by image and patient, the same seed) and trains the same configuration on
each with the sweep's own training loop (``train.fit``); the model is scored at its best val-AUC epoch, as a sweep
keeps it. What is compared is how far val's figures sit from test's for the same model: the smaller the gap, the
more a ranking on val says about test. The test split is read for this measurement only.

    python benchmarks/patient_split.py                     # 28 px, 3 seeds, 4 epochs, ../shared/data/chest_xray
    python benchmarks/patient_split.py --seeds 5 --epochs 6 --size 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from common import SHARED_DATA, matmul_gflops, median, write_result
from selection import PARAMS


def one_run(job: tuple) -> dict:
    """Seed ``seed``'s val carved by ``split_by``: val and test scores at the best val-AUC epoch."""
    import torch
    from scipy.special import expit
    from sklearn.metrics import roc_auc_score

    from pneumo_ray.config import Config, DataConfig, ExperimentConfig, TrainConfig
    from pneumo_ray.data import load_splits
    from pneumo_ray.evaluate import predict_margin
    from pneumo_ray.train import LocalSession, fit

    split_by, seed, folder, size, epochs, cache = job
    torch.set_num_threads(1)
    data_cfg = DataConfig(source="folder", path=folder, size=size, split_by=split_by, cache_dir=cache)
    splits = load_splits(data_cfg, seed=seed)
    mean, std = splits.train_mean_std()
    val_patients = set(splits.patients[len(splits.train_y):]) if splits.patients is not None else None

    class Recording(LocalSession):
        """Keeps each epoch's val and test probabilities, so the best epoch can be scored afterwards."""

        def prepare_model(self, model):
            self.model = super().prepare_model(model)
            return self.model

        def report(self, metrics, write_checkpoint):
            super().report(metrics, write_checkpoint)
            self.probs.append({name: expit(predict_margin(self.model, getattr(splits, f"{name}_x"), mean, std,
                                                          True, self.device)) for name in ("val", "test")})

    session = Recording(threads=1, device=torch.device("cpu"))
    session.probs = []
    cfg = Config(experiment=ExperimentConfig(seed=seed), data=data_cfg, train=TrainConfig(epochs=epochs))
    started = time.perf_counter()
    fit(cfg, PARAMS, splits, session)
    best = int(np.argmax([h["val_auc"] for h in session.history]))
    scores = {}
    for name in ("val", "test"):
        y, p = getattr(splits, f"{name}_y"), session.probs[best][name]
        scores[name] = {"auc": float(roc_auc_score(y, p)), "accuracy": float(np.mean((p >= 0.5) == y)),
                        "normal_recall": float(np.mean(p[y == 0] < 0.5))}
    return {"split_by": split_by, "seed": seed, "epoch": best + 1, **scores, "val_images": len(splits.val_y),
            "val_patients": None if val_patients is None else len(val_patients),
            "seconds": time.perf_counter() - started}


def leaked_share(folder: Path, seed: int) -> float:
    """Under the image split: the share of val images whose patient also has X-rays in train."""
    from pneumo_ray.data import folder_files
    from pneumo_ray.folds import carve_val, patient_ids

    files = folder_files(folder)[0]["train"]
    ids = patient_ids([path.name for path, _ in files])
    keep, carved = carve_val(np.array([label for _, label in files]), None, 0.1, seed)
    return float(np.isin(ids[carved], ids[keep]).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=SHARED_DATA / "chest_xray")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    if not (args.folder / "train").is_dir():
        print(f"[skip] no Kaggle chest X-ray folder at {args.folder}: nothing to measure (pass --folder DIR)")
        return 0
    from pneumo_ray.config import DataConfig
    from pneumo_ray.data import load_splits

    matmul = matmul_gflops()
    with tempfile.TemporaryDirectory() as cache:
        load_splits(DataConfig(source="folder", path=str(args.folder), size=args.size, cache_dir=cache))  # decode once
        jobs = [(split_by, seed, str(args.folder), args.size, args.epochs, cache)
                for seed in range(1, args.seeds + 1) for split_by in ("image", "patient")]
        started = time.perf_counter()
        with get_context("spawn").Pool(args.processes) as pool:
            runs = pool.map(one_run, jobs)
        wall = time.perf_counter() - started
    for r in runs:
        print(f"[seed {r['seed']} {r['split_by']:>7}] epoch {r['epoch']}: val AUC {r['val']['auc']:.4f} "
              f"test {r['test']['auc']:.4f}; accuracy @0.5 val {r['val']['accuracy']:.3f} "
              f"test {r['test']['accuracy']:.3f}; normal recall val {r['val']['normal_recall']:.2f} "
              f"test {r['test']['normal_recall']:.2f}")
    summary = {}
    for split_by in ("image", "patient"):
        mine = [r for r in runs if r["split_by"] == split_by]
        summary[split_by] = {f"{metric}_{part}": median(r[part][metric] for r in mine)
                             for metric in ("auc", "accuracy", "normal_recall") for part in ("val", "test")}
        summary[split_by].update({f"{metric}_gap": median(r["val"][metric] - r["test"][metric] for r in mine)
                                  for metric in ("auc", "accuracy", "normal_recall")})
        s = summary[split_by]
        print(f"[{split_by} split] medians over {len(mine)} seeds: val AUC {s['auc_val']:.4f} vs test "
              f"{s['auc_test']:.4f} (gap {s['auc_gap']:.4f}); normal recall @0.5 val {s['normal_recall_val']:.2f} "
              f"vs test {s['normal_recall_test']:.2f}")
    leaked = [leaked_share(args.folder, seed) for seed in range(1, args.seeds + 1)]
    print(f"[leak] image split: {median(leaked):.0%} of val images have a patient in train (median over seeds)")
    write_result("patient_split", {"folder": str(args.folder), "size": args.size, "params": PARAMS,
                                   "seeds": args.seeds, "epochs": args.epochs, "median": summary,
                                   "image_split_val_images_with_patient_in_train": leaked, "runs": runs,
                                   "wall_s": wall}, matmul)
    return 0


if __name__ == "__main__":
    sys.exit(main())
