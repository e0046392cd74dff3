"""Samplers of the reverse process: one registry, :data:`SAMPLERS`, of what each sampler is and takes.

Every sampler is called the same way, ``sampler(diffusion, model, shape, *, model_kwargs, noise, noise_scale,
clip_denoised, denoised_fn, progress, generator, device, cond_fn) -> x_0`` (:class:`Sampler`; that signature is
written once, in :class:`BoundSampler`), and is registered as a :class:`SamplerSpec`: the step it takes
(``spec.step(context, **options)`` makes ``step(x_t, t) -> x_{t-1}`` for one sampling call, from a
:class:`StepContext`) and what it accepts: its own options (DDIM's ``eta``), gradient guidance (``cond_fn``),
the respacing forms of its steps, a backend it needs. Everything outside this file asks the registry
(:func:`get_sampler`, :func:`sampler_options`, :func:`check_sampler_options`, :func:`sampler_spec`) instead of
naming samplers: adding one is an entry of :data:`SAMPLERS` (and its name in :data:`SamplerName`, the typed
configs' choices; ``tests/diffusion/test_samplers.py`` checks the two agree).

Guidance is not a sampler's business: pass a guided model (see :mod:`glide_lightning.diffusion.guidance`).
Gradient (classifier / CLIP) guidance comes as ``cond_fn``, which the ancestral sampler hands to
:func:`~glide_lightning.diffusion.guidance.condition_mean` at every step; the others refuse it (their
steps have no Σ to scale a gradient by).

- ``ddpm``: ancestral sampling with the model's variance (Ho et al. 2020; Nichol & Dhariwal 2021).
- ``ddim``: DDIM (Song et al. 2021), deterministic at η = 0.
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
  Diffusion Probabilistic Models", multistep second order in the data prediction).
- ``unipc``: UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
  of Diffusion Models", B(h) = e^h - 1 ("bh2"), second order, data prediction).

The two multistep solvers integrate the probability-flow ODE from the model's x_0 prediction alone
(so a learned variance is simply not used) and take Hugging Face diffusers' schedulers as their
backend (:mod:`glide_lightning.diffusion.solvers`); their papers report near-converged samples in 10-25
steps, where ancestral sampling needs 100 or more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
from torch import Tensor

from glide_lightning.diffusion.gaussian import DenoisedFn, GaussianDiffusion, ModelFn
from glide_lightning.diffusion.guidance import CondFn, condition_mean
from glide_lightning.diffusion.schedules import parse_respacing
from glide_lightning.diffusion.solvers import SolverName, diffusers_available, multistep_step_fn

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "unipc"]
"""The registered samplers' names as a type, for typed configs (their command-line choices): the keys of
:data:`SAMPLERS`, in its order (tested)."""
StepFn = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the batch, or one per sample (then sample i depends on its own generator only,
whatever else is in the batch: resumable and shardable generation)."""


class Sampler(Protocol):
    def __call__(self, diffusion: GaussianDiffusion, model: ModelFn, shape: tuple[int, ...], *,
                 model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None, noise_scale: float = 1.0,
                 clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None, progress: bool = False,
                 generator: Generators = None, device: torch.device | str | None = None,
                 cond_fn: CondFn | None = None) -> Tensor: ...


