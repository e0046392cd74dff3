"""folder: any directory of images with captions from sidecar .txt files, a CSV or a JSONL file.

Input (one of three caption sources):
  sidecar  --images DIR: every image under DIR (recursively; .jpg .jpeg .png .webp .bmp .gif
           .tif .tiff …) with its caption in a .txt file of the same stem next to it
           (photos/cat.jpg + photos/cat.txt). The whole .txt file is one caption.
  CSV      --csv captions.csv [--image_col file] [--caption_col caption]: one row per
           image-caption pair (an image may have several rows).
  JSONL    --jsonl captions.jsonl [--image_key image] [--caption_key caption]: one JSON object per
           line, same meaning.
  CSV/JSONL image paths are relative to --images when given, else to the CSV/JSONL's directory
  (absolute paths are used as they are).

Every image mode (L, P, RGBA, CMYK, 16-bit, …) is converted to RGB (transparency over white) and
EXIF orientation is applied. Images that are missing, fail to open, or have no caption are skipped,
counted and reported (and listed under "skipped" in manifest.json); the run never stops for them.
The train/val split hashes each image's path (relative to its root), so it is stable across runs
and an image's captions stay in one split; the sample order is shuffled with --seed.

Output:  train-*.tar (and val-*.tar with --val_fraction > 0), RGB JPEG (or --image_format png),
         txt caption, json {source_id, original_size, size}; manifest.json, with the images' native
         and stored sizes (min / median / max width and height, ``image_sizes``): the training CLI
         warns when the model's image_size is far above them, and this recipe when images are under
         half of --image_size or captions over --text_ctx tokens.

Examples:
  python -m glide_lightning data folder --images photos/ --out data/photos --val_fraction 0.05
  python -m glide_lightning data folder --csv meta/captions.csv --images photos/ --image_col file \\
      --caption_col caption --out data/photos --max_size 256 --workers 2
"""

from __future__ import annotations

import csv as csv_module
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_recipes.common import (
    IMAGE_EXTENSIONS,
    ImageRecipe,
    RecipeError,
    SkipCounter,
    check_fraction,
    check_out_dir,
    clean_caption,
    finish,
    hash_split,
    prepare_out_dir,
    require_dir,
    require_file,
)
from data_recipes.images import Entry, ImageOptions, write_entries
from glide_lightning.data.shards import ImageFormat, Manifest

NAME = "folder"


