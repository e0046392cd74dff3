"""CLIP guidance at sampling time (GLIDE §2.3): a noised CLIP read from a directory, and the ``cond_fn``
that moves each ancestral step's mean by s·Σ·∇_{x_t}(logit_scale · f(x_t, t)·g(c)).

The directory holds ``image_enc.pt`` and ``text_enc.pt``, or ``clip_image_enc.pt`` and ``clip_text_enc.pt`` as
glide-text2im's ``download.py`` names them (:func:`~glide_lightning.models.clip.clip_files`): glide-text2im's
released noised CLIP (its architecture and process, cosine over 1000 steps, are :class:`NoisedCLIPConfig`'s
defaults) or a ``noised_clip`` run's export (``runs/<name>/clip``, whose ``clip_config.json`` records the
architecture, the learned logit scale, the training process and the tokenizer). The gradient math
itself is :func:`glide_lightning.diffusion.guidance.classifier_guidance`.

Every caption the base model accepts guides, ``""`` and blanks included: the ``clip`` tokenizer frames them
as ``[sot, eot]`` (glide-text2im's ``CLIPModel.text_embeddings`` does the same), so guidance ascends the
similarity to the text encoder's embedding of those two tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from glide_lightning.data.tokenizers import Tokenizer, build_tokenizer
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.diffusion.guidance import CondFn, classifier_guidance
from glide_lightning.models.clip import NoisedCLIP, clip_files, load_noised_clip

__all__ = ["GLIDE_CLIP_PROCESS", "GuidanceCLIP", "clip_timesteps", "load_guidance_clip"]

GLIDE_CLIP_PROCESS = DiffusionConfig(steps=1000, noise_schedule="cosine")
"""The process glide-text2im's noised CLIP was trained on (its ``clip/config.yaml``: squaredcos_cap_v2, 1000 steps)."""


@dataclass
class GuidanceCLIP:
    """A noised CLIP ready to guide: the encoders, the process its timesteps index, its tokenizer."""

    clip: NoisedCLIP
    process: DiffusionConfig
    """The diffusion process the image encoder was trained on (its ``w_t`` rows are this process's steps)."""
    tokenizer: Tokenizer
    source: str
    """Where it was read from, and whose it is."""

    def text_targets(self, prompts: list[str], device: torch.device) -> Tensor:
        """The unit-norm text embeddings ``[B, embed_dim]`` that guidance moves each sample toward: the
        CLIP's tokenizer's framing of each prompt (``""`` → ``[sot, eot]`` with the ``clip`` tokenizer), encoded."""
        tokens, mask = (x.to(device) for x in self.tokenizer(prompts))
        with torch.no_grad():
            return self.clip.text_embeddings(tokens, mask)

    def cond_fn(self, prompts: list[str], base_alphas_cumprod: Tensor, scale: float, device: torch.device) -> CondFn:
        """The guidance gradient for a batch of ``prompts`` sampled by a model whose original process
        has ``base_alphas_cumprod`` (ᾱ per original step): the captions are encoded once
        (:meth:`text_targets`), and each step's x_t is scored at the CLIP step of the nearest ᾱ
        (:func:`clip_timesteps`). The returned function maps ``(x_t [B, 3, S, S], t [B])`` to ``[B, 3, S, S]``."""
        text = self.text_targets(prompts, device)  # [B, embed_dim], unit norm
        table = clip_timesteps(base_alphas_cumprod, GaussianDiffusion.from_config(self.process).base_alphas_cumprod)
        table = table.to(device)

        def score(x_t: Tensor, timesteps: Tensor) -> Tensor:
            return self.clip.similarity(x_t, table[timesteps], text)  # [B]

        return classifier_guidance(score, scale)


def clip_timesteps(base_alphas_cumprod: Tensor, clip_alphas_cumprod: Tensor) -> Tensor:
    """For each step of the sampled model's process, the step of the CLIP's process with the nearest
    ᾱ (the same noise level): ``[T_base]`` int64; the identity when the two processes are equal."""
    distance = (base_alphas_cumprod.double()[:, None] - clip_alphas_cumprod.double()[None, :]).abs()  # [T_base, T_clip]
    return distance.argmin(dim=1)


def load_guidance_clip(directory: str | os.PathLike[str], image_size: int,
                       device: torch.device | str = "cpu") -> GuidanceCLIP:
    """Read a noised CLIP directory (see the module docstring) for a model sampling ``image_size`` px images.

    Raises:
        FileNotFoundError: the directory holds neither naming's pair of files (the error names both).
        CheckpointMismatchError: a file does not load strictly into the expected encoder.
        ValueError: the directory holds both namings, or the CLIP sees images of another size than the model samples.
    """
    files = clip_files(directory)
    clip, meta = load_noised_clip(directory)
    if clip.config.image_size != image_size:
        raise ValueError(f"the noised CLIP in {directory} sees {clip.config.image_size} px images but the model samples "
                         f"{image_size} px ones: use a noised CLIP trained at {image_size} px (model.model.image_size "
                         f"of experiments/noised_clip.yaml)")
    process = DiffusionConfig(**meta["process"]) if meta.get("process") else GLIDE_CLIP_PROCESS
    tokenizer = build_tokenizer(meta.get("tokenizer", "clip"), text_ctx=clip.config.text_ctx)
    whose = "glide_lightning noised_clip export" if meta else "glide-text2im's released noised CLIP"
    names = f"{files['image'].name}, {files['text'].name}"
    return GuidanceCLIP(clip.to(device), process, tokenizer, f"{directory} ({whose}: {names})")
