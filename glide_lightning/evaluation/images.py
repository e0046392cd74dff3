"""Writing generated images: PNG files that carry how they were made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from einops import rearrange
from PIL import Image, PngImagePlugin
from torch import Tensor


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
