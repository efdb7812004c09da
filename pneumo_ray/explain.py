"""Grad-CAM heatmaps (the ``grad-cam`` package) for any of the project's convolutional models.

Which layer to explain is found by running the model once: the deepest module whose output is a
feature map at least ``min(7, side // 4)`` pixels across. 7 x 7 is Grad-CAM's usual resolution (ResNet's
last stage at 224 px). At 28 px a ResNet's last stage is 1 x 1, and its map would be a flat square.
The rule works for the seed CNNs and timm CNNs alike, with no per-architecture table. Token models
(ViT) get their patch grid back through a reshape. The MLP has no feature map, and gets no heatmap.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumo_ray.augment import to_float

MIN_CAM_SIDE = 7


def _vit_grid(model: nn.Module) -> tuple[int, int] | None:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return tuple(grid) if grid else None


def cam_layer(model: nn.Module, image_size: int) -> tuple[nn.Module, object] | None:
    """(layer to explain, reshape transform or None), or None when the model has no spatial features."""
    grid = _vit_grid(model)
    if grid is not None:  # ViT: the last block's tokens, less the class/register tokens, as a grid
        prefix = getattr(model, "num_prefix_tokens", 1)

        def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, prefix:].reshape(tokens.shape[0], *grid, tokens.shape[-1]).permute(0, 3, 1, 2)

        return model.blocks[-1], tokens_to_map

    min_side = max(1, min(MIN_CAM_SIDE, image_size // 4))
    sides: list[tuple[nn.Module, int]] = []
    hooks = [m.register_forward_hook(lambda mod, _, out: sides.append((mod, out.shape[-1]))
                                     if isinstance(out, torch.Tensor) and out.ndim == 4 else None)
             for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 1, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    big_enough = [m for m, side in sides if side >= min_side]
    return (big_enough[-1], None) if big_enough else None  # hooks fire in the order the outputs were made


def pneumonia_margin(logits: torch.Tensor) -> torch.Tensor:
    """The Grad-CAM target: logit(pneumonia) - logit(normal), whose sigmoid is the reported probability.
    (The pneumonia logit alone would also credit evidence that raises both logits.)"""
    return logits[..., 1] - logits[..., 0]


def grad_cam(model: nn.Module, images_u8: np.ndarray, mean: float, std: float, normalize: bool,
             batch_size: int = 32) -> np.ndarray | None:
    """N x H x W heatmaps in [0, 1] of what raises the pneumonia probability, at the input's size; None for
    models without a feature map. Batched: gradients of a large model over many images at once would not fit."""
    from pytorch_grad_cam import GradCAM

    layer = cam_layer(model, images_u8.shape[-1])
    if layer is None:
        return None
    images = torch.from_numpy(np.ascontiguousarray(images_u8))
    with GradCAM(model=model, target_layers=[layer[0]], reshape_transform=layer[1]) as cam:
        return np.concatenate([cam(input_tensor=to_float(images[i:i + batch_size], mean, std, normalize),
                                   targets=[pneumonia_margin] * len(images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])


def overlay(image_u8: np.ndarray, heatmap: np.ndarray, side: int | None = None) -> np.ndarray:
    """The grayscale image with the heatmap blended on top, as H x W x 3 uint8 RGB (optionally enlarged)."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(image_u8[..., None], 3, axis=-1).astype(np.float32) / 255.0
    blended = show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.6)
    if side and side != blended.shape[0]:
        blended = np.asarray(Image.fromarray(blended).resize((side, side), Image.BILINEAR))
    return blended
