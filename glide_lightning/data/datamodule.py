"""``GlideDataModule``: image-caption pairs streamed from webdataset shards, for Lightning.

Batches are dicts::

    {"image": float32 [B, 3, S, S] in [-1, 1], "tokens": int64 [B, text_ctx], "mask": bool [B, text_ctx],
     "caption": list[str], "key": list[str], "url": list[str], "skipped": int64 scalar}

plus, from shards with precomputed frozen-encoder embeddings (the ``embed`` recipe, see
:mod:`glide_lightning.data.embeddings`), ``"text_emb"`` float16 ``[B, text_ctx, D]``, ``"text_mask"`` bool
``[B, text_ctx]`` and ``"text_encoder"`` (the encoder's identity per sample).
and, for the other model kinds (``model_kind``), ``"low_res"`` float32 ``[B, 3, s, s]`` (upsamplers:
the images area-downsampled to ``low_res_size``, as ADM does) and ``"inpaint_mask"`` float32
``[B, 1, S, S]`` (inpainting: 1 = known pixel, random rectangles and strokes); see
:mod:`glide_lightning.data.conditioning`.

Batching, decoding and tokenization happen in the DataLoader workers (``batch_size=None``
loaders). See :mod:`glide_lightning.data.pipeline` for the stream itself.

**Skipped samples.** Bad samples and shards are skipped, logged and counted in a shared-memory
counter per split (one slot per worker, so it works across worker processes). ``batch["skipped"]``
is this rank's cumulative count for the batch's split when the batch was made;
:meth:`GlideDataModule.skipped_total` reads it live. To log it, e.g. in ``training_step``:
``self.log("data/skipped", batch["skipped"].float(), on_step=True, on_epoch=False, reduce_fx="sum",
sync_dist=True)`` (sum over ranks; without ``sync_dist`` rank 0 logs its own count).

**Epochs and DDP.** Each (rank, worker) slot resamples shards from its own random sequence
seeded by ``(seed, epoch, rank, worker)`` and shuffles them in windows; ``epoch`` is the trainer's
current epoch (the number of passes when used without a trainer), pushed to the workers when the
loader is iterated, so epochs are reproducible given the seed, world size and worker count.

**Resume.** The training loader is stateful (``state_dict`` / ``load_state_dict``, which Lightning
saves in and restores from checkpoints): a run resumed with the same world size and worker count
trains on exactly the batches an uninterrupted run would have, mid-epoch included, reading again
only the current shuffle window of each stream; with another world size or worker count (or from
a checkpoint without stream state) the stream restarts from a seed derived from the step reached,
and the log says so. See :class:`StreamLoader`. With
``samples_per_epoch`` every rank yields exactly ``samples_per_epoch // batch_size`` full
batches per epoch (ranks stay in step; the loader has a ``len``); without it the stream is
infinite: stop with ``max_steps``. Validation is one deterministic pass: sample ``i`` goes to
rank ``i % world_size``, so each sample is seen exactly once per pass over all ranks, ranks
differ by at most one sample (and batch); every rank reads all validation shards to do so.

**overfit_batches.** With ``Trainer(overfit_batches=k)`` the first ``k`` batches of epoch 0 are
drawn once (in the main process) and replayed at every epoch: the same batches every step.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from glide_lightning.data.embeddings import load_empty_caption
from glide_lightning.data.pipeline import (
    RESIZE_MODES,
    ImageTextStream,
    ResizeMode,
    StreamPosition,
    StreamResume,
    check_choice,
    parse_caption_keys,
)
from glide_lightning.data.shards import upscale_warning
from glide_lightning.data.tokenizers import TOKENIZERS, Tokenizer, TokenizerName, build_tokenizer, tokenizer_files
from glide_lightning.models.config import MODEL_KINDS, ModelKind
from glide_lightning.data.workers import leave_stop_signals_to_the_main_process

__all__ = ["GlideDataModule", "StreamLoader", "expand_shards", "measure_pipeline"]

log = logging.getLogger(__name__)
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, http://, s3://, ... (not "C:")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a list of URLs, checking local files exist.

    ``spec`` is a string or a list of them; each string is expanded like webdataset does
    (``::`` separates several specs, ``${WDS_X}`` is substituted, then braces such as
    ``train-{000000..000009}.tar``). Each resulting item is a URL with a scheme (``pipe:``,
    ``http://``, ``s3://``, ..., kept as is, not checked), a local directory (all its ``*.tar``,
    sorted), a local glob (sorted matches) or a local file (``file:`` prefix allowed).

    Raises:
        FileNotFoundError: nothing matched, or some expanded local files do not exist; the
            message names the spec, directory or pattern that was looked at.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    missing: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(str(item)):
            local = url[len("file:"):] if url.startswith("file:") else url
            if _URL_SCHEME.match(url) and not url.startswith("file:"):
                urls.append(url)
            elif Path(local).expanduser().is_dir():
                directory = Path(local).expanduser()
                tars = sorted(str(p) for p in directory.glob("*.tar") if p.is_file())
                if not tars:
                    raise FileNotFoundError(f"no *.tar shards in directory {str(directory)!r} (shard spec {item!r})")
                splits = sorted({re.sub(r"-\d+$", "", Path(t).stem) for t in tars})
                if len(splits) > 1:  # e.g. the recipes' train-000000.tar and val-000000.tar side by side
                    log.warning("directory %s holds shards of several splits %s, all used; pass a pattern such "
                                "as %s to use one", directory, splits, directory / f"{splits[0]}-*.tar")
                urls.extend(tars)
            elif glob.has_magic(local):
                matches = sorted(glob.glob(os.path.expanduser(local)))
                if not matches:
                    raise FileNotFoundError(f"no shards match the pattern {local!r} (shard spec {item!r})")
                urls.extend(matches)
            elif Path(local).expanduser().is_file():
                urls.append(str(Path(local).expanduser()))
            else:
                missing.append(local)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} shard(s) of spec {spec!r} not found: {shown}")
    if not urls:
        raise FileNotFoundError(f"no shards found for spec {spec!r}")
    return urls


class StreamLoader(DataLoader):
    """A DataLoader over an :class:`ImageTextStream` that numbers its passes (epochs: set in the
    stream, also in persistent workers), raises if a pass yields no batch at all, never draws from
    the global RNG, and, for training, records where the stream stands.

    **Epochs.** The first pass takes its epoch from a resumed state, else from ``epoch_fn`` (the
    trainer's epoch, for a loader made mid-run), else 0; every later pass is the next epoch. So the
    stream, not Lightning's epoch counter, says which data comes next: a run stopped by
    ``max_steps`` mid-epoch is resumed by Lightning at the next epoch, but its data continues the
    unfinished one, as an uninterrupted run's would.

    **Resume.** Training batches carry their ``stream_position``; whoever trains on a batch hands
    it to :meth:`mark_consumed` (:class:`GlideDataModule` does so in ``on_before_batch_transfer``,
    i.e. for the batch of each training step, not for the ones Lightning prefetches).
    :meth:`state_dict` is then where every (rank, worker) stream stands after the last trained
    batch (Lightning saves it in the checkpoint; with several ranks ``gather_fn`` collects every
    rank's part) and :meth:`load_state_dict` makes the next pass continue from there: the same
    world size and worker count give exactly the batches an uninterrupted run would have had.
    Another world size or worker count restarts the stream from a seed derived from the number of
    batches trained so far (never from the beginning), and so does a checkpoint without stream
    state (``step_fn`` says how far the run got); both say so in the log.

    Args:
        dataset: The stream (any dataset works; the extras apply to streams only).
        epoch_fn: Returns the trainer's epoch (for the first pass of a loader made mid-run).
        step_fn: Returns the batches trained so far in the run (resumable training loaders).
        gather_fn: All-gathers an int64 tensor ``[L]`` from every rank into ``[world_size, L]``.
        rank_fn: Returns ``(rank, world_size)``.
        **kwargs: Passed to :class:`torch.utils.data.DataLoader`.
    """

    STATE_FORMAT = 1

    def __init__(self, dataset: Any, *, epoch_fn: Callable[[], int | None] | None = None,
                 step_fn: Callable[[], int] | None = None, gather_fn: Callable[[Tensor], Tensor] | None = None,
                 rank_fn: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        # the DataLoader draws its workers' base seed from this generator: with the default (None)
        # each new iterator would draw from the global RNG, which a resumed run would not replay
        seed = dataset.seed if isinstance(dataset, ImageTextStream) else 0
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, **kwargs)
        self.epoch_fn, self.step_fn, self.gather_fn = epoch_fn, step_fn, gather_fn
        self.rank_fn = rank_fn or (lambda: (0, 1))
        self._passes = 0
        self._epoch = 0  # of the current pass, and of the consumed positions below
        self._consumed = 0  # batches trained on in that epoch
        self._positions: dict[int, StreamPosition] = {}  # logical worker -> after its last trained batch
        self._pending: dict[str, Any] | None = None  # a loaded state, for the first pass

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[Any]:
        stream = self.dataset if isinstance(self.dataset, ImageTextStream) else None
        if self._passes:
            epoch = self._epoch + 1
        else:
            epoch = (self.epoch_fn() if self.epoch_fn is not None else None) or 0
            if stream is not None and stream.train:
                epoch = self._prepare_resume(stream, epoch)
        if stream is not None:
            stream.set_epoch(epoch)
        if self._epoch != epoch:  # a new epoch (a resumed one keeps the positions _prepare_resume set)
            self._epoch, self._consumed, self._positions = epoch, 0, {}
        self._passes += 1
        return self._checked(super().__iter__())

    def _prepare_resume(self, stream: ImageTextStream, epoch: int) -> int:
        """Before the first pass (and before worker processes copy the stream): continue from the
        loaded state, or restart from a step-derived seed, or start afresh. Returns the pass's epoch."""
        pending, self._pending = self._pending, None
        if pending is None or "epoch" not in pending:
            done = pending["restart"] if pending else (self.step_fn() if self.step_fn is not None else 0)
            if pending is None and done:
                log.warning("the checkpoint holds no data-stream state (written by an older version): the training "
                            "stream restarts from a new seed derived from batch %d, not from the beginning", done)
            stream.resume(None, restart=done)
            return epoch
        saved_epoch, consumed, positions = pending["epoch"], pending["consumed"], pending["positions"]
        if stream.batches_per_epoch is not None and consumed >= stream.batches_per_epoch:
            saved_epoch, consumed, positions = saved_epoch + 1, 0, {}  # saved after the last batch of its epoch
        self._epoch, self._consumed, self._positions = saved_epoch, consumed, dict(positions)
        stream.resume(StreamResume(saved_epoch, consumed % self.workers, dict(positions)), restart=pending["restart"])
        return saved_epoch

    def _checked(self, batches: Iterator[Any]) -> Iterator[Any]:
        count = 0
        for batch in batches:
            count += 1
            yield batch
        if count == 0 and isinstance(self.dataset, ImageTextStream):
            raise RuntimeError(self.dataset.describe_failure())

    # ------------------------------------------------------------------------------ resume state
    def mark_consumed(self, position: Sequence[int]) -> None:
        """Record that the batch with this ``stream_position`` was trained on."""
        logical, *values = position
        position = StreamPosition.from_list(values)
        if position.epoch != self._epoch:
            self._epoch, self._consumed, self._positions = position.epoch, 0, {}
        self._positions[int(logical)] = position
        self._consumed += 1

    def _restart(self) -> int:
        return self.dataset.restart if isinstance(self.dataset, ImageTextStream) else 0

    def state_dict(self) -> dict[str, Any]:
        """Where every (rank, worker) stream stands after the last trained batch (plain ints, so
        checkpoints load with ``weights_only=True``)."""
        width = 5
        head = 3  # epoch, consumed, restart; then per logical worker: present, cursor, offset, batches, skipped
        row = [self._epoch, self._consumed, self._restart()]
        for logical in range(self.workers):
            position = self._positions.get(logical)
            row += [0] * width if position is None else [1, *position.to_list()[1:]]
        local = torch.tensor(row, dtype=torch.long)
        rows = self.gather_fn(local) if self.gather_fn is not None else local[None]
        _, world_size = self.rank_fn()
        ranks = []
        for values in rows.reshape(world_size, -1).tolist():
            epoch, consumed, restart = values[:head]
            positions = {str(w): [epoch, *values[head + w * width + 1:head + (w + 1) * width]]
                         for w in range(self.workers) if values[head + w * width]}
            ranks.append({"epoch": epoch, "consumed": consumed, "restart": restart, "positions": positions})
        return {"format": self.STATE_FORMAT, "world_size": world_size, "num_workers": self.workers, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next pass (see the class docstring)."""
        rank, world_size = self.rank_fn()
        if state.get("format") != self.STATE_FORMAT:
            raise ValueError(f"unknown data-stream state format {state.get('format')!r} (expected "
                             f"{self.STATE_FORMAT}): was the checkpoint written by a newer glide_lightning?")
        if (state["world_size"], state["num_workers"]) != (world_size, self.workers):
            done = self.step_fn() if self.step_fn is not None else int(state["ranks"][0]["consumed"])
            log.warning("resuming with %d rank(s) x %d loader worker(s) where the checkpoint had %d x %d: the training "
                        "stream restarts from a new seed derived from batch %d (not from the beginning)",
                        world_size, self.workers, state["world_size"], state["num_workers"], done)
            self._pending = {"restart": done}
            return
        own = state["ranks"][rank]
        positions = {int(w): StreamPosition.from_list(p) for w, p in own["positions"].items()}
        self._pending = {"epoch": int(own["epoch"]), "consumed": int(own["consumed"]),
                         "restart": int(own["restart"]), "positions": positions}


class _ReplayBatches(Dataset):
    """Cached batches replayed in order (``overfit_batches``). ``per_rank`` items per rank; the
    index is divided by ``world_size`` so that Lightning's (unshuffled) DistributedSampler gives
    every rank its own cached batches in order: rank ``r`` reads indices ``r, r + W, ...``."""

    def __init__(self, batches: list[dict[str, Any]], per_rank: int, world_size: int) -> None:
        self.batches, self.per_rank, self.world_size = batches, per_rank, world_size

    def __len__(self) -> int:
        return self.per_rank * self.world_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[(index // self.world_size) % len(self.batches)]


class GlideDataModule(L.LightningDataModule):
    """Streams (image, caption) pairs from webdataset shards as GLIDE training batches.

    Args:
        train_shards: Training shards: a local path, a brace pattern
            (``data/train-{000000..000009}.tar``), a glob, a directory (all its ``*.tar``,
            sorted), a list of these, or any URL webdataset opens (``pipe:aws s3 cp
            s3://bucket/x.tar -``, ``https://...``). Required for fitting.
        val_shards: Validation shards, same forms (None: no validation data).
        image_size: Side of the square training images in pixels: the model's ``image_size``
            (the training CLI links ``model.model.image_size`` here; no default of its own).
        resize_mode: ``squish`` resizes the whole image to a square (miniGLIDE);
            ``center_crop`` resizes the short side then crops the centre square.
        caption_key: Where the caption is: a sample extension (``txt``) or a JSON field
            (``json:caption``, dots for nested fields); a list is tried in order.
        tokenizer: Caption tokenizer: ``clip`` (CLIP BPE, offline), ``gpt2`` (GLIDE's) or ``t5`` (a frozen
            T5 encoder's): the model's (linked from ``model.tokenizer``).
        text_ctx: Tokens per caption (padded/truncated): the model's text context (linked from
            ``model.model.text_ctx``).
        bpe_dir: Directory with GPT-2's ``encoder.json`` and ``vocab.bpe`` (``gpt2`` only; None:
            ``$GLIDE_GPT2_BPE_DIR``): the model's (linked from ``model.bpe_dir``).
        tokenizer_path: The ``t5`` tokenizer's hub name or directory: the frozen encoder's (linked from
            ``model.model.text_encoder_name``); unused by the other tokenizers.
        tokenizer_revision: Its hub revision (linked from ``model.model.text_encoder_revision``).
        batch_size: Training batch size per rank.
        val_batch_size: Validation batch size per rank (None: ``batch_size``).
        num_workers: DataLoader worker processes per rank (0: load in the main process).
        shuffle_buffer: Training samples shuffled together in each worker's shuffle window (at
            least this many, whole shards; 0: no shuffling). Memory: this many decoded images per
            worker; a resume reads the current window again.
        samples_per_epoch: Training samples per rank per epoch (rounded down to whole batches);
            None: an endless stream (use ``max_steps``).
        seed: Seed of the shard resampling and the shuffle buffers (with the epoch).
        max_val_samples: Validate on the first this many validation samples only (None: all).
        model_kind: The model's kind (linked from ``model.model.kind``): ``upsample`` and
            ``upsample_inpaint`` batches carry ``low_res``, ``inpaint`` and ``upsample_inpaint`` ones
            ``inpaint_mask``. ``base`` (the default, for Python callers of text-to-image data): neither.
        low_res_size: Side in pixels of the upsamplers' low-resolution input (GLIDE: 64 for its 256 px
            upsampler); required by and only allowed for the upsampling kinds.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        *,
        image_size: int,
        tokenizer: TokenizerName,
        text_ctx: int,
        bpe_dir: str | None,
        tokenizer_path: str | None = None,
        tokenizer_revision: str | None = None,
        resize_mode: ResizeMode = "squish",
        caption_key: str | list[str] = "txt",
        batch_size: int = 12,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        max_val_samples: int | None = None,
        model_kind: ModelKind = "base",
        low_res_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_choice("resize_mode", resize_mode, RESIZE_MODES)
        check_choice("tokenizer", tokenizer, sorted(TOKENIZERS))
        for name, value, minimum in (("image_size", image_size, 1), ("text_ctx", text_ctx, 1),
                                     ("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                     ("num_workers", num_workers, 0),
                                     ("shuffle_buffer", shuffle_buffer, 0), ("max_val_samples", max_val_samples, 1),
                                     ("samples_per_epoch", samples_per_epoch, batch_size)):
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        check_choice("model_kind", model_kind, MODEL_KINDS)
        upsampling = model_kind.startswith("upsample")
        if upsampling and low_res_size is None:
            raise ValueError(f"data.low_res_size is required for model.kind {model_kind!r}: the side of the "
                             f"low-resolution input (e.g. {image_size // 4} for a 4x upsampler; GLIDE: 64 -> 256)")
        if not upsampling and low_res_size is not None:
            raise ValueError(f"data.low_res_size is set ({low_res_size}) but model.kind {model_kind!r} takes no "
                             f"low-resolution input: remove it, or use model.kind upsample / upsample_inpaint")
        if low_res_size is not None and not 0 < low_res_size < image_size:
            raise ValueError(f"data.low_res_size must be between 1 and the model's image_size {image_size} "
                             f"(exclusive), got {low_res_size}")
        self.model_kind, self.low_res_size = model_kind, low_res_size
        self.train_shards, self.val_shards = train_shards, val_shards
        self.image_size, self.resize_mode = image_size, resize_mode
        self.caption_keys = parse_caption_keys(caption_key)
        files = tokenizer_files(tokenizer, bpe_dir=bpe_dir, path=tokenizer_path, revision=tokenizer_revision)
        self.tokenizer: Tokenizer = build_tokenizer(tokenizer, text_ctx, **files)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.samples_per_epoch, self.max_val_samples = samples_per_epoch, max_val_samples
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self._skipped: dict[str, Tensor] = {}  # per split, made by the process that loads the data
        self._train_loader: StreamLoader | None = None  # records the positions of the trained batches

    def __getstate__(self) -> dict[str, Any]:
        # spawned rank processes (ddp_spawn) count their own skips: do not share the counters
        return {**self.__dict__, "_skipped": {}, "_train_loader": None}

    # ------------------------------------------------------------------------------ Lightning
    def setup(self, stage: str) -> None:
        """Expand the shard specs (clear error if nothing matches), warn when ``image_size`` is far above
        the training images' size (:func:`~glide_lightning.data.shards.upscale_warning`) and load the
        tokenizer's BPE in the main process (forked workers inherit it)."""
        if stage == "fit":
            if self.train_shards is None:
                raise ValueError("GlideDataModule: train_shards is required to fit")
            self.train_urls = expand_shards(self.train_shards)
            if (warning := upscale_warning(self.train_urls, self.image_size)) is not None:
                log.warning("%s", warning)
        if stage in ("fit", "validate") and self.val_shards is not None:
            self.val_urls = expand_shards(self.val_shards)
        if stage == "validate" and self.val_shards is None:
            raise ValueError("GlideDataModule: val_shards is required to validate")
        self.tokenizer(["warm-up"])

    def train_dataloader(self) -> DataLoader:
        """The training stream, or replayed cached batches under ``Trainer(overfit_batches)``."""
        overfit = self.trainer.overfit_batches if self.trainer is not None else 0
        if overfit:
            return self._replay_loader(overfit)
        self._train_loader = self._loader(self._stream("train"), epoch_fn=self._trainer_epoch, step_fn=self._trained,
                                          gather_fn=self._gather, rank_fn=self._rank_info)
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One deterministic pass over the validation shards ([] without ``val_shards``)."""
        if self.val_shards is None:
            return []
        return self._loader(self._stream("val"), epoch_fn=None)

    def empty_caption_embedding(self) -> tuple[Tensor, Tensor, str] | None:
        """The empty caption's precomputed embedding stored with the training shards (``empty_caption.npz``
        beside the first local shard, written by the ``embed`` recipe): ``(text_emb [1, L, D] float16,
        text_mask [1, L], encoder identity)``, or None."""
        first = next(iter(self.train_urls or []), None)
        if first is None or not Path(first).is_file():
            return None
        return load_empty_caption(Path(first).parent)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the stream position of the batch about to be trained on (Lightning calls this
        right before the step, not when it prefetches), and refresh ``batch["skipped"]`` with the
        live count (workers fill it when they make the batch, which with several workers and
        prefetching is not monotonic)."""
        if not isinstance(batch, dict) or self.trainer is None:
            return batch
        position = batch.pop("stream_position", None)
        if position is not None and self.trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed(position)
        if "skipped" in batch:
            batch["skipped"] = torch.tensor(self.skipped_total("train" if self.trainer.training else "val"))
        return batch

    def preview_batch(self) -> dict[str, Any]:
        """The first batch of the validation pass (without ``val_shards``: of the training stream's epoch 0),
        the same at every call, read in this process: the real images, captions and conditioning inputs that
        the sample grids of the upsampling and inpainting models show."""
        stream = self._stream("val" if self.val_shards is not None else "train")
        stream.set_epoch(0)
        batch = next(iter(stream), None)
        if batch is None:
            raise RuntimeError(stream.describe_failure())
        return batch

    # -------------------------------------------------------------------------------- helpers
    def skipped_total(self, split: str = "train") -> int:
        """Samples and shards skipped so far in ``split`` (``train`` or ``val``) by this rank."""
        counter = self._skipped.get(check_choice("split", split, ("train", "val")))
        return 0 if counter is None else int(counter.sum())

    def _counter(self, split: str) -> Tensor:
        """The split's shared-memory skip counter, one slot per worker (workers write to it)."""
        if split not in self._skipped:
            self._skipped[split] = torch.zeros(max(1, self.num_workers), dtype=torch.long).share_memory_()
        return self._skipped[split]

    def batches_per_epoch(self) -> int | None:
        """Training batches per rank per epoch (None: endless stream)."""
        return None if self.samples_per_epoch is None else self.samples_per_epoch // self.batch_size

    def _rank_info(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()  # $RANK/$WORLD_SIZE or torch.distributed
        return rank, world_size

    def _trainer_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _trained(self) -> int:
        """Training batches of the run so far (0 without a trainer)."""
        if self.trainer is None:
            return 0
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def _gather(self, local: Tensor) -> Tensor:
        """``local`` [L] of every rank as [world_size, L] (a collective: every rank must call it)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return local[None]
        gathered = self.trainer.strategy.all_gather(local.to(self.trainer.strategy.root_device))
        return gathered.reshape(self.trainer.world_size, -1).cpu()

    def _stream(self, split: str) -> ImageTextStream:
        urls = self.train_urls if split == "train" else self.val_urls
        spec = self.train_shards if split == "train" else self.val_shards
        if urls is None:
            if spec is None:
                raise ValueError(f"GlideDataModule: no {split}_shards configured")
            urls = expand_shards(spec)
        rank, world_size = self._rank_info()
        return ImageTextStream(
            urls, tokenizer=self.tokenizer, image_size=self.image_size, resize_mode=self.resize_mode,
            caption_keys=self.caption_keys, train=split == "train", shuffle_buffer=self.shuffle_buffer,
            seed=self.seed, rank=rank, world_size=world_size, skip_counter=self._counter(split),
            batch_size=self.batch_size if split == "train" else self.val_batch_size,
            batches_per_epoch=self.batches_per_epoch() if split == "train" else None,
            max_samples=self.max_val_samples if split == "val" else None, name=f"{split}_shards={spec!r}",
            low_res_size=self.low_res_size, inpaint_masks="inpaint" in self.model_kind,
        )

    def _loader(self, stream: ImageTextStream, epoch_fn: Callable[[], int | None] | None,
                **resume_fns: Any) -> StreamLoader:
        workers = self.num_workers
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return StreamLoader(stream, epoch_fn=epoch_fn, batch_size=None, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=on_cuda,
                            worker_init_fn=leave_stop_signals_to_the_main_process if workers else None, **resume_fns)

    def _replay_loader(self, overfit: int | float) -> DataLoader:
        per_epoch = self.batches_per_epoch()
        if isinstance(overfit, float) and per_epoch is None:
            raise ValueError("Trainer(overfit_batches) must be an int number of batches with an endless stream "
                             "(or set samples_per_epoch to use a fraction)")
        count = int(overfit) if isinstance(overfit, int) else max(1, int(overfit * per_epoch))
        stream = self._stream("train")
        stream.set_epoch(0)
        batches = list(islice(iter(stream), count))
        if not batches:
            raise RuntimeError(stream.describe_failure())
        _, world_size = self._rank_info()
        per_rank = count if isinstance(overfit, int) else per_epoch
        log.info("overfit_batches=%s: replaying %d cached training batch(es) every epoch", overfit, len(batches))
        return DataLoader(_ReplayBatches(batches, per_rank, world_size), batch_size=None, shuffle=False)


def measure_pipeline(shards: str | list[str], *, warmup_batches: int = 1, max_batches: int | None = None,
                     **datamodule_kwargs: Any) -> float:
    """Images per second through the data pipeline: read + decode + RGB + resize + tokenize +
    collate, in :class:`GlideDataModule`'s validation mode (one deterministic pass over
    ``shards``, at most ``warmup_batches + max_batches`` batches). ``datamodule_kwargs`` go to
    :class:`GlideDataModule` (``image_size``, ``resize_mode``, ``tokenizer``, ``num_workers``,
    ``val_batch_size``, ...). The warm-up batches (worker start-up) are not timed unless there
    is nothing else."""
    dm = GlideDataModule(val_shards=shards, **datamodule_kwargs)
    dm.setup("validate")  # loads the tokenizer's BPE before timing
    limit = None if max_batches is None else warmup_batches + max_batches
    start, images = time.perf_counter(), 0
    for index, batch in enumerate(islice(dm.val_dataloader(), limit)):
        if index == warmup_batches:
            start, images = time.perf_counter(), 0
        images += len(batch["key"])
    return images / max(time.perf_counter() - start, 1e-9)
