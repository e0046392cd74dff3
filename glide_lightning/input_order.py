"""The channel order of the network's input, recorded in checkpoints.

The UNet's first convolution (``input_blocks.0.0.weight``, ``[out, C_in, k, k]``) takes ``x`` with its conditioning
images concatenated in the order each model class states as ``INPUT_ORDER``, glide-text2im's (``upsample_inpaint``:
``[x, inpaint_image * inpaint_mask, inpaint_mask, upsampled]``, as ``SuperResInpaintText2ImUnet.forward`` and so
``upsample_inpaint.pt`` take it).

The marker: :class:`~glide_lightning.module.GlideModule` writes the top-level checkpoint key ``input_order``
(:data:`INPUT_ORDER_KEY`), the list of the input's blocks of channels in the order its weights take them
(``["x", "inpaint_image*inpaint_mask", "inpaint_mask", "upsampled"]`` for ``upsample_inpaint``). Checkpoints written
before the marker, in another order, are converted when read: :func:`glide_lightning.migrations.convert_input_order`.
glide-text2im's released files are bare state dicts, already in its order.
"""

from __future__ import annotations

from typing import Any

from glide_lightning.models import Text2ImUNet

__all__ = ["FIRST_CONV", "INPUT_ORDER_KEY", "record_input_order"]

INPUT_ORDER_KEY = "input_order"
"""Top-level checkpoint key: the network input's blocks of channels, in the order the checkpoint's weights take them."""

FIRST_CONV = "input_blocks.0.0.weight"
"""The network's first convolution, the one weight whose input columns follow the input order."""


def record_input_order(checkpoint: dict[str, Any], model: Text2ImUNet) -> None:
    """Write the marker: ``checkpoint["input_order"]`` = ``model``'s ``INPUT_ORDER`` (a list of strings)."""
    checkpoint[INPUT_ORDER_KEY] = list(model.INPUT_ORDER)
