"""The streaming image-caption pipeline behind :class:`~glide_lightning.data.datamodule.GlideDataModule`.

Shards are webdataset tars; a sample is the run of consecutive members sharing a key: an image
(``jpg``/``jpeg``/``png``/``webp``, any PIL mode) and a caption (``txt`` or a ``json`` field).
:class:`ImageTextStream` turns shard URLs into ready batches inside each DataLoader worker::

    shard URLs -> [train: seeded resampling, dealt round-robin to (rank, worker)]
               -> tar members -> samples -> [val: routed to (rank, worker) by sample index]
               -> decode, RGB, resize, uint8 [3, S, S] -> [train: seeded shuffle buffer]
               -> batches (image float [-1, 1], tokens, mask, caption, key, url, skipped)

Bad input never stops the stream. An undecodable image, a missing or empty caption, an
unreadable, garbage or truncated shard (its rest) is *skipped*: logged at WARNING with the shard
URL, sample key and cause (repeats of a resampled bad sample, and everything after
:data:`MAX_LOGGED_SKIPS` per worker and epoch, at DEBUG) and counted in a shared-memory counter
(one slot per worker, readable from the main process, copied into each batch as ``"skipped"``).
A skipped sample counts 1; a shard that cannot be opened or parsed counts 1 (its sample count is
unknown); a truncated shard counts 1 for its lost rest, plus 1 if the sample being read when the
data ended is incomplete. A training worker that has read every shard without one valid sample
ends its stream (rather than resampling forever) and the loader raises.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from glide_lightning.data.images import to_rgb
from glide_lightning.data.tokenizers import Tokenizer

__all__ = ["IMAGE_KEYS", "RESIZE_MODES", "BadSample", "ImageTextStream", "ResizeMode", "ShardError", "check_choice",
           "get_caption", "iter_shard", "load_image", "parse_caption_keys"]

log = logging.getLogger(__name__)

ResizeMode = Literal["squish", "center_crop"]
RESIZE_MODES: tuple[str, ...] = ("squish", "center_crop")
IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
MAX_LOGGED_SKIPS = 100  # per worker and stream: WARNING up to here, then DEBUG
_T = TypeVar("_T")


def check_choice(name: str, value: _T, choices: Sequence[_T]) -> _T:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------- shards
@dataclass
class ShardError:
    """A shard-level failure (open, tar parsing, truncation) at sample ``key`` (None: before any)."""

    url: str
    key: str | None
    error: BaseException


def iter_shard(url: str) -> Iterator[dict[str, Any] | ShardError]:
    """Samples of one shard (``{"__key__", "__url__", ext: bytes, ...}``) in tar order. A read
    failure ends the shard: the sample read so far is still yielded (it may be complete), then
    one :class:`ShardError` whose ``key`` is that sample's (None: failed before any sample)."""
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:  # missing file, failing pipe command, ...
        yield ShardError(url, None, e)
        return
    current: dict[str, Any] | None = None
    try:
        for member in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if current is not None and prefix != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            suffix = suffix.lower()
            if suffix in current:
                current["__error__"] = f"duplicate member {member['fname']!r}"
            current[suffix] = member["data"]
    except Exception as e:  # garbage, truncated or unreadable tar: keep what was read, then stop
        if current is not None:
            yield current  # validated downstream like any sample (skipped if incomplete)
        yield ShardError(url, None if current is None else current["__key__"], e)
        current = None
    finally:
        try:
            stream.close()
        except Exception:  # noqa: S110 - a failing close must not hide the data already read
            pass
    if current is not None:
        yield current


