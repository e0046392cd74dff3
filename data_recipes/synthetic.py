"""synthetic: generated pictures of coloured shapes with compositional captions (no input needed).

Input:   none; everything comes from --seed.
Output:  train-000000.tar, … and val-000000.tar, … in --out, PNG images (lossless: colours are
         exact), captions like "a large green triangle" or "a small red circle above a large blue
         square", and per-sample json metadata holding the scene (objects with shape, colour,
         size, centre, and the relation) for text-adherence scoring; plus manifest.json.
         Sample i of a split is identical across runs and machines for a given seed
         (see glide_lightning.data.synthetic). With a val split, also fid_captions.txt and
         fid_reference/NNNNNN.png (the val captions and images) for zero-shot FID and adherence.

Example:
  python -m data_recipes synthetic --out data/shapes64 --train 10000 --val 500 --image-size 64 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_recipes.common import RecipeError, add_output_args, finish, log, prepare_out_dir
from glide_lightning.data.shards import Manifest, write_shards
from glide_lightning.data.synthetic import MIN_IMAGE_SIZE, synthetic_samples

NAME = "synthetic"
SUMMARY = "generated coloured shapes with compositional captions (default smoke/CI dataset)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of this recipe."""
    add_output_args(parser)
    parser.add_argument("--train", type=int, default=10000, help="training samples (default 10000)")
    parser.add_argument("--val", type=int, default=500, help="validation samples (default 500; 0: no val split)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument(
        "--two-object-prob", type=float, default=0.5, help="share of two-object scenes with a relation (default 0.5)"
    )
    parser.add_argument("--no-antialias", action="store_true", help="draw hard edges (no 4x supersampling)")


def build(
    out: Path,
    *,
    train: int = 10000,
    val: int = 500,
    image_size: int = 64,
    seed: int = 0,
    two_object_prob: float = 0.5,
    antialias: bool = True,
    max_per_shard: int = 1000,
    overwrite: bool = False,
) -> Manifest:
    """Write the synthetic dataset to ``out`` and return its manifest."""
    if max_per_shard < 1:
        raise RecipeError(f"--max-per-shard must be >= 1, got {max_per_shard}")
    if train < 1 or val < 0:
        raise RecipeError(f"--train must be >= 1 and --val >= 0, got --train {train} --val {val}")
    if image_size < MIN_IMAGE_SIZE:
        raise RecipeError(f"--image-size must be >= {MIN_IMAGE_SIZE} (shapes get unrecognisable), got {image_size}")
    if not 0.0 <= two_object_prob <= 1.0:
        raise RecipeError(f"--two-object-prob must be in [0, 1], got {two_object_prob}")
    prepare_out_dir(out, overwrite)
    opts = {"image_size": image_size, "antialias": antialias, "two_object_prob": two_object_prob}
    splits = []
    for split, count in (("train", train), ("val", val)):
        if count:
            log.info("rendering %d %s samples (seed %d, %d px)", count, split, seed, image_size)
            samples = synthetic_samples(seed, count, split=split, **opts)
            splits.append(write_shards(samples, out, split, max_per_shard=max_per_shard, image_format="png"))
    if val:  # the held-out captions and images for `make fid EXP=smoke`, as the mscoco recipe writes them
        reference = out / "fid_reference"
        reference.mkdir(exist_ok=True)
        captions = []
        for i, sample in enumerate(synthetic_samples(seed, val, split="val", **opts)):
            sample.image.save(reference / f"{i:06d}.png")
            captions.append(sample.caption)
        (out / "fid_captions.txt").write_text("\n".join(captions) + "\n")
    args = {"out": str(out), "train": train, "val": val, "seed": seed, "max_per_shard": max_per_shard, **opts}
    return finish(out, NAME, args, splits)


def run(args: argparse.Namespace) -> Manifest:
    """CLI entry point."""
    return build(
        args.out,
        train=args.train,
        val=args.val,
        image_size=args.image_size,
        seed=args.seed,
        two_object_prob=args.two_object_prob,
        antialias=not args.no_antialias,
        max_per_shard=args.max_per_shard,
        overwrite=args.overwrite,
    )
