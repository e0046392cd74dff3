"""Named β schedules and timestep respacing.

Everything here is float64 numpy-free torch math on the CPU; the Gaussian process casts to the
working dtype when it indexes a schedule.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

ScheduleName = Literal["linear", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)

# GLIDE's respacing preset for its upsampler ("fast27": 27 steps in five sections, and the noisiest
# kept step T - 1 swapped for T - 3, which GLIDE does to soften artifacts from the noisiest step).
RESPACING_PRESETS = {"fast27": "10,10,3,2,2"}
_SOFTENED_PRESETS = ("fast27",)


def get_named_beta_schedule(name: ScheduleName, num_steps: int) -> torch.Tensor:
    """β_1..β_T (float64, shape [T]) of a named schedule.

    - ``linear``: DDPM's β from 1e-4 to 0.02 at T = 1000, scaled by 1000 / T so that other T give
      a process with the same end points in ᾱ (GLIDE's upsampler, improved DDPM).
    - ``cosine``: Improved DDPM's ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, with β clipped
      at 0.999 (GLIDE's ``squaredcos_cap_v2``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    if name == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if name == "cosine":

        def alpha_bar(s: torch.Tensor) -> torch.Tensor:
            return torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        abar = alpha_bar(steps)
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """The original step indices kept by a respacing ``spec`` (sorted, unique).

    Accepted forms:
    - ``""``: keep every step;
    - ``"N"``: N evenly spaced steps including the first and the last;
    - ``"ddimN"``: the N steps ``0, k, 2k, …`` with an integer stride k (as DDIM); fails if no stride
      gives exactly N;
    - ``"a,b,c"``: split the steps into equal sections and take a, b, c … evenly spaced steps in each;
    - a preset name: ``"fast27"``, GLIDE's upsampler setting: ``"10,10,3,2,2"`` with the last step
      T - 1 replaced by T - 3 (as glide-text2im does).

    Within a section of ``size`` steps, ``count`` steps are kept as Improved DDPM does: a position
    starts at 0 and advances by the float stride (size - 1) / (count - 1); each kept step is the
    position rounded with Python's ``round`` (halves to even), so respaced samplers visit exactly
    the steps of the reference implementation (multiplying j · stride instead differs by one step
    for many counts, through float error at halves).
    """
    name = spec.strip()
    if name in _SOFTENED_PRESETS:
        kept = set(space_timesteps(num_timesteps, RESPACING_PRESETS[name]))
        if num_timesteps - 3 in kept or num_timesteps - 1 not in kept:
            raise ValueError(f"respacing {name!r} needs a process of at least 30 steps, got {num_timesteps}")
        return sorted(kept - {num_timesteps - 1} | {num_timesteps - 3})
    form, counts = parse_respacing(name)
    spec = RESPACING_PRESETS.get(name, name)
    if form == "all":
        return list(range(num_timesteps))
    if form == "ddim":
        n = counts[0]
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == n:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"respacing {spec!r}: no integer stride gives exactly {n} of {num_timesteps} steps")
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"respacing {spec!r}: cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 0.0
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride  # accumulated, as the reference does: the float error is part of the rule
        start += size
    return sorted(set(kept))


def parse_respacing(spec: str) -> tuple[Literal["all", "ddim", "sections"], tuple[int, ...]]:
    """The form of a respacing spec (see :func:`space_timesteps`) and its counts, checked without
    knowing the process: ``("all", ())``, ``("ddim", (N,))`` or ``("sections", (a, b, …))``.

    Raises:
        ValueError: not one of the accepted forms (the message lists them).
    """
    spec = RESPACING_PRESETS.get(spec.strip(), spec.strip())
    if spec == "":
        return "all", ()
    if spec.startswith("ddim"):
        return "ddim", (_parse_count(spec[4:], spec),)
    return "sections", tuple(_parse_count(part, spec) for part in spec.split(","))


def _parse_count(text: str, spec: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(
            f"bad respacing {spec!r}: use '' (all steps), 'N', 'ddimN', comma sections such as "
            f"'10,10,3,2,2', or one of {sorted(RESPACING_PRESETS)}"
        )
    return n


def respaced_betas(alphas_cumprod: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """β of the shorter process that visits only ``kept`` steps and has the same ᾱ there."""
    abar = alphas_cumprod[kept]
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1 - abar / prev
