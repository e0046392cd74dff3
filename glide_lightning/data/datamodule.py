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
and the log says so. See :class:`~glide_lightning.data.loaders.StreamLoader`. With
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
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader

from glide_lightning.data.conditioning import check_low_res_size
from glide_lightning.data.embeddings import load_shards_empty_caption
from glide_lightning.data.loaders import ReplayBatches, StreamLoader
from glide_lightning.data.pipeline import RESIZE_MODES, ImageTextStream, ResizeMode, check_choice, parse_caption_keys
from glide_lightning.data.shards import upscale_warning
from glide_lightning.data.tokenizers import Tokenizer, TokenizerSpec
from glide_lightning.models.config import MODEL_KINDS, ModelKind
from glide_lightning.data.workers import leave_stop_signals_to_the_main_process

__all__ = ["GlideDataModule", "expand_shards", "measure_pipeline"]

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
        tokenizer_spec: How captions become tokens: the model's
            :class:`~glide_lightning.data.tokenizers.TokenizerSpec` (tokenizer name, ``text_ctx``, its files), or its
            dict. The training CLI derives it from the model's config (the text encoder implies the tokenizer, see
            ``TokenizerSpec.for_model``); in Python pass ``module.tokenizer_spec`` or e.g.
            ``TokenizerSpec("clip", text_ctx=77)``. No default: the model decides.
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
        tokenizer_spec: TokenizerSpec | Mapping[str, Any],
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
        spec = TokenizerSpec.coerce(tokenizer_spec)
        tokenizer_spec = spec.to_dict()  # recorded as plain data (checkpoints load with weights_only=True)
        self.save_hyperparameters()
        check_choice("resize_mode", resize_mode, RESIZE_MODES)
        for name, value, minimum in (("image_size", image_size, 1),
                                     ("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                     ("num_workers", num_workers, 0),
                                     ("shuffle_buffer", shuffle_buffer, 0), ("max_val_samples", max_val_samples, 1),
                                     ("samples_per_epoch", samples_per_epoch, batch_size)):
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        check_choice("model_kind", model_kind, MODEL_KINDS)
        check_low_res_size(model_kind, low_res_size, image_size)
        self.model_kind, self.low_res_size = model_kind, low_res_size
        self.train_shards, self.val_shards = train_shards, val_shards
        self.image_size, self.resize_mode = image_size, resize_mode
        self.caption_keys = parse_caption_keys(caption_key)
        self.tokenizer_spec = spec
        self.tokenizer: Tokenizer = spec.build()
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
        self.check_shards(stage)
        if stage == "fit" and (warning := upscale_warning(self.train_urls, self.image_size)) is not None:
            log.warning("%s", warning)
        self.tokenizer(["warm-up"])

    def check_shards(self, stage: str) -> None:
        """Expand the shard specs ``stage`` (``fit``, ``validate``) reads into ``train_urls`` / ``val_urls``: the
        CLI calls it before a run starts, so that a wrong path is said before anything is written.

        Raises:
            ValueError: the stage's shards are not given.
            FileNotFoundError: a local pattern matches no file."""
        if stage == "fit":
            if self.train_shards is None:
                raise ValueError("GlideDataModule: train_shards is required to fit (--data.train_shards)")
            self.train_urls = expand_shards(self.train_shards)
        if stage in ("fit", "validate") and self.val_shards is not None:
            self.val_urls = expand_shards(self.val_shards)
        if stage == "validate" and self.val_shards is None:
            raise ValueError("GlideDataModule: val_shards is required to validate (--data.val_shards)")

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
        return load_shards_empty_caption(self.train_urls or [])

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
        return DataLoader(ReplayBatches(batches, per_rank, world_size), batch_size=None, shuffle=False)


def measure_pipeline(shards: str | list[str], *, warmup_batches: int = 1, max_batches: int | None = None,
                     **datamodule_kwargs: Any) -> float:
    """Images per second through the data pipeline: read + decode + RGB + resize + tokenize +
    collate, in :class:`GlideDataModule`'s validation mode (one deterministic pass over
    ``shards``, at most ``warmup_batches + max_batches`` batches). ``datamodule_kwargs`` go to
    :class:`GlideDataModule` (``image_size``, ``tokenizer_spec``, ``resize_mode``, ``num_workers``,
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
