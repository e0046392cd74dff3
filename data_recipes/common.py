"""Helpers shared by the recipes: their options (:class:`Recipe`, :class:`ImageRecipe`), output dir, skip
accounting, splits, the checks of images and captions against the model, the manifest. Reading image files into
shards: :mod:`data_recipes.images`."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from glide_lightning.data.shards import (
    MANIFEST_NAME,
    Manifest,
    SplitManifest,
    load_manifest,
    write_manifest,
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


class RecipeError(ValueError):
    """A user-facing problem with a recipe's input or arguments: a ``ValueError``, so the front door
    (:mod:`glide_lightning.commands`) prints it as one ``error: ...`` line, without a traceback."""


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip", ".gz", ".7z")


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a directory, else a :class:`RecipeError` naming ``what`` it should be (and, for an
    archive, how to extract it)."""
    path = Path(path)
    if not path.is_dir():
        if path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
            how = "unzip" if path.name.lower().endswith(".zip") else "tar -xf"
            raise RecipeError(f"{what} {path} is an archive, not a directory: extract it first ({how} {path}) and "
                              f"pass the extracted folder")
        state = "is not a directory" if path.exists() else "does not exist"
        raise RecipeError(f"{what} {path} {state}{'; ' + hint if hint else ''}")
    return path


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a file, else a :class:`RecipeError` naming ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        state = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise RecipeError(f"{what} {path} {state}{'; ' + hint if hint else ''}")
    return path


def out_folder(out: Path) -> OutputFolder:
    """``--out`` of a recipe: :data:`RECIPE_OUTPUTS` are its files; its lock is neither counted nor removed."""
    return OutputFolder(out, "", RECIPE_OUTPUTS, kept=(re.escape(LOCK_NAME),), writers="data recipe")


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
            ex.append(capped(f"{source}: {detail}" if detail else source))

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




def capped(text: str, limit: int | None = None) -> str:
    """``text`` cut to ``limit`` characters (default :data:`MANIFEST_TEXT_CHARS`), saying how long it was: what
    the manifest and the log record of a caption or a path (a 1 MB caption is not copied whole)."""
    limit = MANIFEST_TEXT_CHARS if limit is None else limit
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text)} characters in all]"


MANIFEST_TEXT_CHARS = 300
"""The most characters of one caption (or skip example) the manifest records."""


def json_value(value: Any) -> Any:
    """An option as JSON (paths as str)."""
    return str(value) if isinstance(value, os.PathLike) else value


@dataclass(kw_only=True)
class Recipe:
    """The options every recipe has: where it writes."""

    NAME: ClassVar[str] = ""
    """The recipe's name on the command line (``python -m glide_lightning data NAME``)."""

    out: Path
    """Output directory for the shards and manifest.json. One that holds files already is refused (the files
    of two datasets must not mix): see ``--overwrite``."""
    overwrite: bool = False
    """Write into a non-empty ``--out``: the recipe outputs there (shards, manifest.json, fid_captions.txt,
    fid_reference/, ...) are deleted first; other files stay."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def options(self) -> dict[str, Any]:
        """The options as the manifest records them (``args``): JSON values, ``overwrite`` left out."""
        return {f.name: json_value(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.init and f.name != "overwrite"}

    def run(self) -> Any:
        """Write the dataset; returns its manifest."""
        raise NotImplementedError


@dataclass(kw_only=True)
class ShardRecipe(Recipe):
    """A recipe that writes shards."""

    max_per_shard: int = 1000
    """Samples per shard."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_per_shard < 1:
            raise RecipeError(f"--max_per_shard must be >= 1, got {self.max_per_shard}")


@dataclass(kw_only=True)
class ImageRecipe(ShardRecipe):
    """A recipe that shards images from disk: their preprocessing, and the model they are checked against."""

    max_size: int | None = None
    """Downscale so the shorter side is at most this many pixels (default: keep the size)."""
    reencode: bool = False
    """Re-encode RGB JPEGs at quality 95 even when they need no change."""
    workers: int = 1
    """Processes decoding images (the output is identical for any number)."""
    seed: int = 0
    """Seed of the sample order."""
    image_size: int = 64
    """The image size of the model these shards are for (``model.model.image_size``; GLIDE's base: 64). Nothing
    is resized to it (see ``--max_size``): images whose shorter side is under half of it are counted and warned
    about."""
    text_ctx: int = 128
    """The caption length of the model in tokens (``model.model.text_ctx``; GLIDE's GPT-2 BPE: 128, the CLIP
    BPE: 77): captions longer than that are counted and warned about (training keeps their first tokens)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_size is not None and self.max_size < 1:
            raise RecipeError(f"--max_size must be >= 1 (or left out to keep the size), got {self.max_size}")
        if self.workers < 1:
            raise RecipeError(f"--workers must be >= 1, got {self.workers}")
        if self.image_size < 1 or self.text_ctx < 1:
            raise RecipeError(f"--image_size and --text_ctx must be >= 1, got {self.image_size} and {self.text_ctx}")

    def checks(self) -> DataChecks:
        """The checks of this run's images and captions against the model (:class:`DataChecks`)."""
        return DataChecks(self.image_size, self.text_ctx)


