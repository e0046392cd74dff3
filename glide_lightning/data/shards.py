"""Webdataset shards: the on-disk contract between the data recipes and the data loader.

A dataset directory holds tar shards named ``{split}-{index:06d}.tar`` (``train-000000.tar``, …)
and a ``manifest.json``. Each sample in a shard is four tar members sharing one ``__key__``:

- ``<key>.jpg`` (RGB JPEG, quality 95) or ``<key>.png`` (RGB PNG, lossless), one per split;
- ``<key>.txt``: the caption, UTF-8;
- ``<key>.json``: metadata (source id, original size, recipe-specific fields).

``manifest.json`` (written last, see :func:`write_manifest`) names the recipe and its arguments and,
per split, every shard with its sample count and sha256, plus caption statistics.

Atomicity: a shard is written to a hidden temporary name of this process (``.<name>.<pid>.partial``)
and renamed once complete, and writing a
split first deletes the directory's manifest; the manifest is written (atomically) only after all
splits. So an interrupted recipe leaves no manifest, and a manifest only lists complete shards.
Determinism: members are written in a fixed order with fixed mtime/owner/mode, so the same samples
give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

from PIL import Image

from glide_lightning.data.images import to_rgb

__all__ = [
    "IMAGE_FORMATS", "JPEG_QUALITY", "MANIFEST_NAME", "CaptionStats", "ImageFormat", "Manifest", "Sample",
    "ShardInfo", "SplitManifest", "encode_image", "load_manifest", "sha256_file", "shard_name",
    "verify_manifest", "write_manifest", "write_shards",
]

log = logging.getLogger(__name__)

ImageFormat = Literal["jpg", "png"]
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)
JPEG_QUALITY = 95
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "glide_lightning.shards/1"
_MANIFEST_KEYS = frozenset({"format", "recipe", "args", "splits", "total_samples", "created", "glide_lightning_version"})
_TAR_MTIME = 0.0  # fixed member mtime: shards are byte-identical across runs
_TAR_OWNER = "glide"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
_MAGIC: dict[str, tuple[bytes, ...]] = {"jpg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",)}


@dataclass(frozen=True)
class Sample:
    """One image-caption pair before encoding.

    ``image`` is a PIL image (converted to RGB and encoded by :func:`write_shards`) or bytes
    already encoded in the split's ``image_format`` (written as is). ``key`` must be unique within
    the split and contain no dot (webdataset splits the key from the extension at the first dot).
    """

    key: str
    image: Image.Image | bytes
    caption: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard file: its name (relative to the dataset dir), samples, size, sha256."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class CaptionStats:
    """Caption statistics of a split (lengths in whitespace-separated words)."""

    count: int
    mean_words: float
    min_words: int
    max_words: int
    unique: int
    examples: tuple[str, ...]


@dataclass(frozen=True)
class SplitManifest:
    """What :func:`write_shards` wrote for one split."""

    split: str
    image_format: ImageFormat
    num_samples: int
    shards: tuple[ShardInfo, ...]
    captions: CaptionStats

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored under ``manifest["splits"][split]``."""
        return {
            "image_format": self.image_format,
            "num_samples": self.num_samples,
            "shards": [vars(s).copy() for s in self.shards],
            "captions": {**vars(self.captions), "examples": list(self.captions.examples)},
        }

    @classmethod
    def from_dict(cls, split: str, d: Mapping[str, Any]) -> SplitManifest:
        """Inverse of :meth:`to_dict`."""
        caps = dict(d["captions"])
        caps["examples"] = tuple(caps["examples"])
        return cls(
            split=split,
            image_format=d["image_format"],
            num_samples=int(d["num_samples"]),
            shards=tuple(ShardInfo(**s) for s in d["shards"]),
            captions=CaptionStats(**caps),
        )


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``; ``extra`` holds recipe-specific top-level entries."""

    root: Path
    recipe: str
    args: dict[str, Any]
    splits: dict[str, SplitManifest]
    total_samples: int
    created: str
    version: str
    extra: dict[str, Any] = field(default_factory=dict)

    def shard_paths(self, split: str) -> list[Path]:
        """Absolute paths of the shards of ``split`` (the loader's url list)."""
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in {self.root / MANIFEST_NAME}; it has {sorted(self.splits)}")
        return [self.root / s.name for s in self.splits[split].shards]


def shard_name(split: str, index: int) -> str:
    """``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_format(fmt: str) -> None:
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}")


def encode_image(img: Image.Image, fmt: ImageFormat = "jpg", *, quality: int = JPEG_QUALITY) -> bytes:
    """Encode ``img`` (any mode, converted with :func:`to_rgb`) as RGB JPEG (``quality``) or PNG."""
    _check_format(fmt)
    img = to_rgb(img)
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _caption_stats(word_counts: list[int], unique: set[str], examples: list[str]) -> CaptionStats:
    n = len(word_counts)
    return CaptionStats(
        count=n,
        mean_words=round(sum(word_counts) / n, 4) if n else 0.0,
        min_words=min(word_counts) if n else 0,
        max_words=max(word_counts) if n else 0,
        unique=len(unique),
        examples=tuple(examples),
    )


class _ShardFile:
    """One shard being written under a temporary name; :meth:`commit` renames it into place."""

    def __init__(self, out_dir: Path, name: str) -> None:
        import webdataset as wds

        self.path = out_dir / name
        self.tmp = out_dir / f".{name}.{os.getpid()}.partial"  # per process: never another writer's file
        self.stream = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self.writer = wds.TarWriter(
            self.stream, encoder=False, user=_TAR_OWNER, group=_TAR_OWNER, mtime=_TAR_MTIME, compress=False
        )
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        self.count += 1

    def commit(self) -> ShardInfo:
        self.writer.close()  # closes the tar stream, not our file object
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        digest, size = sha256_file(self.tmp), self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        log.info("wrote %s (%d samples, %.1f MB)", self.path.name, self.count, size / 1e6)
        return ShardInfo(name=self.path.name, num_samples=self.count, num_bytes=size, sha256=digest)

    def abort(self) -> None:
        try:
            self.writer.close()  # flush tarfile's buffer now, not at garbage collection into a closed file
        except (OSError, ValueError):
            pass
        self.stream.close()
        self.tmp.unlink(missing_ok=True)


def _encode_record(sample: Sample, fmt: ImageFormat, quality: int) -> dict[str, Any]:
    if not isinstance(sample.key, str) or not _KEY_RE.match(sample.key):
        raise ValueError(
            f"sample key {sample.key!r} is invalid: use letters, digits, '_', '-' or '/' only (no dots: "
            "webdataset splits key and extension at the first dot)"
        )
    if not isinstance(sample.caption, str) or not sample.caption.strip():
        raise ValueError(f"sample {sample.key!r} has an empty caption; skip such samples before writing")
    if isinstance(sample.image, Image.Image):
        data = encode_image(sample.image, fmt, quality=quality)
    elif isinstance(sample.image, (bytes, bytearray)):
        data = bytes(sample.image)
        if not data.startswith(_MAGIC[fmt]):
            raise ValueError(f"sample {sample.key!r}: image bytes are not {fmt} data; pass a PIL image to re-encode")
    else:
        raise TypeError(f"sample {sample.key!r}: image must be a PIL image or bytes, got {type(sample.image).__name__}")
    meta = json.dumps(dict(sample.metadata), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {"__key__": sample.key, fmt: data, "txt": sample.caption.encode("utf-8"), "json": meta}


def _check_split(split: str) -> None:
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split name {split!r} is invalid: use letters, digits and '_' only (e.g. 'train', 'val')")


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike[str],
    split: str,
    *,
    max_per_shard: int = 1000,
    image_format: ImageFormat = "jpg",
    jpeg_quality: int = JPEG_QUALITY,
) -> SplitManifest:
    """Write ``samples`` as ``{split}-{index:06d}.tar`` shards of at most ``max_per_shard`` samples.

    Existing shards of the same split and the directory's ``manifest.json`` are removed first (the
    manifest is rewritten by :func:`write_manifest` once every split is done). Each shard is
    renamed into place only when complete; on an error the partial shard is deleted.
    """
    _check_split(split)
    _check_format(image_format)
    if max_per_shard < 1:
        raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in out.glob(f"{split}-[0-9]*.tar"):
        stale.unlink()

    shards: list[ShardInfo] = []
    keys: set[str] = set()
    word_counts: list[int] = []
    unique: set[str] = set()
    examples: list[str] = []
    current: _ShardFile | None = None
    try:
        for sample in samples:
            record = _encode_record(sample, image_format, jpeg_quality)
            if sample.key in keys:
                raise ValueError(f"duplicate sample key {sample.key!r} in split {split!r}: keys must be unique")
            keys.add(sample.key)
            if current is None:
                current = _ShardFile(out, shard_name(split, len(shards)))
            current.write(record)
            word_counts.append(len(sample.caption.split()))
            if sample.caption not in unique and len(examples) < 5:
                examples.append(sample.caption)
            unique.add(sample.caption)
            if current.count >= max_per_shard:
                shards.append(current.commit())
                current = None
        if current is not None:
            shards.append(current.commit())
            current = None
    finally:
        if current is not None:
            current.abort()
    return SplitManifest(
        split=split,
        image_format=image_format,
        num_samples=len(word_counts),
        shards=tuple(shards),
        captions=_caption_stats(word_counts, unique, examples),
    )


def _version() -> str:
    from glide_lightning import __version__

    return __version__


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(
    out_dir: str | os.PathLike[str],
    recipe: str,
    args: Mapping[str, Any],
    splits: Iterable[SplitManifest],
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json`` (atomically) after every split's shards; returns its path.

    ``args`` must be JSON-serialisable (paths as str); ``extra`` adds recipe-specific top-level
    entries (skipped-input counts, FID reference preprocessing, …).
    """
    out = Path(out_dir)
    split_map = {s.split: s for s in splits}
    for s in split_map.values():
        missing = [sh.name for sh in s.shards if not (out / sh.name).is_file()]
        if missing:
            raise FileNotFoundError(f"split {s.split!r} lists shards missing from {out}: {missing[:3]}")
    clash = _MANIFEST_KEYS & set(extra or {})
    if clash:
        raise ValueError(f"extra manifest entries may not override {sorted(clash)}")
    doc = {
        "format": MANIFEST_FORMAT,
        "recipe": recipe,
        "args": dict(args),
        "splits": {name: s.to_dict() for name, s in split_map.items()},
        "total_samples": sum(s.num_samples for s in split_map.values()),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "glide_lightning_version": _version(),
        **dict(extra or {}),
    }
    path = out / MANIFEST_NAME
    _atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return path


