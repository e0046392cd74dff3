"""Helpers shared by the recipes: output dir, image loading, skip accounting, splits, CLI args."""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import ExifTags, Image, ImageOps

from glide_lightning.data.images import to_rgb
from glide_lightning.data.shards import (
    JPEG_QUALITY,
    MANIFEST_NAME,
    ImageFormat,
    Manifest,
    Sample,
    SplitManifest,
    encode_image,
    load_manifest,
    write_manifest,
    write_shards,
)
from glide_lightning.data.embeddings import EMPTY_CAPTION_FILE
from glide_lightning.locks import LOCK_NAME, DirectoryLock, LockBusy, check_free, release_lock
from glide_lightning.outputs import OutputFolder, OutputNotEmpty

log = logging.getLogger("data_recipes")

#: File extensions scanned as images (fixed, so a scan does not depend on the PIL build).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
Split = Literal["train", "val"]
T = TypeVar("T")
R = TypeVar("R")


RECIPE_OUTPUTS: tuple[str, ...] = (
    r"[A-Za-z0-9_]+-\d{6}\.tar",  # shards: train-000000.tar, val-000000.tar, …
    re.escape(MANIFEST_NAME),
    r"fid_captions\.txt",
    r"fid_reference\.jsonl",
    r"fid_reference",  # the folder of FID reference images
    re.escape(EMPTY_CAPTION_FILE),  # embed
    r"\..+\.partial",  # a shard or manifest being written (or left by a writer that died)
)
"""What the recipes write in ``--out`` (names, as regular expressions): what ``--overwrite`` deletes."""


class RecipeError(Exception):
    """A user-facing problem with a recipe's input or arguments (printed without a traceback)."""


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a directory, else a :class:`RecipeError` naming ``what`` it should be."""
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise RecipeError(f"{what} {path} {state}{'; ' + hint if hint else ''}")
    return path


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a file, else a :class:`RecipeError` naming ``what`` it should be."""
    if not path.is_file():
        state = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise RecipeError(f"{what} {path} {state}{'; ' + hint if hint else ''}")
    return path


def out_folder(out: Path) -> OutputFolder:
    """``--out`` of a recipe: :data:`RECIPE_OUTPUTS` are its files; its lock is neither counted nor removed."""
    return OutputFolder(out, "", RECIPE_OUTPUTS, kept=(re.escape(LOCK_NAME),), writers="data recipe",
                        overwrite_flag="--overwrite")


def prepare_out_dir(out: Path, overwrite: bool) -> Path:
    """Create and lock ``out``; refuse (unless ``overwrite``) a directory that holds anything already.

    The lock (``out/.lock``, see :mod:`glide_lightning.locks`) makes this process the directory's
    only writer until :func:`finish` (or the process's end): a second recipe writing the same
    ``out`` is refused with the holder's pid, host and command. A directory holding files is refused
    (:mod:`glide_lightning.outputs`: the files of two datasets must not mix); with ``overwrite`` the
    recipe outputs there (:data:`RECIPE_OUTPUTS`: shards, manifest, partial files of earlier, dead
    writers, FID caption/reference files, the empty caption's embedding) are deleted first; other
    files in ``out`` are left alone.
    """
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} exists and is not a directory")
    try:
        DirectoryLock(out, "--out").acquire()
    except LockBusy as busy:
        raise RecipeError(str(busy)) from None
    try:
        return out_folder(out).claim(overwrite)
    except OutputNotEmpty as refused:
        release_lock(out)
        raise RecipeError(str(refused)) from None


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Raise unless ``out`` is absent, empty (but for its lock), or ``overwrite`` is set, and free: the
    early look of a recipe that reads its inputs before :func:`prepare_out_dir`."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} exists and is not a directory")
    try:
        check_free(out, "--out")  # a recipe writing there now: say so, not "already holds a dataset"
        out_folder(out).check(overwrite)
    except (LockBusy, OutputNotEmpty) as refused:
        raise RecipeError(str(refused)) from None


def clean_caption(text: str | None) -> str:
    """Caption with surrounding whitespace stripped and inner runs (newlines, tabs) collapsed."""
    return " ".join(str(text).split()) if text is not None else ""


