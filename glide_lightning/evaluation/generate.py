"""Guided generation from prompts: the one library function behind ``python -m glide_lightning
sample``, the sample-grid and FID callbacks and the zero-shot FID harness.

Checkpoints: a glide_lightning ``.ckpt`` (its ``state_dict`` holds the EMA weights when the run used
EMA) or one of glide-text2im's released ``.pt`` files (``base.pt``, ``upsample.pt``), recognised by
their keys and shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from glide_lightning.data.tokenizers import Tokenizer, build_tokenizer
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, SamplerName, classifier_free_guidance, get_sampler
from glide_lightning.models import ModelConfig, build_model, from_glide_text2im
from glide_lightning.models.glide_text2im import detect_glide_kind, glide_config

log = logging.getLogger(__name__)

# glide-text2im's released processes: base (cosine) and upsampler (linear), 1000 steps, learned Σ
GLIDE_DIFFUSION = {
    "base": DiffusionConfig(steps=1000, noise_schedule="cosine", variance_type="learned_range", loss_type="hybrid"),
    "upsample": DiffusionConfig(steps=1000, noise_schedule="linear", variance_type="learned_range", loss_type="hybrid"),
}


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn from a model: the one place these knobs have defaults."""

    guidance_scale: float = 3.0
    """Classifier-free guidance scale s (1: no guidance; GLIDE samples at 3)."""
    sampler: SamplerName = "ddpm"
    """``ddpm`` (ancestral, uses the model's variance) or ``ddim``."""
    steps: str = "100"
    """Sampling steps as a respacing of the training process: ``"100"``, ``"ddim50"``, ``"fast27"``…"""
    eta: float = 0.0
    """DDIM's η (0: deterministic)."""
    batch_size: int = 16
    """Images generated per forward batch (guidance doubles the model's batch)."""
    upsample_steps: str = "fast27"
    """Respacing of the upsampler's process (GLIDE: ``fast27``)."""
    upsample_temp: float = 0.997
    """Scale of the upsampler's initial noise (GLIDE: 0.997)."""

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of ddpm, ddim")
        if self.batch_size < 1 or self.guidance_scale < 0:
            raise ValueError("batch_size must be >= 1 and guidance_scale >= 0")


@dataclass
class SamplingModel:
    """A network ready to sample: its (EMA) weights, process, tokenizer and provenance."""

    model: nn.Module
    diffusion_config: DiffusionConfig
    tokenizer: Tokenizer
    model_config: ModelConfig
    source: str
    """Where the weights come from (path, and whether they are the EMA weights)."""

    @property
    def image_size(self) -> int:
        return self.model_config.image_size


def load_sampling_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> SamplingModel:
    """Load a glide_lightning checkpoint (EMA weights) or a glide-text2im ``.pt`` for sampling."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train a run first, or pass --ckpt PATH)")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and "state_dict" in state and "hyper_parameters" in state:
        hp = state["hyper_parameters"]
        config = ModelConfig(**hp["model"])
        model = build_model(config)
        weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(weights, strict=True)
        ema = "current_model_state" in state  # Lightning's WeightAveraging stores the EMA in state_dict
        loaded = SamplingModel(model, DiffusionConfig(**hp["diffusion"]),
                               build_tokenizer(hp["tokenizer"], text_ctx=config.text_ctx), config,
                               f"{path} ({'EMA' if ema else 'raw, no EMA in this run'} weights, step {state['global_step']})")
    else:
        kind = detect_glide_kind(state)
        if kind not in GLIDE_DIFFUSION:
            raise ValueError(f"{path} is neither a glide_lightning checkpoint nor glide-text2im's base.pt / upsample.pt "
                             f"(keys and shapes match {kind or 'no released model'})")
        model = from_glide_text2im(kind, state)
        loaded = SamplingModel(model, GLIDE_DIFFUSION[kind], build_tokenizer("gpt2", text_ctx=128),
                               glide_config(kind), f"{path} (glide-text2im {kind})")
    loaded.model.to(device).eval()
    return loaded


def sample_generators(seeds: list[int], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per image: image i's noise (initial and at every step) depends on seeds[i]
    alone, not on the batch it is drawn in, the device or the rank: a resumed or sharded FID run
    draws exactly the images an uninterrupted one would."""
    return [torch.Generator().manual_seed(seed * 2 + offset) for seed in seeds]