def load_manifest(dataset_dir: str | os.PathLike[str]) -> Manifest:
    """Read ``<dataset_dir>/manifest.json``; raises a clear error if it is absent or malformed."""
    root = Path(dataset_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist; build one with "
                                "`python -m glide_lightning data <recipe>`")
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {root}: it is written last by a data recipe, so the directory is not a "
            "finished dataset (interrupted run?). Re-run the recipe, e.g. "
            "`python -m glide_lightning data synthetic --out DIR`"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        return Manifest(
            root=root.resolve(),
            recipe=doc["recipe"],
            args=dict(doc["args"]),
            splits={k: SplitManifest.from_dict(k, v) for k, v in doc["splits"].items()},
            total_samples=int(doc["total_samples"]),
            created=doc["created"],
            version=doc["glide_lightning_version"],
            extra={k: v for k, v in doc.items() if k not in _MANIFEST_KEYS},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid shard manifest: {e!r}") from e


def verify_manifest(dataset_dir: str | os.PathLike[str]) -> list[str]:
    """Recompute every listed shard's size and sha256; returns the problems found (empty: all good)."""
    manifest = load_manifest(dataset_dir)
    problems: list[str] = []
    for split in manifest.splits.values():
        for shard in split.shards:
            path = manifest.root / shard.name
            if not path.is_file():
                problems.append(f"{shard.name}: missing")
            elif path.stat().st_size != shard.num_bytes:
                problems.append(f"{shard.name}: {path.stat().st_size} bytes, manifest says {shard.num_bytes}")
            elif sha256_file(path) != shard.sha256:
                problems.append(f"{shard.name}: sha256 differs from the manifest")
    return problems


UPSCALE_WARNING_FACTOR = 2.0
"""The model's ``image_size`` is warned about above this multiple of the training images' median size."""


def upscale_warning(shard_urls: Iterable[str], image_size: int, factor: float = UPSCALE_WARNING_FACTOR) -> str | None:
    """A warning when ``image_size`` (px) is more than ``factor`` times the median size of the images in
    local shards, read from the ``image_sizes`` entry of the ``manifest.json`` beside them (the
    ``folder`` recipe writes it: the sizes stored in the shards, i.e. native or after ``--max-size``);
    None when it is not, or when no manifest says. The median size is the larger of the median width
    and height over every manifest found."""
    found: list[tuple[Path, float]] = []
    for directory in sorted({Path(url.removeprefix("file:")).parent for url in shard_urls if "://" not in url
                             and not url.startswith("pipe:")}):
        try:
            sizes = load_manifest(directory).extra.get("image_sizes") or {}
        except (FileNotFoundError, ValueError):
            continue
        stored = sizes.get("stored") or sizes.get("native")
        if stored:
            found.append((directory / MANIFEST_NAME, max(stored["width"]["median"], stored["height"]["median"])))
    if not found:
        return None
    median = max(size for _, size in found)
    if image_size <= factor * median:
        return None
    smaller = max(8, 1 << math.floor(math.log2(factor * median)))  # the largest power of 2 not warned about
    where = ", ".join(str(path) for path, _ in found)
    return (f"model.model.image_size {image_size} is {image_size / median:.1f}x the median size of the training "
            f"images ({median:g} px, from {where}): the model would learn upsampled pixels that carry no "
            f"information. A smaller model.model.image_size learns several times faster: e.g. "
            f"--model.model.image_size {smaller} (with a model whose channel_mult / attention_resolutions suit it)")
