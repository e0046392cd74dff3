"""glide-text2im's released models: their configurations and strict checkpoint import.

``from_glide_text2im("base", "base.pt")`` builds GLIDE's (filtered) base model and loads the released
checkpoint strictly; without a checkpoint it returns the randomly initialised architecture. The four
kinds are glide-text2im's: ``base`` (64 px), ``upsample`` (64 → 256 px), ``base-inpaint`` and
``upsample-inpaint``; all use GPT-2's BPE (50257 tokens, 128 per caption).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from glide_lightning.models.config import ModelConfig, ModelKind, build_model
from glide_lightning.models.text2im import Text2ImUNet

__all__ = [
    "GLIDE_CHECKPOINT_FILES",
    "GLIDE_KINDS",
    "GLIDE_OPTIONS",
    "CheckpointMismatchError",
    "GlideKind",
    "detect_glide_kind",
    "from_glide_text2im",
    "glide_config",
]

GlideKind = Literal["base", "upsample", "base-inpaint", "upsample-inpaint"]
GLIDE_KINDS: tuple[str, ...] = get_args(GlideKind)

GLIDE_CHECKPOINT_FILES: dict[str, str] = {
    "base": "base.pt",
    "upsample": "upsample.pt",
    "base-inpaint": "base_inpaint.pt",
    "upsample-inpaint": "upsample_inpaint.pt",
}
"""File name of each kind's released checkpoint."""

_MAX_LISTED = 10


def _released(kind: ModelKind, image_size: int, num_res_blocks: int) -> ModelConfig:
    return ModelConfig(
        kind=kind,
        image_size=image_size,
        model_channels=192,
        num_res_blocks=num_res_blocks,
        channel_mult=None,
        attention_resolutions=[32, 16, 8],
        num_heads=1,
        num_head_channels=64,
        num_heads_upsample=-1,
        dropout=0.1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        learn_sigma=True,
        text_ctx=128,
        xf_width=512,
        xf_layers=16,
        xf_heads=8,
        xf_final_ln=True,
        xf_padding=True,
        n_vocab=50257,
    )


GLIDE_OPTIONS: dict[str, ModelConfig] = {
    "base": _released("base", 64, 3),
    "upsample": _released("upsample", 256, 2),
    "base-inpaint": _released("inpaint", 64, 3),
    "upsample-inpaint": _released("upsample_inpaint", 256, 2),
}
"""glide-text2im's released model options, per kind, as :class:`ModelConfig`."""


def glide_config(kind: str) -> ModelConfig:
    """The :class:`ModelConfig` of a released glide-text2im model kind."""
    if kind not in GLIDE_OPTIONS:
        raise ValueError(f"unknown glide-text2im model kind {kind!r}; choose one of {', '.join(GLIDE_KINDS)}")
    return GLIDE_OPTIONS[kind]


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the expected glide-text2im model.

    Attributes:
        kind: the model kind that was expected.
        missing: keys the model has and the checkpoint lacks.
        unexpected: keys the checkpoint has and the model lacks.
        mismatched: ``(key, checkpoint shape, model shape)`` for keys whose shapes differ.

    ``file`` names the file expected (default: the released file of ``kind``).
    """

    def __init__(
        self,
        kind: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
        looks_like: str | None = None,
        file: str | None = None,
    ) -> None:
        self.kind = kind
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        file = file or GLIDE_CHECKPOINT_FILES.get(kind, "?")
        lines = [f"checkpoint does not match glide-text2im's {kind!r} model (expected {file}):"]
        if self.missing:
            lines.append(_listing("missing key", self.missing))
        if self.unexpected:
            lines.append(_listing("unexpected key", self.unexpected))
        if self.mismatched:
            shapes = [f"{k}: checkpoint {list(got)} vs model {list(want)}" for k, got, want in self.mismatched]
            lines.append(_listing("shape mismatch", shapes, plural="shape mismatches"))
        if looks_like is not None:
            lines.append(f"  (it looks like glide-text2im's {looks_like!r} checkpoint: pass kind={looks_like!r})")
        super().__init__("\n".join(lines))


def _listing(noun: str, items: Sequence[str], plural: str | None = None) -> str:
    label = noun if len(items) == 1 else (plural or noun + "s")
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {len(items)} {label}: {shown}{more}"


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(v.shape), expected[k])
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    return missing, unexpected, mismatched


def _load_state_dict(checkpoint: str | os.PathLike[str] | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    bad = [k for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"a state dict maps names to tensors; {bad[:3]} are not tensors")
    return checkpoint


def from_glide_text2im(
    kind: str, checkpoint: str | os.PathLike[str] | Mapping[str, Tensor] | None = None
) -> Text2ImUNet:
    """Build one of glide-text2im's released models, loading its checkpoint strictly if given.

    Args:
        kind: ``base``, ``upsample``, ``base-inpaint`` or ``upsample-inpaint``.
        checkpoint: a path to glide-text2im's ``.pt`` file (read with ``weights_only=True`` onto the
            CPU) or a state dict; None returns the randomly initialised model.

    Returns:
        The model, in training mode (call ``.eval()`` to sample), float32 on the CPU.

    Raises:
        ValueError: for an unknown ``kind``.
        CheckpointMismatchError: when the checkpoint's keys or shapes differ from the model's.
    """
    config = glide_config(kind)
    if checkpoint is None:
        return build_model(config)
    state_dict = _load_state_dict(checkpoint)
    with torch.device("meta"):  # no memory for weights that the checkpoint replaces
        model = build_model(config)
    params = model.state_dict()
    missing, unexpected, mismatched = _compare({k: tuple(v.shape) for k, v in params.items()}, state_dict)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(kind, missing, unexpected, mismatched, _guess_kind(state_dict, kind))
    state_dict = {k: v.to(params[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _guess_kind(state_dict: Mapping[str, Tensor], tried: str) -> str | None:
    """The other released kind whose keys and shapes the state dict matches exactly, if any."""
    found = detect_glide_kind(state_dict)
    return None if found == tried else found


def detect_glide_kind(state_dict: Mapping[str, Tensor]) -> str | None:
    """The released kind whose keys and shapes ``state_dict`` matches exactly, if any."""
    for kind in GLIDE_KINDS:
        if not any(_compare(_expected_shapes(GLIDE_OPTIONS[kind]), state_dict)):
            return kind
    return None
