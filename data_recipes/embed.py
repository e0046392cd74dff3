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
    python -m glide_lightning data embed --shards data/mscoco --out data/mscoco_t5 \\
        --text_encoder t5 --text_encoder_name google/t5-v1_1-base --text_ctx 128
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from data_recipes.common import Recipe, RecipeError, prepare_out_dir
from glide_lightning.data.embeddings import EMPTY_CAPTION_FILE, embedding_members, save_empty_caption
from glide_lightning.data.pipeline import BadSample, ShardError, get_caption, iter_shard
from glide_lightning.data.shards import MANIFEST_NAME, _ShardFile
from glide_lightning.locks import release_lock

log = logging.getLogger(__name__)

NAME = "embed"


@dataclass(kw_only=True)
class Embed(Recipe):
    """Add a frozen text encoder's caption embeddings (fp16, mask, encoder name) to a recipe's shards."""

    NAME = NAME
    shards: Path
    """A directory another recipe wrote (shards and manifest.json)."""
    text_encoder: Literal["t5", "clip"]
    """The encoder (``model.model.text_encoder``)."""
    text_encoder_name: str
    """Its hub name or directory (``model.model.text_encoder_name``)."""
    text_ctx: int
    """Tokens per caption (``model.model.text_ctx``)."""
    text_encoder_pretrained: str | None = None
    """``model.model.text_encoder_pretrained`` (clip)."""
    text_encoder_revision: str | None = None
    """``model.model.text_encoder_revision`` (t5)."""
    batch_size: int = 64
    """Captions per encoder call."""
    device: str = "cpu"
    """Where the encoder runs (``cpu``, ``cuda``, ...)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shards = Path(self.shards)
        if self.text_ctx < 1 or self.batch_size < 1:
            raise RecipeError(f"--text_ctx and --batch_size must be >= 1, got {self.text_ctx} and {self.batch_size}")

    def run(self) -> dict[str, Any]:
        """Embed the captions of the dataset in ``shards`` into ``out``; returns the written manifest.

        Raises:
            RecipeError: no shards in ``shards``, ``out`` is ``shards``, holds files (without ``overwrite``) or is
                busy, or a shard is not a readable tar archive.
        """
        from glide_lightning.data.tokenizers import build_tokenizer, tokenizer_files
        from glide_lightning.models.encoders import encoder_identity, load_text_encoder

        shards, out, device = self.shards, self.out, self.device
        if not shards.is_dir() or not any(shards.glob("*.tar")):
            raise RecipeError(f"--shards {shards} holds no shards: pass a directory a data recipe wrote")
        if out.resolve() == shards.resolve():
            raise RecipeError(f"--out {out} is --shards: the embedded copy needs a directory of its own")
        for path in _shard_paths(shards, _source_manifest(shards)):  # before the encoder is loaded
            if not path.is_file():
                raise RecipeError(f"shard {path} listed in {shards / MANIFEST_NAME} does not exist: write the shards "
                                  f"again with a data recipe")
            if not tarfile.is_tarfile(path):
                raise RecipeError(f"shard {path} is not a tar archive (damaged or not a shard): write the shards "
                                  f"again with a data recipe")
        prepare_out_dir(out, self.overwrite)
        try:
            encoder = load_text_encoder(self.text_encoder, self.text_encoder_name,
                                        pretrained=self.text_encoder_pretrained,
                                        revision=self.text_encoder_revision).to(torch.device(device))
            tokenizer = build_tokenizer(self.text_encoder, self.text_ctx,
                                        **tokenizer_files(self.text_encoder, path=self.text_encoder_name,
                                                          revision=self.text_encoder_revision))
            identity = encoder_identity(self.text_encoder, self.text_encoder_name,
                                        pretrained=self.text_encoder_pretrained, revision=self.text_encoder_revision)

            def encode(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return encoder(tokens.to(device), mask.to(device)).cpu()

            return embed_shards(shards, out, encode, tokenizer, identity, batch_size=self.batch_size)
        finally:
            release_lock(out)


RECIPE = Embed


def build(shards: Path, out: Path, **options: Any) -> dict[str, Any]:
    """:class:`Embed` (its fields are the options) of ``shards`` written to ``out``; returns the manifest."""
    return Embed(shards=shards, out=out, **options).run()


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
    manifest = _source_manifest(source)
    out.mkdir(parents=True, exist_ok=True)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            writer = _ShardFile(out, shard["name"])
            try:
                samples = _readable(iter_shard(str(source / shard["name"])), source / shard["name"])
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


def _source_manifest(source: Path) -> dict[str, Any]:
    """The manifest of the recipe output ``source`` (its ``manifest.json``; without one, the splits its shard names
    say, ``{split}-{index:06d}.tar``)."""
    manifest_path = source / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not isinstance(manifest.get("splits"), dict):
                raise ValueError("it has no 'splits'")
            _shard_paths(source, manifest)  # its shape
        except (ValueError, AttributeError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise RecipeError(f"{manifest_path} is not a recipe's manifest ({type(error).__name__}: {error}): write "
                              f"the shards again with a data recipe") from None
        return manifest
    manifest = {"splits": {}}
    for path in sorted(source.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        split = path.name.rsplit("-", 1)[0]
        manifest["splits"].setdefault(split, {"shards": []})["shards"].append({"name": path.name})
    if not manifest["splits"]:
        raise FileNotFoundError(f"{source} holds neither {MANIFEST_NAME} nor {{split}}-NNNNNN.tar shards")
    return manifest


def _shard_paths(source: Path, manifest: dict[str, Any]) -> list[Path]:
    return [source / shard["name"] for entry in manifest["splits"].values() for shard in entry["shards"]]


def _readable(samples: Iterator[Any], path: Path) -> Iterator[dict[str, Any]]:
    """The samples of a shard; a read failure after some samples is logged (the samples before it are kept), one
    before any (a missing file, or not a tar archive) is a :class:`RecipeError`."""
    read = 0
    for sample in samples:
        if isinstance(sample, ShardError):
            if not read:
                raise RecipeError(f"shard {path} is not a readable tar archive ({sample.error}): write the shards "
                                  f"again with a data recipe")
            log.warning("shard %s: %s (samples after %s lost)", sample.url, sample.error, sample.key)
        else:
            read += 1
            yield sample
