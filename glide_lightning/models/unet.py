"""The ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"; Nichol & Dhariwal 2021).

A UNet of residual blocks conditioned on a timestep embedding (added, or applied as an adaptive
GroupNorm scale and shift), self-attention at chosen resolutions, optionally attending also to the
tokens of a text encoder (GLIDE: the tokens' keys and values join the image's), BigGAN-style
residual up/down-sampling blocks and zero-initialised residual branches.

Module names follow glide-text2im's released checkpoints, so their state dicts load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import Tensor, nn

from glide_lightning.models.nn import normalization, timestep_embedding, zero_module

__all__ = [
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "nearest_upsample_2x",
    "set_gradient_checkpointing",
]


class TimestepBlock(nn.Module):
    """A block whose forward takes the (timestep + conditioning) embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # noqa: D102
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands ``emb`` to timestep blocks and ``encoder_out`` to attention blocks.

    With ``gradient_checkpointing`` set (see :func:`set_gradient_checkpointing`), a training forward
    keeps only the block's inputs and recomputes its activations in the backward pass (torch's
    non-reentrant ``checkpoint``; GLIDE's ``use_checkpoint``): less memory, about a third more compute.
    """

    gradient_checkpointing = False

    def forward(self, x: Tensor, emb: Tensor, encoder_out: Tensor | None = None,  # noqa: D102
                encoder_mask: Tensor | None = None) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, emb, encoder_out, encoder_mask,
                                                     use_reentrant=False)
        return self._forward(x, emb, encoder_out, encoder_mask)

    def _forward(self, x: Tensor, emb: Tensor, encoder_out: Tensor | None, encoder_mask: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, encoder_out, encoder_mask)
            else:
                x = layer(x)
        return x


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn gradient checkpointing of every UNet block of ``model`` on or off (weights unchanged,
    gradients equal up to float rounding; dropout draws the same masks again in the recomputation,
    as torch's checkpoint restores the RNG state)."""
    for module in model.modules():
        if isinstance(module, TimestepEmbedSequential):
            module.gradient_checkpointing = enabled


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = nearest_upsample_2x(x)
        return self.conv(x) if self.use_conv else x


