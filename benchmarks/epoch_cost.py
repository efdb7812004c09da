"""Epoch cost of one model/config/epoch, four ways, in one run:

  (a) plain    the project's training loop (``fit``) in this process, no Ray
  (b) ray1     the same loop under Ray Train, 1 worker
  (c) ray2     the same loop under Ray Train, 2 DDP workers (gloo) on the same cores
  (d) seed     a seed-notebook pipeline: per-image PIL ``transforms.Compose`` in a DataLoader, plain loop

Also the data pipeline alone (batched tensor augmentation vs the PIL DataLoader) and the fp32 matmul
rate, the bound the ResNet-18 target is stated against. Epoch figures are medians over the measured
epochs, after one warm-up epoch. plain and ray1 run ``--pairs`` times, alternating; their ratio is the
median of the pairs' ratios.

    python benchmarks/epoch_cost.py [--model resnet18] [--epochs 3] [--pairs 3] [--max-train N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from common import data_config, matmul_gflops, median, write_result

BATCH = 128


def trial_config(model: str, epochs: int, cpus_per_worker: float, workers: int):
    from pneumo_ray.config import Config

    cfg = Config()
    cfg.train.epochs = epochs
    cfg.train.warmup_epochs = 0
    cfg.resources.cpus_per_worker = cpus_per_worker
    cfg.resources.workers_per_trial = workers
    params = {"model": model, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": BATCH,
              "class_weighting": "none", "freeze_depth": 0}
    return cfg, params


def epoch_figures(history: list[dict], n_train: int) -> dict:
    """Per-epoch wall time from consecutive epoch starts (so it includes validation, checkpoint and
    report), and training images/s from the steps alone; the first (warm-up) epoch is dropped."""
    starts = [h["epoch_started_at"] for h in history]
    walls = [float(w) for w in np.diff(starts)[1:]]
    speeds = [h["train_images_per_s"] for h in history[1:-1]]
    return {"epoch_s": median(walls), "images_per_s": median(speeds), "epoch_s_all": [round(w, 3) for w in walls],
            "images_per_s_all": [round(s, 1) for s in speeds], "train_images": n_train}


def merge_runs(runs: list[dict]) -> dict:
    """One variant's figures over several runs: medians of the runs' medians, and every epoch."""
    return {"epoch_s": median([r["epoch_s"] for r in runs]), "images_per_s": median([r["images_per_s"] for r in runs]),
            "epoch_s_all": [w for r in runs for w in r["epoch_s_all"]],
            "images_per_s_all": [v for r in runs for v in r["images_per_s_all"]],
            "epoch_s_per_run": [round(r["epoch_s"], 3) for r in runs], "train_images": runs[0]["train_images"]}


def run_plain(model: str, epochs: int, splits) -> dict:
    from pneumo_ray.train import LocalSession, fit

    cfg, params = trial_config(model, epochs, os.cpu_count(), 1)
    with tempfile.TemporaryDirectory() as ckpt:  # it checkpoints every epoch, as the Ray run does
        session = LocalSession(threads=os.cpu_count(), checkpoint_dir=ckpt)
        fit(cfg, params, splits, session)
    return epoch_figures(session.history, len(splits.train_y))


def run_ray(model: str, epochs: int, splits, workers: int) -> dict:
    import ray
    import ray.train

    from pneumo_ray.layout import META_FILE
    from pneumo_ray.torch_trainer import torch_trainer
    from pneumo_ray.trial import scaling_config, train_worker

    cores = os.cpu_count()
    cfg, params = trial_config(model, epochs, cores / workers, workers)
    cfg.resources.gpus_per_worker = 0.0
    with tempfile.TemporaryDirectory() as storage:
        trainer = torch_trainer(  # a sweep's trainer, as Ray Train runs it
            train_worker,
            train_loop_config={"cfg": cfg, "params": params, "splits_ref": ray.put(splits),
                               "diverged_file": None, "started_at": time.time()},
            scaling_config=scaling_config(cfg),
            run_config=ray.train.RunConfig(name="bench", storage_path=storage))
        trainer.fit()
        metas = sorted(os.scandir(os.path.join(storage, "bench")), key=lambda e: e.name)
        history = [json.load(open(os.path.join(e.path, META_FILE)))["metrics"]
                   for e in metas if e.name.startswith("checkpoint_") and e.is_dir()]
    return epoch_figures(history, len(splits.train_y))


# --------------------------------------------------------------------------- the seed-style pipeline


class SeedDataset(torch.utils.data.Dataset):
    """As the seed notebooks (and medmnist's own Dataset) do it: one PIL image per item, then transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def seed_loader(splits, workers: int) -> torch.utils.data.DataLoader:
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomRotation(10), transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    return torch.utils.data.DataLoader(SeedDataset(splits.train_x, splits.train_y, transform), batch_size=BATCH,
                                       shuffle=True, num_workers=workers, drop_last=True)


def run_seed(model_name: str, epochs: int, splits, loader_workers: int) -> dict:
    from pneumo_ray.models import build_model

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    from torchvision import transforms

    model = build_model(model_name, 28)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = seed_loader(splits, loader_workers)
    val_loader = torch.utils.data.DataLoader(SeedDataset(splits.val_x, splits.val_y, transforms.Compose([
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])), batch_size=512, num_workers=loader_workers)
    history = []
    for _ in range(epochs - 1):  # fit() reports E epoch starts for E epochs; here the end time closes the last
        start, seen = time.time(), 0
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        train_seconds = time.time() - start
        model.eval()  # the notebooks validate every epoch too
        with torch.no_grad():
            for x, _ in val_loader:
                model(x).softmax(1)
        history.append({"epoch_started_at": start, "train_images_per_s": seen / train_seconds})
    history.append({"epoch_started_at": time.time()})
    return epoch_figures(history, len(splits.train_y))


def data_pipeline(splits, repeats: int = 3) -> dict:
    """Images/s of producing augmented training batches, no model: batched tensor ops vs PIL per image."""
    from pneumo_ray.augment import train_batch
    from pneumo_ray.config import AugmentConfig

    torch.set_num_threads(os.cpu_count())
    x_all, n = torch.from_numpy(splits.train_x), len(splits.train_y)
    cfg, gen = AugmentConfig(), torch.Generator().manual_seed(0)
    project, seed = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - BATCH + 1, BATCH):
            train_batch(x_all[order[i:i + BATCH]], 0.5, 0.25, cfg, gen)
        project.append((n // BATCH) * BATCH / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in seed_loader(splits, 0):
            pass
        seed.append((n // BATCH) * BATCH / (time.perf_counter() - start))
    return {"project_images_per_s": median(project), "seed_pil_images_per_s": median(seed),
            "ratio": median(project) / median(seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per variant (plus a warm-up)")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N train images")
    parser.add_argument("--seed-loader-workers", type=int, default=0,
                        help="DataLoader workers of the seed pipeline (the notebooks used 0-2)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="plain and ray1 runs, alternating; their ratio is the median over the pairs")
    parser.add_argument("--name", default="epoch_cost")
    args = parser.parse_args()

    import ray

    from pneumo_ray.cluster import start_local_ray
    from pneumo_ray.config import Config

    _, splits, data_kind = data_config(args.max_train)
    epochs = args.epochs + 2  # one warm-up epoch, and one more start time to close the last measured epoch
    gflops = matmul_gflops()
    print(f"[machine] fp32 matmul {gflops:.1f} GFLOP/s on {os.cpu_count()} cores")
    pipeline = data_pipeline(splits)
    print(f"[pipeline] project {pipeline['project_images_per_s']:.0f} img/s, seed PIL "
          f"{pipeline['seed_pil_images_per_s']:.0f} img/s: {pipeline['ratio']:.1f}x")

    def under_ray(run):
        start_local_ray(Config(), log_to_driver=False)  # the Ray a local sweep runs on, dashboard included
        try:
            return run()
        finally:
            ray.shutdown()

    # plain and ray1 alternate, pair by pair, and swap order every pair: this machine drifts by up to
    # ±10% between runs of the same work, more than the 5% the ray1/plain target allows
    paired = {"plain": lambda: run_plain(args.model, epochs, splits),
              "ray1": lambda: under_ray(lambda: run_ray(args.model, epochs, splits, 1))}
    pairs: list[dict] = []
    pair_ratios: list[float] = []
    for i in range(args.pairs):
        pair = {name: paired[name]() for name in (("plain", "ray1") if i % 2 == 0 else ("ray1", "plain"))}
        pairs.append(pair)
        pair_ratios.append(pair["ray1"]["epoch_s"] / pair["plain"]["epoch_s"])
        print(f"[pair {i + 1}] plain {pair['plain']['epoch_s']:.2f} s, ray1 {pair['ray1']['epoch_s']:.2f} s: "
              f"{pair_ratios[-1]:.3f}", flush=True)
    results = {name: merge_runs([p[name] for p in pairs]) for name in paired}
    results["seed"] = run_seed(args.model, epochs, splits, args.seed_loader_workers)
    results["ray2"] = under_ray(lambda: run_ray(args.model, epochs, splits, 2))
    for name in ("plain", "ray1", "ray2", "seed"):
        r = results[name]
        print(f"[{name:5s}] epoch {r['epoch_s']:.2f} s  train {r['images_per_s']:.0f} img/s  (epochs {r['epoch_s_all']})")
    a, c, d = (results[k] for k in ("plain", "ray2", "seed"))
    ratios = {"ray1_over_plain_epoch_time": median(pair_ratios),  # the median pair, as both ran side by side
              "ray2_over_plain_epoch_time": c["epoch_s"] / a["epoch_s"],
              "plain_over_seed_images_per_s": a["images_per_s"] / d["images_per_s"],
              "plain_over_seed_epoch_speed": d["epoch_s"] / a["epoch_s"]}
    for k, v in ratios.items():
        print(f"[ratio] {k} = {v:.3f}")
    write_result(args.name, {"data": data_kind, "model": args.model, "batch_size": BATCH,
                             "measured_epochs": args.epochs, "matmul_gflops": gflops, "data_pipeline": pipeline,
                             "pairs": args.pairs, "ray1_over_plain_pair_ratios": [round(r, 4) for r in pair_ratios],
                             "variants": results, "ratios": ratios,
                             "targets": {"ray1_over_plain_epoch_time<=1.05": ratios["ray1_over_plain_epoch_time"] <= 1.05,
                                         "pipeline_ratio>=3": pipeline["ratio"] >= 3,
                                         "resnet18_images_per_s>=375": a["images_per_s"] >= 375}}, gflops)


if __name__ == "__main__":
    main()
