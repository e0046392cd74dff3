"""Image conversions: every PIL mode to RGB (the one rule shared by the data pipeline and the shard
writer), model output to uint8, grids and PNG metadata."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from glide_lightning.data.images import image_grid, read_png_metadata, save_png, to_rgb, to_uint8

RED, WHITE = (255, 0, 0), (255, 255, 255)


def _gray_with_transparent_colour() -> Image.Image:
    img = Image.new("L", (4, 4), 50)
    img.info["transparency"] = 50  # a tRNS colour key, as a PNG decoder sets it
    return img


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (4, 4), 128), (128, 128, 128)),
        (lambda: Image.new("1", (4, 4), 1), WHITE),
        (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), RED),
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), WHITE),  # transparent: white background
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), RED),
        (lambda: Image.new("LA", (4, 4), (0, 0)), WHITE),
        (lambda: Image.new("LA", (4, 4), (0, 128)), (127, 127, 127)),  # half over white
        (_gray_with_transparent_colour, WHITE),
        (lambda: Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), WHITE),  # I;16: scaled, not clipped
        (lambda: Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16)), (100, 100, 100)),
        (lambda: Image.new("I", (4, 4), 1000), (4, 4, 4)),  # I: 16-bit range
        (lambda: Image.new("I", (4, 4), 200), (1, 1, 1)),  # ... for every image: a dark one stays dark
        (lambda: Image.new("F", (4, 4), 128.0), (128, 128, 128)),
        (lambda: Image.new("F", (4, 4), 300.0), WHITE),  # F: clipped to [0, 255]
    ],
)
def test_to_rgb_modes(make, expected) -> None:
    img = to_rgb(make())
    assert img.mode == "RGB" and img.size == (4, 4) and img.getpixel((1, 1)) == expected


def test_palette_with_transparency_is_composited_over_white_after_a_png_round_trip() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 1  # palette index 1 (blue) is transparent
    buf = io.BytesIO()
    img.save(buf, "PNG")
    rgb = to_rgb(Image.open(io.BytesIO(buf.getvalue())))
    assert rgb.getpixel((0, 0)) == WHITE and rgb.getpixel((2, 2)) == RED


def test_to_uint8_rounds_and_clamps() -> None:
    out = to_uint8(torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]))
    assert out.dtype == torch.uint8 and out.tolist() == [0, 0, 128, 255, 255, 255]


def test_grid_layout() -> None:
    images = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1, 1).expand(6, 3, 2, 2)
    grid = image_grid(images, rows=2)
    assert grid.shape == (3, 4, 6)
    assert grid[0, 0, 0] == 0 and grid[0, 0, 2] == 1 and grid[0, 2, 0] == 3  # row-major


def test_png_carries_its_metadata(tmp_path) -> None:
    image = torch.zeros(3, 4, 5, dtype=torch.uint8)
    save_png(image, tmp_path / "a" / "x.png", {"prompt": "a dog", "seed": 3, "scales": [1.0, 3.0]})
    assert read_png_metadata(tmp_path / "a" / "x.png") == {"prompt": "a dog", "seed": "3", "scales": "[1.0, 3.0]"}
    assert Image.open(tmp_path / "a" / "x.png").size == (5, 4)
    assert not list((tmp_path / "a").glob(".*.tmp"))  # written atomically
