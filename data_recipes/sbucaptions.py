"""sbucaptions: SBU Captioned Photo Dataset (URL list + captions) → shards.

Input: the two line-aligned text files of the dataset (line i of one belongs to line i of the other):
  SBU_captioned_photo_dataset_urls.txt       one Flickr image URL per line
  SBU_captioned_photo_dataset_captions.txt   one caption per line
  (--sbu-dir DIR holding both, or --urls FILE --captions FILE), and the images either
  local       --images-dir DIR: images found recursively under DIR, named by their 0-based line
              index (123.jpg, 000000123.jpg, 00000/000000123.jpg as img2dataset writes them; use
              --first-index 1 for 1-based names) or by their URL's basename
              (4385058960_b0f2a26e2b.jpg); --naming auto tries both.
  download    --download --images-dir DIR: fetch them first with img2dataset into DIR (needs
              `pip install img2dataset` and internet access; resized so the shorter side is at
              most --download-size), then proceed as "local". Where an img2dataset .json sidecar
              records a URL that is not the line's, the image goes to the line of that URL (and
              is skipped if the URL is not in the list).
Lines whose image is missing or unreadable, or whose caption is empty, are skipped and counted.

Output:  train-*.tar (and val-*.tar with --val-fraction > 0, a stable hash of the URL), RGB JPEG,
         txt, json {source_id (URL), line, original_size, size}; manifest.json. Sample keys are
         the line index; the order is shuffled with --seed.

Examples:
  python -m data_recipes sbucaptions --sbu-dir /data/sbu --images-dir /data/sbu/images --out data/sbu64 \\
      --max-size 96 --val-fraction 0.01 --workers 2
  python -m data_recipes sbucaptions --sbu-dir /data/sbu --download --images-dir /data/sbu/images --out data/sbu
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Literal, get_args

from data_recipes.common import (
    IMAGE_EXTENSIONS,
    Entry,
    ImageOptions,
    RecipeError,
    SkipCounter,
    add_image_args,
    add_output_args,
    check_fraction,
    check_out_dir,
    clean_caption,
    finish,
    hash_split,
    log,
    prepare_out_dir,
    require_dir,
    require_file,
    write_entries,
)
from glide_lightning.data.shards import Manifest

NAME = "sbucaptions"
SUMMARY = "SBU captions: line-aligned URL + caption files, images local or fetched with img2dataset"
URLS_FILE = "SBU_captioned_photo_dataset_urls.txt"
CAPTIONS_FILE = "SBU_captioned_photo_dataset_captions.txt"
Naming = Literal["auto", "index", "basename"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of this recipe."""
    add_output_args(parser)
    parser.add_argument("--sbu-dir", type=Path, default=None, help="directory holding the URL and caption files")
    parser.add_argument("--urls", type=Path, default=None, help=f"URL list (default: <sbu-dir>/{URLS_FILE})")
    parser.add_argument("--captions", type=Path, default=None, help=f"captions (default: <sbu-dir>/{CAPTIONS_FILE})")
    parser.add_argument(
        "--images-dir", type=Path, required=True, help="local images (the download target with --download)"
    )
    parser.add_argument(
        "--naming", choices=get_args(Naming), default="auto", help="index, basename or auto (default: try both)"
    )
    parser.add_argument("--first-index", type=int, default=0, help="number of the first line in index names (0 or 1)")
    parser.add_argument("--download", action="store_true", help="fetch the images with img2dataset first (internet)")
    parser.add_argument("--download-size", type=int, default=256, help="img2dataset: max shorter side (default 256)")
    parser.add_argument("--download-processes", type=int, default=2, help="img2dataset processes (default 2)")
    parser.add_argument("--download-threads", type=int, default=64, help="img2dataset threads per process (default 64)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of lines in val (default 0)")
    add_image_args(parser)


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file split at ``\\n`` only (a stray ``\\r`` inside a caption must not
    shift the alignment), without line ends; undecodable bytes are replaced."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def download_images(
    urls: Path, images_dir: Path, *, image_size: int = 256, processes: int = 2, threads: int = 64
) -> None:
    """Fetch the URL list with img2dataset into ``images_dir`` (files named by 0-based line index)."""
    try:
        import img2dataset  # type: ignore[import-not-found]
    except ImportError as e:
        raise RecipeError(
            "--download needs img2dataset, which is not installed: `pip install img2dataset` (downloading also "
            "needs internet access). Or fetch the images yourself and pass --images-dir without --download"
        ) from e
    images_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s with img2dataset", urls, images_dir)
    img2dataset.download(
        url_list=str(urls),
        input_format="txt",
        output_folder=str(images_dir),
        output_format="files",
        image_size=image_size,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        processes_count=processes,
        thread_count=threads,
        number_sample_per_shard=10000,
    )


