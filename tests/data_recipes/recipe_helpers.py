"""Helpers for the data-recipe tests (imported as ``recipe_helpers``): images, reading shards back."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from glide_lightning.data.shards import load_manifest, verify_manifest


def save_image(
    path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, ...] = (200, 50, 50), **kw: Any
) -> Path:
    """An RGB image with a gradient (so encodings are not trivial) saved in the format of ``path``."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = colour[:3]
    arr[..., 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def corrupt_file(path: Path) -> Path:
    """A file with an image extension that is not an image (a truncated JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:100])
    return path


def read_split(out: Path, split: str) -> list[dict[str, Any]]:
    """Every sample of ``split`` (listed in the manifest) decoded with webdataset's ``"pil"`` decoder."""
    urls = [str(p) for p in load_manifest(out).shard_paths(split)]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def image_of(sample: dict[str, Any]) -> Image.Image:
    """The sample's image, whichever of jpg / png it is stored as."""
    return sample["jpg"] if "jpg" in sample else sample["png"]


def check_manifest(out: Path) -> dict[str, Any]:
    """Assert the manifest's checksums and counts match the files; returns the raw manifest."""
    assert verify_manifest(out) == []
    doc = json.loads((out / "manifest.json").read_text())
    for split in doc["splits"].values():
        for shard in split["shards"]:
            assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
        assert sum(s["num_samples"] for s in split["shards"]) == split["num_samples"]
        assert split["captions"]["count"] == split["num_samples"]
    assert doc["total_samples"] == sum(s["num_samples"] for s in doc["splits"].values())
    assert doc["glide_lightning_version"] and doc["created"]
    assert not list(out.glob(".*partial"))
    return doc


def data_cli(*argv: object) -> int:
    """``python -m glide_lightning data ARGV`` in-process (the front door, :func:`glide_lightning.commands.main`):
    its exit status."""
    from glide_lightning.commands import main

    try:
        main(["data", *map(str, argv)])
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    return 0


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Contents of every shard in ``out`` by name."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
