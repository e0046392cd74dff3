"""Precomputed frozen text-encoder embeddings in the shards (the frozen encoder's cost paid once).

:func:`embed_shards` (the ``embed`` data recipe: ``python -m data_recipes embed``) copies a recipe's shards
and adds to every sample, next to its image and caption:

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
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["EMPTY_CAPTION_FILE", "embed_shards", "embedding_members", "load_empty_caption", "read_embedding"]

log = logging.getLogger(__name__)

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


def _batches(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_shards(source: str | Path, out: str | Path, encoder: Any, tokenizer: Any, identity: str, *,
                 caption_keys: Sequence[str] = ("txt",), batch_size: int = 64) -> dict[str, Any]:
    """Copy the shards of the recipe output ``source`` (its ``manifest.json``) to ``out`` with every sample's
    caption embedding added (see the module docstring), the empty caption's embedding and a manifest.

    Args:
        source, out: dataset directories (``out`` must differ from ``source``).
        encoder: a frozen encoder: ``encoder(tokens, mask)`` → ``[B, L, D]``.
        tokenizer: its tokenizer (``tokenizer(captions)`` → tokens, mask; ``tokenizer.empty(1)``).
        identity: the encoder's identity string, stored with every sample and in the manifest.
        caption_keys: where captions are (see :func:`~glide_lightning.data.pipeline.get_caption`).
        batch_size: captions encoded per encoder call.

    Returns:
        The written manifest (a dict). Samples without a caption are copied without an embedding.

    Raises:
        FileNotFoundError: ``source`` has no manifest.json and no shards. ValueError: ``out`` is ``source``.
    """
    from glide_lightning.data.pipeline import BadSample, ShardError, get_caption, iter_shard
    from glide_lightning.data.shards import MANIFEST_NAME, _ShardFile

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError("write the embedded shards to another directory (--out) than the source")
    manifest_path = source / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
    else:  # shards written by write_shards alone: their splits from the names ({split}-{index:06d}.tar)
        manifest = {"splits": {}}
        for path in sorted(source.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
            split = path.name.rsplit("-", 1)[0]
            manifest["splits"].setdefault(split, {"shards": []})["shards"].append({"name": path.name})
        if not manifest["splits"]:
            raise FileNotFoundError(f"{source} holds neither {MANIFEST_NAME} nor {{split}}-NNNNNN.tar shards")
    out.mkdir(parents=True, exist_ok=True)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            writer = _ShardFile(out, shard["name"])
            try:
                samples = (s for s in iter_shard(str(source / shard["name"])) if not isinstance(s, ShardError))
                for batch in _batches(samples, batch_size):
                    captions: list[str | None] = []
                    for sample in batch:
                        try:
                            captions.append(get_caption(sample, caption_keys))
                        except BadSample:
                            captions.append(None)
                    real = [c for c in captions if c is not None]
                    if real:
                        tokens, mask = tokenizer(real)
                        emb = encoder(tokens, mask)  # [b, L, D]
                    encoded = iter(range(len(real)))
                    for sample, caption in zip(batch, captions):
                        record = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                        if caption is not None:
                            i = next(encoded)
                            record.update(embedding_members(emb[i], mask[i], identity))
                        writer.write(record)
                shard.update(vars(writer.commit()))
            except BaseException:
                writer.abort()
                raise
    empty_tokens, empty_mask = tokenizer.empty(1)
    empty = encoder(empty_tokens, empty_mask)[0].to(torch.float16)  # [L, D]
    np.savez(out / EMPTY_CAPTION_FILE, emb=empty.cpu().numpy(), mask=empty_mask[0].numpy(), encoder=np.array(identity))
    manifest["text_encoder"] = {"identity": identity, "dim": int(empty.shape[1]), "text_ctx": int(empty.shape[0]),
                                "dtype": "float16", "empty_caption": EMPTY_CAPTION_FILE, "source": str(source)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    log.info("wrote the embedded shards of %s to %s (%s)", source, out, identity)
    return manifest
