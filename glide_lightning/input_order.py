"""The channel order of the network's input, recorded in checkpoints, and the conversion of checkpoints that
predate it.

The UNet's first convolution (``input_blocks.0.0.weight``, ``[out, C_in, k, k]``) takes ``x`` with its conditioning
images concatenated in the order each model class states as ``INPUT_ORDER``, glide-text2im's. Until issue 22 this
project's ``upsample_inpaint`` network took ``[x, upsampled, inpaint_image * inpaint_mask, inpaint_mask]``, while
glide-text2im's ``SuperResInpaintText2ImUnet.forward`` (and so ``upsample_inpaint.pt``) takes ``[x, inpaint_image
* inpaint_mask, inpaint_mask, upsampled]``: a ``.ckpt`` of that kind written before the change holds a first
convolution whose input columns are in the old order.

The marker: :class:`~glide_lightning.module.GlideModule` writes the top-level checkpoint key ``input_order``
(:data:`INPUT_ORDER_KEY`), the list of the input's blocks of channels in the order its weights take them
(``["x", "inpaint_image*inpaint_mask", "inpaint_mask", "upsampled"]`` for ``upsample_inpaint``). A checkpoint
without it is read as written in the order of :data:`UNMARKED_INPUT_ORDER` (the old ``upsample_inpaint`` one; the
other kinds' order never changed). :func:`convert_input_order` permutes the first convolution's input columns from
the checkpoint's order to the model's wherever that weight lives: ``state_dict`` (the EMA weights when the run
kept them), ``current_model_state`` (the raw ones, Lightning's ``WeightAveraging``) and the moments of that
parameter in ``optimizer_states`` (AdamW's ``exp_avg``, ``exp_avg_sq``), then records the model's order in the
checkpoint. Both readers call it: :func:`glide_lightning.sampling.load_checkpoint` (sampling, ``init_from``) and
``GlideModule.on_load_checkpoint`` (resuming). glide-text2im's released files are bare state dicts, already in its
order: they are never converted.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from glide_lightning.models import Text2ImUNet
from glide_lightning.optim import parameter_groups

__all__ = ["FIRST_CONV", "INPUT_ORDER_KEY", "UNMARKED_INPUT_ORDER", "convert_input_order", "record_input_order"]

log = logging.getLogger(__name__)

INPUT_ORDER_KEY = "input_order"
"""Top-level checkpoint key: the network input's blocks of channels, in the order the checkpoint's weights take them."""

FIRST_CONV = "input_blocks.0.0.weight"
"""The network's first convolution, the one weight whose input columns follow the input order."""

UNMARKED_INPUT_ORDER: dict[str, tuple[str, ...]] = {
    "upsample_inpaint": ("x", "upsampled", "inpaint_image*inpaint_mask", "inpaint_mask"),
}
"""The input order of a checkpoint without :data:`INPUT_ORDER_KEY`, by model kind (a kind not listed: its
model's own order). ``upsample_inpaint``: this project's order before issue 22."""


def record_input_order(checkpoint: dict[str, Any], model: Text2ImUNet) -> None:
    """Write the marker: ``checkpoint["input_order"]`` = ``model``'s ``INPUT_ORDER`` (a list of strings)."""
    checkpoint[INPUT_ORDER_KEY] = list(model.INPUT_ORDER)


def _columns(saved: tuple[str, ...], model: Text2ImUNet, where: str) -> Tensor | None:
    """Indices into the saved weight's input columns giving the model's order; None when they are the same."""
    current = tuple(model.INPUT_ORDER)
    if saved == current:
        return None
    if sorted(saved) != sorted(current):
        raise ValueError(f"{where}: its network input order {list(saved)} is not a reordering of this model's "
                         f"{list(current)}: it cannot be converted (is it a checkpoint of another model kind?)")
    width = dict(model.input_layout())
    start, offset = {}, 0
    for name in saved:
        start[name], offset = offset, offset + width[name]
    return torch.cat([torch.arange(start[name], start[name] + width[name]) for name in current])


def _permuted(weight: Any, columns: Tensor, what: str, where: str) -> Tensor:
    expected = int(columns.numel())
    if not isinstance(weight, Tensor) or weight.ndim != 4 or weight.shape[1] != expected:
        shape = list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{where}: {what} should be a [out, {expected}, k, k] convolution weight, got {shape}: "
                         f"converting its input order is not sound")
    return weight.index_select(1, columns)  # a new tensor: a memory-mapped checkpoint is left as it is


