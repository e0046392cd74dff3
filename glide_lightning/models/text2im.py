"""GLIDE's text-conditional UNet and its super-resolution and inpainting variants.

The caption goes through a Transformer (:mod:`glide_lightning.models.text`); the last token's
features, projected to the embedding width, are added to the timestep embedding, and all token
features ``[B, xf_width, text_ctx]`` are extra keys and values for every attention block.

All four models share one call convention (glide-text2im's): ``model(x_t, t, tokens=..., mask=...)``
plus ``low_res=`` (super-resolution; and ``low_res_t=`` where the upsampler was built with
``low_res_noise_cond``) and ``inpaint_image=``, ``inpaint_mask=`` (inpainting); ``t``
holds raw integer timesteps; the output has ``out_channels`` channels (6: ε and the learned-variance
interpolation value). The conditioning images join ``x`` in glide-text2im's channel order, which each class
states as ``INPUT_ORDER``: ``[x, upsampled]`` (super-resolution), ``[x, inpaint_image * inpaint_mask,
inpaint_mask]`` (inpainting), ``[x, inpaint_image * inpaint_mask, inpaint_mask, upsampled]`` (both, as
glide-text2im's ``SuperResInpaintText2ImUnet.forward``; checkpoints record it, see
:mod:`glide_lightning.input_order`).

The caption's encoding does not depend on the noisy image or the timestep: a sampler encodes each
caption batch once with :meth:`Text2ImUNet.encode_caption` and passes its ``xf_proj=``, ``xf_out=``
(and ``xf_mask=``) in place of ``tokens=``, ``mask=`` at every step (stateless: nothing is cached on the
module).

With a frozen pretrained text encoder (``text_encoder`` ``t5`` / ``clip``, Imagen's arm) the GLIDE
transformer is absent: the encoder's embeddings ``[B, L, D]`` are LayerNorm-ed and projected to
``xf_width`` (Imagen finds LayerNorm on the text embeddings helps), the attention blocks attend to them
with padding masked out (a key padding mask: a frozen encoder has no learned padding embedding), and
their mean over real tokens, projected, is added to the timestep embedding (Imagen's pooled embedding).
The encoder itself is kept outside the module tree (:meth:`Text2ImUNet.attach_text_encoder`): never in
``state_dict``, ``parameters()`` or an optimizer.
"""

from __future__ import annotations

from typing import Any, ClassVar

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


