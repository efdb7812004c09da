"""Export round-trip on a finished experiment: its test images written as PNG files, read back only as the export's
preprocess.json says (PIL, no pneumo-ray), scored by each exported format in its own runtime, and compared with
``predict``'s probabilities on the same images.

    python benchmarks/export_roundtrip.py results/default

Needs the experiment's data where its pneumo_config.yaml says, and `pip install -e '.[export]'`. Prints one line
per export and writes benchmarks/results/export_roundtrip.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import matmul_gflops, write_result
from PIL import Image

from pneumo_ray import config, export
from pneumo_ray.predict import load_predictor
from pneumo_ray.sweep import load_sweep_splits

EXPORTS = (("onnx", {"rank": 1}), ("onnx", {"ensemble": True}), ("torchscript", {"ensemble": True}),
           ("safetensors", {"rank": 1}))


def read_as_specified(path: Path, spec: dict) -> np.ndarray:
    """preprocess.json's input steps, in PIL (8-bit files: the 16-bit stretch does not arise)."""
    image, size = Image.open(path).convert("L"), spec["size"]
    if spec["resize"] == "crop":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif spec["resize"] == "pad":
        scale = size / max(image.size)
        fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
        square = Image.new("L", (size, size), 0)
        square.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
        return np.asarray(square)
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def run_exported(out_dir: Path, spec: dict, images: np.ndarray) -> np.ndarray:
    import torch

    batch = np.ascontiguousarray(images[:, None])
    if spec["format"] == "onnx":
        import onnxruntime

        return onnxruntime.InferenceSession(str(out_dir / spec["file"])).run(["p_pneumonia"], {"image": batch})[0]
    scorer = torch.jit.load(str(out_dir / spec["file"])) if spec["format"] == "torchscript" else \
        export.load_safetensors(out_dir)
    with torch.no_grad():
        return scorer(torch.from_numpy(batch)).numpy()


def main(exp: Path) -> None:
    speed_at_start = matmul_gflops()
    cfg = config.loads((exp / "pneumo_config.yaml").read_text(), str(exp / "pneumo_config.yaml"))
    splits = load_sweep_splits(cfg)
    work = Path(tempfile.mkdtemp(prefix="pneumo-export-"))
    paths = []
    for i, image in enumerate(splits.test_x):
        paths.append(work / f"test_{i:04d}.png")
        Image.fromarray(image).save(paths[-1])
    rows = []
    for fmt, options in EXPORTS:
        out = work / f"{fmt}_{'ensemble' if options.get('ensemble') else 'rank1'}"
        started = time.perf_counter()
        model, spec_path = export.export(exp, fmt, out, **options)
        seconds = time.perf_counter() - started
        spec = json.loads(spec_path.read_text())
        images = np.stack([read_as_specified(p, spec) for p in paths])
        expected = load_predictor(exp, **options).probabilities(images)
        got = run_exported(out, spec, images)
        labels, reference = got >= spec["threshold"], expected >= spec["threshold"]
        row = {"format": fmt, "model": "ensemble" if options.get("ensemble") else "rank 1",
               "members": len(spec["members"]), "max_abs_diff": float(np.abs(got - expected).max()),
               "labels_equal": int((labels == reference).sum()), "images": len(paths),
               "test_accuracy": float((labels.astype(int) == splits.test_y).mean()),
               "file_mb": round(model.stat().st_size / 2**20, 2), "export_s": round(seconds, 1)}
        rows.append(row)
        print(f"{fmt:12s} {row['model']:9s} members {row['members']}  max |exported - predict| "
              f"{row['max_abs_diff']:.1e}  labels equal {row['labels_equal']}/{row['images']}  test accuracy "
              f"{row['test_accuracy']:.4f}  {row['file_mb']} MB  export {row['export_s']} s")
    write_result("export_roundtrip", {"experiment": str(exp), "data": splits.summary(), "exports": rows},
                 speed_at_start)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "leaderboard.json").is_file():
        sys.exit("usage: python benchmarks/export_roundtrip.py EXPERIMENT  (the folder of a finished sweep)")
    main(Path(sys.argv[1]).resolve())