def _optimizer_index(model: Text2ImUNet, weight_decay: float) -> tuple[int, int]:
    """The first convolution's index among the optimizer's parameters (``build_optimizer``'s groups), and how many
    parameters there are."""
    params = [p for group in parameter_groups(model, weight_decay) for p in group["params"]]
    target = model.get_parameter(FIRST_CONV)
    return next(i for i, p in enumerate(params) if p is target), len(params)


def convert_input_order(checkpoint: dict[str, Any], model: Text2ImUNet, kind: str, *, where: str,
                        prefix: str = "model.", weight_decay: float | None = None) -> list[str]:
    """Bring a Lightning checkpoint dict of ``model``'s ``kind`` to ``model``'s input order, in place.

    The checkpoint's order is its ``input_order`` (:data:`INPUT_ORDER_KEY`), else :data:`UNMARKED_INPUT_ORDER`'s
    for ``kind``, else ``model``'s. Where it differs, the input columns of the first convolution (``[out, 3C+1, k, k]``
    for ``upsample_inpaint``: old ``[x | upsampled | image·mask | mask]`` → ``[x | image·mask | mask | upsampled]``)
    are permuted in ``state_dict`` and ``current_model_state`` (keys ``prefix + FIRST_CONV``) and, given
    ``weight_decay`` (the optimizer's, to locate the parameter in :func:`~glide_lightning.optim.parameter_groups`'
    order), in every tensor of that parameter's state in each of ``optimizer_states`` (``exp_avg``, ``exp_avg_sq``;
    ``step`` is kept). Without ``weight_decay`` the optimizer states are left alone (a reader of weights only).
    One warning is logged naming what was converted; the checkpoint then records ``model``'s order.

    Args:
        checkpoint: the dict Lightning saved (``torch.load`` of a ``.ckpt``), modified in place.
        model: the network the weights are for (its ``INPUT_ORDER`` and ``image_channels``).
        kind: the checkpoint's model kind (``upsample_inpaint``, …).
        where: the checkpoint's name for messages (its path).
        prefix: the network's prefix in the checkpoint's state dicts (``model.`` in a GlideModule's).
        weight_decay: convert the optimizer states too, whose parameters are ``model``'s parameter groups.

    Returns:
        Where the weight was converted (``state_dict``, …); empty when nothing needed converting.

    Raises:
        ValueError: converting is not sound: the recorded order is not a reordering of the model's, a state dict
            lacks the first convolution or holds it with another number of input channels, the optimizer state
            has another number of parameters than ``model``, or that parameter's moments have another shape.
    """
    recorded = checkpoint.get(INPUT_ORDER_KEY)
    saved = tuple(recorded) if recorded is not None else UNMARKED_INPUT_ORDER.get(kind, tuple(model.INPUT_ORDER))
    columns = _columns(saved, model, where)
    if columns is None:
        return []
    converted = []
    key = prefix + FIRST_CONV
    for name in ("state_dict", "current_model_state"):
        if name in checkpoint:
            if key not in checkpoint[name]:
                raise ValueError(f"{where}: {name} has no {key}: converting its input order is not sound")
            checkpoint[name][key] = _permuted(checkpoint[name][key], columns, f"{name}[{key!r}]", where)
            converted.append(name)
    if weight_decay is not None and checkpoint.get("optimizer_states"):
        index, count = _optimizer_index(model, weight_decay)
        for i, state in enumerate(checkpoint["optimizer_states"]):
            listed = sum(len(group["params"]) for group in state["param_groups"])
            if listed != count:
                raise ValueError(f"{where}: optimizer_states[{i}] holds {listed} parameters, this model's optimizer "
                                 f"{count}: its moments of {FIRST_CONV} cannot be located to convert them")
            moments = state["state"].get(index, {})  # absent before the first optimizer step
            names = [k for k, v in moments.items() if isinstance(v, Tensor) and v.ndim > 0]
            for moment in names:
                moments[moment] = _permuted(moments[moment], columns,
                                            f"optimizer_states[{i}] {moment} of {FIRST_CONV}", where)
            converted.append(f"optimizer_states[{i}] ({', '.join(names) or 'no moments yet'})")
    checkpoint[INPUT_ORDER_KEY] = list(model.INPUT_ORDER)
    log.warning("%s: this %s checkpoint's network takes its input as %s (%s); converted to %s, glide-text2im's "
                "order, by permuting the input columns of %s in %s", where, kind, list(saved),
                "its input_order" if recorded is not None else "no input_order recorded: written before issue 22",
                list(model.INPUT_ORDER), FIRST_CONV, ", ".join(converted) or "no state dict")
    return converted
