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
  python -m glide_lightning data synthetic --out data/shapes64 --train 10000 --val 500 --image_size 64 --seed 0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_recipes.common import RecipeError, ShardRecipe, finish, log, prepare_out_dir
from glide_lightning.data.shards import Manifest, write_shards
from glide_lightning.data.synthetic import MIN_IMAGE_SIZE, synthetic_samples

NAME = "synthetic"


@dataclass(kw_only=True)
class Synthetic(ShardRecipe):
    """Generated coloured shapes with compositional captions (the default smoke/CI dataset)."""

    NAME = NAME
    train: int = 10000
    """Training samples."""
    val: int = 500
    """Validation samples (0: no val split, and no FID captions and references)."""
    image_size: int = 64
    """Image side in pixels."""
    seed: int = 0
    """Dataset seed: sample i of a split is the same on every machine."""
    two_object_prob: float = 0.5
    """Share of two-object scenes, with a relation ("above", "left of", ...)."""
    antialias: bool = True
    """Smooth edges (4x supersampling); false: hard edges."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train < 1 or self.val < 0:
            raise RecipeError(f"--train must be >= 1 and --val >= 0, got --train {self.train} --val {self.val}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise RecipeError(f"--image_size must be >= {MIN_IMAGE_SIZE} (shapes get unrecognisable), got "
                              f"{self.image_size}")
        if not 0.0 <= self.two_object_prob <= 1.0:
            raise RecipeError(f"--two_object_prob must be in [0, 1], got {self.two_object_prob}")

    def run(self) -> Manifest:
        """Write the synthetic dataset to ``out`` and return its manifest."""
        out, seed = self.out, self.seed
        prepare_out_dir(out, self.overwrite)
        opts = {"image_size": self.image_size, "antialias": self.antialias, "two_object_prob": self.two_object_prob}
        splits = []
        for split, count in (("train", self.train), ("val", self.val)):
            if count:
                log.info("rendering %d %s samples (seed %d, %d px)", count, split, seed, self.image_size)
                samples = synthetic_samples(seed, count, split=split, **opts)
                splits.append(write_shards(samples, out, split, max_per_shard=self.max_per_shard, image_format="png"))
        if self.val:  # the held-out captions and images for `make fid EXP=smoke`, as the mscoco recipe writes them
            reference = out / "fid_reference"
            reference.mkdir(exist_ok=True)
            captions = []
            for i, sample in enumerate(synthetic_samples(seed, self.val, split="val", **opts)):
                sample.image.save(reference / f"{i:06d}.png")
                captions.append(sample.caption)
            (out / "fid_captions.txt").write_text("\n".join(captions) + "\n")
        return finish(out, NAME, self.options(), splits)


RECIPE = Synthetic


def build(out: Path, **options: Any) -> Manifest:
    """:class:`Synthetic` (its fields are the options) written to ``out``; returns the manifest."""
    return Synthetic(out=out, **options).run()
