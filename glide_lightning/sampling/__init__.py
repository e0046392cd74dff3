"""Sampling: from a checkpoint to images, behind ``python -m glide_lightning sample``, ``fid`` / ``sweep``,
the training callbacks, ``init_from`` and the benchmark.

- :mod:`~glide_lightning.sampling.config`: :class:`SamplingConfig`, the one place the sampling knobs have
  defaults; :data:`DEFAULT_GUIDANCE_SWEEP`; :func:`model_evaluations` (network evaluations per image).
- :mod:`~glide_lightning.sampling.checkpoints`: :func:`load_checkpoint`, the one reader of every checkpoint
  kind (ours, EMA or raw weights; glide-text2im's released files), into a :class:`SamplingModel`;
  :data:`RELEASED_MODELS`, the one registry of glide-text2im's released models.
- :mod:`~glide_lightning.sampling.batch`: one model's batch (:func:`sample_batch`, classifier-free guided;
  :func:`sample_conditioned`, a model of any kind), the per-image generators, and
  :func:`~glide_lightning.sampling.batch.denoiser`, the one wrapper through which every stage calls its
  network (``compile``, ``precision``, ``memory_format``).
- :mod:`~glide_lightning.sampling.cascade`: :func:`generate`, text to images (a base model, then optionally
  an upsampler, :func:`upsample_batch`).
- :mod:`~glide_lightning.sampling.editing`: :func:`edit`, text-guided inpainting (an inpainting model, then
  optionally an inpainting upsampler).
- :mod:`~glide_lightning.sampling.clip_guidance`: a noised CLIP read for sampling and its ``cond_fn``.
- :mod:`~glide_lightning.sampling.command`: the ``sample`` command (:class:`SampleCommand`), imported by the
  front door (:mod:`glide_lightning.commands`), not here.

The package imports ``models/``, ``diffusion/``, ``data/`` and a few top-level helpers, never ``evaluation/``,
``callbacks/``, the training module or the CLI, which all use it (``tests/test_layout.py``).
"""

from glide_lightning.sampling.batch import (
    denoiser,
    sample_batch,
    sample_conditioned,
    sample_generators,
    uses_channels_last,
)
from glide_lightning.sampling.cascade import check_cascade, generate, upsample_batch
from glide_lightning.sampling.checkpoints import (
    RELEASED_MODELS,
    ReleasedModel,
    SamplingModel,
    Weights,
    check_kind,
    load_checkpoint,
    released_model,
)
from glide_lightning.sampling.clip_guidance import GLIDE_CLIP_PROCESS, GuidanceCLIP, clip_timesteps, load_guidance_clip
from glide_lightning.sampling.config import (
    DEFAULT_GUIDANCE_SWEEP,
    UPSAMPLE_SAMPLERS,
    CascadeTask,
    SamplingConfig,
    model_evaluations,
)
from glide_lightning.sampling.editing import edit, resized, resized_keep

__all__ = [
    "DEFAULT_GUIDANCE_SWEEP", "GLIDE_CLIP_PROCESS", "RELEASED_MODELS", "UPSAMPLE_SAMPLERS", "CascadeTask",
    "GuidanceCLIP", "ReleasedModel", "SamplingConfig", "SamplingModel", "Weights", "check_cascade", "check_kind",
    "clip_timesteps", "denoiser", "edit", "generate", "load_checkpoint", "load_guidance_clip", "model_evaluations",
    "released_model", "resized", "resized_keep", "sample_batch", "sample_conditioned", "sample_generators",
    "upsample_batch", "uses_channels_last",
]
