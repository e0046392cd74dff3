"""The loaders of :class:`~glide_lightning.data.datamodule.GlideDataModule`: :class:`StreamLoader`, a DataLoader
over an :class:`~glide_lightning.data.pipeline.ImageTextStream` that numbers its passes and keeps the resumable
stream state (where every rank's and worker's stream stands after the last trained batch), and
:class:`ReplayBatches`, the cached batches that ``Trainer(overfit_batches)`` replays."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from glide_lightning.data.pipeline import ImageTextStream, StreamPosition, StreamResume
from glide_lightning.data.workers import stop_signals_blocked

__all__ = ["ReplayBatches", "StreamLoader"]

log = logging.getLogger(__name__)


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
        if self.num_workers == 0:
            return self._checked(super().__iter__())
        with stop_signals_blocked():  # this may fork the workers: see data/workers.py
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


class ReplayBatches(Dataset):
    """Cached batches replayed in order (``overfit_batches``). ``per_rank`` items per rank; the
    index is divided by ``world_size`` so that Lightning's (unshuffled) DistributedSampler gives
    every rank its own cached batches in order: rank ``r`` reads indices ``r, r + W, ...``."""

    def __init__(self, batches: list[dict[str, Any]], per_rank: int, world_size: int) -> None:
        self.batches, self.per_rank, self.world_size = batches, per_rank, world_size

    def __len__(self) -> int:
        return self.per_rank * self.world_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[(index // self.world_size) % len(self.batches)]
