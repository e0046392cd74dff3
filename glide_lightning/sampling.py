"""Sampling: the one reader of every checkpoint kind, the one registry of released models, the sampling
options and one model's batch (:func:`sample_batch`, :func:`sample_conditioned`), behind
``python -m glide_lightning sample``, ``fid`` / ``sweep``, the training callbacks, ``init_from`` and the
benchmark. Chaining models is :mod:`glide_lightning.cascade`'s (``generate``: base model, then upsampler)
and :mod:`glide_lightning.editing`'s (``edit``).

Checkpoints (:func:`load_checkpoint`):

- a glide_lightning ``.ckpt`` written by Lightning: the network's architecture, process and tokenizer
  come from its ``hyper_parameters``. A frozen text encoder (``text_encoder`` t5 / clip) is not in the
  file: it is reloaded from the name, pretrained tag / file and revision the hyper-parameters record. When the run used Lightning's ``EMAWeightAveraging``, its
  ``state_dict`` holds the EMA weights and ``current_model_state`` the raw ones; ``weights="ema"``
  (the default) or ``"raw"`` picks one, and :attr:`SamplingModel.source` says which was loaded.
- one of glide-text2im's released files (``base.pt``, ``upsample.pt``, ``base_inpaint.pt``,
  ``upsample_inpaint.pt``), recognised by its keys and shapes; its settings come from
  :data:`RELEASED_MODELS`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from glide_lightning.clip_guidance import GuidanceCLIP
from glide_lightning.conditioning import sampling_low_res_kwargs
from glide_lightning.data.tokenizers import Tokenizer, TokenizerName, build_tokenizer, tokenizer_files
from glide_lightning.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    SamplerName,
    classifier_free_guidance,
    dynamic_threshold,
    get_sampler,
)
from glide_lightning.diffusion.guidance import edm_sigma
from glide_lightning.diffusion.inpainting import keep_known
from glide_lightning.diffusion.samplers import SAMPLER_NAMES
from glide_lightning.diffusion.solvers import diffusers_available
from glide_lightning.diffusion.schedules import parse_respacing
from glide_lightning.models import (
    GLIDE_CHECKPOINT_FILES,
    GLIDE_KINDS,
    GLIDE_OPTIONS,
    GlideKind,
    ModelConfig,
    ModelKind,
    build_with_text_encoder,
    from_glide_text2im,
)
from glide_lightning.models.glide_text2im import detect_glide_kind

__all__ = ["DEFAULT_GUIDANCE_SWEEP", "RELEASED_MODELS", "ReleasedModel", "SamplingConfig", "SamplingModel", "Weights",
           "check_kind", "load_checkpoint", "model_evaluations", "released_model", "sample_batch", "sample_conditioned",
           "sample_generators"]

log = logging.getLogger(__name__)

Weights = Literal["ema", "raw"]


# ------------------------------------------------------------------------------------- released models
@dataclass(frozen=True)
class ReleasedModel:
    """What it takes to sample one of glide-text2im's released models."""

    kind: GlideKind
    """glide-text2im's name: ``base``, ``upsample``, ``base-inpaint`` or ``upsample-inpaint``."""
    file: str
    """Its released checkpoint's file name (``base.pt``, …)."""
    model: ModelConfig
    """Its architecture (``text_ctx`` 128, ``n_vocab`` 50257); it lives beside the strict importer in
    :mod:`glide_lightning.models.glide_text2im`, which cannot see :mod:`~glide_lightning.diffusion`."""
    diffusion: DiffusionConfig
    """Its training process: 1000 steps of a cosine (base models) or linear (upsamplers) schedule, learned Σ."""
    tokenizer: TokenizerName = "gpt2"
    """GPT-2's BPE, padded with token 50256 and mask False to ``model.text_ctx`` tokens."""