def hash_unit(name: str, salt: str = "") -> float:
    """A stable pseudo-random number in [0, 1) from ``name`` (sha256; same on every machine)."""
    digest = hashlib.sha256(f"{salt}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(name: str, val_fraction: float) -> Split:
    """``"val"`` for a stable ``val_fraction`` share of names, else ``"train"``."""
    return "val" if hash_unit(name, "split") < val_fraction else "train"


def check_fraction(value: float, flag: str) -> float:
    """Validate a fraction in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise RecipeError(f"{flag} must be in [0, 1), got {value}")
    return value


@dataclass
class SkipCounter:
    """Counts skipped inputs by reason, keeping a few examples of each for the report."""

    examples_per_reason: int = 3
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, source: str, detail: str = "") -> None:
        """Record one skipped input."""
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.examples_per_reason:
            ex.append(f"{source}: {detail}" if detail else source)

    @property
    def total(self) -> int:
        """Number of skipped inputs."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """Manifest form: ``{"total": n, "reasons": {reason: {"count": n, "examples": [...]}}}``."""
        return {
            "total": self.total,
            "reasons": {r: {"count": n, "examples": self.examples[r]} for r, n in sorted(self.counts.items())},
        }

    def report(self) -> None:
        """Log the counts and examples."""
        if not self.total:
            log.info("skipped: none")
            return
        log.warning("skipped %d input(s):", self.total)
        for reason, n in sorted(self.counts.items()):
            log.warning("  %s: %d (e.g. %s)", reason, n, "; ".join(self.examples[reason]))


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


OUT_RULE = "one that holds files already is refused (the files of two datasets must not mix): see --overwrite"
OUT_HELP = f"output directory for shards + manifest.json; {OUT_RULE}"
OVERWRITE_HELP = ("write into a non-empty --out: the recipe outputs there (shards, manifest.json, fid_captions.txt, "
                  "fid_reference/, ...) are deleted first; other files stay")


def add_output_args(parser: argparse.ArgumentParser, max_per_shard: int = 1000) -> None:
    """``--out``, ``--max-per-shard``, ``--overwrite``."""
    parser.add_argument("--out", type=Path, required=True, help=OUT_HELP)
    parser.add_argument(
        "--max-per-shard", type=int, default=max_per_shard, help=f"samples per shard (default {max_per_shard})"
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_image_args(parser: argparse.ArgumentParser, seed_help: str = "seed of the sample order") -> None:
    """``--max-size``, ``--reencode``, ``--workers``, ``--seed``."""
    parser.add_argument(
        "--max-size", type=int, default=None, help="downscale so the shorter side is at most this (default: keep)"
    )
    parser.add_argument(
        "--reencode", action="store_true", help="re-encode RGB JPEGs at quality 95 even when they need no change"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes decoding images (default 1; output is identical)"
    )
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")


def args_to_json(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Recipe arguments as JSON-friendly values (paths as str), without argparse internals."""
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()
    out: dict[str, Any] = {}
    for k, v in items:
        if k.startswith("_") or callable(v) or k in ("quiet", "recipe"):
            continue
        out[k] = str(v) if isinstance(v, os.PathLike) else v
    return out


def finish(
    out: Path,
    recipe: str,
    args: Mapping[str, Any],
    splits: Sequence[SplitManifest],
    skips: SkipCounter | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write the manifest, log a summary, and return the parsed manifest."""
    extra = dict(extra or {})
    if skips is not None:
        extra["skipped"] = skips.to_dict()
        skips.report()
    if not any(s.num_samples for s in splits):
        raise RecipeError(f"no sample could be written (every input was skipped); no manifest written in {out}")
    write_manifest(out, recipe, args_to_json(args), [s for s in splits if s.num_samples], extra=extra)
    release_lock(out)  # the dataset is complete: the directory is free again
    for s in splits:
        log.info("%s: %d samples in %d shard(s)", s.split, s.num_samples, len(s.shards))
        if not s.num_samples:
            log.warning("split %r is empty and is left out of the manifest", s.split)
    log.info("manifest: %s", out / MANIFEST_NAME)
    return load_manifest(out)


@dataclass
class ImageSizes:
    """Sizes of the images a recipe wrote, ``(width, height)`` in pixels: ``native`` as found on disk
    (after EXIF orientation) and ``stored`` in the shards (after ``--max-size``)."""

    native: list[tuple[int, int]] = field(default_factory=list)
    stored: list[tuple[int, int]] = field(default_factory=list)

    def add(self, native: tuple[int, int], stored: tuple[int, int]) -> None:
        self.native.append((int(native[0]), int(native[1])))
        self.stored.append((int(stored[0]), int(stored[1])))

    def to_dict(self) -> dict[str, Any]:
        """Manifest entry ``image_sizes``: the image count and, for ``native`` and ``stored``, the min,
        median and max of the widths and heights (the training CLI compares them with the model's size)."""

        def stats(values: list[int]) -> dict[str, float]:
            ordered = sorted(values)
            mid = len(ordered) // 2
            median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
            return {"min": ordered[0], "median": median, "max": ordered[-1]}

        return {"images": len(self.native), **{
            name: {"width": stats([w for w, _ in sizes]), "height": stats([h for _, h in sizes])}
            for name, sizes in (("native", self.native), ("stored", self.stored)) if sizes}}


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
            raise RecipeError(f"--max-size must be >= 1 (or left out to keep the size), got {self.max_size}")

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
    sizes: ImageSizes | None = None,
) -> Iterator[Sample]:
    """Decode ``entries`` (in order, on ``workers`` processes) into samples, one per caption.

    Images that fail to decode are counted in ``skips`` (reason ``unreadable image``) and left out;
    the sizes of the others are added to ``sizes`` when given.
    """
    from functools import partial

    for entry, result in zip(entries, ordered_map(partial(_load_entry, opts), entries, workers)):
        if isinstance(result, ImageFailure):
            skips.add(result.reason, entry.source_id, result.detail)
            continue
        if sizes is not None:
            sizes.add(result.original_size, result.size)
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
    sizes: ImageSizes | None = None,
) -> list[SplitManifest]:
    """:func:`write_shards` for each split's entries (splits without entries are skipped); the sizes of
    the images written are added to ``sizes`` when given."""
    if workers < 1:
        raise RecipeError(f"--workers must be >= 1, got {workers}")
    if max_per_shard < 1:
        raise RecipeError(f"--max-per-shard must be >= 1, got {max_per_shard}")
    manifests = []
    for split, entries in entries_by_split.items():
        if not entries:
            continue
        n = sum(len(e.captions) for e in entries)
        log.info("%s: %d images, %d captions", split, len(entries), n)
        samples = image_samples(entries, opts, skips, workers, sizes)
        manifests.append(
            write_shards(samples, out, split, max_per_shard=max_per_shard, image_format=opts.image_format)
        )
    return manifests
