"""``pneumo-ray export``: a leaderboard's model, or its ensemble, as files another program can run without
pneumo-ray, and ``preprocess.json``, which says how to make their input from an image file and what their
output means.

The exported graph (TorchScript or ONNX) is ``Scorer``: it takes what ``predict`` reads from a file (uint8
grayscale N x 1 x S x S, S and the resize rule from preprocess.json) and returns the pneumonia probability per
image. Each member's resize to its own size, its normalisation, flip TTA, its temperature and the ensemble's
mean are inside the graph, so one file is one ``predict`` and only the threshold is applied outside. safetensors
holds weights only: the same Scorer's, rebuilt by ``load_safetensors`` from preprocess.json's members.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pneumo_ray.data import CLASS_NAMES
from pneumo_ray.errors import BadArgument
from pneumo_ray.predict import Member, Predictor, load_predictor

FORMATS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "safetensors": "model.safetensors"}
PREPROCESS_FILE = "preprocess.json"
RESIZE_TEXT = {"stretch": "resize the whole image to S x S (aspect ratio not kept)",
               "crop": "cut the centred square of the short edge, then resize it to S x S (MedMNIST's rule)",
               "pad": "fit the image inside S x S keeping its aspect ratio, then pad with black to S x S"}


class Scorer(nn.Module):
    """uint8 N x 1 x S x S images -> float32 N pneumonia probabilities, as ``Predictor.probabilities``."""

    def __init__(self, members: list[Member], flip_tta: bool):
        super().__init__()
        self.models = nn.ModuleList(m.model for m in members)
        self.size = max(int(m.meta["image_size"]) for m in members)
        self.flip_tta = flip_tta
        # Plain Python numbers: tracing and ONNX export keep them as constants of the graph.
        self.settings = [(int(m.meta["image_size"]), float(m.meta["mean"]), float(m.meta["std"]),
                          bool(m.meta["normalize"]), float(m.temperature)) for m in members]
        self.eval()  # inference only: BatchNorm's running statistics, no dropout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        probabilities = []
        for model, (size, mean, std, normalize, temperature) in zip(self.models, self.settings):
            xm = x
            if size != self.size:  # as augment.resize_images: antialiased bilinear, back to whole grey levels
                xm = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                xm = xm.round().clamp(0, 255)
            xm = xm / 255.0
            if normalize:
                xm = (xm - mean) / std
            logits = model(xm)
            if self.flip_tta:
                logits = (logits + model(xm.flip(-1))) / 2
            probabilities.append(torch.sigmoid((logits[:, 1] - logits[:, 0]) / temperature))
        return torch.stack(probabilities).mean(0)


def preprocess_spec(predictor: Predictor, fmt: str, source: dict) -> dict:
    size = predictor.image_size
    return {
        "format": fmt, "file": FORMATS[fmt], "source": source, "description": predictor.description,
        "input": {"name": "image", "dtype": "uint8", "shape": ["N", 1, size, size],
                  "make_from_file": ["open the file; 16-bit or float images: stretch their own min..max to 0..255",
                                     "convert to 8-bit grayscale (PIL's convert('L'))",
                                     f"{RESIZE_TEXT[predictor.resize]} with bilinear filtering (PIL's BILINEAR)"]},
        "size": size, "resize": predictor.resize,
        "output": {"name": "p_pneumonia", "dtype": "float32", "shape": ["N"],
                   "meaning": "pneumonia probability; each member's resize, normalisation, flip TTA and temperature "
                              "and the members' mean are inside the model"},
        "threshold": predictor.threshold, "label_rule": f"{CLASS_NAMES[1]} if p_pneumonia >= threshold, else "
                                                        f"{CLASS_NAMES[0]}",
        "class_names": list(CLASS_NAMES), "flip_tta": predictor.flip_tta,
        "combine": "mean of the members' probabilities" if len(predictor.members) > 1 else "one member",
        "members": [{"model": m.meta["model"], "arch": m.meta.get("arch") or m.meta["model"],
                     "image_size": int(m.meta["image_size"]), "normalize": bool(m.meta["normalize"]),
                     "mean": float(m.meta["mean"]), "std": float(m.meta["std"]), "temperature": float(m.temperature),
                     "head_dropout": m.meta.get("head_dropout", 0.0), "head_hidden": m.meta.get("head_hidden"),
                     "fold": m.meta.get("fold")} for m in predictor.members],
    }


def write(scorer: Scorer, fmt: str, out_dir: Path) -> Path:
    path = out_dir / FORMATS[fmt]
    example = torch.zeros(2, 1, scorer.size, scorer.size, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated upstream in favour of torch.export, yet TorchScript is what C++ and older
        # serving stacks load; ONNX is the export to prefer where it is an option.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        if fmt == "torchscript":
            torch.jit.trace(scorer, example).save(str(path))
        elif fmt == "onnx":
            torch.onnx.export(scorer, (example,), str(path), input_names=["image"], output_names=["p_pneumonia"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                              verbose=False)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(path))
    return path


def load_safetensors(out_dir: Path) -> Scorer:
    """The Scorer of a safetensors export, rebuilt from preprocess.json's members (needs pneumo-ray's models)."""
    from safetensors.torch import load_file

    from pneumo_ray.models import build_model

    spec = json.loads((out_dir / PREPROCESS_FILE).read_text())
    members = [Member(build_model(m["arch"], m["image_size"], head_dropout=m["head_dropout"] or 0.0,
                                  head_hidden=m["head_hidden"]), m, m["temperature"]) for m in spec["members"]]
    scorer = Scorer(members, spec["flip_tta"])
    scorer.load_state_dict(load_file(str(out_dir / FORMATS["safetensors"])))
    return scorer


def export(exp_dir: Path, fmt: str, out_dir: Path, rank: int = 1, ensemble: bool = False) -> tuple[Path, Path]:
    """Write the model and preprocess.json into ``out_dir`` (new, or empty: nothing is overwritten)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadArgument(f"--out {out_dir}: exists and is not an empty folder; choose a new folder (nothing was "
                          "overwritten)")
    if fmt == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError:
            raise BadArgument("--format onnx needs onnx and onnxscript: pip install 'pneumo-ray[export]'") from None
    predictor = load_predictor(exp_dir, rank, ensemble)
    scorer = Scorer(predictor.members, predictor.flip_tta)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = write(scorer, fmt, out_dir)
    source = {"experiment": str(exp_dir), "rank": None if ensemble else rank, "ensemble": ensemble}
    spec_path = out_dir / PREPROCESS_FILE
    spec_path.write_text(json.dumps(preprocess_spec(predictor, fmt, source), indent=1))
    return model_path, spec_path
