"""Precompute a frozen text encoder's caption embeddings into a copy of a recipe's shards.

Input: a directory another recipe wrote (``--shards``: its shards and ``manifest.json``).
Output (``--out``): the same shards, every sample with its caption's embedding added (``emb.npy``: float16
``[n, D]`` for the ``n`` real tokens, ``emb_mask.npy``: the mask ``[text_ctx]``, ``emb_encoder.txt``: the
encoder's identity), ``empty_caption.npz`` (the empty caption's embedding, for classifier-free guidance)
and ``manifest.json`` with a ``text_encoder`` entry. The data module then hands the stored embeddings to the
model and the frozen encoder does not run during training (see glide_lightning.data.embeddings). The
encoder settings must be the model's (model.model.text_encoder*, text_ctx): training checks the identity.
The FID files (fid_captions.txt, fid_reference/) stay in the source directory.

Example:
    python -m data_recipes embed --shards data/mscoco --out data/mscoco_t5 \\
        --text-encoder t5 --text-encoder-name google/t5-v1_1-base --text-ctx 128
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from data_recipes.common import OUT_RULE, OVERWRITE_HELP, RecipeError, prepare_out_dir
from glide_lightning.data.embeddings import EMPTY_CAPTION_FILE, embedding_members, save_empty_caption
from glide_lightning.data.pipeline import BadSample, ShardError, get_caption, iter_shard
from glide_lightning.data.shards import MANIFEST_NAME, _ShardFile
from glide_lightning.locks import release_lock

log = logging.getLogger(__name__)

SUMMARY = "add a frozen text encoder's caption embeddings (fp16, mask, encoder name) to a recipe's shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of this recipe."""
    parser.add_argument("--shards", type=Path, required=True, help="directory a recipe wrote (shards + manifest.json)")
    parser.add_argument("--out", type=Path, required=True, help=f"output directory for the embedded shards; {OUT_RULE}")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--text-encoder", choices=["t5", "clip"], required=True, help="model.model.text_encoder")
    parser.add_argument("--text-encoder-name", required=True, help="model.model.text_encoder_name")
    parser.add_argument("--text-encoder-pretrained", default=None, help="model.model.text_encoder_pretrained (clip)")
    parser.add_argument("--text-encoder-revision", default=None, help="model.model.text_encoder_revision (t5)")
    parser.add_argument("--text-ctx", type=int, required=True, help="model.model.text_ctx (tokens per caption)")
    parser.add_argument("--batch-size", type=int, default=64, help="captions per encoder call (default 64)")
    parser.add_argument("--device", default="cpu", help="where the encoder runs (default cpu; e.g. cuda)")


def build(shards: Path, out: Path, *, text_encoder: str, text_encoder_name: str, text_ctx: int,
          text_encoder_pretrained: str | None = None, text_encoder_revision: str | None = None,
          batch_size: int = 64, device: str = "cpu", overwrite: bool = False) -> dict[str, Any]:
    """Embed the captions of the dataset in ``shards`` into ``out``; returns the written manifest.

    Raises:
        RecipeError: no shards in ``shards``, ``out`` is ``shards``, holds files (without ``overwrite``) or is busy.
    """
    from glide_lightning.data.tokenizers import build_tokenizer, tokenizer_files
    from glide_lightning.models.encoders import encoder_identity, load_text_encoder

    if not shards.is_dir() or not any(shards.glob("*.tar")):
        raise RecipeError(f"--shards {shards} holds no shards: pass a directory a data recipe wrote")
    if out.resolve() == shards.resolve():
        raise RecipeError(f"--out {out} is --shards: the embedded copy needs a directory of its own")
    prepare_out_dir(out, overwrite)
    encoder = load_text_encoder(text_encoder, text_encoder_name, pretrained=text_encoder_pretrained,
                                revision=text_encoder_revision).to(torch.device(device))
    tokenizer = build_tokenizer(text_encoder, text_ctx,
                                **tokenizer_files(text_encoder, path=text_encoder_name, revision=text_encoder_revision))
    identity = encoder_identity(text_encoder, text_encoder_name, pretrained=text_encoder_pretrained,
                                revision=text_encoder_revision)

    def encode(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return encoder(tokens.to(device), mask.to(device)).cpu()

    try:
        return embed_shards(shards, out, encode, tokenizer, identity, batch_size=batch_size)
    finally:
        release_lock(out)


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
    caption embedding added (:mod:`glide_lightning.data.embeddings`), the empty caption's embedding and a
    manifest with a ``text_encoder`` entry.

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
                samples = _readable(iter_shard(str(source / shard["name"])))
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
    empty = encoder(empty_tokens, empty_mask)[0]  # [L, D]
    save_empty_caption(out, empty, empty_mask[0], identity)
    manifest["text_encoder"] = {"identity": identity, "dim": int(empty.shape[1]), "text_ctx": int(empty.shape[0]),
                                "dtype": "float16", "empty_caption": EMPTY_CAPTION_FILE, "source": str(source)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    log.info("wrote the embedded shards of %s to %s (%s)", source, out, identity)
    return manifest


def _readable(samples: Iterator[Any]) -> Iterator[dict[str, Any]]:
    """The samples of a shard; a read failure is logged (the samples before it are kept)."""
    for sample in samples:
        if isinstance(sample, ShardError):
            log.warning("shard %s: %s (samples after %s lost)", sample.url, sample.error, sample.key)
        else:
            yield sample


def run(args: argparse.Namespace) -> dict[str, Any]:
    """CLI entry point."""
    return build(args.shards, args.out, text_encoder=args.text_encoder, text_encoder_name=args.text_encoder_name,
                 text_ctx=args.text_ctx, text_encoder_pretrained=args.text_encoder_pretrained,
                 text_encoder_revision=args.text_encoder_revision, batch_size=args.batch_size, device=args.device,
                 overwrite=args.overwrite)
