"""How fast the framework's presets learn their captions on this machine (issue 13): ``make bench-learning``.

Two measurements, each through the commands a user runs, written with the machine's description and the
commands to ``bench/learning.json`` (``--out``):

1. **smoke** — ``glide_lightning fit --config experiments/smoke.yaml`` from scratch (its own step budget),
   then ``glide_lightning fid`` on the held-out synthetic captions at guidance 1 and 3 (random-feature
   FID, labelled NOT a real FID, and text adherence: the fraction of caption attributes the
   deterministic checker of :mod:`glide_lightning.evaluation.adherence` finds in the images).
   Targets: adherence ≥ 0.6 at guidance 3 after at most 15 minutes of training (the run's
   ``train/wall_time_s``), and adherence at guidance 3 above guidance 1.
2. **grayscale** — a folder of grayscale pictures with sidecar captions (the synthetic scenes converted
   to 8-bit gray: a stand-in for any grayscale collection) is made into shards by the ``folder``
   recipe, the laptop experiment (``experiments/laptop_folder.yaml``) trains on them, and
   ``glide_lightning sample`` draws images for held-out captions at guidance 3. The mean channel spread
   (per pixel, the largest minus the smallest of R, G, B, in 8-bit levels, averaged over pixels and
   images) of the samples is compared with that of the training images as stored in the shards.
   Target: within 2x of the data's; since exactly gray data has a spread of 0 (JPEG keeps R = G = B), the
   data's spread is floored at one 8-bit level (``SPREAD_FLOOR``), below which a channel difference
   is invisible.

Everything runs in ``--work`` (default ``runs/bench_learning``, emptied first). This is a benchmark, not
a test: it takes about 35 minutes on a 2-core CPU and its figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SMOKE_TARGET_ADHERENCE = 0.6
SMOKE_TARGET_MINUTES = 15.0
SPREAD_FLOOR = 1.0  # 8-bit levels: the data's channel spread used when it is below one level
SPREAD_TARGET_RATIO = 2.0


def run(command: list[str], log: Path) -> float:
    """Run ``command`` in the repository (output to ``log``); its wall time in seconds. Raises on failure."""
    print("$", " ".join(command), flush=True)
    start = time.monotonic()
    with log.open("w") as f:
        done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    return time.monotonic() - start


def last_logged(run_dir: Path, key: str) -> float | None:
    """The last value of ``key`` in the run's CSV metrics (all sessions)."""
    value = None
    for file in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with file.open() as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    value = float(row[key])
    return value


def channel_spread(images: np.ndarray) -> float:
    """Mean over pixels and images of max(R, G, B) − min(R, G, B), in 8-bit levels; ``images``: uint8
    ``[N, H, W, 3]``."""
    images = images.astype(np.int16)
    return float((images.max(axis=-1) - images.min(axis=-1)).mean())


