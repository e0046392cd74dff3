"""Frozen pretrained text encoders (Imagen's arm): T5 from Hugging Face ``transformers`` and the open_clip
text tower.

Imagen (Saharia et al. 2022, §2.1) conditions its UNet on a frozen text encoder's per-token embeddings and
attention mask; it compares T5-XXL, BERT and CLIP and finds that scaling the frozen encoder helps more than
scaling the UNet. A :class:`FrozenTextEncoder` maps ``tokens`` ``[B, L]`` and ``mask`` ``[B, L]`` to
embeddings ``[B, L, dim]`` in eval mode, under ``no_grad``, with every parameter's ``requires_grad`` off.

It computes in float32 (or bf16 when asked: ``precision``), never under its caller's autocast: a training step
under ``trainer.precision: 16-mixed`` runs in fp16 autocast, and T5 v1.1's feed-forward activations exceed fp16's
range (65504), so its embeddings would come out inf / NaN.

The encoder is never a submodule of the network that trains: :class:`~glide_lightning.models.text2im.Text2ImUNet`
keeps it outside its module tree (:meth:`~glide_lightning.models.text2im.Text2ImUNet.attach_text_encoder`), so
its weights are in no ``state_dict``, no optimizer and no checkpoint; checkpoints record what to reload
(:class:`~glide_lightning.models.config.ModelConfig`'s ``text_encoder*`` fields) and
:func:`load_text_encoder` reloads it.

``transformers`` (and ``sentencepiece`` for T5's tokenizer) come with the ``text`` extra:
``pip install 'glide_lightning[text]'``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn

__all__ = ["FROZEN_TEXT_ENCODERS", "TEXT_ENCODERS", "TEXT_ENCODER_PRECISIONS", "FrozenTextEncoder",
           "OpenCLIPTextEncoder", "T5TextEncoder", "TextEncoderName", "TextEncoderPrecision", "check_precision",
           "encoder_identity", "load_text_encoder", "require_text_extra"]

TextEncoderName = Literal["transformer", "t5", "clip"]
TEXT_ENCODERS: tuple[str, ...] = get_args(TextEncoderName)
FROZEN_TEXT_ENCODERS: tuple[str, ...] = ("t5", "clip")
TextEncoderPrecision = Literal["fp32", "bf16"]
TEXT_ENCODER_PRECISIONS: tuple[str, ...] = get_args(TextEncoderPrecision)

CLIP_BPE_VOCAB = 49408
"""The CLIP BPE's vocabulary (the tokenizer :class:`OpenCLIPTextEncoder` is fed with)."""


def require_text_extra(what: str) -> None:
    """Raise ``ImportError`` naming the extra to install when ``transformers`` / ``sentencepiece`` are missing."""
    try:
        import sentencepiece  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} needs Hugging Face transformers and sentencepiece, which are not installed: "
                          f"pip install 'glide_lightning[text]' ({error})") from None


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`TEXT_ENCODER_PRECISIONS`; else ``ValueError`` (fp16 is refused)."""
    if precision not in TEXT_ENCODER_PRECISIONS:
        raise ValueError(f"text_encoder_precision {precision!r} is not fp32 or bf16 (fp16 is not offered: T5 v1.1's "
                         f"feed-forward activations exceed fp16's range, 65504, and its embeddings become inf / NaN)")
    return precision


class FrozenTextEncoder(nn.Module):
    """A pretrained text encoder that never trains: ``forward(tokens, mask)`` → ``[B, L, dim]``.

    Args:
        precision: its arithmetic, ``fp32`` or ``bf16`` (bf16 autocast over float32 weights); whatever the
            caller's autocast. ``ValueError`` for another value.

    Attributes:
        dim: width D of the embeddings.
        source: what was loaded (name, revision or path), for logs and checkpoints' provenance.
        precision: ``fp32`` or ``bf16``, see Args.
    """

    dim: int
    source: str

    def __init__(self, precision: str = "fp32") -> None:
        super().__init__()
        self.precision = check_precision(precision)

    def freeze(self) -> FrozenTextEncoder:
        """Float32 weights (a checkpoint stored in fp16 / bf16 is upcast exactly), eval mode (no dropout) and no
        gradients, for good: :meth:`train` keeps it in eval mode."""
        self.float()
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenTextEncoder:  # noqa: D102  (always eval)
        return super().train(False)

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """The encoder's last hidden states ``[B, L, dim]``; subclasses implement it."""
        raise NotImplementedError

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """``tokens`` int64 ``[B, L]``, ``mask`` bool ``[B, L]`` (True on real tokens) → float32 ``[B, L, dim]``,
        computed without gradients on the encoder's device (moved to ``tokens``' device on first use), in
        ``precision`` whatever autocast the caller runs under (its autocast is switched off for this device type).

        Raises:
            RuntimeError: ``precision`` bf16 on a CUDA GPU without bf16 (before Ampere): use fp32.
        """
        device = tokens.device
        if next(self.parameters()).device != device:
            self.to(device)
        bf16 = self.precision == "bf16"
        if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"text_encoder_precision bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                               f"use fp32")
        # The caller's autocast (fp16 under 16-mixed) ends here: off, or replaced by our own bf16 one.
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
                    if torch.amp.is_autocast_available(device.type) else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            return self.embed(tokens.long(), mask.bool()).float()


