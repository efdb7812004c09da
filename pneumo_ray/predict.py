"""``pneumo-ray predict``: pneumonia probabilities for image files, from an experiment's kept models.

A file is read as the experiment's training images were made: grayscale, then resized to the training
side with bilinear filtering. A MedMNIST (or MedMNIST-format npz) experiment first cuts the centred
square, as MedMNIST did; a folder experiment follows its data.resize (stretch, crop, or pad). It is scored by one
ranked model or by the ensemble and labelled at the threshold the leaderboard chose on val.
Temperature and flip TTA follow the leaderboard too, so a probability here means what it meant there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from pneumo_ray.augment import resize_images
from pneumo_ray.checkpoints import load_ranked
from pneumo_ray.data import CLASS_NAMES
from pneumo_ray.errors import BadArgument
from pneumo_ray.evaluate import predict_margin
from pneumo_ray.images import read_gray
from pneumo_ray.layout import EVALUATION_FILE, LEADERBOARD_JSON
from pneumo_ray.leaderboard import is_ensemble, trial_rows


@dataclass
class Member:
    model: torch.nn.Module
    meta: dict
    temperature: float


@dataclass
class Predictor:
    members: list[Member]
    threshold: float
    flip_tta: bool
    description: str
    resize: str  # how the training images were made square (images.read_gray): see the module docstring

    @property
    def image_size(self) -> int:
        """Files are read at the largest size a member trained at; a smaller member gets them resized, as the
        sweep made its images (models.<label>.size)."""
        return max(int(m.meta["image_size"]) for m in self.members)

    def probabilities(self, images_u8: np.ndarray) -> np.ndarray:
        """The pneumonia probability per image: a model's, or the ensemble's mean of its members'."""
        return np.mean([expit(predict_margin(m.model, resize_images(images_u8, m.meta["image_size"]), m.meta["mean"],
                                             m.meta["std"], m.meta["normalize"], torch.device("cpu"),
                                             flip_tta=self.flip_tta) / m.temperature)
                        for m in self.members], axis=0)

    def heatmaps(self, images_u8: np.ndarray) -> np.ndarray | None:
        """Grad-CAM for pneumonia, averaged over the members that have a feature map (None if none has), each
        computed at its member's size and brought to the images' size."""
        from pneumo_ray.explain import grad_cam

        side = images_u8.shape[-1]
        maps = [grad_cam(m.model, resize_images(images_u8, m.meta["image_size"]), m.meta["mean"], m.meta["std"],
                         m.meta["normalize"]) for m in self.members]
        maps = [torch.nn.functional.interpolate(torch.from_numpy(h).float()[:, None], size=(side, side),
                                                mode="bilinear", align_corners=False)[:, 0].numpy()
                for h in maps if h is not None]
        return np.mean(maps, axis=0) if maps else None


def load_predictor(exp_dir: Path, rank: int = 1, ensemble: bool = False) -> Predictor:
    board = exp_dir / LEADERBOARD_JSON
    if not board.is_file() or not (exp_dir / EVALUATION_FILE).is_file():
        raise BadArgument(f"{exp_dir}: no finished leaderboard here; pass the folder of a finished sweep "
                          "(or run `pneumo-ray report` on it first)")
    rows = json.loads(board.read_text())
    settings = json.loads((exp_dir / EVALUATION_FILE).read_text())["settings"]
    ranked = trial_rows(rows)
    if ensemble:
        chosen = next((r for r in rows if is_ensemble(r)), None)
        if chosen is None:
            raise BadArgument(f"--ensemble: {exp_dir} has no ensemble row (fewer than 2 kept trials, or "
                              "leaderboard.ensemble: false); use --rank N")
        members, description = ranked, f"ensemble of the top {len(ranked)}"
    else:
        if not 1 <= rank <= len(ranked):
            raise BadArgument(f"--rank {rank}: the leaderboard has ranks 1..{len(ranked)}")
        chosen = ranked[rank - 1]
        members, description = [chosen], f"rank {rank} ({chosen['model']}, trial {chosen['trial_id']})"
    loaded = []
    for row in members:  # a cross-validated row is its fold-models, each weighted as one member
        loaded.extend(Member(model, meta, row.get("temperature") or 1.0) for model, meta in load_ranked(exp_dir, row))
    return Predictor(loaded, chosen["threshold"], settings.get("flip_tta", False),
                     f"{description}, threshold {chosen['threshold']:.3f} ({settings['threshold_rule']} on val)",
                     resize=resize_rule(settings))


def resize_rule(settings: dict) -> str:
    """How the training images were made square (images.read_gray), from the leaderboard's settings. Experiments
    scored before data.resize existed name only their source: MedMNIST's crop, else the folder's stretch."""
    return settings.get("resize") or ("crop" if settings.get("data_source") in ("medmnist", "npz") else "stretch")


def read_images(paths: list[str], size: int, resize: str) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """(path, H x W uint8) for each readable file, and a one-line error for each other one."""
    readable, errors = [], []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            errors.append(f"{path}: file not found")
            continue
        if p.stat().st_size == 0:
            errors.append(f"{path}: empty file (0 bytes); pass a PNG or JPEG image")
            continue
        try:
            readable.append((path, read_gray(p, size, resize)))
        except Exception as err:  # PIL raises several types for truncated or foreign files
            errors.append(f"{path}: not a readable image ({type(err).__name__}: {str(err)[:120]}); "
                          "pass a PNG or JPEG image")
    return readable, errors


def cam_path(out_dir: Path, source: str) -> Path:
    """``<stem>_cam.png`` in out_dir, numbered rather than overwriting an existing file."""
    stem, n = Path(source).stem, 1
    path = out_dir / f"{stem}_cam.png"
    while path.exists():
        n += 1
        path = out_dir / f"{stem}_cam_{n}.png"
    return path


def run(exp_dir: Path, paths: list[str], rank: int = 1, ensemble: bool = False,
        cam_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """Lines to print (a header, then path / probability / label per image) and per-file errors."""
    from PIL import Image

    predictor = load_predictor(exp_dir, rank, ensemble)
    readable, errors = read_images(paths, predictor.image_size, predictor.resize)
    lines = [f"# {predictor.description}", "image\tp_pneumonia\tlabel"]
    if not readable:
        return lines, errors
    images = np.stack([img for _, img in readable])
    probs = predictor.probabilities(images)
    lines += [f"{path}\t{p:.4f}\t{CLASS_NAMES[int(p >= predictor.threshold)]}" for (path, _), p in zip(readable, probs)]
    if cam_dir is not None:
        from pneumo_ray.explain import overlay

        heat = predictor.heatmaps(images)
        if heat is None:
            errors.append(f"--cam: {predictor.description} has no convolutional feature map (e.g. mlp); no Grad-CAM")
        else:
            cam_dir.mkdir(parents=True, exist_ok=True)
            for (path, image), h in zip(readable, heat):
                Image.fromarray(overlay(image, h, side=max(224, image.shape[0]))).save(cam_path(cam_dir, path))
    return lines, errors
