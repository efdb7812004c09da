"""Shared by the benchmarks: which data, the median, machine facts, and the JSON results file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("PNEUMO_BENCH_RESULTS", ROOT / "benchmarks" / "results"))  # tests write elsewhere
SHARED_DATA = ROOT.parent / "shared" / "data"  # where the build machine keeps pneumoniamnist.npz
sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` from a clone works without installing the project


def data_config(max_train: int | None = None):
    """The real 28 px PneumoniaMNIST when its file is present, else synthetic data of the same shape.
    Returns (DataConfig, splits, description)."""
    from pneumo_ray.config import DataConfig
    from pneumo_ray.data import load_splits

    root = Path(os.environ.get("PNEUMO_RAY_DATA", SHARED_DATA))
    if (root / "pneumoniamnist.npz").is_file():
        cfg = DataConfig(source="medmnist", size=28, root=str(root))
        kind = f"real PneumoniaMNIST 28px ({root / 'pneumoniamnist.npz'})"
    else:
        cfg = DataConfig(source="synthetic", size=28, synthetic_train=4708, synthetic_val=524, synthetic_test=624)
        kind = f"synthetic 28px, same split sizes as PneumoniaMNIST (no pneumoniamnist.npz in {root})"
    splits = load_splits(cfg)
    if max_train and len(splits.train_y) > max_train:
        splits.train_x, splits.train_y = splits.train_x[:max_train], splits.train_y[:max_train]
        kind += f", first {max_train} train images"
    print(f"[data] {kind}")
    return cfg, splits, kind


def median(values) -> float:
    return float(statistics.median(values))


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate on all cores (the bound the ResNet-18 target is stated against)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        times.append((time.perf_counter() - start) / 10)
    return 2 * n ** 3 / median(times) / 1e9


def write_result(name: str, result: dict, matmul_at_start: float) -> Path:
    """Writes <name>.json with the machine's facts. This machine's speed wanders by up to 1.7x within hours,
    so the matmul rate at the benchmark's start and at its end tell a run from a slow hour apart."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    speed = {"matmul_gflops_at_start": round(matmul_at_start, 1), "matmul_gflops_at_end": round(matmul_gflops(), 1)}
    result = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {**machine(), **speed}, **result}
    path.write_text(json.dumps(result, indent=1))
    print(f"[result] {path}")
    return path
