"""Sample grids during training: fixed prompts × guidance scales with fixed seeds, so grids from
different steps and runs compare cell by cell (upsamplers and inpainting models: fixed validation
images, their input | the results per scale | the real image). Also the Lightning-aware side of sampling: which
weights of a training module to sample from (:func:`model_from_module`, :func:`sampling_model`)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from glide_lightning.callbacks.steps import OptimizerStepCallback
from glide_lightning.data.images import image_grid, save_png, to_pil, to_uint8
from glide_lightning.sampling import (DEFAULT_GUIDANCE_SWEEP, SamplingConfig, SamplingModel, generate, load_checkpoint,
                                     sample_conditioned)

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["a photo of a dog", "a bowl of fruit on a wooden table", "a red car parked on a street",
                   "an oil painting of a mountain landscape"]


def model_from_module(module: Any, caller: L.Callback | None = None) -> tuple[nn.Module, str]:
    """The network a training-time callback should sample from, and which weights those are: the
    EMA weights once an EMA (Lightning ``WeightAveraging``) callback has updated its average, the
    live (optimizer's) weights before that or without one, whatever the order of the callbacks.

    Lightning's WeightAveraging swaps the average into the module from its ``on_validation_epoch_start``
    to its ``on_validation_epoch_end``, swapping even an average that was never updated (a delayed
    ``update_starting_at_step``): inside that window the module holds the average and the callback's
    copy the live weights, outside it the other way round. During validation, ``caller`` is the
    callback asking from its own ``on_validation_epoch_end``: the swap is then still in place exactly
    when the averaging callback comes after ``caller`` in ``trainer.callbacks`` (hooks run in that
    order). (``_average_model`` is a private attribute of Lightning's, read here only: this is the
    Lightning-aware side of sampling.)"""
    average, swapped = _averaging(module, caller)
    if average is None:
        return module.model, "live weights (no EMA callback)"
    updates = int(average.n_averaged)
    if updates:
        return (module if swapped else average.module).model, f"EMA weights ({updates} updates)"
    return (average.module if swapped else module).model, "live weights (the EMA has no update yet)"


def live_model(module: Any, caller: L.Callback | None = None) -> nn.Module:
    """The network with the live (optimizer's) weights, wherever :func:`model_from_module`'s swap put them."""
    average, swapped = _averaging(module, caller)
    return (average.module if swapped else module).model if average is not None else module.model


def _averaging(module: Any, caller: L.Callback | None) -> tuple[Any, bool]:
    """The averaging callback's average model (None: none) and whether it is swapped into the module now."""
    trainer = getattr(module, "_trainer", None)
    averaging = None if trainer is None else next(
        (cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging) and cb._average_model is not None), None)
    if averaging is None:
        return None, False
    swapped = False
    if trainer.validating or trainer.sanity_checking:
        callbacks = trainer.callbacks
        swapped = caller not in callbacks or callbacks.index(averaging) > callbacks.index(caller)
    return averaging._average_model, swapped


def sampling_model(pl_module: Any, caller: L.Callback | None = None) -> SamplingModel:
    """A GlideModule's network ready for :func:`generate`, with its weights chosen and named by
    :func:`model_from_module` (``source`` says which)."""
    model, weights = model_from_module(pl_module, caller)
    return SamplingModel(model, pl_module.diffusion_config, pl_module.tokenizer, pl_module.model_config,
                         f"training run, step {getattr(pl_module, 'global_step', 0)}: {weights}")


def check_sampling_steps(owner: str, steps: str, pl_module: Any) -> None:
    """Fail before training when a callback's sampling respacing cannot be taken from the module's process."""
    from glide_lightning.diffusion.schedules import space_timesteps

    try:
        space_timesteps(pl_module.diffusion_config.steps, steps)
    except ValueError as error:
        raise ValueError(f"{owner} steps {steps!r} does not fit the model's process of "
                         f"model.diffusion.steps={pl_module.diffusion_config.steps} ({error}): set the callback's "
                         f"init_args.sampling.steps to at most {pl_module.diffusion_config.steps} steps") from None


class SampleGrid(OptimizerStepCallback):
    """Every ``every_n_steps`` optimizer steps, and at ``max_steps`` when the run ends there, draw one image per
    (prompt, guidance scale) with the same seeds each time, log the grid (rows = prompts, columns = scales) to
    wandb as ``samples/grid`` and write it to ``<run dir>/samples/step<N>.png``. With a ``WandbLogger`` it also logs
    the ``samples`` Table (:data:`TABLE_COLUMNS`): one row per prompt × scale (× weights), each image on its own with
    its score, so that the runs of an ablation, which share prompts and seeds, compare side by side grouped by
    prompt.

    Upsampling and inpainting models (``model.kind`` other than ``base``) have no prompt-only samples: their
    rows are the first ``len(prompts)`` images of the data module's :meth:`preview_batch` (validation data)
    with their own captions, and the columns are the model's input (the low-res image, nearest-upscaled; or
    the known pixels, erased ones gray) | one result per guidance scale | the real image. Their Table rows are the
    results, with the validation captions as prompts.

    Args:
        prompts: captions of the grid's rows.
        guidance_scales: the grid's columns (default: ``DEFAULT_GUIDANCE_SWEEP``, the one sweep list).
        every_n_steps: optimizer steps between grids.
        seed: seed of the first row (row i uses seed + i, the same in every column).
        sampling: sampler, steps, η, batch size (its ``guidance_scale`` is replaced by each column's);
            checked when the config is parsed.
        upsampler: an upsampler checkpoint (ours, ``runs/<upsample run>/checkpoints/last.ckpt``, or
            glide-text2im's ``upsample.pt``): a base model's grid then shows the cascade's output at the
            upsampler's size (``sampling.upsample_steps`` / ``upsample_temp``). None: the base samples.
        table: log the ``samples`` Table (wandb only).
        raw_weights: the Table also holds the live (optimizer's) weights' samples beside the EMA's, once an EMA has
            been updated (``weights`` ``raw`` and ``ema``): twice the sampling. The grid stays the EMA's.
        adherence: score each Table image's text adherence (:mod:`~glide_lightning.evaluation.adherence`: captions of
            the synthetic shapes dataset only); None: when every caption is one.
        clip_model: open_clip model of the Table's CLIP score (None: no CLIP score).
        clip_pretrained: its pretrained tag or file (None: random weights, not a meaningful score).
    """

    def __init__(self, prompts: list[str] = DEFAULT_PROMPTS,
                 guidance_scales: list[float] = list(DEFAULT_GUIDANCE_SWEEP), every_n_steps: int = 1000,
                 seed: int = 0, sampling: SamplingConfig = SamplingConfig(), upsampler: str | None = None,
                 table: bool = True, raw_weights: bool = False, adherence: bool | None = None,
                 clip_model: str | None = None, clip_pretrained: str | None = "openai") -> None:
        if not prompts or not guidance_scales or every_n_steps < 1:
            raise ValueError("SampleGrid needs prompts, guidance_scales and every_n_steps >= 1")
        self.prompts, self.scales = list(prompts), [float(s) for s in guidance_scales]
        self.every_n_steps, self.seed = every_n_steps, seed
        self.config = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**sampling)
        self.upsampler_path, self._upsampler = upsampler, None
        self.table, self.raw_weights, self.adherence = table, raw_weights, adherence
        self.clip_model, self.clip_pretrained, self._clip = clip_model, clip_pretrained, None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Checks, before training: the sampling steps fit the model's process, and ``adherence: true`` has
        synthetic-shapes prompts (a base model's; ``ValueError`` naming the first other one)."""
        check_sampling_steps("SampleGrid", self.config.steps, pl_module)
        if self.adherence and pl_module.model_config.kind == "base":
            from glide_lightning.data.synthetic import parse_caption

            for prompt in self.prompts:
                try:
                    parse_caption(prompt)
                except ValueError as error:
                    raise ValueError(f"SampleGrid adherence: true scores synthetic-shapes captions only; prompt "
                                     f"{prompt!r} is not one ({error}): set adherence to null or false") from None

    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # once per optimizer step (not per micro-batch), and not when the run is stopping (Ctrl-C)
        if trainer.global_step % self.every_n_steps == 0 and trainer.is_global_zero and not trainer.should_stop:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run that reached max_steps between two grids ends with one (a short run then shows a grid at all); a
        # stopped one (Ctrl-C, max_time, non-finite loss) does not: it stops as fast as it can
        step, last = trainer.global_step, trainer.max_steps
        if (trainer.is_global_zero and not trainer.should_stop and last > 0 and step >= last
                and step % self.every_n_steps != 0):
            self.log_grid(trainer, pl_module)

    @torch.no_grad()
    def make_grid(self, pl_module: L.LightningModule) -> torch.Tensor:
        """uint8 [3, rows·H, cols·W]: row i = prompt i, column j = guidance scale j, seed = seed + i;
        from the EMA weights once averaged (:func:`model_from_module`; ``self.weights`` says which)."""
        loaded = sampling_model(pl_module, self)
        self.weights = loaded.source
        columns = self.columns(loaded, pl_module)
        images = rearrange(torch.stack(columns), "s p c h w -> (p s) c h w")
        return image_grid(images, rows=columns[0].shape[0])

    @torch.no_grad()
    def columns(self, loaded: SamplingModel, pl_module: Any) -> list[torch.Tensor]:
        """The grid's columns, each uint8 [rows, 3, H, W]: one per guidance scale (upsamplers and inpainting models:
        input | one per scale | real), sampled from ``loaded`` (in eval mode, restored after)."""
        was_training = loaded.model.training
        loaded.model.eval()
        seeds = [self.seed + i for i in range(len(self.prompts))]
        try:
            if loaded.model_config.kind == "base":
                upsampler = self.upsampler(next(loaded.model.parameters()).device)
                return [generate(loaded, self.prompts, seeds, replace(self.config, guidance_scale=scale),
                                 upsampler=upsampler).cpu() for scale in self.scales]  # each [P, 3, H, W]
            return self._conditioned_columns(loaded, pl_module, seeds)
        finally:
            loaded.model.train(was_training)

    def upsampler(self, device: torch.device) -> SamplingModel | None:
        """The cascade's upsampler (loaded once, kept on ``device``), or None."""
        if self.upsampler_path is not None and self._upsampler is None:
            self._upsampler = load_checkpoint(self.upsampler_path, device, kind="upsample")
        return self._upsampler

    def _conditioned_columns(self, loaded: SamplingModel, pl_module: Any, seeds: list[int]) -> list[torch.Tensor]:
        """input | result per scale | real, each uint8 [N, 3, H, W], for the first images of the preview batch."""
        if getattr(self, "_preview", None) is None:
            datamodule = getattr(pl_module.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "preview_batch"):
                raise ValueError(f"the sample grid of a {loaded.model_config.kind!r} model shows real images: train "
                                 f"with a GlideDataModule")
            self._preview = datamodule.preview_batch()
        batch = self._preview
        count = min(len(seeds), batch["image"].shape[0])
        device = next(loaded.model.parameters()).device
        real = batch["image"][:count].to(device)
        keep = batch["inpaint_mask"][:count].to(device) if "inpaint_mask" in batch else None
        low_res = batch["low_res"][:count].to(device) if "low_res" in batch else None
        shown = real * keep if keep is not None else F.interpolate(low_res, size=real.shape[-2:], mode="nearest")
        captions = list(batch["caption"][:count])
        results = [to_uint8(sample_conditioned(loaded, captions, seeds[:count], replace(self.config, guidance_scale=s),
                                               low_res=low_res, image=real, keep=keep)) for s in self.scales]
        return [to_uint8(shown).cpu(), *(r.cpu() for r in results), to_uint8(real).cpu()]

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        loaded = sampling_model(pl_module, self)
        self.weights = loaded.source
        columns = self.columns(loaded, pl_module)
        grid = image_grid(rearrange(torch.stack(columns), "s p c h w -> (p s) c h w"), rows=columns[0].shape[0])
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / "samples" / f"step{step:08d}.png"
        preview = getattr(self, "_preview", None)  # upsamplers and inpainting models: rows are validation images
        rows = self.prompts if preview is None else list(preview["caption"][:len(self.prompts)])
        save_png(grid, path, {"step": step, "rows (prompts)": rows, "columns (guidance scales)": self.scales,
                              "seeds": [self.seed + i for i in range(len(rows))],
                              "sampler": self.config.sampler, "steps": self.config.steps, "weights": self.weights})
        weights = self.weights.split(": ", 1)[-1]
        scales = f"guidance {', '.join(f'{s:g}' for s in self.scales)}"
        if pl_module.model_config.kind == "base":
            caption = f"step {step}, {weights}; rows: prompts, columns: {scales}"
        else:
            caption = f"step {step}, {weights}; rows: validation images; columns: input | {scales} | real"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples/grid", images=[to_pil(grid)], caption=[caption], step=step)
                if self.table:
                    base = pl_module.model_config.kind == "base"  # the others: input | results | real
                    sets = [(weights_label(loaded.source), columns if base else columns[1:-1])]
                    if self.raw_weights and sets[0][0] == "ema":
                        raw = replace(loaded, model=live_model(pl_module, self), source="live weights")
                        raw_columns = self.columns(raw, pl_module)
                        sets.append(("raw", raw_columns if base else raw_columns[1:-1]))
                    logger.log_table(key=SAMPLES_TABLE, columns=list(TABLE_COLUMNS),
                                     data=self.table_rows(trainer, rows, sets), step=step)
        log.info("sample grid at step %d (%s): %s", step, weights, path)
        return path

    def table_rows(self, trainer: L.Trainer, prompts: list[str],
                   sets: list[tuple[WeightsLabel, list[torch.Tensor]]]) -> list[list[Any]]:
        """The ``samples`` Table's rows (:data:`TABLE_COLUMNS`): per weights, per scale, per prompt, from ``sets``
        of (weights label, one uint8 [P, 3, H, W] column per guidance scale)."""
        import wandb

        from glide_lightning.callbacks.wandb_logging import images_seen

        seen = images_seen(trainer)
        data = []
        for label, results in sets:
            for scale, images in zip(self.scales, results):
                adherence, clip = self.scores(images, prompts)
                for i, prompt in enumerate(prompts):
                    data.append([trainer.global_step, seen, prompt, scale, label, self.seed + i,
                                 wandb.Image(images[i].permute(1, 2, 0).numpy()), adherence[i], clip[i]])
        return data

    def scores(self, images: torch.Tensor, prompts: list[str]) -> tuple[list[float | None], list[float | None]]:
        """Per image: its text adherence (where :attr:`adherence` asks for it, or is None and every prompt is a
        synthetic-shapes caption) and its CLIP score (with a ``clip_model``); None where not computed."""
        from glide_lightning.data.synthetic import parse_caption
        from glide_lightning.evaluation.adherence import score_image

        adherence: list[float | None] = [None] * len(prompts)
        if self.adherence is None:
            try:
                for prompt in prompts:
                    parse_caption(prompt)
                scored = True
            except ValueError:
                scored = False
        else:
            scored = self.adherence
        if scored:
            adherence = [score_image(image, prompt).fraction for image, prompt in zip(images, prompts)]
        clip: list[float | None] = [None] * len(prompts)
        if self.clip_model:
            if self._clip is None:
                from glide_lightning.evaluation.clip_score import CLIPScorer

                self._clip = CLIPScorer(self.clip_model, self.clip_pretrained)
            clip = [float(v) for v in self._clip.score(images, prompts)]
        return adherence, clip


WeightsLabel = Literal["ema", "raw"]
"""Which weights drew a Table row: the EMA's or the live (optimizer's) ones."""

SAMPLES_TABLE = "samples"
"""The wandb key of :class:`SampleGrid`'s Table."""
TABLE_COLUMNS = ("step", "images_seen", "prompt", "guidance_scale", "weights", "seed", "image", "adherence",
                 "clip_score")
"""The ``samples`` Table's columns: the optimizer step and training images seen at the time, the prompt, guidance
scale, weights (:data:`WeightsLabel`) and noise seed, the image (wandb.Image at the model's output size), its text
adherence and CLIP score (None where not computed)."""


def weights_label(source: str) -> WeightsLabel:
    """``ema`` for a :func:`sampling_model` source naming EMA weights, ``raw`` otherwise."""
    return "ema" if "EMA weights" in source else "raw"
