"""The one reader of every checkpoint kind and the one registry of released models, behind
``python -m glide_lightning sample``, ``fid`` / ``sweep``, the training callbacks, ``init_from`` and the
benchmark: a checkpoint becomes a :class:`SamplingModel` (network, process, tokenizer, provenance).

Checkpoints (:func:`load_checkpoint`):

- a glide_lightning ``.ckpt`` written by Lightning: the network's architecture, process and tokenizer
  come from its ``hyper_parameters``. A frozen text encoder (``text_encoder`` t5 / clip) is not in the
  file: it is reloaded from the name, pretrained tag / file and revision the hyper-parameters record. When the run used Lightning's ``EMAWeightAveraging``, its
  ``state_dict`` holds the EMA weights and ``current_model_state`` the raw ones; ``weights="ema"``
  (the default) or ``"raw"`` picks one, and :attr:`SamplingModel.source` says which was loaded.
- one of glide-text2im's released files (``base.pt``, ``upsample.pt``, ``base_inpaint.pt``,
  ``upsample_inpaint.pt``), recognised by its keys and shapes; its settings come from
  :data:`RELEASED_MODELS`.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from glide_lightning.data.tokenizers import Tokenizer, TokenizerName, build_tokenizer, tokenizer_files
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.models import (
    GLIDE_CHECKPOINT_FILES,
    GLIDE_KINDS,
    GLIDE_OPTIONS,
    GlideKind,
    ModelConfig,
    ModelKind,
    build_with_text_encoder,
    from_glide_text2im,
)
from glide_lightning.models.glide_text2im import detect_glide_kind

__all__ = ["RELEASED_MODELS", "ReleasedModel", "SamplingModel", "Weights", "check_kind", "check_stored_settings",
           "load_checkpoint", "mapped_state", "released_model", "stored_hyper_parameters"]

log = logging.getLogger(__name__)

Weights = Literal["ema", "raw"]


# ------------------------------------------------------------------------------------- released models
@dataclass(frozen=True)
class ReleasedModel:
    """What it takes to sample one of glide-text2im's released models."""

    kind: GlideKind
    """glide-text2im's name: ``base``, ``upsample``, ``base-inpaint`` or ``upsample-inpaint``."""
    file: str
    """Its released checkpoint's file name (``base.pt``, …)."""
    model: ModelConfig
    """Its architecture (``text_ctx`` 128, ``n_vocab`` 50257); it lives beside the strict importer in
    :mod:`glide_lightning.models.glide_text2im`, which cannot see :mod:`~glide_lightning.diffusion`."""
    diffusion: DiffusionConfig
    """Its training process: 1000 steps of a cosine (base models) or linear (upsamplers) schedule, learned Σ."""
    tokenizer: TokenizerName = "gpt2"
    """GPT-2's BPE, padded with token 50256 and mask False to ``model.text_ctx`` tokens."""


_BASE_PROCESS = DiffusionConfig(steps=1000, noise_schedule="cosine", variance_type="learned_range", loss_type="hybrid")
_UPSAMPLER_PROCESS = DiffusionConfig(steps=1000, noise_schedule="linear", variance_type="learned_range",
                                     loss_type="hybrid")

RELEASED_MODELS: dict[str, ReleasedModel] = {
    kind: ReleasedModel(kind, GLIDE_CHECKPOINT_FILES[kind], GLIDE_OPTIONS[kind],
                        _UPSAMPLER_PROCESS if kind.startswith("upsample") else _BASE_PROCESS)
    for kind in GLIDE_KINDS
}
"""glide-text2im's released models by kind: the one place their settings are written down."""


def released_model(kind: str | None = None, *, model_kind: ModelKind | None = None) -> ReleasedModel:
    """The released model of glide-text2im ``kind`` (``base-inpaint``, …) or of our ``model_kind``
    (``inpaint``, …: the kind field of :class:`ModelConfig`). Raises ``ValueError`` naming the choices."""
    for released in RELEASED_MODELS.values():
        if released.kind == kind or (model_kind is not None and released.model.kind == model_kind):
            return released
    raise ValueError(f"no released glide-text2im model of kind {kind or model_kind!r}; "
                     f"choose one of {', '.join(RELEASED_MODELS)}")



@dataclass
class SamplingModel:
    """A network ready to sample: its weights, process, tokenizer and provenance."""

    model: nn.Module
    diffusion_config: DiffusionConfig
    tokenizer: Tokenizer
    model_config: ModelConfig
    source: str
    """Where the weights come from: the path and which weights (EMA or raw, the training step, or
    the released model's kind)."""

    @property
    def image_size(self) -> int:
        return self.model_config.image_size