class _Shared(list):  # noqa: N801
    """A list that ``copy.deepcopy`` shares instead of copying: an EMA average (a deep copy of the model)
    uses the same frozen encoder rather than a second copy of its weights."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


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
        text_encoder: ``transformer`` (GLIDE's own, the ``xf_*`` arguments) or a frozen encoder's name
            (``t5``, ``clip``): then ``xf_layers``, ``xf_heads``, ``xf_padding``, ``n_vocab`` are unused.
        text_encoder_dim: width D of the frozen encoder's embeddings (frozen encoders only).
        in_channels: channels of the noisy image ``x`` (the UNet's own input may have more, see the
            variants).
        **unet_kwargs: the remaining :class:`~glide_lightning.models.unet.UNetModel` arguments
            (``model_channels``, ``out_channels``, ``num_res_blocks``, ``attention_resolutions``, …).
    """

    INPUT_ORDER: ClassVar[tuple[str, ...]] = ("x",)
    """The blocks of channels the UNet's first convolution takes, in order (glide-text2im's order; checkpoints
    record it as ``input_order``)."""

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
        text_encoder: str = "transformer",
        text_encoder_dim: int | None = None,
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
        self.text_encoder = text_encoder
        self._frozen_encoder: list[nn.Module] = _Shared()  # a list keeps it out of the module tree
        if not xf_width:
            return
        if text_encoder != "transformer":
            if not text_encoder_dim:
                raise ValueError(f"text_encoder {text_encoder!r} needs text_encoder_dim (its embeddings' width)")
            self.text_encoder_dim = text_encoder_dim
            self.encoder_ln = LayerNorm(text_encoder_dim)
            self.encoder_proj = nn.Linear(text_encoder_dim, xf_width)
            self.pooled_proj = nn.Linear(xf_width, 4 * self.model_channels)
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

    def input_layout(self) -> list[tuple[str, int]]:
        """``(name, channels)`` of each block of the UNet's input, in :attr:`INPUT_ORDER`: ``inpaint_mask`` has
        1 channel, the others (``x``, ``upsampled``, ``inpaint_image*inpaint_mask``) ``image_channels``."""
        return [(name, 1 if name == "inpaint_mask" else self.image_channels) for name in self.INPUT_ORDER]

    @property
    def frozen_text_encoder(self) -> bool:
        """True when the caption comes from a frozen pretrained encoder (``t5``, ``clip``)."""
        return self.text_encoder != "transformer"

    def attach_text_encoder(self, encoder: nn.Module) -> None:
        """Give a frozen-encoder model its encoder (``forward(tokens, mask)`` → ``[B, L, D]`` with ``dim``
        D, e.g. :class:`~glide_lightning.models.encoders.FrozenTextEncoder`), held outside the module tree.

        Raises:
            ValueError: this model uses GLIDE's transformer, or ``encoder.dim`` is not ``text_encoder_dim``.
        """
        if not self.frozen_text_encoder:
            raise ValueError("this model encodes captions with its own transformer: it takes no frozen encoder")
        if encoder.dim != self.text_encoder_dim:
            raise ValueError(f"the text encoder gives {encoder.dim}-wide embeddings, the model was built for "
                             f"{self.text_encoder_dim} (model.text_encoder_dim)")
        self._frozen_encoder[:] = [encoder]

    @property
    def attached_text_encoder(self) -> nn.Module:
        """The frozen encoder given to :meth:`attach_text_encoder`. Raises ``RuntimeError`` before that."""
        if not self._frozen_encoder:
            raise RuntimeError(f"no {self.text_encoder!r} text encoder attached: load the model with "
                               f"glide_lightning.sampling.load_checkpoint (it reloads the encoder the checkpoint "
                               f"names), or call attach_text_encoder")
        return self._frozen_encoder[0]

    def encode_embeddings(self, text_emb: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """A frozen encoder's embeddings, LayerNorm-ed and projected (Imagen's conditioning).

        Args:
            text_emb: ``[B, L, text_encoder_dim]`` embeddings (any float dtype).
            text_mask: bool ``[B, L]``, True on real tokens.

        Returns:
            ``xf_proj`` ``[B, 4 * model_channels]`` (the projected tokens' mean over real tokens, zero where a
            caption has none, through ``pooled_proj``) and ``xf_out`` ``[B, xf_width, L]``.
        """
        if text_emb.ndim != 3 or text_emb.shape[-1] != self.text_encoder_dim:
            raise ValueError(f"text_emb must have shape [B, L, {self.text_encoder_dim}], got {tuple(text_emb.shape)}")
        if text_mask.shape != text_emb.shape[:2]:
            raise ValueError(f"text_mask shape {tuple(text_mask.shape)} != text_emb's [B, L] {tuple(text_emb.shape[:2])}")
        dtype = self.encoder_proj.weight.dtype
        h = self.encoder_proj(self.encoder_ln(text_emb.to(dtype)))  # [B, L, W]
        keep = rearrange(text_mask.to(h.dtype), "b l -> b l 1")  # [B, L, 1]
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)  # [B, W]
        return self.pooled_proj(pooled), rearrange(h, "b l w -> b w l")  # [B, 4 * model_channels], [B, W, L]

    def encode_caption(self, tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """A caption batch's encoding as the keyword arguments that stand in for ``tokens``/``mask`` in
        :meth:`forward`: ``xf_proj`` and ``xf_out`` (:meth:`encode_text`), plus ``xf_mask`` (``mask``) with a
        frozen encoder, whose padding is masked in attention."""
        xf_proj, xf_out = self.encode_text(tokens, mask)
        out = dict(xf_proj=xf_proj, xf_out=xf_out)
        if self.frozen_text_encoder:
            out["xf_mask"] = mask.bool()
        return out

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
        if self.frozen_text_encoder:  # the frozen encoder runs without gradients; its mask is required
            if mask is None or mask.shape != tokens.shape:
                raise ValueError(f"a frozen text encoder needs mask [B, {self.text_ctx}] with the tokens")
            return self.encode_embeddings(self.attached_text_encoder(tokens, mask), mask)
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
                 xf_proj: Tensor | None, xf_out: Tensor | None, xf_mask: Tensor | None = None,
                 text_emb: Tensor | None = None, text_mask: Tensor | None = None,
                 extra_emb: Tensor | None = None) -> Tensor:
        """Run the text encoder on ``tokens`` (or the projection on a frozen encoder's ``text_emb``, or take
        the precomputed ``xf_proj``/``xf_out``/``xf_mask``; none: no text) and the UNet on the full input ``h``;
        ``extra_emb`` ``[B, 4 * model_channels]`` is added to the embedding too."""
        if sum(x is not None for x in (tokens, text_emb, xf_out if xf_out is not None else xf_proj)) > 1:
            raise ValueError("pass one of tokens/mask, text_emb/text_mask or their encoding xf_proj/xf_out, "
                             "not both")
        if tokens is not None:
            xf_proj, xf_out = self.encode_text(tokens, mask)
            xf_mask = mask if self.frozen_text_encoder else None
        elif text_emb is not None:
            if not self.frozen_text_encoder or text_mask is None:
                raise ValueError("text_emb/text_mask are a frozen text encoder's embeddings and mask (both needed)")
            xf_proj, xf_out = self.encode_embeddings(text_emb, text_mask)
            xf_mask = text_mask
        elif (xf_proj is None) != (xf_out is None):
            raise ValueError("a precomputed caption encoding needs both xf_proj and xf_out (see encode_text)")
        if self.frozen_text_encoder and xf_out is not None and xf_mask is None:
            raise ValueError("a frozen text encoder's encoding needs its xf_mask (see encode_caption)")
        if extra_emb is not None:
            xf_proj = extra_emb if xf_proj is None else xf_proj + extra_emb
        return UNetModel.forward(self, h, timesteps, encoder_out=xf_out, extra_emb=xf_proj, encoder_mask=xf_mask)

    def forward(  # type: ignore[override]
        self, x: Tensor, timesteps: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None,
        xf_proj: Tensor | None = None, xf_out: Tensor | None = None, xf_mask: Tensor | None = None,
        text_emb: Tensor | None = None, text_mask: Tensor | None = None,
    ) -> Tensor:
        """``x`` ``[B, C, H, W]``, ``timesteps`` ``[B]`` → ``[B, out_channels, H, W]``.

        ``tokens``/``mask`` as in :meth:`encode_text`, or instead their encoding ``xf_proj``
        ``[B, 4 * model_channels]``, ``xf_out`` ``[B, xf_width, text_ctx]`` and, with a frozen encoder,
        ``xf_mask`` ``[B, text_ctx]`` (what :meth:`encode_caption` returns, computed once per sampling call),
        or a frozen encoder's precomputed ``text_emb`` ``[B, text_ctx, D]`` and ``text_mask``; none of them:
        no text path.
        """
        self._check_input(x)
        return self._denoise(x, timesteps, tokens, mask, xf_proj, xf_out, xf_mask, text_emb, text_mask)


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

    INPUT_ORDER: ClassVar[tuple[str, ...]] = ("x", "upsampled")

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
        xf_mask: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`Text2ImUNet.forward`, conditioned on ``low_res`` ``[B, C, h, w]`` (required) and,
        with ``low_res_noise_cond``, its augmentation timestep ``low_res_t`` ``[B]``."""
        self._check_input(x)
        h = torch.cat([x, _upsampled(low_res, x)], dim=1)  # [B, 2C, H, W]
        return self._denoise(h, timesteps, tokens, mask, xf_proj, xf_out, xf_mask,
                             extra_emb=self._noise_level_emb(low_res_t, x))


class InpaintText2ImUNet(Text2ImUNet):
    """Text-conditional inpainting: the known pixels (image x mask) and the mask join ``x``."""

    INPUT_ORDER: ClassVar[tuple[str, ...]] = ("x", "inpaint_image*inpaint_mask", "inpaint_mask")

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
        xf_mask: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`Text2ImUNet.forward`, conditioned on ``inpaint_image`` ``[B, C, H, W]`` and
        ``inpaint_mask`` ``[B, 1, H, W]`` (1 where the pixel is known); missing ones are zeros."""
        self._check_input(x)
        h = torch.cat([x, *_inpaint_inputs(x, inpaint_image, inpaint_mask)], dim=1)  # [B, 2C+1, H, W]
        return self._denoise(h, timesteps, tokens, mask, xf_proj, xf_out, xf_mask)