_BASE_PROCESS = DiffusionConfig(steps=1000, noise_schedule="cosine", variance_type="learned_range", loss_type="hybrid")
_UPSAMPLER_PROCESS = DiffusionConfig(steps=1000, noise_schedule="linear", variance_type="learned_range",
                                     loss_type="hybrid")

RELEASED_MODELS: dict[str, ReleasedModel] = {
    kind: ReleasedModel(kind, GLIDE_CHECKPOINT_FILES[kind], GLIDE_OPTIONS[kind],
                        _UPSAMPLER_PROCESS if kind.startswith("upsample") else _BASE_PROCESS)
    for kind in GLIDE_KINDS
}
"""glide-text2im's released models by kind: the one place their settings are written down."""


def released_model(kind: str | None = None, *, model_kind: ModelKind | None = None) -> ReleasedModel:
    """The released model of glide-text2im ``kind`` (``base-inpaint``, …) or of our ``model_kind``
    (``inpaint``, …: the kind field of :class:`ModelConfig`). Raises ``ValueError`` naming the choices."""
    for released in RELEASED_MODELS.values():
        if released.kind == kind or (model_kind is not None and released.model.kind == model_kind):
            return released
    raise ValueError(f"no released glide-text2im model of kind {kind or model_kind!r}; "
                     f"choose one of {', '.join(RELEASED_MODELS)}")