class T5TextEncoder(FrozenTextEncoder):
    """The encoder half of a T5 (``transformers.T5EncoderModel``), e.g. T5 v1.1 base ``google/t5-v1_1-base``
    (D = 768), Imagen's choice at a smaller size; padding positions are masked in its self-attention."""

    def __init__(self, encoder: nn.Module, source: str, precision: str = "fp32") -> None:
        super().__init__(precision)
        self.encoder = encoder
        self.dim = int(encoder.config.d_model)
        self.source = source
        self.freeze()

    @classmethod
    def load(cls, name: str, revision: str | None = None, precision: str = "fp32") -> T5TextEncoder:
        """From a hub name (``google/t5-v1_1-base``; ``revision``: a branch, tag or commit) or a local directory
        written by ``save_pretrained``; ``precision``: see :class:`FrozenTextEncoder`.

        Raises:
            ImportError: transformers missing (names the extra). OSError: not found (offline: a local dir).
            ValueError: ``precision`` is not fp32 or bf16.
        """
        check_precision(precision)
        require_text_extra("model.model.text_encoder 't5'")
        from transformers import T5EncoderModel

        encoder = T5EncoderModel.from_pretrained(name, revision=revision)
        commit = getattr(encoder.config, "_commit_hash", None)
        source = f"t5 {name}" + (f"@{revision}" if revision else "") + (f" (commit {commit})" if commit else "")
        return cls(encoder, source, precision)

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        return self.encoder(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # [B, L, D]


class OpenCLIPTextEncoder(FrozenTextEncoder):
    """The text tower of an open_clip CLIP: token and positional embeddings, the causal Transformer and its
    final LayerNorm, every position kept (``[B, L, width]``, before CLIP's pooling and projection).

    Fed with the CLIP BPE (``sot … eot``, zero padding; :class:`~glide_lightning.data.tokenizers.CLIPTokenizer`):
    causal attention makes a real token's embedding independent of the padding after it.
    """

    def __init__(self, clip: nn.Module, source: str, precision: str = "fp32") -> None:
        super().__init__(precision)
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask"):
            if not hasattr(clip, name):
                raise ValueError(f"{source}: not an open_clip CLIP with a built-in text tower (no {name}); use a "
                                 f"model such as ViT-B-32")
        if clip.token_embedding.num_embeddings != CLIP_BPE_VOCAB:
            raise ValueError(f"{source}: its text tower has {clip.token_embedding.num_embeddings} tokens, not the CLIP "
                             f"BPE's {CLIP_BPE_VOCAB}: only CLIP-BPE open_clip models are supported")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.context_length = int(clip.positional_embedding.shape[0])
        self.dim = int(clip.positional_embedding.shape[1])
        self.source = source
        self.freeze()

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, precision: str = "fp32") -> OpenCLIPTextEncoder:
        """From an open_clip model name and ``pretrained`` tag or weights file (``ViT-B-32``, ``openai``), or
        ``local-dir:PATH`` (open_clip's folder format: ``open_clip_config.json`` and the weights file);
        ``precision``: see :class:`FrozenTextEncoder`.

        Raises:
            ValueError: ``pretrained`` is None for a bare model name (a frozen encoder must be trained),
                the model has no CLIP-BPE text tower, or ``precision`` is not fp32 or bf16.
        """
        import open_clip

        check_precision(precision)
        if pretrained is None and not name.startswith(("local-dir:", "hf-hub:")):
            raise ValueError(f"model.model.text_encoder_pretrained is needed with the open_clip model {name!r}: a "
                             f"pretrained tag (e.g. 'openai', see open_clip.list_pretrained()) or a weights file")
        if pretrained is not None and Path(pretrained).suffix and not Path(pretrained).is_file():
            raise FileNotFoundError(f"text_encoder_pretrained file not found: {pretrained}")
        clip = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
        return cls(clip, f"clip {name}" + (f" ({pretrained})" if pretrained else ""), precision)

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the CLIP text tower's context of {self.context_length}: set "
                             f"model.model.text_ctx <= {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # [B, L, D]
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        return self.ln_final(x)  # [B, L, D]


def load_text_encoder(kind: str, name: str, *, pretrained: str | None = None, revision: str | None = None,
                      precision: str = "fp32") -> FrozenTextEncoder:
    """Load the frozen encoder ``kind`` (``t5`` or ``clip``) named ``name`` (see :class:`T5TextEncoder` and
    :class:`OpenCLIPTextEncoder`), frozen, computing in ``precision`` (``fp32`` or ``bf16``, see
    :class:`FrozenTextEncoder`). Raises ``ValueError`` for another kind or precision."""
    if kind == "t5":
        if pretrained is not None:
            raise ValueError("model.model.text_encoder_pretrained is open_clip's; a T5 loads from "
                             "text_encoder_name (hub name or directory) and text_encoder_revision")
        return T5TextEncoder.load(name, revision, precision)
    if kind == "clip":
        return OpenCLIPTextEncoder.load(name, pretrained, precision)
    raise ValueError(f"{kind!r} is not a frozen text encoder; choose one of {', '.join(FROZEN_TEXT_ENCODERS)}")


def encoder_identity(kind: str, name: str, *, pretrained: str | None = None, revision: str | None = None) -> str:
    """One string naming a frozen encoder's weights, ``kind:name[@revision][+pretrained]``: stored with
    precomputed embeddings and compared with the model's (``model.model.text_encoder*``) when training."""
    return f"{kind}:{name}" + (f"@{revision}" if revision else "") + (f"+{pretrained}" if pretrained else "")
