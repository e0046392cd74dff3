"""The sampling options: :class:`SamplingConfig`, the one place their defaults are written (the training
callbacks, the ``fid`` / ``sweep`` commands and ``sample`` may override them but define none of their own),
the default guidance sweep, and what a config costs (:func:`model_evaluations`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, SamplerName
from glide_lightning.diffusion.guidance import edm_sigma
from glide_lightning.diffusion.samplers import check_sampler_options, sampler_names, sampler_spec
from glide_lightning.diffusion.schedules import RESPACING_PRESETS, parse_respacing, space_timesteps

__all__ = ["DEFAULT_GUIDANCE_SWEEP", "UPSAMPLE_SAMPLERS", "CascadeTask", "SamplingConfig", "check_steps_fit",
           "model_evaluations", "steps_that_fit"]


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn from a model: the one place these knobs have defaults."""

    CHANGES_IMAGES: ClassVar[frozenset[str]] = frozenset({
        "guidance_scale", "sampler", "steps", "eta", "batch_size", "upsample_steps", "upsample_temp",
        "upsample_sampler", "upsample_noise", "guidance_interval", "compile", "precision", "dynamic_threshold",
        "memory_format", "clip_guidance_scale"})
    """Fields that change the images drawn (if only by float rounding: ``compile``, ``precision``, ``memory_format``;
    the zero-shot FID image cache is keyed by them)."""
    KEEPS_IMAGES: ClassVar[frozenset[str]] = frozenset()
    """Fields that leave the images as they are (none yet). Every field is in one of the two sets (a test checks it)."""

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
    """``torch.compile`` the denoiser, of every stage (not the once-per-call text encoder); on CUDA with
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
        # what the sampler takes (the registry's rules): CLIP guidance, its backend, ddimN steps, eta
        problems += check_sampler_options(self.sampler, eta=self.eta, clip_guidance_scale=self.clip_guidance_scale,
                                          steps=self.steps)
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
        if self.upsample_sampler not in upsample_sampler_choices():
            problems.append(f"upsample_sampler {self.upsample_sampler!r} is unknown: choose one of "
                            f"{', '.join(upsample_sampler_choices())}")
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


def upsample_sampler_choices() -> tuple[str, ...]:
    """``upsample_sampler``'s choices: ``auto`` and the registry's samplers for the upsampler stage
    (:attr:`~glide_lightning.diffusion.samplers.SamplerSpec.upsample_stage`), sorted."""
    return ("auto", *sorted(sampler_names(upsample_stage=True)))


UPSAMPLE_SAMPLERS: tuple[str, ...] = upsample_sampler_choices()
"""``upsample_sampler``'s choices when the package was imported (the field's ``Literal``; tested equal)."""
CascadeTask = Literal["text2im", "edit"]
"""What a cascade makes: images from text (``generate``) or edits of given images (``edit``)."""

DEFAULT_GUIDANCE_SWEEP: tuple[float, ...] = (1.0, 3.0, 6.0, 12.0)
"""The guidance scales swept by default (GLIDE / dogGLIDE's 1 / 3 / 6 / 12): the columns of
:class:`~glide_lightning.callbacks.SampleGrid` and the scales of the ``sweep`` command (and so of
``make sweep``); the one place this list is written."""


def model_evaluations(config: SamplingConfig, diffusion_config: DiffusionConfig) -> int:
    """Network evaluations per image (NFE) of base sampling with ``config`` on a model trained with
    ``diffusion_config``: one per step (the sampler's ``evaluations_per_step``: 1 for every sampler so far), two
    per guided step (the guided batch doubles; outside ``guidance_interval`` the conditional half runs alone)."""
    diffusion = GaussianDiffusion.from_config(diffusion_config, config.steps)
    per_step = sampler_spec(config.sampler).evaluations_per_step
    steps = diffusion.num_timesteps
    if config.guidance_scale == 1.0:
        return per_step * steps
    if config.guidance_interval is None:
        return per_step * 2 * steps
    low, high = config.guidance_interval
    sigma = edm_sigma(diffusion.base_alphas_cumprod[diffusion.timestep_map])
    return per_step * (steps + int(((sigma > low) & (sigma <= high)).sum()))


def check_steps_fit(option: str, steps: str, process: int, where: str, role: str = "the model") -> None:
    """Raise ``ValueError`` when the respacing ``steps`` (the value of ``option``, e.g. ``--sampling.steps``) cannot be
    taken from a process of ``process`` steps (``model.diffusion.steps`` of ``role``'s checkpoint ``where``): one
    line naming the option, the value, the process's length and what would fit (:func:`steps_that_fit`). The
    commands call it with the checkpoint's stored hyper-parameters before the model is loaded
    (:func:`~glide_lightning.sampling.checkpoints.check_stored_settings`)."""
    try:
        space_timesteps(process, steps)
    except ValueError as error:
        raise ValueError(f"{option} {steps!r} does not fit {role}'s process of {process} steps "
                         f"(model.diffusion.steps={process} in {where}): {error}; "
                         f"{steps_that_fit(process, steps, option)}") from None


def steps_that_fit(process: int, steps: str, option: str) -> str:
    """What ``option`` could be instead of the respacing ``steps`` on a process of ``process`` steps: the nearest
    ``ddimN`` counts that an integer stride gives, at most as many steps per section as each section holds, or at
    most ``process`` steps."""
    form, counts = parse_respacing(steps)
    at_most = f"pass at most {process} steps (e.g. {_example(option, str(process))})"
    if form == "ddim":
        fitting = sorted({len(range(0, process, stride)) for stride in range(1, process + 1)})
        n = counts[0]
        near = [f"ddim{k}" for k in (max((k for k in fitting if k < n), default=None),
                                     min((k for k in fitting if k > n), default=None)) if k is not None]
        return f"the nearest ddimN that an integer stride gives on {process} steps: {' or '.join(near)}"
    if steps.strip() in RESPACING_PRESETS or len(counts) == 1:
        return at_most
    base, extra = divmod(process, len(counts))
    sizes = [base + (1 if i < extra else 0) for i in range(len(counts))]
    if min(sizes) == 0:
        return f"{process} steps cannot be split into {len(counts)} sections: {at_most}"
    fitted = ",".join(str(min(c, s)) for c, s in zip(counts, sizes))
    return (f"its {len(counts)} sections hold {','.join(map(str, sizes))} steps: take at most that many from each "
            f"(e.g. {_example(option, fitted)})")


def _example(option: str, value: str) -> str:
    """``option value`` as typed: a list option (``--step_counts``) takes the value as one of its items."""
    return f"'{value}' among {option}" if option.endswith("step_counts") else f"{option} {value}"