@dataclass(kw_only=True)
class Folder(ImageRecipe):
    """A directory of images with sidecar .txt captions, or a CSV / JSONL of image paths and captions."""

    NAME = NAME
    images: Path | None = None
    """Image root directory (sidecar .txt captions; with --csv / --jsonl: the root of their paths)."""
    csv: Path | None = None
    """CSV file of image paths and captions."""
    image_col: str = "file"
    """CSV column with the image path."""
    caption_col: str = "caption"
    """CSV column with the caption."""
    jsonl: Path | None = None
    """JSONL file of image paths and captions."""
    image_key: str = "image"
    """JSONL key with the image path."""
    caption_key: str = "caption"
    """JSONL key with the caption."""
    val_fraction: float = 0.0
    """Share of images in the val split."""
    image_format: ImageFormat = "jpg"
    """How images are stored in the shards."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.csv is not None and self.jsonl is not None:
            raise RecipeError("give either --csv or --jsonl, not both")
        if self.csv is None and self.jsonl is None and self.images is None:
            raise RecipeError("give --images DIR (captions from sidecar .txt files), or --csv / --jsonl")
        check_fraction(self.val_fraction, "--val_fraction")
        self.images, self.csv, self.jsonl = (None if p is None else Path(p) for p in (self.images, self.csv, self.jsonl))

    def run(self) -> Manifest:
        """Shard the image folder (captions from sidecar .txt, ``csv`` or ``jsonl``) into ``out``."""
        out, images, csv, jsonl = self.out, self.images, self.csv, self.jsonl
        check_out_dir(out, self.overwrite)
        skips = SkipCounter()
        if csv is None and jsonl is None:
            assert images is not None
            pairs = _sidecar_pairs(require_dir(images, "--images directory"), skips)
            source = "sidecar"
        elif csv is not None:
            require_file(csv, "--csv file")
            root = require_dir(images, "--images directory") if images else csv.parent
            pairs = _table_pairs(_csv_rows(csv, self.image_col, self.caption_col), root, csv.name, skips)
            source = "csv"
        else:
            assert jsonl is not None
            require_file(jsonl, "--jsonl file")
            root = require_dir(images, "--images directory") if images else jsonl.parent
            pairs = _table_pairs(_jsonl_rows(jsonl, self.image_key, self.caption_key, skips), root, jsonl.name, skips)
            source = "jsonl"
        entries = [
            Entry(path, rel, ((f"{i:08d}", caption),), {"caption_source": source})
            for i, (path, rel, caption) in enumerate(pairs)
        ]
        if not entries:
            raise RecipeError(f"found no usable image-caption pairs ({skips.total} skipped: {dict(skips.counts)})")
        random.Random(self.seed).shuffle(entries)
        by_split: dict[str, list[Entry]] = {"train": [], "val": []}
        for e in entries:
            by_split[hash_split(e.source_id, self.val_fraction)].append(e)
        prepare_out_dir(out, self.overwrite)
        opts = ImageOptions(image_format=self.image_format, max_size=self.max_size, reencode=self.reencode)
        checks = self.checks()
        splits = write_entries(out, by_split, opts, skips, workers=self.workers, max_per_shard=self.max_per_shard,
                               checks=checks)
        extra = {"preprocessing": opts.to_dict(), "caption_source": source}
        return finish(out, NAME, self.options(), splits, skips, extra, checks)


RECIPE = Folder


def build(out: Path, **options: Any) -> Manifest:
    """:class:`Folder` (its fields are the options) written to ``out``; returns the manifest."""
    return Folder(out=out, **options).run()


def _read_caption_file(path: Path, source: str, skips: SkipCounter) -> str | None:
    if not path.is_file():
        skips.add("no caption", source, f"no {path.name}")
        return None
    try:
        text = clean_caption(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        skips.add("unreadable caption", source, f"{type(e).__name__}: {e}")
        return None
    if not text:
        skips.add("no caption", source, f"{path.name} is empty")
    return text or None


def _sidecar_pairs(images: Path, skips: SkipCounter) -> Iterator[tuple[Path, str, str]]:
    paths = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    for path in paths:
        rel = path.relative_to(images).as_posix()
        caption = _read_caption_file(path.with_suffix(".txt"), rel, skips)
        if caption:
            yield path, rel, caption


def _csv_rows(path: Path, image_col: str, caption_col: str) -> Iterator[tuple[int, str | None, str | None]]:
    line = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv_module.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in (image_col, caption_col) if c not in columns]
            if missing:
                raise RecipeError(
                    f"--csv {path} has no column {missing[0]!r}; its columns are {columns}. "
                    "Pick them with --image_col / --caption_col"
                )
            for row in reader:
                line = reader.line_num
                yield line, row.get(image_col), row.get(caption_col)
    except (UnicodeDecodeError, csv_module.Error) as e:
        raise RecipeError(f"--csv {path} is not a readable UTF-8 CSV file (after line {line}: {e})") from None


def _jsonl_rows(
    path: Path, image_key: str, caption_key: str, skips: SkipCounter
) -> Iterator[tuple[int, str | None, str | None]]:
    seen_keys = False
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                skips.add("bad jsonl line", f"{path.name}:{line_no}", str(e))
                continue
            if not seen_keys and image_key not in obj:
                raise RecipeError(
                    f"--jsonl {path} line {line_no} has no key {image_key!r}; its keys are {sorted(obj)}. "
                    "Pick them with --image_key / --caption_key"
                )
            seen_keys = True
            image, caption = obj.get(image_key), obj.get(caption_key)
            yield line_no, None if image is None else str(image), None if caption is None else str(caption)


def _table_pairs(
    rows: Iterator[tuple[int, str | None, str | None]], root: Path, label: str, skips: SkipCounter
) -> Iterator[tuple[Path, str, str]]:
    for line_no, image, caption in rows:
        where = f"{label}:{line_no}"
        if not image or not image.strip():
            skips.add("no image path", where)
            continue
        rel = image.strip()
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        text = clean_caption(caption)
        if not text:
            skips.add("no caption", rel, f"empty caption at {where}")
        elif not path.is_file():
            skips.add("missing image", rel, f"{path} not found ({where})")
        else:
            yield path, rel, text
