"""Held-out synthetic captions and their reference images, as the synthetic recipe writes them for ``fid``."""

from __future__ import annotations

from pathlib import Path

from glide_lightning.data.synthetic import synthetic_samples


def write_held_out(root: Path, n: int, image_size: int) -> tuple[Path, Path, list[str]]:
    """``root/reference/<key>.png`` (the first ``n`` val samples at ``image_size`` px) and ``root/captions.txt``
    (their captions, a line each); returns the reference folder, the captions file and the captions."""
    reference = root / "reference"
    reference.mkdir(parents=True)
    captions = []
    for sample in synthetic_samples(0, n, split="val", image_size=image_size):
        sample.image.save(reference / f"{sample.key}.png")
        captions.append(sample.caption)
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    return reference, root / "captions.txt", captions
