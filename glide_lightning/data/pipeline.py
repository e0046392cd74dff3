"""The streaming image-caption pipeline behind :class:`~glide_lightning.data.datamodule.GlideDataModule`.

Shards are webdataset tars; a sample is the run of consecutive members sharing a key: an image
(``jpg``/``jpeg``/``png``/``webp``, any PIL mode) and a caption (``txt`` or a ``json`` field).
:class:`ImageTextStream` turns shard URLs into ready batches inside each DataLoader worker::

    shard URLs -> [train: each (rank, worker) resamples its own seeded shard sequence]
               -> tar members -> samples -> [val: routed to (rank, worker) by sample index]
               -> decode, RGB, resize, uint8 [3, S, S] -> [train: seeded shuffle windows]
               -> batches (image float [-1, 1], tokens, mask, caption, key, url, skipped,
                  train: stream_position; with precomputed embeddings: text_emb, text_mask,
                  text_encoder, see :mod:`glide_lightning.data.embeddings`; upsamplers: low_res;
                  inpainting: inpaint_mask)

The conditioning inputs of the other model kinds (:mod:`glide_lightning.data.conditioning`) are made
per batch: ``low_res`` by area downsampling of the batch's images, ``inpaint_mask`` from a NumPy
generator seeded by ``(seed, epoch, restart, rank, logical worker, batch number)`` in training (so a
resumed stream draws the masks an uninterrupted one would) and by ``(seed, batch number)`` in
validation (the same masks at every validation).

**Resumable training stream.** A (rank, worker) training stream is a sequence of *windows*: runs
of consecutive shards of its resampled shard sequence holding at least ``shuffle_buffer`` valid
samples, each window shuffled as a whole with a seed of its own. Every training batch carries the
:class:`StreamPosition` reached after it (window start, samples used from the window, batches,
skips), so a checkpoint can record where each stream stands and a resumed stream continues with
exactly the next sample: the shards before the window are drawn but never read, and only the
current window is read again. (A rolling shuffle buffer, as webdataset's ``shuffle``, cannot be
resumed without storing its contents; shuffle windows are what block-shuffling streaming loaders use
for the same reason.)

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
from dataclasses import dataclass, field, replace
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

from glide_lightning.data.conditioning import downsample, random_masks
from glide_lightning.data.embeddings import read_embedding
from glide_lightning.data.images import to_rgb
from glide_lightning.data.tokenizers import Tokenizer

__all__ = ["IMAGE_KEYS", "RESIZE_MODES", "BadSample", "ImageTextStream", "ResizeMode", "ShardError", "StreamPosition",
           "check_choice", "get_caption", "iter_shard", "load_image", "parse_caption_keys"]

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
@dataclass(frozen=True)
class StreamPosition:
    """Where one (rank, worker) training stream stands after a batch: enough to continue it exactly.

    ``cursor`` indexes the worker's resampled shard sequence of ``epoch`` (the window the next
    sample comes from starts there), ``offset`` counts the samples of that window already used,
    ``batches`` the batches the worker has yielded in the epoch, and ``skipped`` the samples/shards
    its slot had skipped (over the run) before the window was read (reading the window again counts
    the window's own skips again).
    """

    epoch: int
    cursor: int = 0
    offset: int = 0
    batches: int = 0
    skipped: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.cursor, self.offset, self.batches, self.skipped]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> StreamPosition:
        return cls(*(int(v) for v in values))


@dataclass(frozen=True)
class StreamResume:
    """What a stream continues from at its next pass of ``epoch``: the position of each logical
    worker, and the rotation that makes DataLoader worker ``p`` play logical worker
    ``(p + rotation) % workers`` (the DataLoader always starts its round-robin at worker 0; the
    batch after ``k`` consumed ones comes from logical worker ``k % workers``)."""

    epoch: int
    rotation: int
    positions: dict[int, StreamPosition]


class _Item(NamedTuple):
    image: Tensor  # uint8 [3, S, S]
    caption: str
    key: str
    url: str
    embedding: tuple[Tensor, Tensor, str] | None = None  # precomputed: text_emb [L, D] fp16, text_mask [L], encoder


@dataclass
class _Progress:
    """Per-worker progress of one pass, for the "no valid sample anywhere" check."""

    good: int = 0
    shards_done: int = 0
    distinct_done: set[str] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)


class ImageTextStream(IterableDataset):
    """Batches of decoded, resized, tokenized image-caption pairs streamed from shards.

    Training (``train=True``): each (rank, worker) slot resamples shard URLs with replacement from
    its own sequence seeded by ``(seed, epoch, restart, rank, worker)`` and shuffles them in
    windows of at least ``shuffle_buffer`` samples (see the module docstring); given those and the
    worker count an epoch is reproducible, and :meth:`resume` continues it from saved
    :class:`StreamPosition` s. The stream is infinite unless ``batches_per_epoch`` (per rank) is
    set, which also gives it a ``len``. Validation (``train=False``): every (rank, worker) reads all shards in order; raw
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
        shuffle_buffer: Training shuffle window size in samples (0 or 1: no shuffling; a window
            is then one shard).
        seed: Base seed of the shard sequence and the shuffle buffers.
        batches_per_epoch: Training batches per rank per epoch (None: infinite stream).
        max_samples: Validation: use only the first ``max_samples`` samples (None: all).
        rank: This process's global rank.
        world_size: Number of ranks.
        skip_counter: Shared int64 tensor, one slot per worker (created if None).
        name: What the stream is called in messages (e.g. the shard spec).
        low_res_size: Also yield ``low_res`` float ``[B, 3, low_res_size, low_res_size]``, the images
            area-downsampled (:func:`~glide_lightning.data.conditioning.downsample`); None: no.
        inpaint_masks: Also yield ``inpaint_mask`` float ``[B, 1, S, S]`` (1 = known pixel), random
            rectangles and strokes (:func:`~glide_lightning.data.conditioning.random_masks`).
    """

    def __init__(self, urls: Sequence[str], *, tokenizer: Tokenizer, batch_size: int, image_size: int,
                 resize_mode: ResizeMode = "squish", caption_keys: Sequence[str] = ("txt",), train: bool = False,
                 shuffle_buffer: int = 1000, seed: int = 0, batches_per_epoch: int | None = None,
                 max_samples: int | None = None, rank: int = 0, world_size: int = 1,
                 skip_counter: Tensor | None = None, name: str = "", low_res_size: int | None = None,
                 inpaint_masks: bool = False) -> None:
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
        self.low_res_size, self.inpaint_masks = low_res_size, inpaint_masks
        counter = torch.zeros(64, dtype=torch.long) if skip_counter is None else skip_counter
        self.skip_counter = counter.share_memory_()
        self.name = name or repr(self.urls[0] if len(self.urls) == 1 else f"{len(self.urls)} shards")
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # read by (persistent) workers
        self.restart = 0  # part of every training seed: a stream restarted at batch n uses n (see resume)
        self._resume: StreamResume | None = None  # each process's copy applies it once, then drops it

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass (shared with already-started worker processes)."""
        self._epoch.fill_(int(epoch))

    def resume(self, resume: StreamResume | None, restart: int = 0) -> None:
        """Continue the next pass of ``resume.epoch`` from ``resume``'s positions (None: start the
        epoch afresh), with ``restart`` mixed into every later training seed. Set before the
        DataLoader starts its worker processes (they take a copy of the stream)."""
        self._resume, self.restart = resume, int(restart)

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
            events = self._route((e for url in self.urls for e in iter_shard(url)), worker, workers)
            items = self._decode(events, progress, slot)
            yield from (self._collate([item for _, item in group], (self.seed, group[0][0]))
                        for group in _group_by_chunk(items))
            return
        resume, self._resume = self._resume, None
        if resume is None or resume.epoch != epoch:
            resume = StreamResume(epoch, 0, {})
        logical = (worker + resume.rotation) % workers
        start = resume.positions.get(logical, StreamPosition(epoch, skipped=int(self.skip_counter[slot])))
        share = None
        if self.batches_per_epoch is not None:
            share = self.batches_per_epoch // workers + int(logical < self.batches_per_epoch % workers)
        items = self._train_items(logical, start, progress, slot)
        batches = start.batches
        while share is None or batches < share:
            chunk = list(islice(items, self.batch_size))
            if not chunk:
                return
            batches += 1
            batch = self._collate([item for item, _ in chunk],
                                  (self.seed, start.epoch, self.restart, self.rank, logical, batches))
            batch["stream_position"] = [logical, *replace(chunk[-1][1], batches=batches).to_list()]
            yield batch

    def _train_items(self, logical: int, start: StreamPosition, progress: _Progress,
                     slot: int) -> Iterator[tuple[_Item, StreamPosition]]:
        """The samples of logical worker ``logical``'s training stream from ``start`` on, each with
        the position reached after it. Shards before ``start.cursor`` are drawn, not read."""
        seed = (self.seed, start.epoch, self.restart, self.rank, logical)
        rng = random.Random(wds.utils.make_seed(*seed))
        draws = (self.urls[rng.randrange(len(self.urls))] for _ in repeat(None))  # resampled, infinite
        cursor, offset = start.cursor, start.offset
        shards = islice(draws, cursor, None)
        self.skip_counter[slot] = start.skipped
        while True:
            window_start, skipped_before, window = cursor, int(self.skip_counter[slot]), []
            while len(window) < max(1, self.shuffle_buffer):
                if self._gives_up(progress):
                    return
                url = next(shards)
                cursor += 1
                window += [item for _, item in self._decode(((None, e) for e in iter_shard(url)), progress, slot)]
                progress.shards_done += 1
                progress.distinct_done.add(url)
            if self.shuffle_buffer > 1:
                random.Random(wds.utils.make_seed(*seed, window_start)).shuffle(window)
            end = StreamPosition(start.epoch, cursor, 0, 0, int(self.skip_counter[slot]))
            for index in range(offset, len(window)):
                last = index + 1 == len(window)
                yield window[index], end if last else StreamPosition(start.epoch, window_start, index + 1, 0,
                                                                     skipped_before)
            offset = 0

    def _gives_up(self, progress: _Progress) -> bool:
        """Resampled training: give up once every shard has been read (or 3x as many reads as
        shards) without a valid sample, since resampling would loop forever: the stream ends, and
        the loader raises on an empty pass (ending rather than raising lets the other worker
        processes shut down cleanly)."""
        if progress.good == 0 and (len(progress.distinct_done) >= len(self.urls)
                                   or progress.shards_done >= 3 * len(self.urls)):
            log.error("%s; this worker read %d shard(s) and gives up", self.describe_failure(), progress.shards_done)
            return True
        return False

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
        try:
            embedding = read_embedding(sample)
        except ValueError as error:
            raise BadSample(f"bad precomputed embedding: {error}") from None
        return _Item(image, caption, sample["__key__"], sample["__url__"], embedding)

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

    def _collate(self, items: Sequence[_Item], mask_seed: tuple[int, ...]) -> dict[str, Any]:
        """One batch; ``mask_seed`` seeds its inpainting masks (see the module docstring)."""
        tokens, mask = self.tokenizer([item.caption for item in items])
        image = torch.stack([item.image for item in items]).float().div_(127.5).sub_(1.0)
        batch = {"image": image, "tokens": tokens, "mask": mask,
                 "caption": [item.caption for item in items], "key": [item.key for item in items],
                 "url": [item.url for item in items], "skipped": self.skip_counter.sum()}
        if all(item.embedding is not None for item in items):  # precomputed: the frozen encoder need not run
            batch["text_emb"] = torch.stack([item.embedding[0] for item in items])  # [B, L, D] float16
            batch["text_mask"] = torch.stack([item.embedding[1] for item in items])  # [B, L]
            batch["text_encoder"] = [item.embedding[2] for item in items]
        if self.low_res_size is not None:
            batch["low_res"] = downsample(image, self.low_res_size)  # [B, 3, s, s]
        if self.inpaint_masks:
            rng = np.random.default_rng(wds.utils.make_seed(*mask_seed))
            batch["inpaint_mask"] = random_masks(len(items), self.image_size, rng)  # [B, 1, S, S]
        return batch


def _group_by_chunk(items: Iterator[tuple[int, _T]]) -> Iterator[list[tuple[int, _T]]]:
    group: list[tuple[int, _T]] = []
    for pair in items:
        if group and pair[0] != group[0][0]:
            yield group
            group = []
        group.append(pair)
    if group:
        yield group
