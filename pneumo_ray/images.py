"""One X-ray image file -> a square uint8 grayscale array: how the folder source and ``predict`` read files, so a
file means the same thing to both."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff"}


def read_gray(path: Path, size: int, resize: str = "stretch") -> np.ndarray:
    """One image file -> size x size uint8 grayscale. A non-square image is stretched (``stretch``), cut to the
    centred square of its short edge (``crop``, as MedMNIST built PneumoniaMNIST), or fitted inside the square
    and padded with black (``pad``, resize-and-pad)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # forces a full decode, so a truncated file fails here, not in training
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16-bit or float images (e.g. exported from DICOM): convert("L") would clip them to white. Stretch
            # the image's own range to 0..255 instead.
            pixels = np.asarray(img, dtype=np.float64)
            low, high = pixels.min(), pixels.max()
            img = Image.fromarray(((pixels - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8))
        img = img.convert("L")
        if resize == "crop" and img.width != img.height:
            # Cut, then resize. Not PIL's ImageOps.fit: its resize reads pixels beyond the crop box for the
            # filter's support, so what lies outside the square bleeds into the edge pixels.
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side))
        elif resize == "pad" and img.width != img.height:
            fitted = img.resize((max(1, round(img.width * size / max(img.size))),
                                 max(1, round(img.height * size / max(img.size)))), Image.BILINEAR)
            square = Image.new("L", (size, size), 0)
            square.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
            return np.asarray(square, dtype=np.uint8)
        return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
