"""The wandb side of a training run, made to compare with the other arms of its ablation.

- :class:`RunWandbLogger`: Lightning's ``WandbLogger`` whose every logged row carries :data:`IMAGES_SEEN` (training
  images the weights have seen), which defines each ``train/*``, ``val/*`` and ``sys/*`` key the first time it is
  logged with that counter as its x-axis and its summary (:func:`summary_of`: the minimum of losses, FID and KID,
  the maximum of CLIP score, adherence and peak memory), and which, given the run's resolved config
  (:meth:`RunWandbLogger.describe`), puts that in the wandb run config instead of the module's and the data module's
  hyper-parameters (the config holds both, as the training CLI parsed them).
- :class:`TrainingStats`: at the trainer's log cadence, ``train/grad_norm`` (the total L2 norm of the gradients
  before clipping, unscaled under a GradScaler), ``train/param_norm`` and the peak memory (:data:`PEAK_RSS`, and
  :data:`PEAK_CUDA` on a GPU); it gives the logger its images-seen counter.
- :class:`ImagesSeen`: that counter, kept in the checkpoint so that it survives a resume with another batch size.

Both act on rank 0 only and only through a ``WandbLogger``: the CSV log does not change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import grad_norm, rank_zero_only

from glide_lightning.callbacks.steps import OptimizerStepCallback
from glide_lightning.evaluation.wandb_eval import IMAGES_SEEN, metric_name

log = logging.getLogger(__name__)

# IMAGES_SEEN: the x-axis of train/*, val/* and sys/*: optimizer steps × the global batch (images_per_step); named
# in evaluation/wandb_eval.py, which the eval runs, the Report and the dashboard read it from
PEAK_RSS = "sys/peak_memory_host_rss_mib"
"""The process's peak resident set size (host memory, ``getrusage``), MiB."""
PEAK_CUDA = "sys/peak_memory_cuda_allocated_mib"
"""``torch.cuda.max_memory_allocated`` of the module's GPU, MiB (tensors only, not the allocator's cache)."""
STEPPED_PREFIXES = ("train/", "val/", "sys/")
"""Keys drawn against :data:`IMAGES_SEEN`."""
MINIMISED = ("train/loss", "train/mse", "train/vb", "val/loss", "val/mse", "val/vb", "val/fid", "val/kid")
MAXIMISED = ("val/clip_score", "val/adherence", "sys/peak_memory")


def summary_of(key: str) -> str | None:
    """The wandb summary of ``key``: ``"min,last"`` for losses (``train/loss``, ``…/mse``, ``…/vb``, their
    quartiles), ``val/fid*`` and ``val/kid*``; ``"max,last"`` for ``val/clip_score*``, ``val/adherence*`` and
    ``sys/peak_memory*``; None (wandb's default: the last value) for the rest."""
    if key.startswith(MINIMISED):
        return "min,last"
    if key.startswith(MAXIMISED):
        return "max,last"
    return None


def count_images(batch: Mapping[str, Any]) -> int:
    """The number of images in a training or validation batch (``batch["image"]`` ``[B, C, H, W]``: B)."""
    return int(batch["image"].shape[0])


class ImagesSeen(L.Callback):
    """The training images the weights have seen, all ranks together: each micro-batch's images × ranks, counted
    as the batch starts (a step's logged rows and its checkpoint include its own images), saved in the checkpoint
    (Lightning's callback state) and restored with it. Its value is :data:`IMAGES_SEEN`: a resume that changes the
    batch size, the accumulation or the devices continues the count instead of recomputing it from the step (which
    would move every earlier point of the run). A checkpoint saved before this counter existed starts it at
    ``global_step`` × the current images per step (:func:`images_per_step`), the old estimate."""

    def __init__(self) -> None:
        self.count = 0
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count, self._restored = int(state_dict["count"]), True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._restored and trainer.global_step > 0:
            self.count = trainer.global_step * (images_per_step(trainer) or 0)
            log.info("%s starts at %d: the checkpoint predates the counter (global_step × images per step)",
                     IMAGES_SEEN, self.count)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.count += count_images(batch) * int(trainer.world_size)


def images_per_step(trainer: L.Trainer, batch_size: int | None = None) -> int | None:
    """Training images per optimizer step, all ranks: the batch size per rank (``batch_size``, else the data
    module's ``batch_size``) × ``accumulate_grad_batches`` × ranks. None when no batch size is known."""
    if batch_size is None:
        batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if not isinstance(batch_size, int) or batch_size < 1:
        return None
    return batch_size * int(trainer.accumulate_grad_batches) * int(trainer.world_size)


def images_seen(trainer: L.Trainer) -> int | None:
    """Training images the weights have seen: the trainer's :class:`ImagesSeen` count, else (a trainer without one)
    ``trainer.global_step`` × :func:`images_per_step` (None: no batch size known)."""
    counter = next((c for c in trainer.callbacks if isinstance(c, ImagesSeen)), None)
    if counter is not None:
        return counter.count
    per_step = images_per_step(trainer)
    return None if per_step is None else trainer.global_step * per_step