# ------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn from a model: the one place these knobs have defaults."""

    guidance_scale: float = 3.0
    """Classifier-free guidance scale s (1: no guidance; GLIDE samples at 3): ε̂ = ε_u + s·(ε_c − ε_u). 0 samples
    the unconditional model alone, so the prompt is not used (``sample`` records ``conditioning: unconditional``
    in each image's metadata); between 0 and 1, between the unconditional and the conditional model."""
    sampler: SamplerName = "ddpm"
    """``ddpm`` (ancestral, uses the model's variance), ``ddim``, or the multistep ODE solvers
    ``dpmpp_2m`` (DPM-Solver++(2M)) and ``unipc`` (UniPC), made for 10-25 steps (they need diffusers:
    ``pip install 'glide_lightning[solvers]'``)."""
    steps: str = "100"
    """Sampling steps as a respacing of the training process: ``"100"``, ``"ddim50"``, ``"fast27"``…
    (one model evaluation per step, two where guided)."""
    eta: float = 0.0
    """DDIM's η (0: deterministic)."""
    batch_size: int = 16
    """Images generated per forward batch (guidance doubles the model's batch)."""
    upsample_steps: str = "fast27"
    """Respacing of the upsampler's process (GLIDE: ``fast27``)."""
    upsample_temp: float = 0.997
    """Scale of the upsampler's initial noise (GLIDE: 0.997)."""
    upsample_sampler: Literal["auto", "ddim", "ddpm"] = "auto"
    """The upsampler stage's sampler, started from noise × ``upsample_temp``: ``ddim`` (deterministic, η = 0)
    or ``ddpm`` (ancestral). ``auto``: what glide-text2im's notebooks run at that stage, ``ddim`` for
    text-to-image (``text2im.ipynb`` and ``clip_guided.ipynb``: ``ddim_sample_loop``) and ``ddpm`` for edits
    (``inpaint.ipynb``: ``p_sample_loop``). Results and cached images record the sampler used."""
    upsample_noise: float = 0.0
    """For upsamplers trained with noise augmentation of their low-res input (``model.low_res_noise``):
    the base samples are noised (``q_sample``) at this fraction of the upsampler's process and the
    network is told that level (``low_res_t``); 0: the process's first step. Other upsamplers: must be 0."""
    guidance_interval: tuple[float, float] | None = None
    """Guide only at steps whose noise level σ = √((1 - ᾱ_t) / ᾱ_t) lies in (low, high]; elsewhere the
    conditional model runs alone (half the forward passes there). Kynkäänniemi et al. 2024 guide
    EDM2 in (0.28, 5.42]. None: guide at every step."""
    compile: bool = False
    """``torch.compile`` the denoiser (not the once-per-call text encoder); on CUDA with
    ``mode="reduce-overhead"`` (CUDA graphs: small batches stop paying per-kernel launch costs), on
    the CPU with inductor's ``freezing`` (inference only: oneDNN convolutions fused with their
    neighbouring pointwise ops; later weight changes, such as an EMA swap, are still followed:
    tested). The first call compiles, which takes a while on a CPU: an option for long runs (an FID run),
    not for a few images. Outputs equal eager ones within float rounding: fused kernels round
    differently (as eager channels-last does) and a sampling chain carries that further, most with few
    steps (the first step's x̂_0 multiplies ε's rounding by 1/√ᾱ_T, 2e4 on the 1000-step cosine schedule)
    and random weights (``tests/test_bench.py`` bounds it). How much faster than eager it samples depends on
    the machine and the model: ``make bench`` times it as ``sample_25_steps_cfg_compile``."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """The denoiser's arithmetic: ``fp32``; ``bf16`` autocast (the sampler's own math stays fp32);
    ``auto``: bf16 on GPUs that support it, fp32 elsewhere."""
    dynamic_threshold: float | None = None
    """Imagen's dynamic thresholding: the percentile p in (0, 1] (Imagen: 0.995) of ``|pred_xstart|`` per
    sample that becomes the clipping bound s (at least 1), then ``pred_xstart / s``; keeps high guidance
    scales from saturating. Every sampler gets it (it post-processes ``pred_xstart`` where the static
    [-1, 1] clip does, see :func:`~glide_lightning.diffusion.dynamic_threshold`). None: the static clip only."""
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    """The UNet's activation layout while sampling: ``channels_last`` (NHWC) or ``contiguous`` (NCHW).
    ``auto``: channels_last on the CPU, where eager guided sampling is faster in it (oneDNN convolutions skip
    their layout reorders); contiguous with ``compile`` (inductor's freezing lays out the convolutions
    itself, and its fused kernels are faster from NCHW) and on GPUs. Outputs equal within float rounding;
    the network's own memory format is restored after each call."""

    clip_guidance_scale: float = 0.0
    """CLIP guidance scale s (GLIDE §2.3): each ancestral step's mean moves by s·Σ·∇_{x_t} of a noised
    CLIP's ``logit_scale · cos(f(x_t, t), g(caption))`` (the CLIP comes from ``sample --clip_dir``).
    0: off. Needs sampler ``ddpm``; adds one CLIP forward and backward per step. GLIDE's CLIP-guided
    samples use no classifier-free guidance: set ``guidance_scale`` 1 for CLIP guidance alone."""

    def __post_init__(self) -> None:
        """Options that contradict each other are errors when the config is made (parse time)."""
        problems = []
        if self.clip_guidance_scale < 0:
            problems.append(f"clip_guidance_scale must be >= 0 (0: off), got {self.clip_guidance_scale}")
        elif self.clip_guidance_scale > 0 and self.sampler != "ddpm":
            problems.append(f"clip_guidance_scale {self.clip_guidance_scale} shifts the ancestral step's mean, but "
                            f"sampler is {self.sampler!r}: use sampler 'ddpm' or clip_guidance_scale 0")
        if self.sampler not in SAMPLER_NAMES:
            problems.append(f"sampler {self.sampler!r} is unknown: choose one of {', '.join(SAMPLER_NAMES)}")
        elif self.sampler in ("dpmpp_2m", "unipc") and not diffusers_available():
            problems.append(f"sampler {self.sampler!r} needs Hugging Face diffusers: pip install "
                            f"'glide_lightning[solvers]'")
        if self.guidance_interval is not None:
            low, high = self.guidance_interval
            if not 0 <= low < high:
                problems.append(f"guidance_interval (low, high] needs 0 <= low < high, got {self.guidance_interval}")
        if self.precision not in ("fp32", "bf16", "auto"):
            problems.append(f"precision {self.precision!r} is unknown: choose fp32, bf16 or auto")
        if self.memory_format not in ("auto", "contiguous", "channels_last"):
            problems.append(f"memory_format {self.memory_format!r} is unknown: choose auto, contiguous or "
                            f"channels_last")
        for name in ("steps", "upsample_steps"):
            try:
                parse_respacing(getattr(self, name))
            except ValueError as error:
                problems.append(f"{name}: {error}")
        if self.steps.strip().startswith("ddim") and self.sampler != "ddim":
            problems.append(f"steps {self.steps!r} is DDIM's stride spacing but sampler is {self.sampler!r}: use "
                            f"sampler 'ddim', or steps '{self.steps.strip()[4:]}' for evenly spaced {self.sampler} steps")
        if self.eta < 0:
            problems.append(f"eta must be >= 0, got {self.eta}")
        elif self.eta != 0 and self.sampler != "ddim":
            problems.append(f"eta {self.eta} is DDIM's noise level, but sampler is {self.sampler!r}: use sampler "
                            f"'ddim' or leave eta at 0")
        if self.dynamic_threshold is not None and not 0 < self.dynamic_threshold <= 1:
            problems.append(f"dynamic_threshold is a percentile p in (0, 1] (Imagen: 0.995), got "
                            f"{self.dynamic_threshold}")
        if self.guidance_scale < 0:
            problems.append(f"guidance_scale must be >= 0 (1: no guidance), got {self.guidance_scale}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.upsample_noise <= 1:
            problems.append(f"upsample_noise must be in [0, 1] (a fraction of the upsampler's process), got "
                            f"{self.upsample_noise}")
        if self.upsample_sampler not in UPSAMPLE_SAMPLERS:
            problems.append(f"upsample_sampler {self.upsample_sampler!r} is unknown: choose one of "
                            f"{', '.join(UPSAMPLE_SAMPLERS)}")
        if self.upsample_temp <= 0:
            problems.append(f"upsample_temp must be > 0 (GLIDE: 0.997), got {self.upsample_temp}")
        if problems:
            raise ValueError("bad sampling options:\n  - " + "\n  - ".join(problems))


    def upsample_sampler_for(self, task: CascadeTask) -> str:
        """The upsampler stage's sampler for ``task`` (``text2im`` or ``edit``): ``upsample_sampler``, with
        ``auto`` resolved as glide-text2im's notebooks do (``ddim`` for text-to-image, ``ddpm`` for edits)."""
        if self.upsample_sampler != "auto":
            return self.upsample_sampler
        return {"text2im": "ddim", "edit": "ddpm"}[task]


UPSAMPLE_SAMPLERS: tuple[str, ...] = ("auto", "ddim", "ddpm")
CascadeTask = Literal["text2im", "edit"]
"""What a cascade makes: images from text (``generate``) or edits of given images (``edit``)."""

DEFAULT_GUIDANCE_SWEEP: tuple[float, ...] = (1.0, 3.0, 6.0, 12.0)
"""The guidance scales swept by default (GLIDE / dogGLIDE's 1 / 3 / 6 / 12): the columns of
:class:`~glide_lightning.callbacks.SampleGrid` and the scales of the ``sweep`` command (and so of
``make sweep``); the one place this list is written."""


@dataclass
class SamplingModel:
    """A network ready to sample: its weights, process, tokenizer and provenance."""

    model: nn.Module
    diffusion_config: DiffusionConfig
    tokenizer: Tokenizer
    model_config: ModelConfig
    source: str
    """Where the weights come from: the path and which weights (EMA or raw, the training step, or
    the released model's kind)."""

    @property
    def image_size(self) -> int:
        return self.model_config.image_size


# ------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(checkpoint: str | Path, device: torch.device | str = "cpu", *, weights: Weights = "ema",
                    kind: ModelKind | None = None) -> SamplingModel:
    """Read any checkpoint this project knows (see the module docstring) into a :class:`SamplingModel`
    in eval mode on ``device``.

    Args:
        checkpoint: a glide_lightning ``.ckpt`` or a glide-text2im ``.pt``.
        device: where the network goes.
        weights: ``ema`` (the EMA weights when the run kept them, else the raw ones, as ``source``
            says) or ``raw`` (the weights the optimizer trained). Released files hold one set.
        kind: the :class:`ModelConfig` kind the caller needs (``init_from`` passes its model's), checked.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is neither kind of checkpoint, cannot be read with
            ``torch.load(weights_only=True)``, holds a model of another ``kind``, or ``weights`` is unknown; or
            a glide_lightning checkpoint in an older input order cannot be converted
            (:func:`~glide_lightning.migrations.convert_input_order`; glide-text2im's files are never converted).
        CheckpointMismatchError: ``kind`` is given and the file is a state dict that matches no
            released model; the error lists its differences from the released model of that kind.
    """
    path = Path(checkpoint)
    if weights not in ("ema", "raw"):
        raise ValueError(f"unknown weights {weights!r}; choose ema or raw")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train a run first, or pass the path of a .ckpt or "
                                f"of glide-text2im's base.pt / upsample.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(f"{path} cannot be read as a checkpoint (torch.load with weights_only=True): {e}") from e
    if isinstance(state, dict) and "state_dict" in state and "hyper_parameters" in state:
        loaded = _read_lightning(path, state, weights)
    elif isinstance(state, dict):
        loaded = _read_released(path, state, kind)
    else:
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint: pass a glide_lightning .ckpt "
                         f"or one of glide-text2im's {', '.join(GLIDE_CHECKPOINT_FILES.values())}")
    if kind is not None:
        check_kind(loaded, kind, "the checkpoint's model")
    loaded.model.to(device).eval()
    return loaded


