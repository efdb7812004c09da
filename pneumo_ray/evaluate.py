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
