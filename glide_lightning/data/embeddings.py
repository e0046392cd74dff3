"""Precomputed frozen text-encoder embeddings in the shards (the frozen encoder's cost paid once): the format.

The ``embed`` data recipe (``python -m glide_lightning data embed``, :mod:`data_recipes.embed`) copies a recipe's
shards and adds to every sample, next to its image and caption (:func:`embedding_members`):

- ``emb.npy``: float16 ``[n, D]``, the encoder's embeddings of the caption's ``n`` real tokens,
- ``emb_mask.npy``: bool ``[text_ctx]``, the tokenizer's mask (True on the ``n`` real tokens),
- ``emb_encoder.txt``: the encoder's identity (:func:`~glide_lightning.models.encoders.encoder_identity`),

and stores the empty caption's embedding (classifier-free guidance drops captions to it) with the dataset,
in ``empty_caption.npz``; ``manifest.json`` records the encoder under ``text_encoder``. The data pipeline
reads them back (:func:`read_embedding`) into the batch's ``text_emb`` ``[B, text_ctx, D]`` (float16, zero at
padding) and ``text_mask``, and the training step then skips the encoder.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["EMPTY_CAPTION_FILE", "embedding_members", "load_empty_caption", "load_shards_empty_caption", "read_embedding",
           "save_empty_caption"]

EMPTY_CAPTION_FILE = "empty_caption.npz"
EMB, EMB_MASK, EMB_ENCODER = "emb.npy", "emb_mask.npy", "emb_encoder.txt"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def embedding_members(emb: Tensor, mask: Tensor, identity: str) -> dict[str, bytes]:
    """The tar members that carry one caption's embedding: ``emb`` ``[L, D]`` (only the rows where the bool
    ``mask`` ``[L]`` is True are stored, as float16), the mask, and the encoder's ``identity``."""
    real = emb[mask.bool()].to(torch.float16).cpu().numpy()  # [n, D]
    return {EMB: _npy(real), EMB_MASK: _npy(mask.bool().cpu().numpy()), EMB_ENCODER: identity.encode("utf-8")}


def read_embedding(sample: dict[str, Any]) -> tuple[Tensor, Tensor, str] | None:
    """A sample's stored embedding as ``(text_emb [L, D] float16, zero at padding; text_mask [L] bool;
    identity)``, or None when the sample has none. Raises ``ValueError`` for inconsistent members."""
    if EMB not in sample:
        return None
    if EMB_MASK not in sample or EMB_ENCODER not in sample:
        raise ValueError(f"a precomputed embedding needs {EMB}, {EMB_MASK} and {EMB_ENCODER}")
    real = torch.from_numpy(np.load(io.BytesIO(sample[EMB]), allow_pickle=False))  # [n, D]
    mask = torch.from_numpy(np.load(io.BytesIO(sample[EMB_MASK]), allow_pickle=False)).bool()  # [L]
    if real.ndim != 2 or int(mask.sum()) != real.shape[0]:
        raise ValueError(f"stored embedding {tuple(real.shape)} does not match its mask ({int(mask.sum())} real tokens)")
    emb = torch.zeros(mask.shape[0], real.shape[1], dtype=torch.float16)
    emb[mask] = real.to(torch.float16)
    return emb, mask, bytes(sample[EMB_ENCODER]).decode("utf-8")


def load_empty_caption(directory: str | Path) -> tuple[Tensor, Tensor, str] | None:
    """The empty caption's stored embedding of a dataset directory: ``(text_emb [1, L, D] float16,
    text_mask [1, L], identity)``, or None when the directory has no ``empty_caption.npz``."""
    path = Path(directory) / EMPTY_CAPTION_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        emb, mask, identity = (torch.from_numpy(stored["emb"]), torch.from_numpy(stored["mask"]).bool(),
                               str(stored["encoder"]))
    return emb[None], mask[None], identity


def load_shards_empty_caption(urls: list[str]) -> tuple[Tensor, Tensor, str] | None:
    """The empty caption's stored embedding of the dataset ``urls`` (shard URLs) belong to: the
    ``empty_caption.npz`` beside the first of them (:func:`load_empty_caption`), or None when that is not a
    local file or has none beside it."""
    first = next(iter(urls), None)
    if first is None or not Path(first).is_file():
        return None
    return load_empty_caption(Path(first).parent)


def save_empty_caption(directory: str | Path, emb: Tensor, mask: Tensor, identity: str) -> Path:
    """Store the empty caption's embedding ``emb`` ``[L, D]`` (as float16), its ``mask`` ``[L]`` and the encoder's
    ``identity`` in ``directory/empty_caption.npz`` (read back by :func:`load_empty_caption`)."""
    path = Path(directory) / EMPTY_CAPTION_FILE
    np.savez(path, emb=emb.to(torch.float16).cpu().numpy(), mask=mask.bool().cpu().numpy(), encoder=np.array(identity))
    return path