def check_kind(loaded: SamplingModel, kind: ModelKind, role: str) -> None:
    """Raise ``ValueError`` when ``loaded`` is not a model of ``kind``, naming ``role`` (``the upsampler``, …),
    both kinds, where the weights come from and glide-text2im's released file of that kind: the one kind check
    of :func:`load_checkpoint` (``kind=``) and of :func:`~glide_lightning.cascade.check_cascade`."""
    if loaded.model_config.kind != kind:
        raise ValueError(f"{role} must be of kind {kind!r}, got {loaded.model_config.kind!r} ({loaded.source}): pass "
                         f"a checkpoint of a {kind!r} model (e.g. glide-text2im's {released_model(model_kind=kind).file})")


def _read_lightning(path: Path, state: dict[str, Any], weights: Weights) -> SamplingModel:
    """A GlideModule checkpoint: its hyper-parameters rebuild the network, process and tokenizer. An older
    checkpoint form is brought to the current one first (:mod:`glide_lightning.migrations`: hyper-parameters
    added since, the weights of an ``upsample_inpaint`` one written before its network's input order was
    recorded, with a warning); a conversion that is not sound raises ``ValueError``."""
    from glide_lightning.migrations import migrate_hyper_parameters, migrate_weights

    hp = state["hyper_parameters"]
    if not isinstance(hp, dict) or not {"model", "diffusion", "tokenizer"} <= hp.keys():
        raise ValueError(f"{path} is a Lightning checkpoint, but not of a GlideModule (its hyper_parameters lack "
                         f"model, diffusion and tokenizer)")
    migrate_hyper_parameters(state, where=str(path))
    config = ModelConfig(**hp["model"])
    has_ema = "current_model_state" in state  # Lightning's WeightAveraging: EMA in state_dict, raw moved aside
    use_ema = has_ema and weights == "ema"
    what = ("EMA weights" if use_ema else "raw weights" if has_ema or weights == "raw"
            else "raw weights: this run kept no EMA")
    model, _ = build_with_text_encoder(config)  # a frozen encoder is not in the file: reloaded from what it records
    migrate_weights(state, model, config.kind, where=str(path))  # the weights only (state_dict, raw ones)
    source = state["current_model_state"] if has_ema and not use_ema else state["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in source.items() if k.startswith("model.")},
                          strict=True)
    encoder = ""
    if model.frozen_text_encoder:
        loaded_now = model.attached_text_encoder.source
        encoder = f", text encoder {loaded_now}"
        trained_with = state.get("text_encoder_source")
        if trained_with not in (None, loaded_now):
            log.warning("%s was trained with the text encoder %s but %s was loaded now: pin "
                        "model.text_encoder_revision to sample with the same weights", path, trained_with, loaded_now)
    files = tokenizer_files(hp["tokenizer"], path=config.text_encoder_name, revision=config.text_encoder_revision)
    return SamplingModel(model, DiffusionConfig(**hp["diffusion"]),
                         build_tokenizer(hp["tokenizer"], text_ctx=config.text_ctx, **files), config,
                         f"{path} ({what}, step {state.get('global_step', '?')}{encoder})")


