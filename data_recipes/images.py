"""Images from disk into shards, for the recipes that read image files (:class:`~data_recipes.common.ImageRecipe`):
decoding, EXIF orientation, RGB and downscaling (:func:`load_image`, in worker processes with the order kept,
:func:`ordered_map`), and each split's entries written as shards (:func:`write_entries`) with their skips
counted and the images and captions checked against the model."""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import ExifTags, Image, ImageOps

from data_recipes.common import DataChecks, RecipeError, SkipCounter, log
from glide_lightning.data.images import to_rgb
from glide_lightning.data.shards import (
    JPEG_QUALITY,
    ImageFormat,
    Sample,
    SplitManifest,
    encode_image,
    write_shards,
)

T = TypeVar("T")
R = TypeVar("R")

@dataclass(frozen=True)
class LoadedImage:
    """An image ready for a shard: encoded bytes plus its sizes (``[width, height]``)."""

    data: bytes
    size: tuple[int, int]
    original_size: tuple[int, int]
    original_mode: str


@dataclass(frozen=True)
class ImageFailure:
    """Why an image could not be used (returned, not raised, so worker pools keep going)."""

    reason: str
    detail: str


def shrink(img: Image.Image, max_size: int | None) -> Image.Image:
    """Downscale so the shorter side is ``max_size`` (keeps aspect ratio; never upscales)."""
    if not max_size or min(img.size) <= max_size:
        return img
    w, h = img.size
    scale = max_size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def load_image(
    source: Path | bytes,
    *,
    image_format: ImageFormat = "jpg",
    max_size: int | None = None,
    exif_transpose: bool = True,
    reencode: bool = False,
) -> LoadedImage | ImageFailure:
    """Fully decode ``source``, convert to RGB, optionally orient (EXIF) and shrink, and encode.

    An RGB JPEG that needs no change is kept byte for byte (no generation loss) unless
    ``reencode``; everything else is encoded as ``image_format`` (JPEG quality 95).
    Undecodable or truncated files give an :class:`ImageFailure`.
    """
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        return ImageFailure("unreadable file", f"{type(e).__name__}: {e}")
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            opened.load()
            fmt, mode, original = opened.format, opened.mode, opened.size
            orientation = opened.getexif().get(ExifTags.Base.Orientation, 1) if exif_transpose else 1
            changed = orientation in range(2, 9)
            img = ImageOps.exif_transpose(opened) if changed else opened
            img = shrink(to_rgb(img), max_size)
            if (
                image_format == "jpg"
                and not reencode
                and fmt == "JPEG"
                and mode == "RGB"
                and not changed
                and img.size == original
            ):
                return LoadedImage(raw, original, original, mode)
            return LoadedImage(encode_image(img, image_format, quality=JPEG_QUALITY), img.size, original, mode)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this image", never crash the run
        return ImageFailure("unreadable image", f"{type(e).__name__}: {e}")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int = 64) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` processes, results in input order, at most ``window`` in flight.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True)
class Entry:
    """One input image and its captions: ``captions`` is ``((sample_key, caption), ...)``."""

    path: Path
    source_id: str
    captions: tuple[tuple[str, str], ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageOptions:
    """How :func:`load_image` prepares every image of a recipe run."""

    image_format: ImageFormat = "jpg"
    max_size: int | None = None
    exif_transpose: bool = True
    reencode: bool = False

    def __post_init__(self) -> None:
        if self.max_size is not None and self.max_size < 1:
            raise RecipeError(f"--max_size must be >= 1 (or left out to keep the size), got {self.max_size}")

    def load(self, path: Path) -> LoadedImage | ImageFailure:
        """:func:`load_image` with these options (picklable, for worker processes)."""
        return load_image(
            path,
            image_format=self.image_format,
            max_size=self.max_size,
            exif_transpose=self.exif_transpose,
            reencode=self.reencode,
        )

    def to_dict(self) -> dict[str, Any]:
        """Manifest description of the image preprocessing."""
        return {
            "image_format": self.image_format,
            "mode": "converted to RGB (transparency composited over white, 16-bit scaled to 8-bit)",
            "exif_transpose": self.exif_transpose,
            "max_size": self.max_size,
            "resize": "BICUBIC so the shorter side is max_size when larger; never upscaled",
            "jpeg": (
                f"re-encoded at quality {JPEG_QUALITY}"
                if self.reencode
                else f"RGB JPEGs needing no change kept byte for byte, others encoded at quality {JPEG_QUALITY}"
            ),
        }


def _load_entry(opts: ImageOptions, entry: Entry) -> LoadedImage | ImageFailure:
    return opts.load(entry.path)


def image_samples(
    entries: Sequence[Entry],
    opts: ImageOptions,
    skips: SkipCounter,
    workers: int = 1,
    checks: DataChecks | None = None,
) -> Iterator[Sample]:
    """Decode ``entries`` (in order, on ``workers`` processes) into samples, one per caption.

    Images that fail to decode are counted in ``skips`` (reason ``unreadable image``) and left out;
    the others and their captions are counted in ``checks`` when given.
    """
    from functools import partial

    for entry, result in zip(entries, ordered_map(partial(_load_entry, opts), entries, workers)):
        if isinstance(result, ImageFailure):
            skips.add(result.reason, entry.source_id, result.detail)
            continue
        if checks is not None:
            checks.image(result.original_size, result.size)
            for _, caption in entry.captions:
                checks.caption(caption)
        meta = {
            "source_id": entry.source_id,
            "original_size": list(result.original_size),
            "size": list(result.size),
            **entry.metadata,
        }
        for key, caption in entry.captions:
            yield Sample(key, result.data, caption, meta)


def write_entries(
    out: Path,
    entries_by_split: Mapping[str, Sequence[Entry]],
    opts: ImageOptions,
    skips: SkipCounter,
    *,
    workers: int = 1,
    max_per_shard: int = 1000,
    checks: DataChecks | None = None,
) -> list[SplitManifest]:
    """:func:`write_shards` for each split's entries (splits without entries are skipped); the images and
    captions written are counted in ``checks`` when given."""
    if workers < 1:
        raise RecipeError(f"--workers must be >= 1, got {workers}")
    if max_per_shard < 1:
        raise RecipeError(f"--max_per_shard must be >= 1, got {max_per_shard}")
    manifests = []
    for split, entries in entries_by_split.items():
        if not entries:
            continue
        n = sum(len(e.captions) for e in entries)
        log.info("%s: %d images, %d captions", split, len(entries), n)
        samples = image_samples(entries, opts, skips, workers, checks)
        manifests.append(
            write_shards(samples, out, split, max_per_shard=max_per_shard, image_format=opts.image_format)
        )
    return manifests