# ------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(checkpoint: str | Path, device: torch.device | str = "cpu", *, weights: Weights = "ema",
                    kind: ModelKind | None = None) -> SamplingModel:
    """Read any checkpoint this project knows (see the module docstring) into a :class:`SamplingModel`
    in eval mode on ``device``.

    Args:
        checkpoint: a glide_lightning ``.ckpt`` or a glide-text2im ``.pt``.
        device: where the network goes.
        weights: ``ema`` (the EMA weights when the run kept them, else the raw ones, as ``source``
            says) or ``raw`` (the weights the optimizer trained). Released files hold one set.
        kind: the :class:`ModelConfig` kind the caller needs (``init_from`` passes its model's), checked.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is neither kind of checkpoint, cannot be read with
            ``torch.load(weights_only=True)``, holds a model of another ``kind``, or ``weights`` is unknown; or
            a glide_lightning checkpoint in an older input order cannot be converted
            (:func:`~glide_lightning.migrations.convert_input_order`; glide-text2im's files are never converted).
        CheckpointMismatchError: ``kind`` is given and the file is a state dict that matches no
            released model; the error lists its differences from the released model of that kind.
    """
    path = Path(checkpoint)
    if weights not in ("ema", "raw"):
        raise ValueError(f"unknown weights {weights!r}; choose ema or raw")
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        hint = f"its newest checkpoint is {last}" if last.is_file() else "pass a .ckpt file in it"
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a checkpoint file: {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train a run first, or pass the path of a .ckpt or "
                                f"of glide-text2im's base.pt / upsample.pt)")
    if not zipfile.is_zipfile(path):  # torch.save's format; anything else gets torch's advice about saving it
        raise ValueError(f"{path} cannot be read as a checkpoint: it is not a file torch.save wrote, or it is "
                         f"damaged (truncated): pass a glide_lightning .ckpt or glide-text2im's .pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(f"{path} cannot be read as a checkpoint (torch.load with weights_only=True): {e}") from e
    if isinstance(state, dict) and "state_dict" in state and "hyper_parameters" in state:
        loaded = _read_lightning(path, state, weights)
    elif isinstance(state, dict):
        loaded = _read_released(path, state, kind)
    else:
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint: pass a glide_lightning .ckpt "
                         f"or one of glide-text2im's {', '.join(GLIDE_CHECKPOINT_FILES.values())}")
    if kind is not None:
        check_kind(loaded, kind, "the checkpoint's model")
    loaded.model.to(device).eval()
    return loaded


def mapped_state(checkpoint: str | Path) -> dict[str, Any] | None:
    """A checkpoint file's top-level dict, memory-mapped (``torch.load(mmap=True)``: its settings and tensor keys
    without reading the weights; a 1.5 GB checkpoint costs its pickle alone). None for anything that cannot be read
    so: :func:`load_checkpoint` reports those."""
    path = Path(checkpoint)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file: the real reader reports it
        return None
    return state if isinstance(state, dict) else None


def stored_hyper_parameters(checkpoint: str | Path) -> dict[str, Any] | None:
    """A glide_lightning checkpoint's ``hyper_parameters`` (:func:`mapped_state`), read without building the model
    or reading its weights. None for glide-text2im's released files (no hyper-parameters) and unreadable files."""
    hp = (mapped_state(checkpoint) or {}).get("hyper_parameters")
    return hp if isinstance(hp, dict) else None


def _stored_steps(hp: dict[str, Any]) -> int | None:
    diffusion = hp.get("diffusion")
    steps = diffusion.get("steps") if isinstance(diffusion, dict) else None
    return steps if isinstance(steps, int) and steps > 0 else None


def check_stored_settings(checkpoint: str | Path, option: str, values: Iterable[str], role: str = "the model", *,
                          kind: ModelKind | None = None) -> None:
    """Refuse, from ``checkpoint``'s stored hyper-parameters (:func:`stored_hyper_parameters`) and so before the model
    is built or its weights loaded, what :func:`load_checkpoint` and the sampler would refuse only after loading:
    a model of another ``kind`` than the command needs (:func:`check_kind`'s message), and a respacing in
    ``values`` of ``option`` (``--sampling.steps``, ``--sampling.upsample_steps``, ``--step_counts``) that cannot be
    taken from the process of ``role``'s model (:func:`~glide_lightning.sampling.config.check_steps_fit`'s one
    line). Raises ``ValueError``. glide-text2im's released files (no hyper-parameters) and unreadable files are
    left to :func:`load_checkpoint`, as before."""
    from glide_lightning.sampling.config import check_steps_fit

    hp = stored_hyper_parameters(checkpoint)
    if hp is None:
        return
    model = hp.get("model")
    found = model.get("kind") if isinstance(model, dict) else None
    if kind is not None and isinstance(found, str) and found != kind:
        raise ValueError(_kind_mismatch("the checkpoint's model", kind, found, str(checkpoint)))
    process = _stored_steps(hp)
    if process is not None:
        for steps in dict.fromkeys(values):
            check_steps_fit(option, steps, process, str(checkpoint), role)


