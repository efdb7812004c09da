"""How long a sweep waits for its images: the Kaggle chest X-ray folder decoded from its JPEGs every time
(the baseline, and what a sweep did before data.cache_dir), against the same folder read from the cache.

    python benchmarks/folder_cache.py                      # 64 px, ../shared/data/chest_xray
    python benchmarks/folder_cache.py --sizes 64 128 224 --repeats 3

Each size: one cold load (decode, then write the cache), then ``--repeats`` loads with the cache and as
many without it, alternating; medians are reported. The arrays read back must equal the decoded ones.
Writes benchmarks/results/folder_cache.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, matmul_gflops, median, write_result


def timed_load(cfg) -> tuple[float, object]:
    from pneumo_ray.data import load_splits

    started = time.perf_counter()
    splits = load_splits(cfg, seed=0)
    return time.perf_counter() - started, splits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=SHARED_DATA / "chest_xray")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (args.folder / "train").is_dir():
        print(f"[skip] no Kaggle chest X-ray folder at {args.folder}: nothing to measure (pass --folder DIR)")
        return 0
    import numpy as np

    from pneumo_ray.config import DataConfig

    matmul_at_start = matmul_gflops()
    sizes = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="pneumo-cache-bench-") as cache:
            cached = DataConfig(source="folder", path=str(args.folder), size=size, cache_dir=cache)
            uncached = DataConfig(source="folder", path=str(args.folder), size=size, cache_dir=None)
            cold_s, first = timed_load(cached)
            warm, decode = [], []
            for _ in range(args.repeats):
                seconds, again = timed_load(cached)
                warm.append(seconds)
                seconds, fresh = timed_load(uncached)
                decode.append(seconds)
                for split in ("train", "val", "test"):
                    assert np.array_equal(again.split(split)[0], fresh.split(split)[0]), split
            cache_mb = sum(p.stat().st_size for p in Path(cache).rglob("*.npz")) / 2**20
        sizes[str(size)] = {"images": int(sum(len(first.split(s)[1]) for s in ("train", "val", "test"))),
                            "first_load_with_cache_write_s": round(cold_s, 2),
                            "decode_s_median": round(median(decode), 2), "cache_read_s_median": round(median(warm), 2),
                            "speedup": round(median(decode) / median(warm), 1), "cache_mb": round(cache_mb, 1),
                            "decode_s_all": [round(s, 2) for s in decode], "cache_read_s_all": [round(s, 2) for s in warm]}
        print(f"[{size}px] {sizes[str(size)]['images']} images: decode {median(decode):.2f} s, from the cache "
              f"{median(warm):.2f} s ({median(decode) / median(warm):.1f}x), first load {cold_s:.2f} s, "
              f"cache {cache_mb:.1f} MB")
    write_result("folder_cache", {"data": f"Kaggle chest X-ray folder {args.folder}", "repeats": args.repeats,
                                  "sizes": sizes}, matmul_at_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