# ----------------------------------------------------------------------------------------- images
def load_image(data: bytes, image_size: int, resize_mode: ResizeMode = "squish") -> Tensor:
    """Decode image bytes to a uint8 ``[3, image_size, image_size]`` tensor.

    ``squish`` resizes the whole image to a square (aspect ratio not kept, as miniGLIDE does);
    ``center_crop`` resizes the short side to ``image_size`` and keeps the centre square (one
    resampling of the cropped region). JPEGs are decoded at a reduced DCT scale when they are at
    least twice the target size (PIL ``draft``); EXIF orientation is applied. Raises on
    undecodable or truncated data.
    """
    img = Image.open(io.BytesIO(data))
    img.draft(None, (image_size, image_size))  # JPEG only: never below the target size
    img.load()
    img = to_rgb(ImageOps.exif_transpose(img))
    width, height = img.size
    box: tuple[float, float, float, float] | None = None
    if resize_mode == "center_crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
    elif resize_mode != "squish":
        check_choice("resize_mode", resize_mode, RESIZE_MODES)
    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    return rearrange(torch.from_numpy(np.array(img, dtype=np.uint8)), "h w c -> c h w")


# --------------------------------------------------------------------------------------- captions
class BadSample(ValueError):
    """Why a sample was skipped (no image, no caption, ...)."""


def parse_caption_keys(caption_key: str | Sequence[str]) -> tuple[str, ...]:
    """Validate caption keys: a sample extension (``"txt"``) or ``"json:<field>"`` (dots walk
    nested objects: ``"json:meta.caption"``); several keys are tried in order."""
    keys = (caption_key,) if isinstance(caption_key, str) else tuple(caption_key)
    if not keys:
        raise ValueError("caption_key must name at least one key, e.g. 'txt' or 'json:caption'")
    for key in keys:
        if not isinstance(key, str) or not key.strip() or key.strip() in ("json:",) or key.startswith("json:."):
            raise ValueError(f"invalid caption_key {key!r}: use a sample extension ('txt') or 'json:<field>'")
    return tuple(k.strip() for k in keys)


def get_caption(sample: dict[str, Any], keys: Sequence[str]) -> str:
    """The first non-empty caption found under ``keys`` (a list value: its first non-empty
    string), whitespace-stripped; raises :class:`BadSample` if there is none."""
    parsed: dict[str, Any] = {}
    for key in keys:
        ext, _, path = key.partition(":")
        if ext.lower() not in sample:
            continue
        raw = sample[ext.lower()]
        if not path:
            value: Any = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        else:
            if ext not in parsed:
                parsed[ext] = json.loads(raw)
            value = parsed[ext]
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, str) and v.strip()), None)
        if isinstance(value, str) and value.strip():
            return value.strip()
    found = sorted(k for k in sample if not k.startswith("__"))
    raise BadSample(f"no caption under {list(keys)} (sample has {found})")


# --------------------------------------------------------------------------------------- dataset
class _Item(NamedTuple):
    image: Tensor  # uint8 [3, S, S]
    caption: str
    key: str
    url: str


@dataclass
class _Progress:
    """Per-worker progress of one pass, for the "no valid sample anywhere" check."""

    good: int = 0
    shards_done: int = 0
    distinct_done: set[str] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)