def check_kind(loaded: SamplingModel, kind: ModelKind, role: str) -> None:
    """Raise ``ValueError`` when ``loaded`` is not a model of ``kind``, naming ``role`` (``the upsampler``, …),
    both kinds, where the weights come from and glide-text2im's released file of that kind: the one kind check
    of :func:`load_checkpoint` (``kind=``) and of :func:`~glide_lightning.sampling.cascade.check_cascade`."""
    if loaded.model_config.kind != kind:
        raise ValueError(_kind_mismatch(role, kind, loaded.model_config.kind, loaded.source))


def _kind_mismatch(role: str, kind: ModelKind, found: str, source: str) -> str:
    """:func:`check_kind`'s message (and :func:`check_stored_settings`')."""
    return (f"{role} must be of kind {kind!r}, got {found!r} ({source}): pass a checkpoint of a {kind!r} model (e.g. "
            f"glide-text2im's {released_model(model_kind=kind).file})")


def _read_lightning(path: Path, state: dict[str, Any], weights: Weights) -> SamplingModel:
    """A GlideModule checkpoint: its hyper-parameters rebuild the network, process and tokenizer. An older
    checkpoint form is brought to the current one first (:mod:`glide_lightning.migrations`: hyper-parameters
    added since, the weights of an ``upsample_inpaint`` one written before its network's input order was
    recorded, with a warning); a conversion that is not sound raises ``ValueError``."""
    from glide_lightning.migrations import migrate_hyper_parameters, migrate_weights

    hp = state["hyper_parameters"]
    if not isinstance(hp, dict) or not {"model", "diffusion", "tokenizer"} <= hp.keys():
        raise ValueError(f"{path} is a Lightning checkpoint, but not of a GlideModule (its hyper_parameters lack "
                         f"model, diffusion and tokenizer)")
    migrate_hyper_parameters(state, where=str(path))
    config = ModelConfig(**hp["model"])
    has_ema = "current_model_state" in state  # Lightning's WeightAveraging: EMA in state_dict, raw moved aside
    use_ema = has_ema and weights == "ema"
    what = ("EMA weights" if use_ema else "raw weights" if has_ema or weights == "raw"
            else "raw weights: this run kept no EMA")
    model, _ = build_with_text_encoder(config)  # a frozen encoder is not in the file: reloaded from what it records
    migrate_weights(state, model, config.kind, where=str(path))  # the weights only (state_dict, raw ones)
    source = state["current_model_state"] if has_ema and not use_ema else state["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in source.items() if k.startswith("model.")},
                          strict=True)
    encoder = ""
    if model.frozen_text_encoder:
        loaded_now = model.attached_text_encoder.source
        encoder = f", text encoder {loaded_now}"
        trained_with = state.get("text_encoder_source")
        if trained_with not in (None, loaded_now):
            log.warning("%s was trained with the text encoder %s but %s was loaded now: pin "
                        "model.text_encoder_revision to sample with the same weights", path, trained_with, loaded_now)
    files = tokenizer_files(hp["tokenizer"], path=config.text_encoder_name, revision=config.text_encoder_revision)
    return SamplingModel(model, DiffusionConfig(**hp["diffusion"]),
                         build_tokenizer(hp["tokenizer"], text_ctx=config.text_ctx, **files), config,
                         f"{path} ({what}, step {state.get('global_step', '?')}{encoder})")


def _read_released(path: Path, state: dict[str, Any], kind: ModelKind | None) -> SamplingModel:
    """A bare state dict: one of glide-text2im's released models, recognised by keys and shapes."""
    found = detect_glide_kind(state)
    if found is None:
        if kind is not None and any(r.model.kind == kind for r in RELEASED_MODELS.values()):
            # the caller needs this kind: explain how the file differs from that released model
            from_glide_text2im(released_model(model_kind=kind).kind, state)
        raise ValueError(f"{path} is neither a glide_lightning checkpoint (a .ckpt with state_dict and "
                         f"hyper_parameters) nor one of glide-text2im's released "
                         f"{', '.join(GLIDE_CHECKPOINT_FILES.values())} (its keys and shapes match none)")
    released = RELEASED_MODELS[found]
    return SamplingModel(from_glide_text2im(found, state), released.diffusion,
                         build_tokenizer(released.tokenizer, text_ctx=released.model.text_ctx), released.model,
                         f"{path} (glide-text2im {found})")