def nearest_upsample_2x(x: Tensor) -> Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` for ``[B, C, H, W]`` → ``[B, C, 2H, 2W]``,
    bit for bit: each pixel repeated 2x2 by one broadcast copy, faster than the interpolation kernel on
    CPU (a channels-last ``x`` keeps that kernel, which keeps its layout)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return F.interpolate(x, scale_factor=2, mode="nearest")
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution (``op``), or 2x2 average pooling without one."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        elif self.out_channels != channels:
            raise ValueError("average-pool downsampling cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on an embedding, optionally resampling (BigGAN style).

    ``h = in_layers(x)`` (GroupNorm, SiLU, conv3x3); with ``up``/``down`` both ``h`` (before its
    convolution) and the skip path ``x`` are resampled. The embedding enters as
    ``norm(h) * (1 + scale) + shift`` (``use_scale_shift_norm``) or is added to ``h``; then SiLU,
    dropout and a zero-initialised conv3x3. The skip path is the identity, or a 1x1 conv when the
    channel count changes.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
        norm_min_channels: int = 1,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both")
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels, norm_min_channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_min_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]``, ``emb`` ``[B, E]`` → ``[B, C_out, H', W']``."""
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = rearrange(emb_out, "b c -> b c 1 1")  # [B, C_emb, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels, optionally also attending to encoder tokens.

    ``qkv`` holds each head's query, key and value channels together (layout ``(heads, 3, c)``);
    ``encoder_kv`` projects encoder tokens ``[B, encoder_channels, S]`` to per-head keys and values
    (layout ``(heads, 2, c)``) that are prepended to the image's keys and values. Attention is
    :func:`torch.nn.functional.scaled_dot_product_attention` (scale ``1/sqrt(c)``); an ``encoder_mask``
    (a frozen text encoder's padding, Imagen) removes the masked tokens' keys, without one (GLIDE, whose
    padding positions carry a learned embedding) nothing is masked. The output projection is
    zero-initialised and added to the input.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        encoder_channels: int | None = None,
        norm_min_channels: int = 1,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(f"{channels} attention channels cannot be split into {num_heads} heads")
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"{channels} attention channels are not a multiple of num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.norm = normalization(channels, norm_min_channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        if encoder_channels is not None:
            self.encoder_kv = nn.Conv1d(encoder_channels, 2 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, encoder_out: Tensor | None = None, encoder_mask: Tensor | None = None) -> Tensor:
        """``x`` ``[B, C, H, W]``; ``encoder_out`` ``[B, encoder_channels, S]`` or None; ``encoder_mask`` bool
        ``[B, S]`` (True: attend to that token; the image's own keys are always attended to) or None."""
        b, c, height, width = x.shape
        # Tokens are channels-last pixels: a view of a channels-last x, and the 1x1 projections are
        # matmuls over them (F.linear on the Conv1d weights, so checkpoints are unchanged): no layout
        # copies, and a query SDPA's fused kernel takes as it is (Conv1d on [B, C, T] gives it a query
        # strided along c, which sends SDPA to its unfused math kernel on CPU).
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # [B, T, C]
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # [B, T, 3C]
        q, k, v = rearrange(qkv, "b t (h three c) -> three b h t c", h=self.num_heads, three=3)
        if encoder_out is not None:
            if not hasattr(self, "encoder_kv"):
                raise ValueError("this AttentionBlock was built without encoder_channels")
            encoder_tokens = rearrange(encoder_out.to(qkv.dtype), "b e s -> b s e")  # [B, S, encoder_channels]
            ekv = F.linear(encoder_tokens, self.encoder_kv.weight.squeeze(-1), self.encoder_kv.bias)  # [B, S, 2C]
            ek, ev = rearrange(ekv, "b s (h two c) -> two b h s c", h=self.num_heads, two=2)
            k = torch.cat([ek, k], dim=2)  # [B, heads, S + T, c]
            v = torch.cat([ev, v], dim=2)  # [B, heads, S + T, c]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self._attn_mask(encoder_out, encoder_mask, height * width))
        a = rearrange(a, "b h t c -> b t (h c)")  # [B, T, C]
        h = F.linear(a, self.proj_out.weight.squeeze(-1), self.proj_out.bias)  # [B, T, C]
        return x + rearrange(h, "b (h w) c -> b c h w", h=height, w=width)  # [B, C, H, W], channels-last strides

    @staticmethod
    def _attn_mask(encoder_out: Tensor | None, encoder_mask: Tensor | None, pixels: int) -> Tensor | None:
        """SDPA's boolean mask ``[B, 1, 1, S + T]`` (True: attend) from ``encoder_mask`` ``[B, S]``, or None."""
        if encoder_out is None or encoder_mask is None:
            return None
        keep = torch.cat([encoder_mask.bool(), encoder_mask.new_ones(encoder_mask.shape[0], pixels, dtype=torch.bool)], 1)
        return rearrange(keep, "b s -> b 1 1 s")  # [B, 1, 1, S + T]


class UNetModel(nn.Module):
    """The ADM UNet, conditioned on timesteps and optionally on encoder tokens / an extra embedding.

    Args:
        in_channels: input channels (3 for images; more when conditioning images are concatenated).
        model_channels: base channel count (a multiple of 32: GroupNorm has 32 groups).
        out_channels: output channels (3 for ε; 6 for ε and the learned-variance interpolation v).
        num_res_blocks: residual blocks per resolution level.
        attention_resolutions: downsample rates ``ds`` (1, 2, 4, …) at which to use attention.
        dropout: dropout probability inside the residual blocks.
        channel_mult: channel multiplier of each level; ``len(channel_mult) - 1`` downsamplings.
        num_heads: attention heads (used when ``num_head_channels == -1``).
        num_head_channels: channels per attention head (-1: use ``num_heads``).
        num_heads_upsample: heads in the decoder's attention (-1: same as ``num_heads``).
        use_scale_shift_norm: condition by adaptive GroupNorm scale/shift instead of addition.
        resblock_updown: resample with residual blocks (BigGAN) instead of plain (de)convolutions.
        encoder_channels: width of the encoder tokens attention blocks may attend to (None: none).
        norm_min_channels: fewest channels per GroupNorm group (1: ADM's 32 groups everywhere; see
            :func:`~glide_lightning.models.nn.normalization`).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        encoder_channels: int | None = None,
        norm_min_channels: int = 1,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.encoder_channels = encoder_channels
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, norm_min_channels=norm_min_channels,
                            **kw)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, encoder_channels, norm_min_channels)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = res(ch, ch, up=True) if resblock_updown else Upsample(ch, use_conv=True)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, norm_min_channels), nn.SiLU(),
            zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)),
        )

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        encoder_out: Tensor | None = None,
        extra_emb: Tensor | None = None,
        encoder_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict ``[B, out_channels, H, W]`` from ``x`` ``[B, in_channels, H, W]``.

        Args:
            x: the (noisy) input, with any conditioning channels already concatenated.
            timesteps: ``[B]`` (or scalar) raw timesteps, embedded by :func:`timestep_embedding`.
            encoder_out: ``[B, encoder_channels, S]`` tokens every attention block attends to.
            extra_emb: ``[B, 4 * model_channels]`` added to the timestep embedding (e.g. pooled text).
            encoder_mask: bool ``[B, S]``, True on the ``encoder_out`` tokens to attend to (None: all).
        """
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps.to(x.device), self.model_channels)  # [B, model_channels]
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # [B, 4 * model_channels]
        if extra_emb is not None:
            emb = emb + extra_emb.to(emb.dtype)
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, encoder_out, encoder_mask)
            hs.append(h)
        h = self.middle_block(h, emb, encoder_out, encoder_mask)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)  # [B, C + C_skip, H, W]
            h = block(h, emb, encoder_out, encoder_mask)
        return self.out(h)
