"""Make ``reports/edit_example.png``: an edit, made on a CPU with a briefly trained inpainting model, side by side
with its input. Runs ``python -m glide_lightning sample`` three times (two prompts, then the first result edited
again: a chained edit) and writes one row: picture | mask | edit 1 | edit 2 | edit 1 edited again, each
upscaled 4x (nearest) so the 16 px images can be seen.

    python scripts/edit_example.py --ckpt runs/smoke_inpaint/checkpoints/last.ckpt

The picture is a held-out synthetic scene at the model's size (so the kept pixels equal it exactly), the mask
a white rectangle over one of its objects (white = regenerate), each prompt the scene's caption with another
object in its place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glide_lightning.commands import main as glide
from glide_lightning.data.synthetic import synthetic_samples
from glide_lightning.sampling import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="an inpainting checkpoint (model.kind: inpaint)")
    parser.add_argument("--work", default="edit_example", help="folder of the inputs and the sample outputs")
    parser.add_argument("--out", default="reports/edit_example.png")
    # the held-out scene is "a small black triangle left of a large blue triangle": the mask erases the large
    # triangle (the right half) and each prompt is the scene's caption with another object there
    parser.add_argument("--prompts", nargs=3, default=["a small black triangle left of a large red circle",
                                                        "a small black triangle left of a large green square",
                                                        "a small black triangle left of a large yellow triangle"])
    parser.add_argument("--mask-box", nargs=4, type=float, default=[0.45, 0.0, 1.0, 1.0],
                        metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                        help="the white (regenerated) rectangle, in fractions of the image's width and height")
    parser.add_argument("--steps", default="50")
    args = parser.parse_args()
    size = load_checkpoint(args.ckpt).image_size
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scene = next(iter(synthetic_samples(7, 1, split="val", image_size=size)))
    scene.image.convert("RGB").save(work / "photo.png")
    mask = np.zeros((size, size), np.uint8)
    left, top, right, bottom = (round(f * size) for f in args.mask_box)
    mask[top:bottom, left:right] = 255
    Image.fromarray(mask).save(work / "mask.png")
    common = ["--ckpt", args.ckpt, "--mask", str(work / "mask.png"), "--sampling.steps", args.steps, "--seed", "1"]
    results = []
    for i, (source, prompt) in enumerate([(work / "photo.png", args.prompts[0]), (work / "photo.png", args.prompts[1]),
                                         (work / "edit0/0000.png", args.prompts[2])]):
        glide(["sample", *common, "--inpaint-image", str(source), "--prompt", prompt, "--out", str(work / f"edit{i}")])
        results.append(np.array(Image.open(work / f"edit{i}/0000.png").convert("RGB")))
    row = [np.array(Image.open(work / "photo.png").convert("RGB")), np.repeat(mask[..., None], 3, axis=2), *results]
    strip = torch.from_numpy(np.concatenate(row, axis=1))
    big = strip.repeat_interleave(4, 0).repeat_interleave(4, 1).numpy()  # nearest 4x
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(big).save(args.out, optimize=True)
    print(f"{args.out}: picture ({scene.caption!r}) | mask | " + " | ".join(repr(p) for p in args.prompts[:2])
          + f" | edit 1 edited again with {args.prompts[2]!r}")


if __name__ == "__main__":
    main()
