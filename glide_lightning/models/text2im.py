"""GLIDE's text-conditional UNet and its super-resolution and inpainting variants.

The caption goes through a Transformer (:mod:`glide_lightning.models.text`); the last token's
features, projected to the embedding width, are added to the timestep embedding, and all token
features ``[B, xf_width, text_ctx]`` are extra keys and values for every attention block.

All four models share one call convention (glide-text2im's): ``model(x_t, t, tokens=..., mask=...)``
plus ``low_res=`` (super-resolution; and ``low_res_t=`` where the upsampler was built with
``low_res_noise_cond``) and ``inpaint_image=``, ``inpaint_mask=`` (inpainting); ``t``
holds raw integer timesteps; the output has ``out_channels`` channels (6: ε and the learned-variance
interpolation value).

The caption's encoding does not depend on the noisy image or the timestep: a sampler encodes each
caption batch once with :meth:`Text2ImUNet.encode_text` and passes ``xf_proj=``, ``xf_out=`` in
place of ``tokens=``, ``mask=`` at every step (stateless: nothing is cached on the module).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from glide_lightning.models.nn import LayerNorm, timestep_embedding, zero_module
from glide_lightning.models.text import Transformer
from glide_lightning.models.unet import UNetModel

__all__ = [
    "InpaintText2ImUNet",
    "SuperResInpaintText2ImUNet",
    "SuperResText2ImUNet",
    "Text2ImUNet",
]


class Text2ImUNet(UNetModel):
    """An ADM UNet conditioned on a caption encoded by its own Transformer (GLIDE).

    Args:
        text_ctx: number of caption tokens (the tokenizer's padded length).
        xf_width: Transformer width (0: no text encoder, an unconditional UNet).
        xf_layers: Transformer layers.
        xf_heads: Transformer attention heads.
        xf_final_ln: apply a LayerNorm to the Transformer's output.
        xf_padding: replace the input embedding at masked-out (padding) positions by a learned
            per-position padding embedding.
        n_vocab: vocabulary size of the tokenizer.
        in_channels: channels of the noisy image ``x`` (the UNet's own input may have more, see the
            variants).
        **unet_kwargs: the remaining :class:`~glide_lightning.models.unet.UNetModel` arguments
            (``model_channels``, ``out_channels``, ``num_res_blocks``, ``attention_resolutions``, …).
    """

    def __init__(
        self,
        *,
        text_ctx: int,
        xf_width: int,
        xf_layers: int,
        xf_heads: int,
        xf_final_ln: bool = True,
        xf_padding: bool = True,
        n_vocab: int,
        in_channels: int = 3,
        **unet_kwargs: Any,
    ) -> None:
        super().__init__(
            in_channels=self.unet_in_channels(in_channels),
            encoder_channels=xf_width or None,
            **unet_kwargs,
        )
        self.image_channels = in_channels
        self.text_ctx = text_ctx
        self.xf_width = xf_width
        self.xf_padding = xf_padding
        if not xf_width:
            return
        self.transformer = Transformer(xf_width, xf_layers, xf_heads)
        self.final_ln = LayerNorm(xf_width) if xf_final_ln else None
        self.token_embedding = nn.Embedding(n_vocab, xf_width)
        self.positional_embedding = nn.Parameter(torch.empty(text_ctx, xf_width))
        if xf_padding:
            self.padding_embedding = nn.Parameter(torch.empty(text_ctx, xf_width))
        self.transformer_proj = nn.Linear(xf_width, 4 * self.model_channels)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if xf_padding:
            nn.init.normal_(self.padding_embedding, std=0.01)

    @staticmethod
    def unet_in_channels(image_channels: int) -> int:
        """Channels the UNet sees: the noisy image plus any concatenated conditioning images."""
        return image_channels

    def encode_text(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode a caption batch.

        Args:
            tokens: ``[B, text_ctx]`` token ids.
            mask: ``[B, text_ctx]`` bool, True on real tokens; None means every position is real.
                With ``xf_padding`` the input embedding where it is False is replaced by the learned
                ``padding_embedding`` of that position (so the token id there does not matter).

        Returns:
            ``xf_proj`` ``[B, 4 * model_channels]`` (from the last position's features) and
            ``xf_out`` ``[B, xf_width, text_ctx]`` (every position, for the attention blocks).
        """
        if not self.xf_width:
            raise ValueError("this model has no text encoder (xf_width=0): pass tokens=None")
        if tokens.ndim != 2 or tokens.shape[1] != self.text_ctx:
            raise ValueError(f"tokens must have shape [B, {self.text_ctx}], got {tuple(tokens.shape)}")
        xf_in = self.token_embedding(tokens.long()) + self.positional_embedding  # [B, L, W]
        if self.xf_padding and mask is not None:
            if mask.shape != tokens.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != tokens shape {tuple(tokens.shape)}")
            keep = rearrange(mask.bool(), "b l -> b l 1")  # [B, L, 1]
            xf_in = torch.where(keep, xf_in, self.padding_embedding.to(xf_in.dtype))  # [B, L, W]
        xf_out = self.transformer(xf_in)  # [B, L, W]
        if self.final_ln is not None:
            xf_out = self.final_ln(xf_out)
        xf_proj = self.transformer_proj(xf_out[:, -1])  # [B, 4 * model_channels]
        return xf_proj, rearrange(xf_out, "b l w -> b w l")  # [B, W, L]

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(f"x must have shape [B, {self.image_channels}, H, W], got {tuple(x.shape)}")

    def _denoise(self, h: Tensor, timesteps: Tensor, tokens: Tensor | None, mask: Tensor | None,
                 xf_proj: Tensor | None, xf_out: Tensor | None, extra_emb: Tensor | None = None) -> Tensor:
        """Run the text encoder on ``tokens`` (or take its precomputed ``xf_proj``/``xf_out``; neither:
        no text) and the UNet on the full input ``h``; ``extra_emb`` ``[B, 4 * model_channels]`` is added
        to the embedding too."""
        if tokens is not None:
            if xf_proj is not None or xf_out is not None:
                raise ValueError("pass tokens/mask or their encoding xf_proj/xf_out, not both")
            xf_proj, xf_out = self.encode_text(tokens, mask)
        elif (xf_proj is None) != (xf_out is None):
            raise ValueError("a precomputed caption encoding needs both xf_proj and xf_out (see encode_text)")
        if extra_emb is not None:
            xf_proj = extra_emb if xf_proj is None else xf_proj + extra_emb
        return UNetModel.forward(self, h, timesteps, encoder_out=xf_out, extra_emb=xf_proj)

    def forward(  # type: ignore[override]
        self, x: Tensor, timesteps: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None,
        xf_proj: Tensor | None = None, xf_out: Tensor | None = None,
    ) -> Tensor:
        """``x`` ``[B, C, H, W]``, ``timesteps`` ``[B]`` → ``[B, out_channels, H, W]``.

        ``tokens``/``mask`` as in :meth:`encode_text`, or instead their encoding ``xf_proj``
        ``[B, 4 * model_channels]`` and ``xf_out`` ``[B, xf_width, text_ctx]`` (what
        :meth:`encode_text` returns, computed once per sampling call); none of them: no text path.
        """
        self._check_input(x)
        return self._denoise(x, timesteps, tokens, mask, xf_proj, xf_out)


def _upsampled(low_res: Tensor | None, x: Tensor) -> Tensor:
    """``low_res`` ``[B, C, h, w]`` bilinearly resized to ``x``'s height and width."""
    if low_res is None:
        raise ValueError("a super-resolution model needs low_res (the low-resolution image)")
    return F.interpolate(low_res.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _inpaint_inputs(x: Tensor, inpaint_image: Tensor | None, inpaint_mask: Tensor | None) -> list[Tensor]:
    """``[inpaint_image * inpaint_mask, inpaint_mask]``, each defaulting to zeros."""
    if inpaint_image is None:
        inpaint_image = torch.zeros_like(x)
    if inpaint_mask is None:
        inpaint_mask = torch.zeros_like(x[:, :1])
    inpaint_mask = inpaint_mask.to(x.dtype)
    return [inpaint_image.to(x.dtype) * inpaint_mask, inpaint_mask]


class SuperResText2ImUNet(Text2ImUNet):
    """Text-conditional super-resolution: the low-res image, bilinearly upsampled, joins ``x``.

    Args:
        low_res_noise_cond: for training with Gaussian noise augmentation of the low-res input
            (cascaded diffusion, Ho et al. 2021, §4.3; Imagen): the augmentation's timestep
            ``low_res_t`` ``[B]`` (raw integer steps of the training process) is embedded as the
            timestep is (sinusoid, then ``low_res_noise_embed``: Linear-SiLU-Linear, its last layer
            zero-initialised, so that a fresh embedding changes nothing: an upsampler without it, e.g.
            glide-text2im's, can be fine-tuned with it) and added to the embedding. Adds
            ``low_res_noise_embed.*`` weights; False (GLIDE's) adds none.
        **kwargs: as :class:`Text2ImUNet`.
    """

    def __init__(self, *, low_res_noise_cond: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low_res_noise_cond = low_res_noise_cond
        if low_res_noise_cond:
            emb_dim = 4 * self.model_channels
            self.low_res_noise_embed = nn.Sequential(nn.Linear(self.model_channels, emb_dim), nn.SiLU(),
                                                     zero_module(nn.Linear(emb_dim, emb_dim)))

    @staticmethod
    def unet_in_channels(image_channels: int) -> int:  # noqa: D102
        return 2 * image_channels

    def _noise_level_emb(self, low_res_t: Tensor | None, x: Tensor) -> Tensor | None:
        """The embedding ``[B, 4 * model_channels]`` of the low-res input's augmentation timestep."""
        if not self.low_res_noise_cond:
            if low_res_t is not None:
                raise ValueError("low_res_t given, but this upsampler was not built with low_res_noise_cond")
            return None
        if low_res_t is None:
            raise ValueError("this upsampler was trained with noise augmentation of low_res: pass low_res_t "
                             "(the augmentation timestep, 0 for a clean low-res input)")
        low_res_t = low_res_t.expand(x.shape[0]) if low_res_t.ndim == 0 else low_res_t
        t_emb = timestep_embedding(low_res_t.to(x.device), self.model_channels)  # [B, model_channels]
        return self.low_res_noise_embed(t_emb.to(x.dtype))  # [B, 4 * model_channels]

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        timesteps: Tensor,
        low_res: Tensor | None = None,
        tokens: Tensor | None = None,
        mask: Tensor | None = None,
        xf_proj: Tensor | None = None,
        xf_out: Tensor | None = None,
        low_res_t: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`Text2ImUNet.forward`, conditioned on ``low_res`` ``[B, C, h, w]`` (required) and,
        with ``low_res_noise_cond``, its augmentation timestep ``low_res_t`` ``[B]``."""
        self._check_input(x)
        h = torch.cat([x, _upsampled(low_res, x)], dim=1)  # [B, 2C, H, W]
        return self._denoise(h, timesteps, tokens, mask, xf_proj, xf_out, self._noise_level_emb(low_res_t, x))


class InpaintText2ImUNet(Text2ImUNet):
    """Text-conditional inpainting: the known pixels (image x mask) and the mask join ``x``."""

    @staticmethod
    def unet_in_channels(image_channels: int) -> int:  # noqa: D102
        return 2 * image_channels + 1

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        timesteps: Tensor,
        inpaint_image: Tensor | None = None,
        inpaint_mask: Tensor | None = None,
        tokens: Tensor | None = None,
        mask: Tensor | None = None,
        xf_proj: Tensor | None = None,
        xf_out: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`Text2ImUNet.forward`, conditioned on ``inpaint_image`` ``[B, C, H, W]`` and
        ``inpaint_mask`` ``[B, 1, H, W]`` (1 where the pixel is known); missing ones are zeros."""
        self._check_input(x)
        h = torch.cat([x, *_inpaint_inputs(x, inpaint_image, inpaint_mask)], dim=1)  # [B, 2C+1, H, W]
        return self._denoise(h, timesteps, tokens, mask, xf_proj, xf_out)


class SuperResInpaintText2ImUNet(SuperResText2ImUNet):
    """Text-conditional super-resolution inpainting: upsampled low-res, known pixels and mask."""

    @staticmethod
    def unet_in_channels(image_channels: int) -> int:  # noqa: D102
        return 3 * image_channels + 1

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        timesteps: Tensor,
        low_res: Tensor | None = None,
        inpaint_image: Tensor | None = None,
        inpaint_mask: Tensor | None = None,
        tokens: Tensor | None = None,
        mask: Tensor | None = None,
        xf_proj: Tensor | None = None,
        xf_out: Tensor | None = None,
        low_res_t: Tensor | None = None,
    ) -> Tensor:
        """Combines :class:`SuperResText2ImUNet` and :class:`InpaintText2ImUNet` (in that order)."""
        self._check_input(x)
        cond = [_upsampled(low_res, x), *_inpaint_inputs(x, inpaint_image, inpaint_mask)]
        h = torch.cat([x, *cond], dim=1)  # [B, 3C+1, H, W]
        return self._denoise(h, timesteps, tokens, mask, xf_proj, xf_out, self._noise_level_emb(low_res_t, x))