class RunWandbLogger(WandbLogger):
    """A ``WandbLogger`` for a training run (arguments: Lightning's ``WandbLogger``'s).

    Once given its counter (``images_seen``, a callable returning the images seen so far; :class:`TrainingStats`
    sets it), every row it logs carries :data:`IMAGES_SEEN`, and each ``train/*``, ``val/*`` and ``sys/*`` key is
    defined (``define_metric``) the first time it is logged, by its exact name, with that x-axis and its
    :func:`summary_of`. Exact names, because wandb matches a key to one of several glob definitions in no fixed
    order, and Lightning defines ``*`` (against ``trainer/global_step``) already; a dot (``val/fid@1.5``), which wandb
    reads as nesting, is escaped (:func:`~glide_lightning.evaluation.wandb_eval.metric_name`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.images_seen: Callable[[], int] | None = None
        self.description: dict[str, Any] | None = None
        self._defined: set[str] = set()

    def describe(self, config: Mapping[str, Any]) -> None:
        """Put ``config`` (the resolved config, lineage, ablation: JSON-like values) in the wandb run config, replacing
        what an earlier session of the run put there, and log no module hyper-parameters after it (the resolved
        config holds them). Call it on rank 0 (elsewhere it does nothing), once the wandb run has started."""
        self.description = dict(config)
        if rank_zero_only.rank == 0:
            self.experiment.config.update(self.description, allow_val_change=True)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self.description is None:  # no resolved config given: Lightning's own (the modules' hyper-parameters)
            super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.images_seen is not None:
            metrics = {**metrics, IMAGES_SEEN: self.images_seen()}
            self._define(metrics)
        super().log_metrics(metrics, step)

    def _define(self, metrics: Mapping[str, Any]) -> None:
        experiment = self.experiment
        if not self._defined:
            experiment.define_metric(IMAGES_SEEN)
            for prefix in STEPPED_PREFIXES:
                experiment.define_metric(f"{prefix}*", step_metric=IMAGES_SEEN)
            self._defined.add(IMAGES_SEEN)
        for key in metrics:
            if key in self._defined or not key.startswith(STEPPED_PREFIXES):
                continue
            summary = summary_of(key)
            experiment.define_metric(metric_name(key), step_metric=IMAGES_SEEN,
                                     **({"summary": summary} if summary else {}))
            self._defined.add(key)


def parameter_norm(module: torch.nn.Module) -> float:
    """The L2 norm of all trainable parameters of ``module`` together (those with ``requires_grad``), accumulated in
    float64 (float32 sums drift by 1e-4 relative over an embedding of millions of entries)."""
    norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float64) for p in module.parameters() if p.requires_grad]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def peak_memory(device: torch.device) -> dict[str, float]:
    """:data:`PEAK_RSS` (where the ``resource`` module exists: not on Windows) and, for a CUDA ``device``,
    :data:`PEAK_CUDA`, both in MiB."""
    peaks: dict[str, float] = {}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peaks[PEAK_RSS] = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    except ImportError:
        pass
    if device.type == "cuda":
        peaks[PEAK_CUDA] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


class TrainingStats(OptimizerStepCallback):
    """Gradient norm, parameter norm and peak memory at the trainer's log cadence (``log_every_n_steps``), to the
    run's ``WandbLogger`` only, from rank 0; gives a :class:`RunWandbLogger` its images-seen counter.

    At optimizer step k (counted from 1) with k a multiple of ``log_every_n_steps``, the row that Lightning logs the
    step's ``train/*`` under (``trainer/global_step`` k − 1, :data:`IMAGES_SEEN` k × images per step) gets:

    - ``train/grad_norm``: the L2 norm of all gradients together, taken in ``on_before_optimizer_step``: after the
      micro-batches' accumulation and the DDP all-reduce, before gradient clipping (the norm clipping compares with
      ``gradient_clip_val``), unscaled under a GradScaler (Lightning unscales before this hook; a fused optimizer,
      which unscales in its own step, gets its norm divided by the scale here). Lightning's ``grad_norm``.
      ``inf``/``nan`` for a step the GradScaler or the non-finite guard skips.
    - ``train/param_norm``: the L2 norm of the trainable parameters after the step (the optimizer's weights, not an
      EMA's).
    - :data:`PEAK_RSS` and, on a GPU, :data:`PEAK_CUDA`: peaks since the process started, MiB.

    Nothing is computed without a ``WandbLogger`` or off rank 0; nothing it does touches an RNG or the weights.
    """

    def __init__(self) -> None:
        self._logger: WandbLogger | None = None
        self._grad_norm: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if self._logger is None or not trainer.is_global_zero or stage != "fit":
            self._logger = None
            return
        counted = any(isinstance(c, ImagesSeen) for c in trainer.callbacks)
        if not counted and images_per_step(trainer) is None:
            log.warning("wandb: no batch size known (the data module has no batch_size): %s is not logged", IMAGES_SEEN)
        elif isinstance(self._logger, RunWandbLogger):
            self._logger.images_seen = lambda: images_seen(trainer) or 0

    def _due(self, trainer: L.Trainer, step: int) -> bool:
        """Whether optimizer step ``step`` (from 1) is one Lightning logs ``train/*`` at."""
        every = trainer.log_every_n_steps
        return self._logger is not None and every > 0 and step % every == 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._due(trainer, trainer.global_step + 1):
            total = grad_norm(pl_module, norm_type=2).get("grad_2.0_norm_total")
            self._grad_norm = None if total is None else float(total)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
            fused = getattr(inner, "_step_supports_amp_scaling", False)  # unscales in its own step, after this hook
            if self._grad_norm is not None and scaler is not None and fused:
                self._grad_norm /= float(scaler.get_scale())

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self._due(trainer, step):
            return
        assert self._logger is not None
        values = {"train/param_norm": parameter_norm(pl_module), **peak_memory(pl_module.device)}
        if self._grad_norm is not None:
            values["train/grad_norm"] = self._grad_norm
        self._grad_norm = None
        self._logger.log_metrics(values, step=step - 1)  # Lightning logs step k's train/* under k - 1