@dataclass(frozen=True)
class StepContext:
    """What a sampler's step is made from, for one sampling call: the :class:`Sampler` arguments that are not
    the loop's own (``noise``, ``noise_scale``, ``progress`` and ``device`` are :class:`BoundSampler`'s)."""

    diffusion: GaussianDiffusion
    model: ModelFn
    model_kwargs: dict[str, Any] | None
    clip_denoised: bool
    denoised_fn: DenoisedFn | None
    generator: Generators
    cond_fn: CondFn | None
    """Gradient guidance: only ever set for a sampler whose spec has ``gradient_guidance``."""

    def p_mean_variance(self, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        """The model's prediction at ``(x_t, t)``: :meth:`GaussianDiffusion.p_mean_variance` with the call's
        ``model_kwargs``, ``clip_denoised`` and ``denoised_fn``."""
        return self.diffusion.p_mean_variance(self.model, x, t, self.model_kwargs, clip_denoised=self.clip_denoised,
                                              denoised_fn=self.denoised_fn)

    def randn_like(self, x: Tensor) -> Tensor:
        """Fresh standard normal noise shaped like ``x``, from the call's generator(s)."""
        return _randn_like(x, self.generator)


@dataclass(frozen=True)
class SamplerBackend:
    """A library a sampler runs on, which may not be installed."""

    name: str
    available: Callable[[], bool]
    install: str
    """What is missing and how to install it, the end of "sampler 'x' needs …"."""


DIFFUSERS = SamplerBackend("diffusers", diffusers_available,
                           "Hugging Face diffusers: pip install 'glide_lightning[solvers]'")


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its step, and what it binds and accepts.

    ``step(context, **options)`` makes one sampling call's ``step(x_t [B, …], t [B]) -> x_{t-1}``, called for
    t = K - 1, …, 0 of the (respaced) process, once each, under ``torch.no_grad``; the initial noise and that
    loop are :class:`BoundSampler`'s. ``options`` are the keyword options it declares (``takes_eta``: ``eta``)."""

    step: Callable[..., StepFn]
    summary: str
    """What it is, in a line or two (the bound sampler's docstring)."""
    takes_eta: bool = False
    """Takes ``eta``, the noise level of a stochastic step (DDIM's η): a config's ``eta`` reaches it; the
    other samplers refuse an ``eta`` other than 0."""
    gradient_guidance: bool = False
    """Applies ``cond_fn`` (classifier / CLIP guidance: the ancestral step's mean moved by Σ·∇); the others
    refuse it (their steps have no Σ to scale a gradient by)."""
    backend: SamplerBackend | None = None
    """A library it needs (checked when a config names it)."""
    respacings: frozenset[str] = frozenset({"all", "sections"})
    """The forms of respacing (:func:`~glide_lightning.diffusion.schedules.parse_respacing`) it runs on:
    ``all`` (``""``), ``sections`` (``"100"``, ``"10,10,3,2,2"``, ``"fast27"``), ``ddim`` (``"ddim50"``: DDIM's
    stride spacing)."""
    upsample_stage: bool = False
    """A choice of the cascade's upsampler stage (``SamplingConfig.upsample_sampler``; glide-text2im's
    notebooks run ``ddim`` at η = 0 there for text-to-image, ``ddpm`` for edits)."""
    evaluations_per_step: int = 1
    """Network evaluations per step of the process (a config's NFE: this × steps, twice where guided)."""

    @property
    def options(self) -> frozenset[str]:
        """The keyword options it declares, which :func:`get_sampler` binds (``cond_fn`` is every sampler's
        argument, applied where ``gradient_guidance``)."""
        return frozenset({"eta"} if self.takes_eta else ())


def _ancestral_step(context: StepContext) -> StepFn:
    """Ancestral sampling: x_{t-1} ~ N(μ_θ(x_t, t), Σ_θ(x_t, t)), no noise added at t = 0. ``cond_fn``
    (gradient guidance) shifts each step's mean by Σ times its gradient at x_t
    (:func:`~glide_lightning.diffusion.guidance.condition_mean`), called with the original step indices."""
    diffusion, cond_fn = context.diffusion, context.cond_fn

    def step(x: Tensor, t: Tensor) -> Tensor:
        out = context.p_mean_variance(x, t)
        mean = out["mean"] if cond_fn is None else condition_mean(out, cond_fn, x, diffusion.timestep_map.to(t.device)[t])
        z = context.randn_like(x)
        return mean + _nonzero(t, x) * torch.exp(0.5 * out["log_variance"]) * z

    return step


def _ddim_step(context: StepContext, *, eta: float = 0.0) -> StepFn:
    """DDIM (Song et al. 2021, eq. 12): deterministic at ``eta=0``; ``eta=1`` has DDPM's posterior variance."""
    diffusion = context.diffusion

    def step(x: Tensor, t: Tensor) -> Tensor:
        out = context.p_mean_variance(x, t)
        eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = diffusion._extract("alphas_cumprod", t, x)
        abar_prev = diffusion._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * abar_prev.sqrt() + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps
        if eta == 0:
            return mean
        return mean + _nonzero(t, x) * sigma * context.randn_like(x)

    return step


def _multistep(solver: SolverName) -> Callable[[StepContext], StepFn]:
    """The step of one of :mod:`~glide_lightning.diffusion.solvers`' multistep solvers (diffusers' scheduler)."""

    def make(context: StepContext) -> StepFn:
        return multistep_step_fn(solver, context.diffusion, context.model, context.model_kwargs,
                                 context.clip_denoised, context.denoised_fn)

    return make


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(
        _ancestral_step, "Ancestral sampling: x_{t-1} ~ N(μ_θ(x_t, t), Σ_θ(x_t, t)), no noise added at t = 0; "
        "``cond_fn`` (gradient guidance) shifts each step's mean by Σ times its gradient at x_t.",
        gradient_guidance=True, upsample_stage=True),
    "ddim": SamplerSpec(
        _ddim_step, "DDIM (Song et al. 2021, eq. 12): deterministic at ``eta=0``; ``eta=1`` has DDPM's posterior "
        "variance. Usually run on a respaced process (``diffusion.respace(\"ddim50\")``).",
        takes_eta=True, respacings=frozenset({"all", "sections", "ddim"}), upsample_stage=True),
    "dpmpp_2m": SamplerSpec(
        _multistep("dpmpp_2m"), "DPM-Solver++(2M): deterministic given x_T, one model evaluation per step of "
        "``diffusion`` (run it on a respaced process: ``diffusion.respace(\"20\")``).", backend=DIFFUSERS),
    "unipc": SamplerSpec(
        _multistep("unipc"), "UniPC (bh2, order 2): the predictor of each step is corrected with the next model "
        "evaluation, so it costs one evaluation per step of ``diffusion``, as DPM-Solver++; deterministic given x_T.",
        backend=DIFFUSERS),
}
"""Every sampler, by name: the one place a sampler is added (and :data:`SamplerName`)."""