def _scan(images_dir: Path) -> tuple[dict[int, Path], dict[str, Path]]:
    by_index: dict[int, Path] = {}
    by_name: dict[str, Path] = {}
    for path in sorted(images_dir.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem.isdigit():
            by_index.setdefault(int(path.stem), path)
        by_name.setdefault(path.name, path)
    return by_index, by_name


def _sidecar_url(path: Path) -> str | None:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        url = json.loads(sidecar.read_text(encoding="utf-8")).get("url")
    except (OSError, ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None


def build(
    out: Path,
    *,
    images_dir: Path,
    sbu_dir: Path | None = None,
    urls: Path | None = None,
    captions: Path | None = None,
    naming: Naming = "auto",
    first_index: int = 0,
    download: bool = False,
    download_size: int = 256,
    download_processes: int = 2,
    download_threads: int = 64,
    val_fraction: float = 0.0,
    seed: int = 0,
    max_size: int | None = None,
    reencode: bool = False,
    workers: int = 1,
    max_per_shard: int = 1000,
    overwrite: bool = False,
) -> Manifest:
    """Shard SBU captions (images in ``images_dir``, fetched first when ``download``) into ``out``."""
    if naming not in get_args(Naming):
        raise RecipeError(f"--naming must be one of {get_args(Naming)}, got {naming!r}")
    check_fraction(val_fraction, "--val-fraction")
    if sbu_dir is None and (urls is None or captions is None):
        raise RecipeError("give --sbu-dir DIR (holding the URL and caption files) or both --urls and --captions")
    if sbu_dir is not None:
        require_dir(sbu_dir, "--sbu-dir")
        urls, captions = urls or sbu_dir / URLS_FILE, captions or sbu_dir / CAPTIONS_FILE
    assert urls is not None and captions is not None
    require_file(urls, "URL list", f"expected {URLS_FILE}")
    require_file(captions, "captions file", f"expected {CAPTIONS_FILE}")
    url_lines, caption_lines = read_lines(urls), read_lines(captions)
    if len(url_lines) != len(caption_lines):
        raise RecipeError(
            f"{urls.name} has {len(url_lines)} lines but {captions.name} has {len(caption_lines)}: "
            "the files must be line-aligned (line i of one describes line i of the other)"
        )
    check_out_dir(out, overwrite)
    if download:
        download_images(
            urls, images_dir, image_size=download_size, processes=download_processes, threads=download_threads
        )
    require_dir(images_dir, "--images-dir", "pass the folder holding the images, or add --download to fetch them")

    by_index, by_name = _scan(images_dir)
    url_to_line: dict[str, int] = {}
    for i, u in enumerate(url_lines):
        url_to_line.setdefault(u.strip(), i)
    skips = SkipCounter()
    found: dict[int, Path] = {}
    for number, path in by_index.items():
        if naming == "basename":
            break
        line = number - first_index
        recorded = _sidecar_url(path)
        if recorded is not None and not (0 <= line < len(url_lines) and url_lines[line].strip() == recorded):
            if recorded not in url_to_line:
                skips.add("url not in the list", path.name, recorded)
                continue
            line = url_to_line[recorded]
        found.setdefault(line, path)
    entries: list[Entry] = []
    for i, (url, raw_caption) in enumerate(zip(url_lines, caption_lines)):
        url = url.strip()
        path = found.get(i)
        if path is None and naming != "index":
            path = by_name.get(url.rsplit("/", 1)[-1].split("?", 1)[0])
        caption = clean_caption(raw_caption)
        if not url:
            skips.add("empty url line", f"line {i}")
        elif path is None:
            skips.add("missing image", f"line {i}", url)
        elif not caption:
            skips.add("no caption", f"line {i}", url)
        else:
            entries.append(Entry(path, url, ((f"{i:07d}", caption),), {"line": i, "url": url}))
    if not entries:
        raise RecipeError(
            f"none of the {len(url_lines)} lines has an image in {images_dir} (naming {naming!r}: files named by "
            f"0-based line index or URL basename); skipped: {dict(skips.counts)}"
        )
    random.Random(seed).shuffle(entries)
    by_split: dict[str, list[Entry]] = {"train": [], "val": []}
    for entry in entries:
        by_split[hash_split(entry.source_id, val_fraction)].append(entry)

    prepare_out_dir(out, overwrite)
    opts = ImageOptions(image_format="jpg", max_size=max_size, reencode=reencode)
    splits = write_entries(out, by_split, opts, skips, workers=workers, max_per_shard=max_per_shard)
    args: dict[str, Any] = {
        "out": out, "images_dir": images_dir, "urls": urls, "captions": captions, "naming": naming,
        "first_index": first_index, "download": download, "download_size": download_size,
        "val_fraction": val_fraction, "seed": seed, "max_size": max_size, "reencode": reencode,
        "workers": workers, "max_per_shard": max_per_shard,
    }  # fmt: skip
    return finish(out, NAME, args, splits, skips, {"preprocessing": opts.to_dict(), "lines": len(url_lines)})


def run(args: argparse.Namespace) -> Manifest:
    """CLI entry point."""
    return build(
        args.out,
        images_dir=args.images_dir,
        sbu_dir=args.sbu_dir,
        urls=args.urls,
        captions=args.captions,
        naming=args.naming,
        first_index=args.first_index,
        download=args.download,
        download_size=args.download_size,
        download_processes=args.download_processes,
        download_threads=args.download_threads,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_size=args.max_size,
        reencode=args.reencode,
        workers=args.workers,
        max_per_shard=args.max_per_shard,
        overwrite=args.overwrite,
    )
