"""The extra inputs the upsampling and inpainting models train on, made by the data pipeline from each batch,
and the data module's check of the low-res size against the model's kind (:func:`check_low_res_size`).

**Low-resolution input** (``model.kind: upsample`` / ``upsample_inpaint``): :func:`downsample` is the
reference implementation's: ADM's ``super_res_train.py`` (which GLIDE's upsampler follows) makes
``low_res`` with ``F.interpolate(large_batch, small_size, mode="area")`` from the training image at the
model's size, i.e. the mean of each ``factor x factor`` block of the full image (no crop). GLIDE
feeds its upsampler the base model's samples rounded to 8 bits; the training input here is not
rounded, as ADM's is not.

**Inpainting masks** (``model.kind: inpaint`` / ``upsample_inpaint``): :func:`random_masks` draws one
mask per image, 1 where the pixel is known and 0 where it is erased (glide-text2im's
``inpaint_mask``; the model sees ``image * mask`` and ``mask``). The mix, in units of the image side S:

- with probability :data:`RECTANGLE_PROB` (0.5): 1 to 3 axis-aligned rectangles, each side uniform in
  [0.15 S, 0.6 S], placed uniformly inside the image;
- otherwise free-form strokes: 1 to 4 polylines of 2 to 5 segments, each segment 0.15 S to 0.5 S long
  in a uniformly random direction, drawn with width 0.05 S to 0.15 S (round joints);
- with probability :data:`FULL_ERASE_PROB` (0.05) the whole image is erased (the model then
  generates from the caption alone, as the base model does).

The erased area is thus from a few percent of the image to all of it (about a quarter on average).
Masks come from a NumPy generator the caller seeds (the pipeline seeds it from the stream's position,
so a resumed stream draws the masks an uninterrupted one would have).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["FULL_ERASE_PROB", "RECTANGLE_PROB", "check_low_res_size", "downsample", "random_mask", "random_masks"]

RECTANGLE_PROB = 0.5
"""Probability that a mask is made of rectangles (else of free-form strokes)."""
FULL_ERASE_PROB = 0.05
"""Probability that the whole image is erased."""


def check_low_res_size(model_kind: str, low_res_size: int | None, image_size: int) -> None:
    """Check ``low_res_size`` (the side in pixels of the low-res input) against the model's kind and
    ``image_size``: required by the upsampling kinds (``upsample``, ``upsample_inpaint``), refused for the
    others, strictly between 0 and ``image_size``.

    Raises:
        ValueError: a ``low_res_size`` that does not fit, naming the fix.
    """
    upsampling = model_kind.startswith("upsample")
    if upsampling and low_res_size is None:
        raise ValueError(f"data.low_res_size is required for model.kind {model_kind!r}: the side of the "
                         f"low-resolution input (e.g. {image_size // 4} for a 4x upsampler; GLIDE: 64 -> 256)")
    if not upsampling and low_res_size is not None:
        raise ValueError(f"data.low_res_size is set ({low_res_size}) but model.kind {model_kind!r} takes no "
                         f"low-resolution input: remove it, or use model.kind upsample / upsample_inpaint")
    if low_res_size is not None and not 0 < low_res_size < image_size:
        raise ValueError(f"data.low_res_size must be between 1 and the model's image_size {image_size} "
                         f"(exclusive), got {low_res_size}")


def downsample(images: Tensor, size: int) -> Tensor:
    """ADM's low-resolution input: ``images`` ``[B, C, S, S]`` area-averaged to ``[B, C, size, size]``
    (``F.interpolate(mode="area")``: the mean of each block when ``size`` divides S). Raises
    ``ValueError`` when ``size`` is not smaller than S."""
    if not 0 < size < images.shape[-1]:
        raise ValueError(f"low_res_size must be between 1 and the image size {images.shape[-1]} (exclusive), "
                         f"got {size}")
    return F.interpolate(images, size=(size, size), mode="area")


def random_mask(size: int, rng: np.random.Generator) -> Tensor:
    """One float mask ``[1, size, size]``: 1 = known pixel, 0 = erased (the mix of the module docstring)."""
    if rng.random() < FULL_ERASE_PROB:
        return torch.zeros(1, size, size)
    canvas = Image.new("L", (size, size), 0)  # 255 where erased
    draw = ImageDraw.Draw(canvas)
    if rng.random() < RECTANGLE_PROB:
        for _ in range(rng.integers(1, 4)):
            w, h = (max(1, round(size * rng.uniform(0.15, 0.6))) for _ in range(2))
            x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
            draw.rectangle([int(x0), int(y0), int(x0 + w - 1), int(y0 + h - 1)], fill=255)
    else:
        for _ in range(rng.integers(1, 5)):
            width = max(1, round(size * rng.uniform(0.05, 0.15)))
            points = [tuple(rng.uniform(0, size, 2))]
            for _ in range(rng.integers(2, 6)):
                angle, length = rng.uniform(0, 2 * np.pi), size * rng.uniform(0.15, 0.5)
                x, y = points[-1]
                points.append((float(np.clip(x + length * np.cos(angle), 0, size - 1)),
                               float(np.clip(y + length * np.sin(angle), 0, size - 1))))
            draw.line(points, fill=255, width=width, joint="curve")
            for x, y in (points[0], points[-1]):  # round caps
                draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    erased = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)  # [S, S]
    return (1.0 - erased).round().unsqueeze(0)


def random_masks(batch: int, size: int, rng: np.random.Generator) -> Tensor:
    """``batch`` masks of :func:`random_mask`, float ``[batch, 1, size, size]`` (1 = known)."""
    return torch.stack([random_mask(size, rng) for _ in range(batch)])
