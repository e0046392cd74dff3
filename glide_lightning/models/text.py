"""GLIDE's caption encoder: a pre-norm Transformer over token embeddings (no attention mask).

Only the Transformer stack lives here (``transformer.resblocks.{i}`` in glide-text2im's state
dicts); the token, positional and padding embeddings, the final LayerNorm and the projection into
the timestep embedding are attributes of the text-conditioned UNet itself (their keys have no
prefix in the released checkpoints), see :class:`glide_lightning.models.text2im.Text2ImUNet`.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from glide_lightning.models.nn import LayerNorm

__all__ = ["MLP", "MultiheadAttention", "ResidualAttentionBlock", "Transformer"]


class MultiheadAttention(nn.Module):
    """Bidirectional multi-head self-attention; ``c_qkv`` holds each head's q, k, v together.

    The fused projection's output channels are laid out ``(heads, 3, head_channels)``. Attention is
    :func:`torch.nn.functional.scaled_dot_product_attention` (scale ``1/sqrt(head_channels)``), with
    no mask: padded positions carry the learned padding embedding instead of being masked out.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, L, width]`` → ``[B, L, width]``."""
        qkv = self.c_qkv(x)  # [B, L, 3 * width]
        q, k, v = rearrange(qkv, "b l (h three c) -> three b h l c", h=self.heads, three=3)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, c]
        return self.c_proj(rearrange(a, "b h l c -> b l (h c)"))  # [B, L, width]


class MLP(nn.Module):
    """Position-wise feed-forward layer ``c_proj(GELU(c_fc(x)))`` with a 4x hidden width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm Transformer layer: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ``layers`` :class:`ResidualAttentionBlock` of the given width and heads."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, L, width]`` → ``[B, L, width]``."""
        for block in self.resblocks:
            x = block(x)
        return x
