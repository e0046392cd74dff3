"""Every conversion of an older checkpoint form to the current one, in one place.

A glide_lightning ``.ckpt`` is read in two ways, and each reader calls the migrations that apply to it:

- :func:`glide_lightning.sampling.load_checkpoint` (the ``sample`` / ``fid`` commands, the training callbacks,
  ``init_from``) reads the network's weights: :func:`migrate_hyper_parameters` before it builds the network from
  the checkpoint's ``hyper_parameters``, :func:`migrate_weights` before it loads the weights;
- ``GlideModule.on_load_checkpoint`` (resuming a run with Lightning) restores weights, EMA weights and the optimizer:
  :func:`migrate_training_state`.

The migrations, each a function that says which old form it reads, since when the current form is written and what
it becomes:

- :func:`add_missing_hyper_parameters`: ``hyper_parameters`` without the model and diffusion fields added after the
  first checkpoints (:data:`HYPER_PARAMETERS_ADDED_LATER`) → those fields, at the values the checkpoint's run used;
- :func:`spell_weighting`: ``diffusion`` hyper-parameters without ``weighting`` (``loss_type: p2``, or
  ``min_snr_gamma`` alone) → ``loss_type`` simple / hybrid and ``weighting``;
- :func:`nest_tokenizer_spec`: ``datamodule_hyper_parameters`` with the tokenizer as five fields (``tokenizer``,
  ``text_ctx``, ``bpe_dir``, ``tokenizer_path``, ``tokenizer_revision``) → one ``tokenizer_spec`` dict, the data
  module's :class:`~glide_lightning.data.tokenizers.TokenizerSpec`;
- :func:`regroup_optimizer_state`: an AdamW state with all parameters in one group → the decay / no-decay groups of
  :func:`~glide_lightning.optim.parameter_groups`;
- :func:`convert_input_order`: an ``upsample_inpaint`` checkpoint whose first convolution takes the network's input
  in this project's earlier order → glide-text2im's order, recorded as ``input_order``
  (:mod:`glide_lightning.input_order`).

Each one leaves a checkpoint of the current form as it is. glide-text2im's released files are bare state dicts in
their own (current) form: none of these applies to them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from glide_lightning.diffusion.config import modern_loss_spelling
from glide_lightning.input_order import FIRST_CONV, INPUT_ORDER_KEY
from glide_lightning.models import Text2ImUNet
from glide_lightning.optim import OptimizerConfig, parameter_groups

__all__ = ["HYPER_PARAMETERS_ADDED_LATER", "UNMARKED_INPUT_ORDER", "add_missing_hyper_parameters",
           "convert_input_order", "migrate_hyper_parameters", "migrate_training_state", "migrate_weights",
           "nest_tokenizer_spec", "regroup_optimizer_state", "spell_weighting"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the readers' entry points
def migrate_hyper_parameters(checkpoint: dict[str, Any], *, where: str) -> list[str]:
    """Bring a Lightning checkpoint's ``hyper_parameters`` to the current form, in place, before a reader builds
    the network and the process from them (or compares them with a resume's, ``runs.check_resume``), and its
    ``datamodule_hyper_parameters`` too. Returns the fields added (:func:`add_missing_hyper_parameters`) and
    respelled (:func:`spell_weighting`, :func:`nest_tokenizer_spec`)."""
    return (add_missing_hyper_parameters(checkpoint, where=where) + spell_weighting(checkpoint, where=where)
            + nest_tokenizer_spec(checkpoint, where=where))


def migrate_weights(checkpoint: dict[str, Any], model: Text2ImUNet, kind: str, *, where: str) -> list[str]:
    """Bring a Lightning checkpoint's weights (``state_dict``, and ``current_model_state`` where the run kept EMA
    weights) to ``model``'s current form, in place, for a reader of weights (no optimizer). Returns where the
    weights were converted (:func:`convert_input_order`).

    Raises:
        ValueError: a conversion is not sound (see :func:`convert_input_order`).
    """
    return convert_input_order(checkpoint, model, kind, where=where)


def migrate_training_state(checkpoint: dict[str, Any], model: Text2ImUNet, kind: str, optimizer: OptimizerConfig, *,
                           where: str) -> list[str]:
    """Bring a checkpoint a run resumes from to the current form, in place: its AdamW states regrouped
    (:func:`regroup_optimizer_state`), then its weights, EMA weights and AdamW moments in ``model``'s input order
    (:func:`convert_input_order`, which locates the moments in the regrouped order). Returns what was converted.

    Args:
        checkpoint: the dict Lightning restores from (``GlideModule.on_load_checkpoint``'s).
        model: the run's network (``prefix`` ``model.`` in the checkpoint's state dicts).
        kind: its model kind.
        optimizer: the run's optimizer settings (the weight decay of the groups).
        where: the checkpoint's name for messages.

    Raises:
        ValueError: a conversion is not sound (see :func:`convert_input_order`).
    """
    converted = []
    if "optimizer_states" in checkpoint:
        states = checkpoint["optimizer_states"]
        checkpoint["optimizer_states"] = [regroup_optimizer_state(state, model, optimizer) for state in states]
        converted += [f"optimizer_states[{i}] regrouped" for i, (old, new)
                      in enumerate(zip(states, checkpoint["optimizer_states"])) if old is not new]
    converted += convert_input_order(checkpoint, model, kind, where=where, weight_decay=optimizer.weight_decay)
    return converted


# ----------------------------------------------------------------------------- hyper-parameters added later
HYPER_PARAMETERS_ADDED_LATER: dict[str, dict[str, Any]] = {
    "model": {
        # GroupNorm's group size became a choice (EDM's at-least-4-channels groups): before, ADM's 32 groups
        "groupnorm_min_channels": 1,
        # frozen pretrained text encoders (T5, open_clip) were added: before, GLIDE's own text transformer
        "text_encoder": "transformer",
        "text_encoder_name": None,
        "text_encoder_pretrained": None,
        "text_encoder_revision": None,
        "text_encoder_dim": None,
        # the frozen encoder's arithmetic became a choice: before it, a frozen encoder computed in fp32
        "text_encoder_precision": "fp32",
        # upsamplers could be conditioned on the noise level of their low-res input: before, GLIDE's upsampler
        "low_res_noise_cond": False,
    },
    "diffusion": {
        # the prediction target became a choice (eps or v): before, eps
        "prediction": "eps",
        # the min-SNR-γ weighting was added: before, none
        "min_snr_gamma": None,
    },
}
"""By section of a GlideModule checkpoint's ``hyper_parameters``: the fields added after the first checkpoints were
written, each with the value that reproduces how a checkpoint without it was trained (pinned here, so that a later
change of a field's default cannot change what an older checkpoint means)."""


def add_missing_hyper_parameters(checkpoint: dict[str, Any], *, where: str) -> list[str]:
    """Old form: ``hyper_parameters`` whose ``model`` / ``diffusion`` sections lack fields that were added after the
    first checkpoints (a checkpoint written before GroupNorm's group size, frozen text encoders and their precision,
    noise-level conditioning of upsamplers, v-prediction or min-SNR-γ were options). New form: each such field
    present, at the value of :data:`HYPER_PARAMETERS_ADDED_LATER`, the behaviour the checkpoint was trained with.
    In place; the fields present are kept. Returns the fields added (``model.low_res_noise_cond``, …), logged at
    info level (the result is the same model, nothing to warn about)."""
    hp = checkpoint.get("hyper_parameters")
    added = []
    for section, fields in HYPER_PARAMETERS_ADDED_LATER.items():
        values = hp.get(section) if isinstance(hp, dict) else None
        if not isinstance(values, dict):
            continue
        for name, value in fields.items():
            if name not in values:
                values[name] = value
                added.append(f"{section}.{name}")
    if added:
        log.info("%s: hyper-parameters written before these fields existed; read with the values it was trained "
                 "with: %s", where, ", ".join(f"{name}={_added_value(name)!r}" for name in added))
    return added


def _added_value(name: str) -> Any:
    section, field = name.split(".", 1)
    return HYPER_PARAMETERS_ADDED_LATER[section][field]


# ----------------------------------------------------------------------------- the MSE weighting as a field
def spell_weighting(checkpoint: dict[str, Any], *, where: str) -> list[str]:
    """Old form: ``diffusion`` hyper-parameters written before ``weighting`` existed, where the P2 weighting was
    ``loss_type: p2`` (with the VLB term where the variance was learned) and min-SNR-γ was ``min_snr_gamma`` alone.
    New form: ``loss_type`` ``simple`` / ``hybrid`` and ``weighting`` ``none`` / ``p2`` / ``min_snr``
    (:func:`~glide_lightning.diffusion.config.modern_loss_spelling`, the mapping ``DiffusionConfig`` applies to
    old YAML too): the same loss. In place; run after :func:`add_missing_hyper_parameters`. Returns the fields
    changed (``diffusion.loss_type``, ``diffusion.weighting``), logged at info level."""
    hp = checkpoint.get("hyper_parameters")
    values = hp.get("diffusion") if isinstance(hp, dict) else None
    if not isinstance(values, dict):
        return []
    spelled = modern_loss_spelling(values)
    changed = [name for name in ("loss_type", "weighting") if name in spelled and values.get(name) != spelled[name]]
    if changed:
        log.info("%s: diffusion hyper-parameters in the spelling from before the weighting field; read as %s",
                 where, ", ".join(f"{name}={spelled[name]!r}" for name in changed))
        values.update({name: spelled[name] for name in changed})
    return [f"diffusion.{name}" for name in changed]


# ----------------------------------------------------------------------------- the data module's tokenizer as one value
_FLAT_TOKENIZER_FIELDS = {"text_ctx": "text_ctx", "bpe_dir": "bpe_dir", "tokenizer_path": "path",
                          "tokenizer_revision": "revision"}
"""The old data module's tokenizer fields (besides ``tokenizer``, the name) → their name in ``TokenizerSpec``."""
_TOKENIZER_FILES = {"bpe_dir": "gpt2", "path": "t5", "revision": "t5"}
"""The tokenizer each file field belongs to (``TokenizerSpec`` records it for that one only)."""


def nest_tokenizer_spec(checkpoint: dict[str, Any], *, where: str) -> list[str]:
    """Old form: ``datamodule_hyper_parameters`` written while ``GlideDataModule`` took its tokenizer as five fields
    (``tokenizer`` the name, ``text_ctx``, ``bpe_dir``, ``tokenizer_path``, ``tokenizer_revision``; each linked from
    the model's config). New form: ``tokenizer_spec``, one dict: the
    :class:`~glide_lightning.data.tokenizers.TokenizerSpec` (``name``, ``text_ctx``, ``bpe_dir`` for ``gpt2``,
    ``path`` and ``revision`` for ``t5``): the same tokenizer, so that a resume's comparison
    (``runs.check_resume``) sees no change where there is none. In place; a current form is left as it is. Returns
    the fields nested (``data.tokenizer``, ``data.text_ctx``, …), logged at info level."""
    values = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(values, dict) or not isinstance(values.get("tokenizer"), str):
        return []
    name = values["tokenizer"]
    spec: dict[str, Any] = {"name": name, "text_ctx": None, "bpe_dir": None, "path": None, "revision": None}
    moved = ["data.tokenizer"]
    for old, new in _FLAT_TOKENIZER_FIELDS.items():
        if old in values:
            value = values.pop(old)
            moved.append(f"data.{old}")
            if _TOKENIZER_FILES.get(new, name) == name:
                spec[new] = value
    del values["tokenizer"]
    values["tokenizer_spec"] = spec
    log.info("%s: the data module's tokenizer recorded as separate fields; read as one tokenizer spec: %s", where, spec)
    return moved


# ----------------------------------------------------------------------------- one AdamW parameter group
def regroup_optimizer_state(state: dict[str, Any], model: torch.nn.Module, config: OptimizerConfig) -> dict[str, Any]:
    """Old form: an AdamW ``state`` (``optimizer.state_dict()``) of a checkpoint written before the optimizer had
    decay and no-decay parameter groups: all of ``model``'s trainable parameters in one group, indexed in
    ``model.parameters()`` order. New form: the groups of :func:`~glide_lightning.optim.parameter_groups` (weights
    decayed by ``config.weight_decay``; biases, norms and embeddings not), indexed in their order, each parameter
    keeping its moments and step count, so that such a run resumes. Any other state is returned as it is (the same
    object)."""
    if len(state["param_groups"]) != 1:
        return state
    old_index = {id(p): i for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}
    if len(state["param_groups"][0]["params"]) != len(old_index):
        return state
    saved_group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    groups, new_state, new_index = [], {}, 0
    for group in parameter_groups(model, config.weight_decay):
        indices = []
        for p in group["params"]:
            if old_index[id(p)] in state["state"]:
                new_state[new_index] = state["state"][old_index[id(p)]]
            indices.append(new_index)
            new_index += 1
        groups.append({**saved_group, "weight_decay": group["weight_decay"], "name": group["name"], "params": indices})
    log.warning("the checkpoint's optimizer has one parameter group: its AdamW state is regrouped into decay and "
                "no-decay groups (weight decay %g on weights only from now on)", config.weight_decay)
    return {"state": new_state, "param_groups": groups}


# ----------------------------------------------------------------------------- the network's input order
UNMARKED_INPUT_ORDER: dict[str, tuple[str, ...]] = {
    "upsample_inpaint": ("x", "upsampled", "inpaint_image*inpaint_mask", "inpaint_mask"),
}
"""The input order of a checkpoint without :data:`~glide_lightning.input_order.INPUT_ORDER_KEY`, by model kind (a
kind not listed: its model's own order, which never changed). ``upsample_inpaint``: this project's order until its
network took glide-text2im's."""


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
    """Old form: an ``upsample_inpaint`` checkpoint written before the network's input order was recorded, whose
    first convolution (``input_blocks.0.0.weight``, ``[out, 3C+1, k, k]``) takes the input in this project's earlier
    order ``[x | upsampled | image·mask | mask]``. New form: its columns in glide-text2im's order
    ``[x | image·mask | mask | upsampled]`` (``SuperResInpaintText2ImUnet.forward``, ``upsample_inpaint.pt``) and
    that order recorded as ``input_order``. In place.

    The checkpoint's order is its ``input_order`` (:data:`~glide_lightning.input_order.INPUT_ORDER_KEY`), else
    :data:`UNMARKED_INPUT_ORDER`'s for ``kind``, else ``model``'s. Where it differs, the first convolution's input
    columns are permuted in ``state_dict`` and ``current_model_state`` (keys ``prefix + FIRST_CONV``) and, given
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
                "its input_order" if recorded is not None else
                "no input_order recorded: written before the network's input order was recorded",
                list(model.INPUT_ORDER), FIRST_CONV, ", ".join(converted) or "no state dict")
    return converted
