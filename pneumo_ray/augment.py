"""Batched tensor augmentation and normalisation.

The seed notebooks ran PIL transforms image by image in DataLoader workers. Here a
whole uint8 batch becomes float once, and rotation, crop and flip are a single
``affine_grid`` + ``grid_sample`` over the batch: one kernel call, no Python loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pneumo_ray.config import AugmentConfig


def to_float(images_u8: torch.Tensor, mean: float, std: float, normalize: bool) -> torch.Tensor:
    """uint8 B x H x W -> float B x 1 x H x W, scaled to [0, 1] and optionally standardised."""
    x = images_u8.unsqueeze(1).float().div_(255.0)
    if normalize:
        x = x.sub_(mean).div_(std)
    return x


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random rotation (±rotation_deg), pad/crop shift or resized crop, and horizontal flip, per image."""
    n, _, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731 - generator stays on CPU

    angle = (rand(n) * 2 - 1) * math.radians(cfg.rotation_deg)
    scale = torch.ones(n)
    shift = torch.zeros(n, 2)
    if cfg.crop == "pad":
        # Zero-pad by p pixels then crop back == shift by up to p pixels; in grid units that is 2p/size.
        shift = (rand(n, 2) * 2 - 1) * torch.tensor([2 * cfg.crop_padding / w, 2 * cfg.crop_padding / h])
    elif cfg.crop == "resized":
        scale = cfg.crop_scale + (1 - cfg.crop_scale) * rand(n)  # crop a (scale x side) window, resize back
        shift = (rand(n, 2) * 2 - 1) * (1 - scale)[:, None]
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n)

    if cfg.rotation_deg == 0 and cfg.crop == "none":  # flip only: no resampling, no blur
        return torch.where(flip.view(-1, 1, 1, 1).to(x.device) < 0, x.flip(-1), x)

    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
        torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
    ], dim=1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Pad with the image's own background level rather than 0, which after normalisation is not black.
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background