def _read_released(path: Path, state: dict[str, Any], kind: ModelKind | None) -> SamplingModel:
    """A bare state dict: one of glide-text2im's released models, recognised by keys and shapes."""
    found = detect_glide_kind(state)
    if found is None:
        if kind is not None and any(r.model.kind == kind for r in RELEASED_MODELS.values()):
            # the caller needs this kind: explain how the file differs from that released model
            from_glide_text2im(released_model(model_kind=kind).kind, state)
        raise ValueError(f"{path} is neither a glide_lightning checkpoint (a .ckpt with state_dict and "
                         f"hyper_parameters) nor one of glide-text2im's released "
                         f"{', '.join(GLIDE_CHECKPOINT_FILES.values())} (its keys and shapes match none)")
    released = RELEASED_MODELS[found]
    return SamplingModel(from_glide_text2im(found, state), released.diffusion,
                         build_tokenizer(released.tokenizer, text_ctx=released.model.text_ctx), released.model,
                         f"{path} (glide-text2im {found})")


# ------------------------------------------------------------------------------------- generation
def model_evaluations(config: SamplingConfig, diffusion_config: DiffusionConfig) -> int:
    """Network evaluations per image (NFE) of base sampling with ``config`` on a model trained with
    ``diffusion_config``: one per step, two per guided step (the guided batch doubles; outside
    ``guidance_interval`` the conditional half runs alone)."""
    diffusion = GaussianDiffusion.from_config(diffusion_config, config.steps)
    steps = diffusion.num_timesteps
    if config.guidance_scale == 1.0:
        return steps
    if config.guidance_interval is None:
        return 2 * steps
    low, high = config.guidance_interval
    sigma = edm_sigma(diffusion.base_alphas_cumprod[diffusion.timestep_map])
    return steps + int(((sigma > low) & (sigma <= high)).sum())