class ImageTextStream(IterableDataset):
    """Batches of decoded, resized, tokenized image-caption pairs streamed from shards.

    Training (``train=True``): shard URLs are resampled with replacement from one random
    sequence seeded by ``(seed, epoch)`` and dealt round-robin to the ``world_size x workers``
    (rank, worker) slots; each slot shuffles its samples with a buffer seeded by
    ``(seed, epoch, rank, worker)``. Given those and the worker count, an epoch is reproducible.
    The stream is infinite unless ``batches_per_epoch`` (per rank) is set, which also gives it a
    ``len``. Validation (``train=False``): every (rank, worker) reads all shards in order; raw
    sample ``i`` (at most ``max_samples``) belongs to rank ``i % world_size``, and that rank's
    ``j``-th sample to worker ``(j // batch_size) % workers``, so every sample is used exactly
    once, ranks differ by at most one sample and batches come out in the single-process order.

    Args:
        urls: Shard URLs (see :func:`expand_shards`).
        tokenizer: Tokenizes a batch of captions (run in the worker).
        batch_size: Samples per batch.
        image_size: Output side in pixels.
        resize_mode: ``"squish"`` or ``"center_crop"`` (see :func:`load_image`).
        caption_keys: Where captions are looked up (see :func:`get_caption`).
        train: Resample and shuffle (else one deterministic pass).
        shuffle_buffer: Training shuffle buffer size in samples (0 or 1: no shuffling).
        seed: Base seed of the shard sequence and the shuffle buffers.
        batches_per_epoch: Training batches per rank per epoch (None: infinite stream).
        max_samples: Validation: use only the first ``max_samples`` samples (None: all).
        rank: This process's global rank.
        world_size: Number of ranks.
        skip_counter: Shared int64 tensor, one slot per worker (created if None).
        name: What the stream is called in messages (e.g. the shard spec).
    """

    def __init__(self, urls: Sequence[str], *, tokenizer: Tokenizer, batch_size: int, image_size: int = 64,
                 resize_mode: ResizeMode = "squish", caption_keys: Sequence[str] = ("txt",), train: bool = False,
                 shuffle_buffer: int = 1000, seed: int = 0, batches_per_epoch: int | None = None,
                 max_samples: int | None = None, rank: int = 0, world_size: int = 1,
                 skip_counter: Tensor | None = None, name: str = "") -> None:
        super().__init__()
        if not urls:
            raise ValueError("ImageTextStream needs at least one shard URL")
        self.urls = list(urls)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.resize_mode = check_choice("resize_mode", resize_mode, RESIZE_MODES)
        self.caption_keys = parse_caption_keys(caption_keys)
        self.train, self.shuffle_buffer, self.seed = train, int(shuffle_buffer), int(seed)
        self.batches_per_epoch, self.max_samples = batches_per_epoch, max_samples
        self.rank, self.world_size = int(rank), int(world_size)
        counter = torch.zeros(64, dtype=torch.long) if skip_counter is None else skip_counter
        self.skip_counter = counter.share_memory_()
        self.name = name or repr(self.urls[0] if len(self.urls) == 1 else f"{len(self.urls)} shards")
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # read by (persistent) workers

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass (shared with already-started worker processes)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        """The epoch of the next pass."""
        return int(self._epoch)

    def skipped(self) -> int:
        """Samples and shards skipped so far by this stream's workers (this process's rank)."""
        return int(self.skip_counter.sum())

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an infinite or unsized stream has no len()")
        return self.batches_per_epoch

    def describe_failure(self) -> str:
        """What was looked for, and how much was skipped (for the "no valid sample" errors)."""
        return (f"no valid sample in {self.name} (rank {self.rank} of {self.world_size}): looked for an "
                f"image under {list(IMAGE_KEYS)} and a caption under {list(self.caption_keys)}; "
                f"{self.skipped()} sample(s)/shard(s) skipped so far (see the WARNING logs of {__name__})")

    # ---------------------------------------------------------------------------------- stages
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, progress = self.epoch, _Progress()
        slot = worker % self.skip_counter.numel()
        if not self.train:
            events = self._route(self._read(iter(self.urls), None), worker, workers)
            items = self._decode(events, progress, slot)
            yield from (self._collate([item for _, item in group]) for group in _group_by_chunk(items))
            return
        rng = random.Random(wds.utils.make_seed(self.seed, epoch))
        shards = (self.urls[rng.randrange(len(self.urls))] for _ in repeat(None))  # resampled, infinite
        shards = islice(shards, self.rank * workers + worker, None, self.world_size * workers)
        items = (item for _, item in self._decode(((None, e) for e in self._read(shards, progress)), progress, slot))
        if self.shuffle_buffer > 1:
            seed = wds.utils.make_seed(self.seed, epoch, self.rank, worker)
            items = wds.filters.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), seed=seed)(items)
        batches = (self._collate(chunk) for chunk in _chunks(items, self.batch_size))
        if self.batches_per_epoch is not None:
            share = self.batches_per_epoch // workers + int(worker < self.batches_per_epoch % workers)
            batches = islice(batches, share)
        yield from batches

    def _read(self, shards: Iterator[str], progress: _Progress | None) -> Iterator[dict[str, Any] | ShardError]:
        """Samples of the shards in turn. With ``progress`` (resampled training), give up once
        every shard has been read (or 3x as many reads as shards) without a valid sample, since
        resampling would loop forever: the stream ends, and the loader raises on an empty pass
        (ending rather than raising lets the other worker processes shut down cleanly)."""
        for url in shards:
            if progress is not None and progress.good == 0 and (
                len(progress.distinct_done) >= len(self.urls) or progress.shards_done >= 3 * len(self.urls)
            ):
                log.error("%s; this worker read %d shard(s) and gives up", self.describe_failure(),
                          progress.shards_done)
                return
            yield from iter_shard(url)
            if progress is not None:
                progress.shards_done += 1
                progress.distinct_done.add(url)

    def _route(self, events: Iterator[Any], worker: int, workers: int) -> Iterator[tuple[int, Any]]:
        """Validation: keep this (rank, worker)'s events (samples and shard errors alike, so each
        skip is counted once), tagged with their batch ("chunk") number."""
        for index, event in enumerate(events):
            if self.max_samples is not None and index >= self.max_samples:
                return
            if index % self.world_size != self.rank:
                continue
            chunk = (index // self.world_size) // self.batch_size
            if chunk % workers == worker:
                yield chunk, event

    def _decode(self, events: Iterable[tuple[_T, Any]], progress: _Progress, slot: int) -> Iterator[tuple[_T, _Item]]:
        for chunk, event in events:
            if isinstance(event, ShardError):
                self._skip(event, event.error, progress, slot)
                continue
            try:
                item = self._to_item(event)
            except Exception as e:  # any failure of one sample: skip, log, count
                self._skip(event, e, progress, slot)
                continue
            progress.good += 1
            yield chunk, item

    def _to_item(self, sample: dict[str, Any]) -> _Item:
        if "__error__" in sample:
            raise BadSample(sample["__error__"])
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample(f"no image under {list(IMAGE_KEYS)} (sample has {found})")
        caption = get_caption(sample, self.caption_keys)
        image = load_image(sample[image_key], self.image_size, self.resize_mode)
        return _Item(image, caption, sample["__key__"], sample["__url__"])

    def _skip(self, event: Any, error: BaseException, progress: _Progress, slot: int) -> None:
        self.skip_counter[slot] += 1
        cause = str(error) if isinstance(error, BadSample) else f"{type(error).__name__}: {error}"
        if isinstance(event, ShardError):
            what = (f"shard {event.url}" if event.key is None
                    else f"rest of shard {event.url} after sample {event.key!r}")
        else:
            what = f"sample {event['__key__']!r} of shard {event['__url__']}"
        if what in progress.warned or len(progress.warned) >= MAX_LOGGED_SKIPS:  # resampled again, or too many
            log.debug("skipped %s: %s", what, cause)
            return
        log.warning("skipped %s: %s", what, cause)
        progress.warned.add(what)
        if len(progress.warned) == MAX_LOGGED_SKIPS:
            log.warning("%d samples/shards skipped by this worker this epoch; further skips and repeats are "
                        "logged at DEBUG level (all are counted)", MAX_LOGGED_SKIPS)

    def _collate(self, items: Sequence[_Item]) -> dict[str, Any]:
        tokens, mask = self.tokenizer([item.caption for item in items])
        image = torch.stack([item.image for item in items]).float().div_(127.5).sub_(1.0)
        return {"image": image, "tokens": tokens, "mask": mask,
                "caption": [item.caption for item in items], "key": [item.key for item in items],
                "url": [item.url for item in items], "skipped": self.skip_counter.sum()}


def _chunks(items: Iterator[_T], size: int) -> Iterator[list[_T]]:
    while chunk := list(islice(items, size)):
        yield chunk


def _group_by_chunk(items: Iterator[tuple[int, _T]]) -> Iterator[list[tuple[int, _T]]]:
    group: list[tuple[int, _T]] = []
    for pair in items:
        if group and pair[0] != group[0][0]:
            yield group
            group = []
        group.append(pair)
    if group:
        yield group
