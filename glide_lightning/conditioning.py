"""What the network is conditioned on: the one place that turns a data batch into the network's keyword
arguments, the caption's (``tokens=`` / ``mask=`` or precomputed ``text_emb=`` / ``text_mask=``, with
classifier-free guidance's caption dropout) and each model kind's image inputs (``low_res=``, ``low_res_t=``,
``inpaint_image=``, ``inpaint_mask=``), for training and validation
(:class:`~glide_lightning.module.GlideModule`), and the upsamplers' low-res input at sampling time, with the
noise augmentation that sampling applies too.

Noise augmentation of the low-res input (cascaded diffusion models, Ho et al. 2021, §4.3 "conditioning
augmentation"; Imagen): the low-res image is replaced by ``q_sample(low_res, s)`` of the upsampler's own
training process at a timestep ``s`` drawn uniformly from ``{0, …, ⌊low_res_noise·(T − 1)⌋}`` per sample,
and ``s`` reaches the network as ``low_res_t`` (embedded like the timestep: the upsampler needs
``model.low_res_noise_cond``). At sampling time the base model's samples are noised at one fixed ``s``
(``SamplingConfig.upsample_noise``) and the network is told that ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from glide_lightning.data.images import to_uint8
from glide_lightning.data.tokenizers import Tokenizer, TokenizerSpec
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.models import ModelConfig

__all__ = ["caption_kwargs", "check_trainable", "conditioning_kwargs", "drop_captions", "noised_low_res",
           "sampling_low_res_kwargs"]


def drop_captions(tokens: Tensor, mask: Tensor, empty_tokens: Tensor, empty_mask: Tensor,
                  cond_drop_prob: float) -> tuple[Tensor, Tensor, Tensor]:
    """Classifier-free guidance's caption dropout: each caption of ``tokens`` / ``mask`` ``[B, L]`` replaced by the
    empty caption ``empty_tokens`` / ``empty_mask`` ``[1, L]`` with probability ``cond_drop_prob`` (drawn from the
    global RNG); returns the captions and which were dropped, bool ``[B]``."""
    drop = torch.rand(tokens.shape[0], device=tokens.device) < cond_drop_prob  # [B]
    empty_tokens, empty_mask = empty_tokens.to(tokens.device), empty_mask.to(tokens.device)
    tokens = torch.where(drop[:, None], empty_tokens, tokens)
    mask = torch.where(drop[:, None], empty_mask, mask)
    return tokens, mask, drop


def caption_kwargs(batch: dict[str, Any], *, identity: str | None, cond_drop_prob: float | None,
                   empty_tokens: Callable[[], tuple[Tensor, Tensor]],
                   empty_embedding: Callable[[], tuple[Tensor, Tensor]]) -> tuple[dict[str, Tensor], Tensor]:
    """The network's caption keyword arguments for a data batch, and which captions were dropped (bool ``[B]``).

    Args:
        batch: the data module's batch: ``tokens`` / ``mask`` ``[B, L]``, and from shards with precomputed
            embeddings (the ``embed`` recipe) ``text_emb`` ``[B, L, D]``, ``text_mask`` ``[B, L]`` and
            ``text_encoder`` (each sample's encoder identity).
        identity: the model's frozen text encoder's identity (``ModelConfig.text_encoder_identity``); None for
            GLIDE's own transformer, which takes ``tokens`` / ``mask`` always.
        cond_drop_prob: each caption is replaced by the empty caption with this probability (classifier-free
            guidance; :func:`drop_captions`); None: none dropped (validation), nothing drawn from the RNG.
        empty_tokens: returns the empty caption's ``(tokens, mask)`` ``[1, L]``.
        empty_embedding: returns the empty caption's ``(text_emb [1, L, D], text_mask [1, L])``, called only when
            a precomputed batch drops a caption.

    Returns:
        ``tokens`` / ``mask``, or the precomputed ``text_emb`` / ``text_mask`` where the batch has them and the
        model has a frozen encoder; and the dropped captions.

    Raises:
        ValueError: the stored embeddings are another encoder's than ``identity``.
    """
    if "text_emb" not in batch or identity is None:
        tokens, mask = batch["tokens"], batch["mask"]
        dropped = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if cond_drop_prob is not None:
            tokens, mask, dropped = drop_captions(tokens, mask, *empty_tokens(), cond_drop_prob)
        return dict(tokens=tokens, mask=mask), dropped
    wrong = sorted(set(batch["text_encoder"]) - {identity})
    if wrong:
        raise ValueError(f"the shards' precomputed embeddings are {wrong[0]}'s, but the model conditions on "
                         f"{identity}: embed the shards again with the model's encoder (python -m glide_lightning data "
                         f"embed) or train on the shards without embeddings")
    emb, mask = batch["text_emb"], batch["text_mask"]
    dropped = torch.rand(emb.shape[0], device=emb.device) < cond_drop_prob if cond_drop_prob is not None else \
        torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
    if dropped.any():
        empty_emb, empty_mask = (x.to(emb.device) for x in empty_embedding())
        emb = torch.where(dropped[:, None, None], empty_emb.to(emb.dtype), emb)  # [B, L, D]
        mask = torch.where(dropped[:, None], empty_mask, mask)  # [B, L]
    return dict(text_emb=emb, text_mask=mask), dropped


def augmentation_top_step(fraction: float, num_timesteps: int) -> int:
    """The largest noise-augmentation timestep of the low-res input for ``fraction`` of a ``num_timesteps``-step
    process: ⌊fraction·(T − 1)⌋ (1e-9 absorbs float error such as 0.3·1000 = 299.99…). Training draws s uniformly
    in [0, this]; sampling at ``--sampling.upsample_noise fraction`` uses exactly this step, the largest one trained
    (e.g. 0.2 of 1000 steps: 199).

    Raises:
        ValueError: ``fraction`` outside [0, 1]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a noise-augmentation level is a fraction of the process in [0, 1], got {fraction}")
    return math.floor(fraction * (num_timesteps - 1) + 1e-9)


def noised_low_res(diffusion: GaussianDiffusion, low_res: Tensor, low_res_t: Tensor, noise: Tensor) -> Tensor:
    """``low_res`` ``[B, 3, h, w]`` noised to the upsampler process's (unrespaced) timesteps ``low_res_t``
    ``[B]`` by ``q_sample`` with ``noise`` (like ``low_res``): the augmentation of training and sampling."""
    return diffusion.q_sample(low_res, low_res_t.to(low_res.device), noise.to(low_res))


def sampling_low_res_kwargs(low_res: Tensor, diffusion: DiffusionConfig, upsample_noise: float, noise_cond: bool,
                            generators: list[torch.Generator]) -> dict[str, Tensor]:
    """An upsampler's image inputs at sampling time: ``low_res`` ``[B, 3, h, w]`` in [-1, 1] rounded to 8 bits (as
    GLIDE feeds it the saved base samples) and, for an upsampler trained with noise augmentation (``noise_cond``:
    ``model.low_res_noise_cond``), ``low_res`` noised at ``upsample_noise`` (a fraction of the upsampler's
    process ``diffusion``, unrespaced) with each image's noise drawn from its generator in ``generators``, and that
    level as ``low_res_t`` ``[B]``."""
    low_res = to_uint8(low_res).float().to(low_res.device) / 127.5 - 1
    if not noise_cond:
        return {"low_res": low_res}
    process = GaussianDiffusion.from_config(diffusion)
    level = augmentation_top_step(upsample_noise, process.num_timesteps)
    low_res_t = torch.full((low_res.shape[0],), level, dtype=torch.long, device=low_res.device)
    noise = torch.stack([torch.randn(low_res.shape[1:], generator=g) for g in generators])
    return {"low_res": noised_low_res(process, low_res, low_res_t, noise), "low_res_t": low_res_t}


def conditioning_kwargs(kind: str, batch: dict[str, Any], *, diffusion: GaussianDiffusion | None = None,
                        low_res_noise: float = 0.0, noise_cond: bool = False,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The network's image-conditioning keyword arguments for a data batch of model ``kind``.

    Args:
        kind: ``base`` (none), ``upsample`` (``low_res``), ``inpaint`` (``inpaint_image``: the batch's
            images, which the network multiplies by the mask itself, and ``inpaint_mask``) or
            ``upsample_inpaint`` (all three).
        batch: the data module's batch (``image``; ``low_res`` and ``inpaint_mask`` for the kinds
            that need them, see :mod:`glide_lightning.data.conditioning`).
        diffusion: the training process (the augmentation's ``q_sample``); needed with ``noise_cond``.
        low_res_noise: the largest augmentation timestep as a fraction of the process (0: none).
        noise_cond: the upsampler takes ``low_res_t`` (``model.low_res_noise_cond``): then ``low_res`` is
            always noised and ``low_res_t`` passed (at ``low_res_noise`` 0: s = 0, the process's first step).
        generator: CPU generator of the augmentation's timesteps and noise (validation: fixed); None: the
            global RNG (training, whose state checkpoints keep).

    Raises:
        ValueError: the batch lacks an input the kind needs (the data module was not told the model's kind).
    """
    kwargs: dict[str, Tensor] = {}
    if kind.startswith("upsample"):
        if "low_res" not in batch:
            raise ValueError(f"a model of kind {kind!r} needs the batch's low_res: give the data module "
                             f"model_kind={kind!r} and low_res_size (the training CLI links model.model.kind)")
        low_res = batch["low_res"]
        if noise_cond:
            if diffusion is None:
                raise ValueError("noise augmentation of low_res needs the training process (diffusion=)")
            top = augmentation_top_step(low_res_noise, diffusion.num_timesteps)
            low_res_t = torch.randint(0, top + 1, (low_res.shape[0],), generator=generator).to(low_res.device)
            noise = torch.randn(low_res.shape, generator=generator) if generator is not None \
                else torch.randn_like(low_res)
            low_res = noised_low_res(diffusion, low_res, low_res_t, noise)
            kwargs["low_res_t"] = low_res_t
        kwargs["low_res"] = low_res
    if "inpaint" in kind:
        if "inpaint_mask" not in batch:
            raise ValueError(f"a model of kind {kind!r} needs the batch's inpaint_mask: give the data module "
                             f"model_kind={kind!r} (the training CLI links model.model.kind)")
        kwargs["inpaint_image"] = batch["image"]
        kwargs["inpaint_mask"] = batch["inpaint_mask"]
    return kwargs


def check_trainable(model: ModelConfig, diffusion: DiffusionConfig, tokenizer: TokenizerSpec,
                    low_res_noise: float = 0.0) -> Tokenizer:
    """The caption tokenizer, once the model's conditioning (its text encoder and the tokenizer it implies,
    :meth:`TokenizerSpec.for_model <glide_lightning.data.tokenizers.TokenizerSpec.for_model>`, the text context and
    vocabulary, the low-res noise augmentation) and its process are known to train together.

    Raises:
        ValueError: settings that do not fit together; the message names the field and the fix.
    """
    if not 0.0 <= low_res_noise <= 1.0:
        raise ValueError(f"model.low_res_noise must be in [0, 1] (a fraction of the process), got {low_res_noise}")
    if low_res_noise and not model.low_res_noise_cond:
        raise ValueError("model.low_res_noise > 0 augments the upsampler's low-res input, whose noise level must reach "
                         "the network: set model.model.low_res_noise_cond: true (model.model.kind upsample or "
                         "upsample_inpaint)")
    if diffusion.variance_type == "learned_range" and not model.learn_sigma:
        raise ValueError("model.diffusion.variance_type 'learned_range' needs model.model.learn_sigma: true "
                         "(6 output channels), or a fixed variance_type with loss_type simple")
    expected = TokenizerSpec.for_model(model, tokenizer.name, tokenizer.bpe_dir)  # a name the encoder does not read
    if tokenizer != expected:  # a hand-made spec at another text_ctx, or another T5's files
        raise ValueError(f"{tokenizer} is not the model's tokenizer {expected}: use TokenizerSpec.for_model(model)")
    try:
        built = tokenizer.build()
    except ValueError as error:
        raise ValueError(f"model.model.text_ctx {model.text_ctx} does not suit tokenizer {tokenizer.name!r}: {error}") \
            from None
    if model.xf_width and not model.frozen_text_encoder and model.n_vocab != built.n_vocab:
        raise ValueError(f"model.model.n_vocab is {model.n_vocab} but tokenizer {tokenizer.name!r} has {built.n_vocab} "
                         f"tokens: set model.model.n_vocab: {built.n_vocab} (or another model.tokenizer)")
    return built
