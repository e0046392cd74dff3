"""Image conversions, each in one place: any PIL image to 8-bit RGB (data in), model output in [-1, 1]
to uint8 tensors, grids, PIL images and PNG files that say how they were made (data out).

Tensor images are ``[3, H, W]`` (or ``[N, 3, H, W]``); uint8 ones are in [0, 255], model-space ones
in [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image, PngImagePlugin
from torch import Tensor

__all__ = ["image_grid", "read_png_metadata", "save_png", "to_pil", "to_rgb", "to_uint8"]

_WIDE_GRAY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 255}
"""Modes wider than 8 bits and the value that maps to white."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency (RGBA, LA, PA, P or L/RGB with a transparent
    colour) is composited over white; 16/32-bit grayscale (``I;16*``, ``I``: assumed 16-bit
    range) is scaled to 8 bits, ``F`` clipped to [0, 255]; everything else goes through
    ``Image.convert("RGB")`` (CMYK, YCbCr, 1, L, P, ...). The same rule for every image, whatever
    its values: a dark 16-bit image stays dark."""
    if img.mode in _WIDE_GRAY:
        array = np.asarray(img, dtype=np.float64)
        array = np.clip(array, 0, _WIDE_GRAY[img.mode]) * (255.0 / _WIDE_GRAY[img.mode])
        img = Image.fromarray(np.rint(array).astype(np.uint8))  # 2-D uint8: mode "L"
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        img = background
    return img if img.mode == "RGB" else img.convert("RGB")


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats → uint8 [0, 255] (rounded, clamped), any shape."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(images: Tensor, rows: int) -> Tensor:
    """uint8 [rows·cols, 3, H, W] → one [3, rows·H, cols·W] grid, row-major."""
    return rearrange(images, "(r c) ch h w -> ch (r h) (c w)", r=rows)


def to_pil(image: Tensor) -> Image.Image:
    """uint8 [3, H, W] → PIL RGB."""
    return Image.fromarray(rearrange(image, "c h w -> h w c").cpu().numpy())


def save_png(image: Tensor, path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Save a uint8 [3, H, W] image; ``metadata`` goes into PNG text chunks (one per key, JSON values)
    so that the file itself says how it was made. Written atomically (temp name, then rename)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    to_pil(image).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def read_png_metadata(path: Path) -> dict[str, str]:
    """The text chunks of a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        return dict(image.text)  # type: ignore[attr-defined]