class BoundSampler:
    """A registered sampler with its options bound (what :func:`get_sampler` returns): a :class:`Sampler`.

    ``noise`` is the initial x_T (drawn from ``generator`` if absent); ``noise_scale`` multiplies it (GLIDE's
    ``upsample_temp``); ``clip_denoised`` clips each x_0 prediction to [-1, 1], then ``denoised_fn`` post-processes
    it; ``cond_fn`` is gradient guidance (refused by samplers without ``gradient_guidance``). Options given
    at the call (``eta=…``) override the bound ones; an option the sampler does not declare is a ``TypeError``."""

    def __init__(self, name: str, spec: SamplerSpec, options: dict[str, Any]) -> None:
        self.name, self.spec, self.options = name, spec, options
        self.__doc__ = spec.summary

    def __repr__(self) -> str:
        options = "".join(f", {key}={value!r}" for key, value in self.options.items())
        return f"get_sampler({self.name!r}{options})"

    def __call__(self, diffusion: GaussianDiffusion, model: ModelFn, shape: tuple[int, ...], *,
                 model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None, noise_scale: float = 1.0,
                 clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None, progress: bool = False,
                 generator: Generators = None, device: torch.device | str | None = None,
                 cond_fn: CondFn | None = None, **options: Any) -> Tensor:
        if cond_fn is not None:
            options["cond_fn"] = cond_fn
        options = _checked_options(self.name, self.spec, {**self.options, **options})
        context = StepContext(diffusion, model, model_kwargs, clip_denoised, denoised_fn, generator,
                              options.pop("cond_fn", None))
        return _loop(diffusion, self.spec.step(context, **options), shape, noise, noise_scale, progress, generator,
                     device)


