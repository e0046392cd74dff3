"""GLIDE's noised CLIP: an image encoder that sees x_t and t, and a text encoder (GLIDE, Nichol et al.
2022, §2.3 and Appendix: CLIP models trained on noised images, used for CLIP guidance).

Module and parameter names load glide-text2im's released noised CLIP strictly (:func:`load_noised_clip`),
named ``image_enc.pt`` / ``text_enc.pt`` or, as its ``download.py`` caches them, ``clip_image_enc.pt`` /
``clip_text_enc.pt``; the architecture follows from their keys and shapes:

- both encoders are pre-norm Transformers ``blocks.block_{i}`` of ``f_attn`` (LayerNorm ``ln``, query
  ``f_q``, key ``f_k`` without bias, value ``f_v``, output ``f_c``) and ``f_mlp`` (``ln``, ``f_1`` to 4x
  width, GELU, ``f_2``), with heads of ``head_channels`` (64) channels; every linear map is an
  ``Affine`` with weight ``w`` ``[out, in]`` and bias ``b``, every LayerNorm has ``g`` and ``b``;
- the image encoder (a ViT) cuts the image into ``patch_size`` patches (``blocks.input.patch_proj``, a
  bias-free strided convolution), prepends the timestep's learned embedding ``w_t[t]`` as its first
  token (where CLIP has a class token), adds ``w_pos`` and a LayerNorm, attends bidirectionally, and
  projects the first token (``blocks.output``: LayerNorm, bias-free ``f``) to the joint embedding;
- the text encoder embeds tokens (``w_voc``) plus positions (``w_pos``), attends causally, and
  projects the hidden state of the caption's last token (its end-of-text token, at ``len - 1``; an empty
  caption is ``[sot, eot]``, length 2, as glide-text2im's ``encode_prompts`` frames it).

Pixels are normalised as CLIP's were: ``x`` in [-1, 1] → [0, 255] → minus CLIP's channel means,
divided by its channel standard deviations (glide-text2im's image embedding does the same).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from glide_lightning.models.glide_text2im import CheckpointMismatchError, _compare, _load_state_dict

__all__ = ["CLIP_CONFIG_FILE", "CLIP_FILES", "GLIDE_DOWNLOAD_CLIP_FILES", "ImageEncoder", "NoisedCLIP",
           "NoisedCLIPConfig", "TextEncoder", "clip_files", "load_noised_clip", "save_noised_clip"]

log = logging.getLogger(__name__)

CLIP_FILES = {"image": "image_enc.pt", "text": "text_enc.pt"}
"""The two files of a noised CLIP directory as :func:`save_noised_clip` writes them (glide-text2im's
``clip/image-enc`` and ``clip/text-enc`` checkpoints, without its download's prefix)."""
GLIDE_DOWNLOAD_CLIP_FILES = {"image": "clip_image_enc.pt", "text": "clip_text_enc.pt"}
"""The same files as glide-text2im's ``download.py`` names them (the URL's file name, in ``glide_model_cache``
beside ``base.pt``); :func:`load_noised_clip` reads either naming."""
_NAMINGS = (CLIP_FILES, GLIDE_DOWNLOAD_CLIP_FILES)
CLIP_CONFIG_FILE = "clip_config.json"
"""Written beside our own exports: the architecture, logit scale and training process. A directory
without it holds glide-text2im's release (:class:`NoisedCLIPConfig`'s defaults, cosine 1000 steps)."""

CLIP_MEAN = (122.77093945, 116.74601272, 104.09373519)
CLIP_STD = (68.50053285, 66.63215831, 70.32316309)
"""OpenAI CLIP's pixel statistics on the 0-255 scale (the values glide-text2im's noised CLIP uses)."""


@dataclass(frozen=True)
class NoisedCLIPConfig:
    """Architecture of a noised CLIP. The defaults are glide-text2im's released one (its ``clip/config.yaml``)."""

    image_size: int = 64
    """Side of the (square) images the image encoder takes, pixels; the sampled model's size."""
    patch_size: int = 4
    """Side of the ViT's patches, pixels; ``image_size`` must be a multiple of it."""
    image_width: int = 768
    """Width of the image Transformer (GLIDE: 12 heads x 64)."""
    image_layers: int = 12
    """Blocks of the image Transformer."""
    text_width: int = 512
    """Width of the text Transformer (GLIDE: 8 heads x 64)."""
    text_layers: int = 12
    """Blocks of the text Transformer."""
    head_channels: int = 64
    """Channels per attention head in both Transformers (the widths must be multiples of it)."""
    embed_dim: int = 512
    """Width of the joint image-text embedding."""
    n_vocab: int = 65536
    """Rows of the token embedding (GLIDE: 65536, holding the CLIP BPE's 49408 ids; ``clip`` tokenizer)."""
    text_ctx: int = 77
    """Tokens per caption (the ``clip`` tokenizer's ``sot ids eot`` and zero padding)."""
    n_timesteps: int = 1000
    """Rows of the timestep embedding ``w_t``: the steps of the process the encoder was trained on."""
    logit_scale: float = 100.0
    """Multiplier of the cosine similarity in the contrastive logits and in CLIP guidance (GLIDE: 100)."""

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("image_width", "text_width"):
            if getattr(self, name) % self.head_channels:
                problems.append(f"{name} {getattr(self, name)} is not a multiple of head_channels {self.head_channels}")
        if self.text_ctx < 2:
            problems.append(f"text_ctx must be >= 2 (sot and eot), got {self.text_ctx}")
        if self.logit_scale <= 0:
            problems.append(f"logit_scale must be > 0, got {self.logit_scale}")
        if problems:
            raise ValueError("bad noised CLIP config: " + "; ".join(problems))


class Affine(nn.Module):
    """``y = x @ w.T (+ b)``: glide-text2im's linear layer (parameters ``w`` ``[out, in]`` and ``b``)."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True, std: float | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in) * (std if std is not None else math.sqrt(2 / (n_in + n_out))))
        self.b = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.linear(x, self.w, self.b)


class CLIPLayerNorm(nn.Module):
    """LayerNorm (ε = 1e-5) computed in at least float32 and returned in the input's dtype, with
    glide-text2im's parameter names ``g`` and ``b``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(width))
        self.b = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.layer_norm(x.to(dtype), self.g.shape, self.g.to(dtype), self.b.to(dtype), 1e-5).to(x.dtype)


class AttentionResblock(nn.Module):
    """``x + f_c(attention(f_q(ln(x)), f_k(ln(x)), f_v(ln(x))))``; causal when ``causal``."""

    def __init__(self, width: int, head_channels: int, layers: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = width // head_channels, causal
        self.ln = CLIPLayerNorm(width)
        self.f_q = Affine(width, width, std=width ** -0.5)
        self.f_k = Affine(width, width, bias=False, std=width ** -0.5)
        self.f_v = Affine(width, width, std=width ** -0.5)
        self.f_c = Affine(width, width, std=(width * (2 * layers) ** 2) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, L, width]`` → ``[B, L, width]``."""
        h = self.ln(x)
        q, k, v = (rearrange(f(h), "b l (h c) -> b h l c", h=self.heads) for f in (self.f_q, self.f_k, self.f_v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, heads, L, c]
        return x + self.f_c(rearrange(a, "b h l c -> b l (h c)"))


class MLPResblock(nn.Module):
    """``x + f_2(GELU(f_1(ln(x))))`` with a 4x hidden width."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.ln = CLIPLayerNorm(width)
        self.f_1 = Affine(width, 4 * width, std=math.sqrt(2 / (4 * width)))
        self.f_2 = Affine(4 * width, width, std=(width * (2 * layers) ** 2) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return x + self.f_2(F.gelu(self.f_1(self.ln(x))))


class TransformerBlock(nn.Module):
    """One pre-norm Transformer block: :class:`AttentionResblock` then :class:`MLPResblock`."""

    def __init__(self, width: int, head_channels: int, layers: int, causal: bool) -> None:
        super().__init__()
        self.f_attn = AttentionResblock(width, head_channels, layers, causal)
        self.f_mlp = MLPResblock(width, layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.f_mlp(self.f_attn(x))


class Readout(nn.Module):
    """LayerNorm, then the bias-free projection ``f`` to the joint embedding."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.ln = CLIPLayerNorm(width)
        self.f = Affine(width, embed_dim, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        """``h`` ``[B, width]`` → ``[B, embed_dim]``."""
        return self.f(self.ln(h))


class ImageEmbedding(nn.Module):
    """Patches, the timestep token and positions, then a LayerNorm: ``[B, 3, S, S]`` → ``[B, 1 + (S/p)², width]``."""

    def __init__(self, config: NoisedCLIPConfig) -> None:
        super().__init__()
        width, p = config.image_width, config.patch_size
        self.patch_size, self.n_timesteps = p, config.n_timesteps
        self.w_t = nn.Parameter(torch.randn(config.n_timesteps, width) * width ** -0.5)
        self.patch_proj = nn.Parameter(torch.randn(width, 3, p, p) * math.sqrt(2 / (width * p * p)))
        self.w_pos = nn.Parameter(torch.randn(1 + (config.image_size // p) ** 2, width) * width ** -0.5)
        self.ln = CLIPLayerNorm(width)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, x_t: Tensor, timesteps: Tensor) -> Tensor:  # noqa: D102
        pixels = ((x_t + 1) * 127.5 - self.mean) / self.std  # [-1, 1] → CLIP's normalised 0-255 scale
        patches = F.conv2d(pixels, self.patch_proj, stride=self.patch_size)  # [B, width, S/p, S/p]
        patches = rearrange(patches, "b c h w -> b (h w) c")  # [B, (S/p)², width]
        t_token = rearrange(self.w_t[timesteps], "b c -> b 1 c")  # [B, 1, width]
        return self.ln(torch.cat([t_token, patches], dim=1) + self.w_pos)


class ImageEncoder(nn.Module):
    """The noised image encoder: ``forward(x_t [B, 3, S, S] in [-1, 1], timesteps [B] int)`` → ``[B, embed_dim]``
    (unnormalised). ``timesteps`` index the process it was trained on (``0 .. n_timesteps - 1``)."""

    def __init__(self, config: NoisedCLIPConfig) -> None:
        super().__init__()
        self.config = config
        layers = config.image_layers
        blocks: dict[str, nn.Module] = {"input": ImageEmbedding(config)}
        blocks |= {f"block_{i}": TransformerBlock(config.image_width, config.head_channels, layers, False)
                   for i in range(layers)}
        blocks["output"] = Readout(config.image_width, config.embed_dim)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, x_t: Tensor, timesteps: Tensor) -> Tensor:  # noqa: D102
        size = self.config.image_size
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != (3, size, size):
            raise ValueError(f"the noised CLIP's image encoder takes [B, 3, {size}, {size}] images, got "
                             f"{tuple(x_t.shape)}")
        if timesteps.shape != x_t.shape[:1]:
            raise ValueError(f"timesteps must have shape [{x_t.shape[0]}], got {tuple(timesteps.shape)}")
        if bool(((timesteps < 0) | (timesteps >= self.config.n_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.config.n_timesteps}), got {timesteps.tolist()}")
        h = self.blocks["input"](x_t, timesteps.long())
        for i in range(self.config.image_layers):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h[:, 0])


class TextEmbedding(nn.Module):
    """Token plus position embeddings: ``[B, L]`` → ``[B, L, width]``."""

    def __init__(self, config: NoisedCLIPConfig) -> None:
        super().__init__()
        self.w_voc = nn.Parameter(torch.randn(config.n_vocab, config.text_width) * 0.02)
        self.w_pos = nn.Parameter(torch.randn(config.text_ctx, config.text_width) * 0.01)

    def forward(self, tokens: Tensor) -> Tensor:  # noqa: D102
        return F.embedding(tokens, self.w_voc) + self.w_pos[: tokens.shape[1]]


class TextEncoder(nn.Module):
    """The text encoder: ``forward(tokens [B, L] int, lengths [B] int)`` → ``[B, embed_dim]`` (unnormalised),
    read at position ``lengths - 1`` (the ``eot`` of the ``clip`` tokenizer's ``sot ids eot``; glide-text2im's
    ``TextEncoder`` reads there too). Raises ``ValueError`` for ``L > text_ctx`` or a length outside ``[1, L]``."""

    def __init__(self, config: NoisedCLIPConfig) -> None:
        super().__init__()
        self.config = config
        layers = config.text_layers
        blocks: dict[str, nn.Module] = {"input": TextEmbedding(config)}
        blocks |= {f"block_{i}": TransformerBlock(config.text_width, config.head_channels, layers, True)
                   for i in range(layers)}
        blocks["output"] = Readout(config.text_width, config.embed_dim)
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:  # noqa: D102
        if tokens.ndim != 2 or tokens.shape[1] > self.config.text_ctx:
            raise ValueError(f"tokens must be [B, L <= {self.config.text_ctx}], got {tuple(tokens.shape)}")
        if bool(((lengths < 1) | (lengths > tokens.shape[1])).any()):
            raise ValueError(f"caption lengths must lie in [1, {tokens.shape[1]}] (the position read is length - 1; "
                             f"NoisedCLIP.text_embeddings reads a caption without real tokens at 0), got "
                             f"{lengths.tolist()}")
        h = self.blocks["input"](tokens)
        for i in range(self.config.text_layers):
            h = self.blocks[f"block_{i}"](h)
        last = h[torch.arange(h.shape[0], device=h.device), lengths.long() - 1]  # [B, width]
        return self.blocks["output"](last)


class NoisedCLIP(nn.Module):
    """The two encoders and the similarity CLIP guidance ascends (GLIDE §2.3: s·∇_{x_t}(f(x_t, t)·g(c)))."""

    def __init__(self, config: NoisedCLIPConfig = NoisedCLIPConfig()) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)

    def image_embeddings(self, x_t: Tensor, timesteps: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, embed_dim]`` of noised images at (this CLIP's) ``timesteps``."""
        return F.normalize(self.image_encoder(x_t, timesteps), dim=-1)

    def text_embeddings(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Unit-norm caption embeddings ``[B, embed_dim]`` from a tokenizer's tokens and mask (``[B, L]``; the
        caption length is the mask's count of real tokens). The ``clip`` tokenizer frames every caption, ``""``
        too, as ``sot … eot`` (glide-text2im's ``padded_tokens_and_len``), read at its eot. A row without real
        tokens (the ``gpt2`` tokenizer's ``""``, all padding, as GLIDE's base model frames it) is read at
        position 0, its first padding token (GPT-2's end of text): the encoder sees it alone, causally."""
        return F.normalize(self.text_encoder(tokens, mask.long().sum(-1).clamp(min=1)), dim=-1)

    def similarity(self, x_t: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        """``logit_scale · cos(f(x_t, t), g(c))`` per sample, ``[B]`` (glide-text2im's guidance objective)."""
        return self.config.logit_scale * (self.image_embeddings(x_t, timesteps) * text_embeddings).sum(-1)


def save_noised_clip(clip: NoisedCLIP, directory: str | os.PathLike[str], process: dict[str, Any] | None = None,
                     tokenizer: str = "clip", logit_scale: float | None = None) -> Path:
    """Write ``image_enc.pt`` and ``text_enc.pt`` (glide-text2im's format: bare state dicts) and
    ``clip_config.json`` (the architecture with ``logit_scale`` when given, e.g. a learned one;
    ``process``: the training process's settings; the ``tokenizer``'s name) to ``directory``; returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for part, encoder in (("image", clip.image_encoder), ("text", clip.text_encoder)):
        state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
        torch.save(state, out / CLIP_FILES[part])
    config = asdict(clip.config) if logit_scale is None else {**asdict(clip.config), "logit_scale": logit_scale}
    meta = {"model": config, "process": process, "tokenizer": tokenizer}
    (out / CLIP_CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    return out


def clip_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """The image and text encoder files of a noised CLIP ``directory``: ``image_enc.pt`` and ``text_enc.pt``
    (our exports, glide-text2im's ``clip/`` names) or ``clip_image_enc.pt`` and ``clip_text_enc.pt`` (as
    glide-text2im's ``download.py`` saves them); ``{"image": path, "text": path}``.

    Raises:
        FileNotFoundError: ``directory`` is not a directory, or holds neither complete pair (the error names
            both namings and the files of either that it found).
        ValueError: it holds both complete pairs: which CLIP is meant is ambiguous.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"noised CLIP directory {root} is not a directory: pass a folder holding "
                                f"{_naming_text()}")
    complete = [naming for naming in _NAMINGS if all((root / name).is_file() for name in naming.values())]
    if len(complete) > 1:
        raise ValueError(f"noised CLIP directory {root} holds both namings of the encoder files, "
                         f"{_naming_text(' and ')}: which CLIP is meant is ambiguous; keep one pair (or point "
                         f"--clip_dir at a folder holding one)")
    if not complete:
        found = sorted({name for naming in _NAMINGS for name in naming.values() if (root / name).is_file()})
        raise FileNotFoundError(f"noised CLIP directory {root} holds neither {_naming_text(' nor ')} (found: "
                                f"{', '.join(found) or 'none of them'}): pass glide-text2im's noised CLIP (its "
                                f"clip/ files, or its download cache glide_model_cache) or a noised_clip run's "
                                f"export (runs/<name>/clip)")
    return {part: root / name for part, name in complete[0].items()}


def _naming_text(joiner: str = " or ") -> str:
    return joiner.join(f"{n['image']} + {n['text']}" for n in _NAMINGS)


def load_noised_clip(directory: str | os.PathLike[str]) -> tuple[NoisedCLIP, dict[str, Any]]:
    """A noised CLIP from ``directory`` (its two encoder files under either naming, see :func:`clip_files`,
    strictly loaded), in eval mode on the CPU, and ``clip_config.json``'s content (``model``, ``process``,
    ``tokenizer``; empty for glide-text2im's release, whose architecture is :class:`NoisedCLIPConfig`'s defaults).

    Raises:
        FileNotFoundError: the directory or its encoder files are missing (see :func:`clip_files`).
        ValueError: the directory holds both namings (see :func:`clip_files`).
        CheckpointMismatchError: a file's keys or shapes differ from the expected encoder's (the error
            lists the missing, unexpected and mismatched keys).
    """
    root = Path(directory)
    files = clip_files(root)
    log.info("noised CLIP: reading %s and %s from %s", files["image"].name, files["text"].name, root)
    meta = json.loads((root / CLIP_CONFIG_FILE).read_text()) if (root / CLIP_CONFIG_FILE).is_file() else {}
    config = NoisedCLIPConfig(**meta.get("model", {}))
    with torch.device("meta"):  # no memory for weights that the files replace
        clip = NoisedCLIP(config)
    for part, encoder in (("image", clip.image_encoder), ("text", clip.text_encoder)):
        state = _load_state_dict(files[part])
        params = encoder.state_dict()
        found = _compare({k: tuple(v.shape) for k, v in params.items()}, state)
        if any(found):
            raise CheckpointMismatchError(f"clip/{part}-enc", *found, file=str(files[part]))
        encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    for module in clip.modules():  # the non-persistent pixel statistics were made on the meta device
        if isinstance(module, ImageEmbedding):
            module.mean = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
            module.std = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    return clip.eval(), meta
