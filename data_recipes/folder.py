"""folder: any directory of images with captions from sidecar .txt files, a CSV or a JSONL file.

Input (one of three caption sources):
  sidecar  --images DIR: every image under DIR (recursively; .jpg .jpeg .png .webp .bmp .gif
           .tif .tiff …) with its caption in a .txt file of the same stem next to it
           (photos/cat.jpg + photos/cat.txt). The whole .txt file is one caption.
  CSV      --csv captions.csv [--image-col file] [--caption-col caption]: one row per
           image-caption pair (an image may have several rows).
  JSONL    --jsonl captions.jsonl [--image-key image] [--caption-key caption]: one JSON object per
           line, same meaning.
  CSV/JSONL image paths are relative to --images when given, else to the CSV/JSONL's directory
  (absolute paths are used as they are).

Every image mode (L, P, RGBA, CMYK, 16-bit, …) is converted to RGB (transparency over white) and
EXIF orientation is applied. Images that are missing, fail to open, or have no caption are skipped,
counted and reported (and listed under "skipped" in manifest.json); the run never stops for them.
The train/val split hashes each image's path (relative to its root), so it is stable across runs
and an image's captions stay in one split; the sample order is shuffled with --seed.

Output:  train-*.tar (and val-*.tar with --val-fraction > 0), RGB JPEG (or --image-format png),
         txt caption, json {source_id, original_size, size}; manifest.json, with the images' native
         and stored sizes (min / median / max width and height, ``image_sizes``): the training CLI
         warns when the model's image_size is far above them.

Examples:
  python -m data_recipes folder --images photos/ --out data/photos --val-fraction 0.05
  python -m data_recipes folder --csv meta/captions.csv --images photos/ --image-col file \\
      --caption-col caption --out data/photos --max-size 256 --workers 2
"""

from __future__ import annotations

import argparse
import csv as csv_module
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

from data_recipes.common import (
    IMAGE_EXTENSIONS,
    Entry,
    ImageOptions,
    ImageSizes,
    RecipeError,
    SkipCounter,
    add_image_args,
    add_output_args,
    check_fraction,
    check_out_dir,
    clean_caption,
    finish,
    hash_split,
    prepare_out_dir,
    require_dir,
    require_file,
    write_entries,
)
from glide_lightning.data.shards import ImageFormat, Manifest

NAME = "folder"
SUMMARY = "a directory of images with sidecar .txt captions, or a CSV / JSONL of image paths + captions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of this recipe."""
    add_output_args(parser)
    src = parser.add_argument_group("input (sidecar .txt by default; or --csv / --jsonl)")
    src.add_argument("--images", type=Path, default=None, help="image root directory")
    src.add_argument("--csv", type=Path, default=None, help="CSV file of image paths and captions")
    src.add_argument("--image-col", default="file", help="CSV column with the image path (default 'file')")
    src.add_argument("--caption-col", default="caption", help="CSV column with the caption (default 'caption')")
    src.add_argument("--jsonl", type=Path, default=None, help="JSONL file of image paths and captions")
    src.add_argument("--image-key", default="image", help="JSONL key with the image path (default 'image')")
    src.add_argument("--caption-key", default="caption", help="JSONL key with the caption (default 'caption')")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images in val (default 0)")
    parser.add_argument("--image-format", choices=get_args(ImageFormat), default="jpg", help="default jpg")
    add_image_args(parser)


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
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv_module.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in (image_col, caption_col) if c not in columns]
        if missing:
            raise RecipeError(
                f"--csv {path} has no column {missing[0]!r}; its columns are {columns}. "
                "Pick them with --image-col / --caption-col"
            )
        for row in reader:
            yield reader.line_num, row.get(image_col), row.get(caption_col)


def _jsonl_rows(
    path: Path, image_key: str, caption_key: str, skips: SkipCounter
) -> Iterator[tuple[int, str | None, str | None]]:
    seen_keys = False
    with open(path, encoding="utf-8-sig") as f:
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
                    "Pick them with --image-key / --caption-key"
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


def build(
    out: Path,
    *,
    images: Path | None = None,
    csv: Path | None = None,
    image_col: str = "file",
    caption_col: str = "caption",
    jsonl: Path | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
    val_fraction: float = 0.0,
    image_format: ImageFormat = "jpg",
    max_size: int | None = None,
    reencode: bool = False,
    workers: int = 1,
    seed: int = 0,
    max_per_shard: int = 1000,
    overwrite: bool = False,
) -> Manifest:
    """Shard an image folder (captions from sidecar .txt, ``csv`` or ``jsonl``) into ``out``."""
    if csv is not None and jsonl is not None:
        raise RecipeError("give either --csv or --jsonl, not both")
    if image_format not in get_args(ImageFormat):
        raise RecipeError(f"--image-format must be one of {get_args(ImageFormat)}, got {image_format!r}")
    check_fraction(val_fraction, "--val-fraction")
    check_out_dir(out, overwrite)
    skips = SkipCounter()
    if csv is None and jsonl is None:
        if images is None:
            raise RecipeError("give --images DIR (captions from sidecar .txt files), or --csv / --jsonl")
        pairs = _sidecar_pairs(require_dir(images, "--images directory"), skips)
        source = "sidecar"
    elif csv is not None:
        require_file(csv, "--csv file")
        root = require_dir(images, "--images directory") if images else csv.parent
        pairs = _table_pairs(_csv_rows(csv, image_col, caption_col), root, csv.name, skips)
        source = "csv"
    else:
        assert jsonl is not None
        require_file(jsonl, "--jsonl file")
        root = require_dir(images, "--images directory") if images else jsonl.parent
        pairs = _table_pairs(_jsonl_rows(jsonl, image_key, caption_key, skips), root, jsonl.name, skips)
        source = "jsonl"
    entries = [
        Entry(path, rel, ((f"{i:08d}", caption),), {"caption_source": source})
        for i, (path, rel, caption) in enumerate(pairs)
    ]
    if not entries:
        raise RecipeError(f"found no usable image-caption pairs ({skips.total} skipped: {dict(skips.counts)})")
    random.Random(seed).shuffle(entries)
    by_split: dict[str, list[Entry]] = {"train": [], "val": []}
    for e in entries:
        by_split[hash_split(e.source_id, val_fraction)].append(e)
    prepare_out_dir(out, overwrite)
    opts = ImageOptions(image_format=image_format, max_size=max_size, reencode=reencode)
    sizes = ImageSizes()
    splits = write_entries(out, by_split, opts, skips, workers=workers, max_per_shard=max_per_shard, sizes=sizes)
    args = {
        "out": out, "images": images, "csv": csv, "image_col": image_col, "caption_col": caption_col,
        "jsonl": jsonl, "image_key": image_key, "caption_key": caption_key, "val_fraction": val_fraction,
        "seed": seed, "max_per_shard": max_per_shard, "workers": workers,
    }  # fmt: skip
    extra = {"preprocessing": opts.to_dict(), "caption_source": source, "image_sizes": sizes.to_dict()}
    return finish(out, NAME, args, splits, skips, extra)


def run(args: argparse.Namespace) -> Manifest:
    """CLI entry point."""
    return build(
        args.out,
        images=args.images,
        csv=args.csv,
        image_col=args.image_col,
        caption_col=args.caption_col,
        jsonl=args.jsonl,
        image_key=args.image_key,
        caption_key=args.caption_key,
        val_fraction=args.val_fraction,
        image_format=args.image_format,
        max_size=args.max_size,
        reencode=args.reencode,
        workers=args.workers,
        seed=args.seed,
        max_per_shard=args.max_per_shard,
        overwrite=args.overwrite,
    )
