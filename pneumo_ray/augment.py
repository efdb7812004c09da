"""Batched tensor augmentation and normalisation.

The seed notebooks ran PIL transforms image by image in DataLoader workers. Here a
whole uint8 batch becomes float once, and rotation, shear, zoom, crop and flip are a
single ``affine_grid`` + ``grid_sample`` over the batch: one kernel call, no Python loop.
Brightness and contrast jitter follow on the [0, 1] images, then the standardisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pneumo_ray.config import AugmentConfig

# augment.normalize -> (mean, std), except ``train``, which is measured on the train split. ImageNet's are the means
# of its RGB mean and std: the images are gray, and a pretrained timm model takes them through a 1-channel stem
# whose weights are its RGB stem's summed, so one mean and std stand for the three.
FIXED_NORMALIZATION = {"imagenet": (0.449, 0.226), "half": (0.5, 0.5), "none": (0.0, 1.0)}


def normalization(rule: str, splits) -> tuple[float, float]:
    """The (mean, std) images are standardised with under augment.normalize ``rule``."""
    return splits.train_mean_std() if rule == "train" else FIXED_NORMALIZATION[rule]


def resize_images(images_u8, size: int):
    """uint8 N x H x W -> N x size x size, bilinear with antialiasing (as PIL resizes), in chunks so a large
    split never needs a float copy of itself at once. The same images as numpy, at another size."""
    import numpy as np

    if images_u8.shape[-1] == size:
        return images_u8
    out = np.empty((len(images_u8), size, size), np.uint8)
    for i in range(0, len(images_u8), 256):
        x = torch.from_numpy(np.ascontiguousarray(images_u8[i:i + 256])).unsqueeze(1).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + 256] = x.round_().clamp_(0, 255).squeeze(1).to(torch.uint8).numpy()
    return out


def resized_splits(splits, size: int):
    """``splits`` at ``size`` px, for a search.model entry with its own size (models.<label>.size): the sweep
    loads its data once, at the largest size any model wants, and each model's images are made from those.
    Kept on the instance, so a process resizes each size once."""
    import dataclasses

    if splits.image_size == size:
        return splits
    cache = splits.__dict__.setdefault("_resized", {})
    if size not in cache:
        cache[size] = dataclasses.replace(splits, **{f"{name}_x": resize_images(getattr(splits, f"{name}_x"), size)
                                                     for name in ("train", "val", "test")})
    return cache[size]


def to_float(images_u8: torch.Tensor, mean: float, std: float, normalize: bool) -> torch.Tensor:
    """uint8 B x H x W -> float B x 1 x H x W, scaled to [0, 1] and optionally standardised."""
    x = images_u8.unsqueeze(1).float().div_(255.0)
    if normalize:
        x = x.sub_(mean).div_(std)
    return x


def train_batch(images_u8: torch.Tensor, mean: float, std: float, cfg: AugmentConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A training batch: uint8 -> [0, 1] float, augmented there (jitter is defined on [0, 1] images, as in
    torchvision and Keras), then standardised."""
    return augment_batch(to_float(images_u8, mean, std, normalize=False), cfg, generator).sub_(mean).div_(std)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image: rotation (±rotation_deg), shear (±shear_deg), zoom (x 1 ± zoom), a pad/crop shift or resized
    crop, horizontal flip; then brightness and contrast jitter. ``x`` holds [0, 1] images."""
    n, _, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731 - generator stays on CPU

    # Drawn in this order, and each only when it is on, so that a config without the later ones draws the
    # same numbers (and so trains the same) as before they existed.
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
    shear = torch.tan((rand(n) * 2 - 1) * math.radians(cfg.shear_deg)) if cfg.shear_deg else torch.zeros(n)
    if cfg.zoom:  # the grid samples a window (zoom x side): below 1 zooms in, above 1 out (Keras' zoom_range)
        scale = scale * (1 - cfg.zoom + 2 * cfg.zoom * rand(n))

    if cfg.rotation_deg == 0 and cfg.crop == "none" and not cfg.shear_deg and not cfg.zoom:
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device) < 0, x.flip(-1), x)  # no resampling, no blur
    else:
        # rotation @ shear @ scale @ flip, written out: with no shear it is the plain rotated, scaled flip.
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([
            torch.stack([cos * flip, cos * shear - sin, shift[:, 0]], dim=1),
            torch.stack([sin * flip, sin * shear + cos, shift[:, 1]], dim=1),
        ], dim=1).to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Fill with the image's own background level rather than 0 (after normalisation, 0 is not black).
        background = x.amin(dim=(1, 2, 3), keepdim=True)
        x = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background
    if cfg.brightness:  # torchvision's adjust_brightness: scale by a factor in 1 ± brightness
        x = (x * (1 - cfg.brightness + 2 * cfg.brightness * rand(n)).view(-1, 1, 1, 1).to(x.device)).clamp_(0, 1)
    if cfg.contrast:  # torchvision's adjust_contrast: blend with the image's mean gray, factor in 1 ± contrast
        factor = (1 - cfg.contrast + 2 * cfg.contrast * rand(n)).view(-1, 1, 1, 1).to(x.device)
        gray = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (gray + factor * (x - gray)).clamp_(0, 1)
    return x