def shard_images(shards: Path, size: int) -> np.ndarray:
    """The training images stored in ``shards/train-*.tar``, resized to ``size`` px (bicubic; the spread
    of gray images does not depend on the filter), uint8 ``[N, size, size, 3]``."""
    images = []
    for shard in sorted(shards.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".jpeg", ".png", ".webp")):
                    image = Image.open(BytesIO(tar.extractfile(member).read())).convert("RGB")
                    images.append(np.asarray(image.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(images)


def smoke(work: Path, n: int, extra: list[str]) -> dict[str, object]:
    py = sys.executable
    run_dir = work / "smoke"
    if not list((REPO / "data/synthetic").glob("train-*.tar")):
        run([py, "-m", "glide_lightning", "data", "synthetic", "--out", "data/synthetic"], work / "smoke_data.log")
    fit = [py, "-m", "glide_lightning", "fit", "--config", "experiments/smoke.yaml", "--run.root", str(work),
           "--run.name", "smoke", *extra]
    wall = run(fit, work / "smoke_fit.log")
    # the smoke experiment's own evaluation settings (experiments/eval/smoke.yaml, as `make fid EXP=smoke` reads them)
    fid = [py, "-m", "glide_lightning", "fid", "--config", str(REPO / "experiments/eval/smoke.yaml"),
           "--run_dir", str(run_dir), "--n", str(n), "--scales", "[1, 3]"]
    run(fid, work / "smoke_fid.log")
    results = {r["guidance_scale"]: r for path in run_dir.glob("fid/*/results.json")
               for r in json.loads(path.read_text())["results"]}
    minutes = (last_logged(run_dir, "train/wall_time_s") or wall) / 60
    adherence = {f"{s:g}": results[s]["adherence"] for s in sorted(results)}
    return {
        "commands": [" ".join(fit), " ".join(fid)],
        "steps": int(last_logged(run_dir, "step") or 0) + 1,  # logged 0-based
        "training_minutes": minutes,
        "adherence": adherence,
        "fid_random_features_NOT_a_real_FID": {f"{s:g}": results[s]["fid"]["fid"] for s in sorted(results)},
        "n_captions": n,
        "targets": {"adherence_at_3_min": SMOKE_TARGET_ADHERENCE, "training_minutes_max": SMOKE_TARGET_MINUTES},
        "met": adherence["3"] >= SMOKE_TARGET_ADHERENCE and minutes <= SMOKE_TARGET_MINUTES
        and adherence["3"] > adherence["1"],
    }


def grayscale(work: Path, count: int, n: int, extra: list[str]) -> dict[str, object]:
    from glide_lightning.data.synthetic import synthetic_samples

    py = sys.executable
    pictures, shards = work / "gray_pictures", work / "gray_shards"
    pictures.mkdir(parents=True)
    for sample in synthetic_samples(7, count, image_size=32):
        sample.image.convert("L").save(pictures / f"{sample.key}.png")
        (pictures / f"{sample.key}.txt").write_text(sample.caption)
    recipe = [py, "-m", "glide_lightning", "data", "folder", "--images", str(pictures), "--out", str(shards)]
    run(recipe, work / "gray_recipe.log")
    fit = [py, "-m", "glide_lightning", "fit", "--config", "experiments/laptop_folder.yaml", "--run.root", str(work),
           "--run.name", "gray", "--data.train_shards", f"{shards}/train-*.tar", *extra]
    run(fit, work / "gray_fit.log")
    captions = [s.caption for s in synthetic_samples(7, n, split="val", image_size=32)]
    out = work / "gray_samples"
    sample = [py, "-m", "glide_lightning", "sample", "--ckpt", str(work / "gray/checkpoints/last.ckpt"),
              "--out", str(out), "--sampling.steps", "25", "--prompts_file", str(work / "gray_prompts.txt")]
    (work / "gray_prompts.txt").write_text("\n".join(captions) + "\n")
    run(sample, work / "gray_sample.log")
    samples = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("[0-9]*.png"))])  # not grid.png
    size = samples.shape[1]
    data_spread = channel_spread(shard_images(shards, size))
    sample_spread = channel_spread(samples)
    return {
        "commands": [" ".join(recipe), " ".join(fit), " ".join(sample)],
        "training_images": count,
        "samples": len(samples),
        "image_size": size,
        "data_channel_spread_levels": data_spread,
        "sample_channel_spread_levels": sample_spread,
        "target": f"sample spread <= {SPREAD_TARGET_RATIO} x max(data spread, {SPREAD_FLOOR})",
        "met": sample_spread <= SPREAD_TARGET_RATIO * max(data_spread, SPREAD_FLOOR),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/learning.json", help="the JSON file to write")
    parser.add_argument("--work", default="runs/bench_learning", help="scratch directory (emptied first)")
    parser.add_argument("--n", type=int, default=64, help="held-out captions per guidance scale")
    parser.add_argument("--gray-images", type=int, default=1500, help="grayscale training pictures")
    parser.add_argument("--skip", choices=["smoke", "grayscale"], action="append", default=[],
                        help="leave out a part")
    parser.add_argument("--smoke-args", default="", help="extra fit arguments of the smoke run (split on spaces)")
    parser.add_argument("--gray-args", default="", help="extra fit arguments of the grayscale run")
    args = parser.parse_args(argv)
    work = (REPO / args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report: dict[str, object] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "cpus": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if "smoke" not in args.skip:
        report["smoke"] = smoke(work, args.n, args.smoke_args.split())
        out.write_text(json.dumps(report, indent=1))
        print(json.dumps(report["smoke"], indent=1), flush=True)
    if "grayscale" not in args.skip:
        report["grayscale"] = grayscale(work, args.gray_images, args.n, args.gray_args.split())
        print(json.dumps(report["grayscale"], indent=1), flush=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