_PIECE = re.compile(r"\w+|[^\w\s]+")


def min_tokens(caption: str) -> int:
    """A lower bound of the BPE tokens of ``caption``: its runs of word characters and of punctuation, each at
    least one token of GPT-2's and of CLIP's BPE (which split letters, digits and punctuation further)."""
    return sum(1 for _ in _PIECE.finditer(caption))


@dataclass
class DataChecks:
    """The images and captions of a recipe run measured against the model they are for: images far below its
    ``image_size`` and captions over its ``text_ctx`` are counted, warned about (:meth:`report`) and recorded in
    the manifest (``checks``)."""

    image_size: int
    text_ctx: int
    sizes: ImageSizes = field(default_factory=lambda: ImageSizes())
    small_images: int = 0
    smallest: tuple[int, int] | None = None
    long_captions: int = 0
    longest_caption: int = 0
    """Tokens (at least) of the longest caption over the context."""

    def image(self, native: tuple[int, int], stored: tuple[int, int]) -> None:
        """Count one written image (its size on disk and in the shards)."""
        self.sizes.add(native, stored)
        if 2 * min(stored) < self.image_size:
            self.small_images += 1
            if self.smallest is None or min(stored) < min(self.smallest):
                self.smallest = (int(stored[0]), int(stored[1]))

    def caption(self, text: str) -> None:
        """Count one written caption."""
        if len(text) <= self.text_ctx:  # fewer characters than the context: fewer tokens too
            return
        tokens = min_tokens(text)
        if tokens > self.text_ctx:
            self.long_captions += 1
            self.longest_caption = max(self.longest_caption, tokens)

    def report(self) -> dict[str, Any]:
        """Log a warning for each problem found; returns the manifest entry ``checks``."""
        images = len(self.sizes.stored)
        if self.small_images:
            w, h = self.smallest or (0, 0)
            log.warning("%d of %d images are far smaller than the model's %d px (shorter side under %d px, the "
                        "smallest %dx%d px): the model would learn from blurry upscales; use larger images, or a "
                        "model of a smaller image_size (--image_size here, model.model.image_size in training)",
                        self.small_images, images, self.image_size, self.image_size // 2 + self.image_size % 2, w, h)
        if self.long_captions:
            log.warning("%d caption(s) are longer than the model's context of %d tokens (the longest at least %d "
                        "tokens): training keeps their first %d tokens and cuts the rest (the manifest records at "
                        "most %d characters of a caption)", self.long_captions, self.text_ctx,
                        self.longest_caption, self.text_ctx, MANIFEST_TEXT_CHARS)
        return {"image_size": self.image_size, "text_ctx": self.text_ctx,
                "images_under_half_image_size": self.small_images,
                "smallest_image": list(self.smallest) if self.smallest else None,
                "captions_over_text_ctx": self.long_captions}


def _capped_split(split: SplitManifest) -> SplitManifest:
    examples = tuple(capped(e) for e in split.captions.examples)
    return dataclasses.replace(split, captions=dataclasses.replace(split.captions, examples=examples))


def finish(
    out: Path,
    recipe: str,
    args: Mapping[str, Any],
    splits: Sequence[SplitManifest],
    skips: SkipCounter | None = None,
    extra: Mapping[str, Any] | None = None,
    checks: DataChecks | None = None,
) -> Manifest:
    """Write the manifest (captions in it capped at :data:`MANIFEST_TEXT_CHARS`), log a summary and the
    warnings of ``checks``, and return the parsed manifest."""
    extra = dict(extra or {})
    if skips is not None:
        extra["skipped"] = skips.to_dict()
        skips.report()
    if checks is not None:
        extra["image_sizes"] = checks.sizes.to_dict()
        extra["checks"] = checks.report()
    if not any(s.num_samples for s in splits):
        raise RecipeError(f"no sample could be written (every input was skipped); no manifest written in {out}")
    kept = [_capped_split(s) for s in splits if s.num_samples]
    write_manifest(out, recipe, {k: json_value(v) for k, v in args.items()}, kept, extra=extra)
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
