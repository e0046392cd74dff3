"""sbucaptions: SBU Captioned Photo Dataset (URL list + captions) → shards.

Input: the two line-aligned text files of the dataset (line i of one belongs to line i of the other):
  SBU_captioned_photo_dataset_urls.txt       one Flickr image URL per line
  SBU_captioned_photo_dataset_captions.txt   one caption per line
  (--sbu_dir DIR holding both, or --urls FILE --captions FILE), and the images either
  local       --images_dir DIR: images found recursively under DIR, named by their 0-based line
              index (123.jpg, 000000123.jpg, 00000/000000123.jpg as img2dataset writes them; use
              --first_index 1 for 1-based names) or by their URL's basename
              (4385058960_b0f2a26e2b.jpg); --naming auto tries both.
  download    --download true --images_dir DIR: fetch them first with img2dataset into DIR (needs
              `pip install img2dataset` and internet access; resized so the shorter side is at
              most --download_size), then proceed as "local". Where an img2dataset .json sidecar
              records a URL that is not the line's, the image goes to the line of that URL (and
              is skipped if the URL is not in the list).
Lines whose image is missing or unreadable, or whose caption is empty, are skipped and counted.

Output:  train-*.tar (and val-*.tar with --val_fraction > 0, a stable hash of the URL), RGB JPEG,
         txt, json {source_id (URL), line, original_size, size}; manifest.json. Sample keys are
         the line index; the order is shuffled with --seed.

Examples:
  python -m glide_lightning data sbucaptions --sbu_dir /data/sbu --images_dir /data/sbu/images \\
      --out data/sbu64 --max_size 96 --val_fraction 0.01 --workers 2
  python -m glide_lightning data sbucaptions --sbu_dir /data/sbu --download true --images_dir /data/sbu/images \\
      --out data/sbu
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    log,
    prepare_out_dir,
    require_dir,
    require_file,
)
from data_recipes.images import Entry, ImageOptions, write_entries
from glide_lightning.data.shards import Manifest

NAME = "sbucaptions"
URLS_FILE = "SBU_captioned_photo_dataset_urls.txt"
CAPTIONS_FILE = "SBU_captioned_photo_dataset_captions.txt"
Naming = Literal["auto", "index", "basename"]


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
            "needs internet access). Or fetch the images yourself and pass --images_dir without --download"
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


@dataclass(kw_only=True)
class SBUCaptions(ImageRecipe):
    """SBU captions: line-aligned URL and caption files, images local or fetched with img2dataset."""

    NAME = NAME
    images_dir: Path
    """The local images (the download target with ``--download true``)."""
    sbu_dir: Path | None = None
    """Directory holding the URL and caption files."""
    urls: Path | None = None
    """The URL list (default: ``<sbu_dir>/SBU_captioned_photo_dataset_urls.txt``)."""
    captions: Path | None = None
    """The captions (default: ``<sbu_dir>/SBU_captioned_photo_dataset_captions.txt``)."""
    naming: Naming = "auto"
    """How image files are named: ``index`` (line number), ``basename`` (the URL's), or ``auto`` (try both)."""
    first_index: int = 0
    """Number of the first line in index names (0 or 1)."""
    download: bool = False
    """Fetch the images with img2dataset first (needs internet access)."""
    download_size: int = 256
    """img2dataset: the most pixels of the shorter side."""
    download_processes: int = 2
    """img2dataset processes."""
    download_threads: int = 64
    """img2dataset threads per process."""
    val_fraction: float = 0.0
    """Share of lines in the val split."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.images_dir = Path(self.images_dir)
        self.sbu_dir, self.urls, self.captions = (None if p is None else Path(p)
                                                  for p in (self.sbu_dir, self.urls, self.captions))
        check_fraction(self.val_fraction, "--val_fraction")
        if self.sbu_dir is None and (self.urls is None or self.captions is None):
            raise RecipeError("give --sbu_dir DIR (holding the URL and caption files) or both --urls and --captions")

    def run(self) -> Manifest:
        """Shard SBU captions (images in ``images_dir``, fetched first when ``download``) into ``out``."""
        out, images_dir, naming, urls, captions = self.out, self.images_dir, self.naming, self.urls, self.captions
        if self.sbu_dir is not None:
            require_dir(self.sbu_dir, "--sbu_dir")
            urls, captions = urls or self.sbu_dir / URLS_FILE, captions or self.sbu_dir / CAPTIONS_FILE
        assert urls is not None and captions is not None
        require_file(urls, "URL list", f"expected {URLS_FILE}")
        require_file(captions, "captions file", f"expected {CAPTIONS_FILE}")
        url_lines, caption_lines = read_lines(urls), read_lines(captions)
        if len(url_lines) != len(caption_lines):
            raise RecipeError(
                f"{urls.name} has {len(url_lines)} lines but {captions.name} has {len(caption_lines)}: "
                "the files must be line-aligned (line i of one describes line i of the other)"
            )
        check_out_dir(out, self.overwrite)
        if self.download:
            download_images(urls, images_dir, image_size=self.download_size, processes=self.download_processes,
                            threads=self.download_threads)
        require_dir(images_dir, "--images_dir", "pass the folder holding the images, or add --download true to fetch "
                                                "them")

        by_index, by_name = _scan(images_dir)
        url_to_line: dict[str, int] = {}
        for i, u in enumerate(url_lines):
            url_to_line.setdefault(u.strip(), i)
        skips = SkipCounter()
        found: dict[int, Path] = {}
        for number, path in by_index.items():
            if naming == "basename":
                break
            line = number - self.first_index
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
        random.Random(self.seed).shuffle(entries)
        by_split: dict[str, list[Entry]] = {"train": [], "val": []}
        for entry in entries:
            by_split[hash_split(entry.source_id, self.val_fraction)].append(entry)

        prepare_out_dir(out, self.overwrite)
        opts = ImageOptions(image_format="jpg", max_size=self.max_size, reencode=self.reencode)
        checks = self.checks()
        splits = write_entries(out, by_split, opts, skips, workers=self.workers, max_per_shard=self.max_per_shard,
                               checks=checks)
        args = {**self.options(), "urls": str(urls), "captions": str(captions)}
        extra = {"preprocessing": opts.to_dict(), "lines": len(url_lines)}
        return finish(out, NAME, args, splits, skips, extra, checks)


RECIPE = SBUCaptions


def build(out: Path, **options: Any) -> Manifest:
    """:class:`SBUCaptions` (its fields are the options) written to ``out``; returns the manifest."""
    return SBUCaptions(out=out, **options).run()