def sampler_spec(name: str) -> SamplerSpec:
    """The registered sampler ``name``; ``ValueError`` (listing the choices) for an unknown one."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_names(**wanted: Any) -> tuple[str, ...]:
    """The registered samplers whose spec has every attribute given (``sampler_names(takes_eta=True)``), in
    registry order; all of them without arguments."""
    return tuple(name for name, spec in SAMPLERS.items()
                 if all(getattr(spec, key) == value for key, value in wanted.items()))


def get_sampler(name: SamplerName, **options: Any) -> Sampler:
    """The sampler called ``name`` with its own options bound (``get_sampler("ddim", eta=0.0)``): only the
    options its spec declares (and ``cond_fn`` where it applies gradient guidance); any other is refused
    (``TypeError``; a ``cond_fn`` it cannot apply: ``ValueError``). A sampling config's options for it:
    :func:`sampler_options`."""
    spec = sampler_spec(name)
    return BoundSampler(name, spec, _checked_options(name, spec, options))


def sampler_options(name: str, *, eta: float = 0.0, cond_fn: CondFn | None = None) -> dict[str, Any]:
    """What a sampling config gives sampler ``name``, to bind with :func:`get_sampler`: ``eta`` where the sampler
    takes it, ``cond_fn`` where given. Nothing is dropped: an ``eta`` other than 0 for a sampler without one
    is a ``ValueError`` (:func:`check_sampler_options`' message), as is a ``cond_fn`` it cannot apply."""
    spec = sampler_spec(name)
    options: dict[str, Any] = {}
    if spec.takes_eta:
        options["eta"] = eta
    elif eta != 0:
        raise ValueError(_eta_problem(name, eta))
    if cond_fn is not None:
        options["cond_fn"] = cond_fn
    return _checked_options(name, spec, options)


def check_sampler_options(name: str, *, eta: float = 0.0, clip_guidance_scale: float = 0.0,
                          steps: str | None = None) -> list[str]:
    """The rules a sampling config's ``sampler`` breaks with these options, one message each (empty: none):
    an unknown sampler, a missing backend, CLIP guidance (``clip_guidance_scale`` > 0) with a sampler without
    gradient guidance, ``steps`` of a respacing form it does not run on (``ddimN`` for another sampler than
    DDIM), a negative ``eta`` or one other than 0 for a sampler without it. A ``steps`` that is no
    respacing at all is the caller's to report."""
    problems = []
    spec = SAMPLERS.get(name)
    if clip_guidance_scale > 0 and not (spec and spec.gradient_guidance):
        problems.append(f"clip_guidance_scale {clip_guidance_scale} shifts the ancestral step's mean, but sampler is "
                        f"{name!r}: use {_either(sampler_names(gradient_guidance=True))} or clip_guidance_scale 0")
    if spec is None:
        problems.append(f"sampler {name!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    elif spec.backend is not None and not spec.backend.available():
        problems.append(f"sampler {name!r} needs {spec.backend.install}")
    if steps is not None:
        try:
            form, counts = parse_respacing(steps)
        except ValueError:
            form, counts = "all", ()
        if form not in (spec.respacings if spec else SamplerSpec.respacings):
            problems.append(_respacing_problem(name, steps, form, counts))
    if eta < 0:
        problems.append(f"eta must be >= 0, got {eta}")
    elif eta != 0 and not (spec and spec.takes_eta):
        problems.append(_eta_problem(name, eta))
    return problems


def _checked_options(name: str, spec: SamplerSpec, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` if sampler ``name`` takes them all (a copy), else the error."""
    unknown = sorted(set(options) - spec.options - {"cond_fn"})
    if unknown:
        declared = ", ".join(sorted(spec.options)) or "none"
        raise TypeError(f"sampler {name!r} takes no option {', '.join(map(repr, unknown))} (its options: {declared})")
    if options.get("cond_fn") is not None and not spec.gradient_guidance:
        guided = _either(sampler_names(gradient_guidance=True))
        raise ValueError(f"sampler {name!r} cannot apply gradient (classifier / CLIP) guidance: it shifts the "
                         f"ancestral step's mean by Σ·∇; sample with {guided}")
    return dict(options)


def _eta_problem(name: str, eta: float) -> str:
    return (f"eta {eta} is DDIM's noise level, but sampler is {name!r}: use {_either(sampler_names(takes_eta=True))} "
            f"or leave eta at 0")


def _respacing_problem(name: str, steps: str, form: str, counts: tuple[int, ...]) -> str:
    runs_it = _either(tuple(n for n, s in SAMPLERS.items() if form in s.respacings))
    if form == "ddim":
        return (f"steps {steps!r} is DDIM's stride spacing but sampler is {name!r}: use {runs_it}, or steps "
                f"'{counts[0]}' for evenly spaced {name} steps")
    return f"steps {steps!r} is a respacing of form {form!r}, which sampler {name!r} does not run on: use {runs_it}"


def _either(names: tuple[str, ...]) -> str:
    """``sampler 'a'``, ``sampler 'a' or 'b'``, ``sampler 'a', 'b' or 'c'``."""
    quoted = [repr(name) for name in names] or ["(none registered)"]
    return "sampler " + (quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}")


ddpm_sample: Sampler = get_sampler("ddpm")
ddim_sample: Sampler = get_sampler("ddim")
dpmpp_2m_sample: Sampler = get_sampler("dpmpp_2m")
unipc_sample: Sampler = get_sampler("unipc")


def _loop(diffusion: GaussianDiffusion, step: StepFn, shape: tuple[int, ...], noise: Tensor | None, noise_scale: float,
          progress: bool, generator: Generators, device: torch.device | str | None) -> Tensor:
    if noise is None:
        x = _randn(shape, generator, torch.float32, device)
    else:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = noise if device is None else noise.to(device)
    x = x * noise_scale
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    # every step's t made once, before the loop: the loop itself allocates no index tensors
    all_t = torch.arange(diffusion.num_timesteps, device=x.device).unsqueeze(1).expand(-1, shape[0])  # [T, B]
    with torch.no_grad():
        for i in steps:
            x = step(x, all_t[i])
    return x


def _randn_like(x: Tensor, generator: Generators) -> Tensor:
    return _randn(tuple(x.shape), generator, x.dtype, x.device)


def _randn(shape: tuple[int, ...], generator: Generators, dtype: torch.dtype,
           device: torch.device | str | None) -> Tensor:
    """Standard normal noise from no generator, one generator, or one generator per sample."""
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device or generator.device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]).to(
        device or generator[0].device)


def _nonzero(t: Tensor, x: Tensor) -> Tensor:
    """1 where t > 0, 0 at the last step; shaped to broadcast against x."""
    return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