def sample_generators(seeds: list[int], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per image: image i's noise (initial and at every step) depends on seeds[i]
    alone, not on the batch it is drawn in, the device or the rank: a resumed or sharded FID run
    draws exactly the images an uninterrupted one would."""
    return [torch.Generator().manual_seed(seed * 2 + offset) for seed in seeds]


@torch.no_grad()
def sample_conditioned(loaded: SamplingModel, prompts: list[str], seeds: list[int], config: SamplingConfig, *,
                       low_res: Tensor | None = None, image: Tensor | None = None, keep: Tensor | None = None,
                       progress: bool = False, clip: GuidanceCLIP | None = None) -> Tensor:
    """One batch from a model of any kind, guided as ``config`` says, float ``[B, 3, S, S]`` in [-1, 1]:
    upsamplers from ``low_res`` ``[B, 3, s, s]`` in [-1, 1] (rounded to 8 bits as a saved image is; noised
    at ``config.upsample_noise`` where the model was trained so), inpainting models from ``image``
    ``[B, 3, S, S]`` and ``keep`` ``[B, 1, S, S]`` (1 = known; known pixels kept as
    :func:`~glide_lightning.editing.edit` says).
    The training sample grids of the upsampling and inpainting kinds draw with it, and so does
    :func:`glide_lightning.editing.edit`.
    ``clip``: the noised CLIP of CLIP guidance at ``config.clip_guidance_scale`` (:func:`sample_batch`).
    Raises ``ValueError`` when an input the model's kind needs is missing."""
    kind = loaded.model_config.kind
    device = next(loaded.model.parameters()).device
    image_kwargs: dict[str, Tensor] = {}
    denoised_fn = None
    if kind.startswith("upsample"):
        if low_res is None:
            raise ValueError(f"a model of kind {kind!r} samples from a low-resolution image: pass low_res")
        image_kwargs.update(sampling_low_res_kwargs(low_res.to(device), loaded.diffusion_config, config.upsample_noise,
                                                    loaded.model_config.low_res_noise_cond,
                                                    sample_generators(seeds, offset=1)))
    if "inpaint" in kind:
        if image is None or keep is None:
            raise ValueError(f"a model of kind {kind!r} fills in an image: pass image and keep (1 = known pixel)")
        image, keep = image.to(device), keep.to(device)
        image_kwargs.update(inpaint_image=image, inpaint_mask=keep)
        denoised_fn = keep_known(image, keep)
    result = sample_batch(loaded, prompts, seeds, config, device, progress, image_kwargs, denoised_fn, clip=clip)
    return result if denoised_fn is None else denoised_fn(result)


@torch.no_grad()
def sample_batch(loaded: SamplingModel, prompts: list[str], seeds: list[int], config: SamplingConfig,
                 device: torch.device, progress: bool = False, image_kwargs: dict[str, Tensor] | None = None,
                 denoised_fn: Any = None, *, clip: GuidanceCLIP | None = None) -> Tensor:
    """One batch of base samples for ``prompts``, float in [-1, 1], ``[B, 3, H, W]`` (what
    :func:`~glide_lightning.cascade.generate` converts to uint8); ``image_kwargs`` are further inputs of the
    network, shared by the guided and unguided halves (an inpainting model's ``inpaint_image`` / ``inpaint_mask``), and
    ``denoised_fn`` is applied to each step's ``pred_xstart`` (:func:`~glide_lightning.editing.edit`), after
    ``config.dynamic_threshold``'s thresholding where that is set (so pasted known pixels stay exact).

    The captions and the empty caption (batch 1) go through the text encoder once, in one call,
    before the step loop; every step reuses the encodings (``xf_proj``, ``xf_out``, with a frozen encoder
    ``xf_mask``, in the model's keyword arguments), and the guided batch's [conditional; unconditional] encodings are
    concatenated once, at the first step (see :func:`classifier_free_guidance`). With
    ``config.clip_guidance_scale`` > 0, ``clip`` guides the ancestral steps (its ``cond_fn``)."""
    if config.clip_guidance_scale > 0 and clip is None:
        raise ValueError(f"clip_guidance_scale {config.clip_guidance_scale} needs a noised CLIP (clip=, which "
                         f"`sample --clip_dir DIR` passes; the fid / sweep commands and the training callbacks take "
                         f"none): set clip_guidance_scale 0 here")
    size = loaded.image_size
    tokens, mask = (x.to(device) for x in loaded.tokenizer(prompts))
    guided = config.guidance_scale != 1.0
    if guided:  # the empty caption, once per batch, in the same encoder call as the captions
        empty_tokens, empty_mask = (x.to(device) for x in loaded.tokenizer.empty(1))
        tokens, mask = torch.cat([tokens, empty_tokens]), torch.cat([mask, empty_mask])
    # xf_proj [B (+1), 4 * model_channels], xf_out [B (+1), W, L] (and a frozen encoder's xf_mask [B (+1), L])
    encoded = loaded.model.encode_caption(tokens, mask)
    batch = len(prompts)
    cond = {**{k: v[:batch] for k, v in encoded.items()}, **(image_kwargs or {})}
    uncond = {k: v[batch:] for k, v in encoded.items()}
    diffusion = GaussianDiffusion.from_config(loaded.diffusion_config, config.steps)
    cond_fn = None
    if clip is not None and config.clip_guidance_scale > 0:
        cond_fn = clip.cond_fn(prompts, diffusion.base_alphas_cumprod, config.clip_guidance_scale, device)
    with _denoiser(loaded.model, config, device) as denoiser:
        model = classifier_free_guidance(denoiser, config.guidance_scale, uncond, interval=config.guidance_interval,
                                         alphas_cumprod=diffusion.base_alphas_cumprod)
        return _run_sampler(config, diffusion, model, (batch, 3, size, size), cond, seeds, progress, device,
                            cond_fn, denoised_fn)


def _run_sampler(config: SamplingConfig, diffusion: GaussianDiffusion, model: Any, shape: tuple[int, ...],
                 model_kwargs: dict[str, Any], seeds: list[int], progress: bool, device: torch.device,
                 cond_fn: Any = None, denoised_fn: Any = None) -> Tensor:
    options = {"eta": config.eta} if config.sampler == "ddim" else {}
    if cond_fn is not None:
        options["cond_fn"] = cond_fn
    sampler = get_sampler(config.sampler, **options)
    return sampler(diffusion, model, shape, model_kwargs=model_kwargs, generator=sample_generators(seeds),
                   progress=progress, device=device, denoised_fn=_denoised_fn(config, denoised_fn))


def _denoised_fn(config: SamplingConfig, denoised_fn: Any = None) -> Any:
    """The sampler's ``denoised_fn``: ``config.dynamic_threshold``'s thresholding (where set), then
    ``denoised_fn`` (an edit's known-pixel paste, last so those pixels stay exact); None when neither."""
    if config.dynamic_threshold is None:
        return denoised_fn
    threshold = functools.partial(dynamic_threshold, percentile=config.dynamic_threshold)
    if denoised_fn is None:
        return threshold
    return lambda pred_xstart: denoised_fn(threshold(pred_xstart))


def uses_channels_last(config: SamplingConfig, device: torch.device) -> bool:
    """Whether sampling under ``config`` on ``device`` runs the UNet channels-last (NHWC): the
    ``memory_format`` option, ``auto`` resolved as :attr:`SamplingConfig.memory_format` documents."""
    if config.memory_format != "auto":
        return config.memory_format == "channels_last"
    return device.type == "cpu" and not config.compile


@contextlib.contextmanager
def _denoiser(model: nn.Module, config: SamplingConfig, device: torch.device) -> Iterator[Any]:
    """``model`` as the sampler calls it under ``config``'s ``compile``, ``precision`` and
    ``memory_format`` (the network's own memory format restored on exit); returns float32 outputs."""
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"
                                          and torch.cuda.is_bf16_supported())
    channels_last = uses_channels_last(config, device)
    net: Any = model
    if config.compile and device.type == "cuda":
        net = torch.compile(model, mode="reduce-overhead", dynamic=False)
    elif config.compile:  # inductor's freezing: oneDNN convolutions fused with their pointwise neighbours
        net = torch.compile(model, dynamic=False, options={"freezing": True})
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        if not (bf16 or channels_last or config.compile):
            yield model
            return

        def denoise(x_t: Tensor, timesteps: Tensor, **kwargs: Any) -> Tensor:
            if channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            if device.type == "cuda" and config.compile:
                torch.compiler.cudagraph_mark_step_begin()  # the last output was consumed: its buffer may go
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(x_t, timesteps, **kwargs)
            return out.float().contiguous()

        yield denoise
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
