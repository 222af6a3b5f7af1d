"""uint8 images from a dataset -> a model's `pixel_values`, through its image processor
(`checkpoints.preprocess.ImageProcessor`, which alone rescales and normalises)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def pixel_values(images: np.ndarray, processor) -> np.ndarray:
    """uint8 `[n, H, W, C]` -> `[n, C, H, W]` for `processor`'s model: normalised directly at the
    model's size and channels, else resized and converted by the processor (CIFAR into a 224 px
    model, colour into greyscale)."""
    if images.shape[1:3] == tuple(processor.size) and images.shape[3] == processor.channels:
        return processor.normalize(images)
    pil = [Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im) for im in images]
    return processor(pil)["pixel_values"]
