"""Inference over uint8 image arrays, and the metrics that go with it.

The training loop (val, every epoch) and the leaderboard (test, once) both call
``evaluate``, so a number on the leaderboard means what it meant during the sweep.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pneumo_ray.augment import to_float
from pneumo_ray.config import Config
from pneumo_ray.data import Splits
from pneumo_ray.metrics import binary_metrics


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8: np.ndarray, mean: float, std: float, normalize: bool,
                   device: torch.device, batch_size: int = 512) -> torch.Tensor:
    was_training = model.training
    model.eval()
    images = torch.from_numpy(np.ascontiguousarray(images_u8))
    out = [model(to_float(images[i:i + batch_size].to(device), mean, std, normalize)).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, images_u8: np.ndarray, labels: np.ndarray, mean: float, std: float,
             normalize: bool, device: torch.device, prefix: str, batch_size: int = 512
             ) -> tuple[dict[str, float], np.ndarray]:
    """Metrics (loss + binary metrics, keys prefixed) and the pneumonia probabilities."""
    logits = predict_logits(model, images_u8, mean, std, normalize, device, batch_size)
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    prob = torch.softmax(logits, dim=1)[:, 1].numpy()
    metrics = binary_metrics(labels, prob, prefix=prefix)
    metrics[f"{prefix}loss"] = float(F.cross_entropy(logits, target))
    return metrics, prob


def predict_margin(model: nn.Module, images_u8: np.ndarray, mean: float, std: float, normalize: bool,
                   device: torch.device, batch_size: int = 512, flip_tta: bool = False) -> np.ndarray:
    """logit(pneumonia) - logit(normal) per image, so that sigmoid(margin) is the pneumonia probability and
    sigmoid(margin / T) its temperature-scaled version. ``flip_tta``: the mean with the mirrored image's."""
    logits = predict_logits(model, images_u8, mean, std, normalize, device, batch_size)
    if flip_tta:
        logits = (logits + predict_logits(model, images_u8[..., ::-1], mean, std, normalize, device, batch_size)) / 2
    return (logits[:, 1] - logits[:, 0]).double().numpy()


def selection_labels(splits: Splits) -> np.ndarray:
    """The labels that the threshold and temperature are chosen on: val's, or under CV the whole pool's,
    each image predicted out of fold."""
    return splits.val_y if splits.folds is None else splits.pool()[1]


def member_margins(members: list[tuple[torch.nn.Module, dict]], splits: Splits, cfg: Config,
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """A ranked trial's logit margins: on val (under CV: each pooled image by the fold-model that did not
    train on it), and on test by each of its models; on the images at the size the trial trained at."""
    from pneumo_ray.augment import resized_splits

    splits = resized_splits(splits, members[0][1]["image_size"])

    def margins(model, meta, images):
        return predict_margin(model, images, meta["mean"], meta["std"], meta["normalize"], torch.device("cpu"),
                              cfg.train.eval_batch_size, cfg.leaderboard.flip_tta)

    tests = [margins(model, meta, splits.test_x) for model, meta in members]
    if splits.folds is None:
        model, meta = members[0]
        return margins(model, meta, splits.val_x), tests
    pool_x, _ = splits.pool()
    out_of_fold = np.full(len(pool_x), np.nan)
    for model, meta in members:
        held_out = splits.folds == meta["fold"]
        out_of_fold[held_out] = margins(model, meta, pool_x[held_out])
    return out_of_fold, tests


def kept_probabilities(members: list[tuple[nn.Module, dict]], splits: Splits, cfg: Config,
                       ) -> tuple[float, np.ndarray, np.ndarray]:
    """A kept trial's pneumonia probabilities: (temperature, on val, on test). Val is out of fold under CV;
    the temperature is fitted on val when leaderboard.temperature_scaling asks, else 1. A cross-validated
    trial's test probability is the mean of its fold-models' (no refit on the pool)."""
    from scipy.special import expit

    from pneumo_ray.metrics import fit_temperature

    val_margins, test_margins = member_margins(members, splits, cfg)
    t = fit_temperature(selection_labels(splits), val_margins) if cfg.leaderboard.temperature_scaling else 1.0
    return t, expit(val_margins / t), np.mean([expit(m / t) for m in test_margins], axis=0)