class SuperResInpaintText2ImUNet(SuperResText2ImUNet):
    """Text-conditional super-resolution inpainting: known pixels, mask and upsampled low-res join ``x``, in
    glide-text2im's order (``SuperResInpaintText2ImUnet.forward``): ``[x, inpaint_image * inpaint_mask,
    inpaint_mask, upsampled]``, 3C + 1 channels. Checkpoints of this project written before the network's input
    order was recorded, in its earlier order ``[x, upsampled, inpaint_image * inpaint_mask, inpaint_mask]``, are
    converted when read, see :func:`glide_lightning.migrations.convert_input_order`.

    Args:
        **kwargs: as :class:`SuperResText2ImUNet`.
    """

    INPUT_ORDER: ClassVar[tuple[str, ...]] = ("x", "inpaint_image*inpaint_mask", "inpaint_mask", "upsampled")

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
        xf_mask: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`Text2ImUNet.forward`, conditioned on ``low_res`` ``[B, C, h, w]`` (required), bilinearly
        upsampled to ``x``'s size, ``inpaint_image`` ``[B, C, H, W]`` and ``inpaint_mask`` ``[B, 1, H, W]`` (1 where
        the pixel is known; missing ones are zeros) and, with ``low_res_noise_cond``, ``low_res_t`` ``[B]``. The UNet
        takes ``[x, inpaint_image * inpaint_mask, inpaint_mask, upsampled]`` (glide-text2im's
        ``SuperResInpaintText2ImUnet.forward``) → ``[B, out_channels, H, W]``.

        Raises:
            ValueError: ``x`` is not ``[B, C, H, W]``, ``low_res`` is missing, or a caption / ``low_res_t``
                argument is wrong (as :class:`SuperResText2ImUNet`).
        """
        self._check_input(x)
        upsampled = _upsampled(low_res, x)  # [B, C, H, W]
        h = torch.cat([x, *_inpaint_inputs(x, inpaint_image, inpaint_mask), upsampled], dim=1)  # [B, 3C+1, H, W]
        return self._denoise(h, timesteps, tokens, mask, xf_proj, xf_out, xf_mask,
                             extra_emb=self._noise_level_emb(low_res_t, x))
