"""FID, CLIP score and text adherence during training, on a small subset of the validation data.

At the end of a validation run (every ``every_n_validations``-th), the first ``num_samples``
validation captions are sampled at each guidance scale with the EMA weights (the live weights
until the average has its first update; ``val/generation_ema`` is 1 or 0 accordingly, whatever the
order of the callbacks), and compared with the validation images themselves. Logged as
``val/fid@<scale>``, ``val/clip_score@<scale>`` and ``val/adherence@<scale>``, so that
``ModelCheckpoint(monitor="val/fid@3")`` can keep the best-FID checkpoint. A small-sample FID is
biased upwards: compare it across steps and runs, not with published numbers (``make fid`` is for
those).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Literal

import lightning as L
import torch

from glide_lightning.data.images import to_uint8
from glide_lightning.sampling import SamplingConfig, generate

log = logging.getLogger(__name__)


class GenerationMetrics(L.Callback):
    """Generation metrics during validation.

    Args:
        num_samples: validation captions sampled (and real images compared against) per scale.
        guidance_scales: scales to evaluate (None: the sampling default).
        every_n_validations: compute at every n-th validation run (generation is slow).
        extractor: ``inception`` (standard FID features; ``inception_weights`` or the library's
            download) or ``random-conv`` (no weights: NOT a real FID, labelled in the logs).
        inception_weights: local Inception weights file.
        clip_model: open_clip model of the CLIP score (None: no CLIP score).
        clip_pretrained: open_clip pretrained tag or file (None: random weights, labelled).
        adherence: also score text adherence (captions of the synthetic shapes dataset only).
        sampling: sampler, steps, η, batch size and the default scale (checked when the config is parsed).
        seed: seed of the first sample (sample i uses seed + i at every scale and validation).
    """

    def __init__(self, num_samples: int = 64, guidance_scales: list[float] | None = None, every_n_validations: int = 1,
                 extractor: Literal["inception", "random-conv"] = "inception", inception_weights: str | None = None,
                 clip_model: str | None = None, clip_pretrained: str | None = "openai", adherence: bool = False,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> None:
        if num_samples < 2 or every_n_validations < 1:
            raise ValueError("GenerationMetrics needs num_samples >= 2 and every_n_validations >= 1")
        self.config = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**sampling)
        self.scales = [float(s) for s in guidance_scales] if guidance_scales else [self.config.guidance_scale]
        self.num_samples, self.every_n_validations, self.seed = num_samples, every_n_validations, seed
        self.extractor_name, self.inception_weights = extractor, inception_weights
        self.clip_model, self.clip_pretrained, self.adherence = clip_model, clip_pretrained, adherence
        self._extractor: Any = None
        self._clip: Any = None
        self._validations = 0
        self._images: list[torch.Tensor] = []
        self._captions: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from glide_lightning.callbacks.samples import check_sampling_steps

        check_sampling_steps("GenerationMetrics", self.config.steps, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self._captions = [], []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        missing = self.num_samples - len(self._captions)
        if missing > 0 and trainer.is_global_zero:
            self._images.append(to_uint8(batch["image"][:missing]).cpu())
            self._captions += list(batch["caption"][:missing])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        values = self.compute(pl_module) if trainer.is_global_zero else None
        values = trainer.strategy.broadcast(values, src=0)
        for key, value in values.items():
            pl_module.log(key, value, sync_dist=False, rank_zero_only=False)

    @torch.no_grad()
    def compute(self, pl_module: Any) -> dict[str, float]:
        """The metrics at every scale (rank 0), from the EMA weights once the average has been updated
        and the live weights before that, whatever the callback order (see ``model_from_module``);
        ``val/generation_ema`` says which (1 or 0)."""
        from glide_lightning.callbacks.samples import sampling_model
        from glide_lightning.evaluation.fid import feature_stats, fid_from_stats

        if len(self._captions) < 2:
            raise RuntimeError(f"GenerationMetrics found {len(self._captions)} validation samples; it needs at least 2")
        real = torch.cat(self._images)
        extractor = self.extractor()
        reference = feature_stats(extractor, real)
        loaded = sampling_model(pl_module, self)
        log.info("generation metrics from the %s", loaded.source)
        seeds = [self.seed + i for i in range(len(self._captions))]
        values: dict[str, float] = {}
        for scale in self.scales:
            fake = generate(loaded, self._captions, seeds, replace(self.config, guidance_scale=scale))
            result = fid_from_stats(feature_stats(extractor, fake), reference)
            values[f"val/fid@{scale:g}"] = result.fid
            if self.clip_model:
                values[f"val/clip_score@{scale:g}"] = float(self.clip().score(fake, self._captions).mean())
            if self.adherence:
                from glide_lightning.evaluation.adherence import adherence_rate

                values[f"val/adherence@{scale:g}"] = adherence_rate(fake, self._captions)
            log.info("%s", result.label)
        if extractor.random_weights:
            values["val/fid_random_weights"] = 1.0  # the FIDs above are NOT real FIDs
        values["val/generation_ema"] = float("EMA weights" in loaded.source)  # 0: the live weights
        return values

    def extractor(self) -> Any:
        if self._extractor is None:
            from glide_lightning.evaluation.zero_shot import build_extractor

            self._extractor = build_extractor(self.extractor_name, self.inception_weights)
            if self._extractor.random_weights:
                log.warning("val/fid@* use a random feature extractor (%s): NOT real FIDs", self._extractor.name)
        return self._extractor

    def clip(self) -> Any:
        if self._clip is None:
            from glide_lightning.evaluation.clip_score import CLIPScorer

            self._clip = CLIPScorer(self.clip_model, self.clip_pretrained)
            if self.clip_pretrained is None:
                log.warning("val/clip_score@* use a randomly initialised CLIP: not meaningful scores")
        return self._clip