@torch.no_grad()
def generate(base: SamplingModel, prompts: list[str], seeds: list[int], config: SamplingConfig = SamplingConfig(), *,
             upsampler: SamplingModel | None = None, progress: bool = False) -> Tensor:
    """Images for ``prompts`` (one per prompt, uint8 [N, 3, H, W]), guided at ``config.guidance_scale``.

    Image i depends on ``prompts[i]`` and ``seeds[i]`` only (see :func:`sample_generators`), up to
    floating-point differences between batch sizes (a pixel level here and there). With
    ``upsampler``, the base samples are upsampled (conditioned on the prompt, unguided, GLIDE's
    ``fast27`` and temperature by default).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = next(base.model.parameters()).device
    out = []
    for start in range(0, len(prompts), config.batch_size):
        batch_prompts, batch_seeds = prompts[start:start + config.batch_size], seeds[start:start + config.batch_size]
        images = _sample(base, batch_prompts, batch_seeds, config, device, progress)
        if upsampler is not None:
            images = _upsample(upsampler, images, batch_prompts, batch_seeds, config, progress)
        out.append(to_uint8(images))
    return torch.cat(out) if out else torch.empty(0, 3, base.image_size, base.image_size, dtype=torch.uint8)


def _sample(loaded: SamplingModel, prompts: list[str], seeds: list[int], config: SamplingConfig,
            device: torch.device, progress: bool) -> Tensor:
    size = loaded.image_size
    tokens, mask = (x.to(device) for x in loaded.tokenizer(prompts))
    empty_tokens, empty_mask = (x.to(device) for x in loaded.tokenizer.empty(1))
    model = classifier_free_guidance(loaded.model, config.guidance_scale, dict(tokens=empty_tokens, mask=empty_mask))
    diffusion = GaussianDiffusion.from_config(loaded.diffusion_config, config.steps)
    options = {"eta": config.eta} if config.sampler == "ddim" else {}
    sampler = get_sampler(config.sampler, **options)
    return sampler(diffusion, model, (len(prompts), 3, size, size), model_kwargs=dict(tokens=tokens, mask=mask),
                   generator=sample_generators(seeds), progress=progress, device=device)


def _upsample(loaded: SamplingModel, low_res: Tensor, prompts: list[str], seeds: list[int], config: SamplingConfig,
              progress: bool) -> Tensor:
    device = low_res.device
    size = loaded.image_size
    tokens, mask = (x.to(device) for x in loaded.tokenizer(prompts))
    # GLIDE feeds the upsampler the base samples rounded to 8-bit, as a saved image would be
    low_res = to_uint8(low_res).float() / 127.5 - 1
    diffusion = GaussianDiffusion.from_config(loaded.diffusion_config, config.upsample_steps)
    return get_sampler("ddpm")(diffusion, loaded.model, (len(prompts), 3, size, size),
                               model_kwargs=dict(low_res=low_res, tokens=tokens, mask=mask),
                               noise_scale=config.upsample_temp, generator=sample_generators(seeds, offset=1),
                               progress=progress, device=device)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats → uint8 [0, 255] (rounded, clamped)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_grid(images: Tensor, rows: int) -> Tensor:
    """uint8 [rows·cols, 3, H, W] → one [3, rows·H, cols·W] grid, row-major."""
    return rearrange(images, "(r c) ch h w -> ch (r h) (c w)", r=rows)


def model_from_module(module: Any) -> nn.Module:
    """The EMA weights of a GlideModule's network when an EMA callback averages it, else the network.

    Lightning's WeightAveraging swaps the average into the module during validation, so there the
    module itself holds the EMA weights; elsewhere they live in the callback's averaged copy."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.validating or trainer.sanity_checking:
        return module.model
    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None)  # Lightning's WeightAveraging
        if average is not None:
            return average.module.model
    return module.model
