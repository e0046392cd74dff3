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
from pathlib import Path
from typing import Any

import torch

from data_recipes.common import RecipeError, prepare_out_dir
from glide_lightning.locks import release_lock

SUMMARY = "add a frozen text encoder's caption embeddings (fp16, mask, encoder name) to a recipe's shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of this recipe."""
    parser.add_argument("--shards", type=Path, required=True, help="directory a recipe wrote (shards + manifest.json)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the embedded shards")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
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
        RecipeError: no shards in ``shards``, ``out`` holds a dataset (without ``overwrite``) or is busy.
    """
    from glide_lightning.data.embeddings import embed_shards
    from glide_lightning.data.tokenizers import build_tokenizer, tokenizer_files
    from glide_lightning.models.encoders import encoder_identity, load_text_encoder

    if not shards.is_dir() or not any(shards.glob("*.tar")):
        raise RecipeError(f"--shards {shards} holds no shards: pass a directory a data recipe wrote")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """CLI entry point."""
    return build(args.shards, args.out, text_encoder=args.text_encoder, text_encoder_name=args.text_encoder_name,
                 text_ctx=args.text_ctx, text_encoder_pretrained=args.text_encoder_pretrained,
                 text_encoder_revision=args.text_encoder_revision, batch_size=args.batch_size, device=args.device,
                 overwrite=args.overwrite)
