"""mscoco: MS-COCO captions (2014 or 2017) → training shards + a zero-shot FID caption/reference set.

Input layout (--coco_dir ROOT; image folders may also sit under ROOT/images/):
  2014: ROOT/annotations/captions_train2014.json, captions_val2014.json,
        ROOT/train2014/COCO_train2014_000000xxxxxx.jpg, ROOT/val2014/COCO_val2014_000000xxxxxx.jpg
  2017: ROOT/annotations/captions_train2017.json, captions_val2017.json,
        ROOT/train2017/000000xxxxxx.jpg, ROOT/val2017/000000xxxxxx.jpg
  --year is detected from the annotation files when only one year is present.

Output in --out:
  train-*.tar   from the train split: one sample per image-caption pair (key
                <image_id:012d>_<annotation_id>), or --captions_per_image N random captions per
                image; image order shuffled with --seed; RGB JPEG, txt, json {source_id, image_id,
                file_name, original_size, size}. Images are NOT EXIF-rotated (COCO's captions and
                the usual FID references use the stored pixel orientation).
  val-*.tar     --val_images images of the val split with one caption each (for validation loss).
  fid_captions.txt        zero-shot FID prompts from the val split: --fid_n captions (default
                          30000, as in GLIDE), one line each, one per distinct image, images and
                          captions drawn with --seed (deterministic).
  fid_reference/NNNNNN.png  the matching reference images, line i ↔ fid_reference/{i:06d}.png:
                          RGB, largest centred square crop (side min(w, h), left (w-side)//2,
                          top (h-side)//2), resized to --fid_resolution² with PIL BICUBIC (antialiased).
  fid_reference.jsonl     per line: index, image_id, file_name, caption.
  manifest.json           also records the FID set and its exact preprocessing.
  The val set of 2017 has 5000 images: a larger --fid_n is reduced to what exists (with a warning).

Examples:
  python -m glide_lightning data mscoco --coco_dir /data/coco --year 2014 --out data/coco64 --max_size 128 \\
      --workers 2
  python -m glide_lightning data mscoco --coco_dir /data/coco --out data/coco --captions_per_image 1 --fid_n 5000
"""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from data_recipes.common import (
    ImageRecipe,
    RecipeError,
    SkipCounter,
    check_out_dir,
    clean_caption,
    finish,
    log,
    prepare_out_dir,
    require_dir,
)
from data_recipes.images import Entry, ImageFailure, ImageOptions, ordered_map, write_entries
from glide_lightning.data.images import to_rgb
from glide_lightning.data.shards import Manifest, sha256_file

NAME = "mscoco"
Year = Literal["2014", "2017"]
FID_PREPROCESSING = (
    "decode with PIL, convert to RGB, no EXIF rotation; crop the largest centred square (side = min(w, h), "
    "left = (w - side) // 2, top = (h - side) // 2); resize to resolution x resolution with PIL "
    "Image.Resampling.BICUBIC (antialiased); save as PNG"
)


def _detect_year(ann_dir: Path, year: str | None) -> Year:
    present = [y for y in ("2014", "2017") if (ann_dir / f"captions_train{y}.json").is_file()]
    if year is not None:
        if year not in present:
            found = f"annotations found for {present}" if present else "no annotations found"
            raise RecipeError(f"{ann_dir / f'captions_train{year}.json'} not found ({found})")
        return year  # type: ignore[return-value]
    if not present:
        raise RecipeError(
            f"no captions_train2014.json or captions_train2017.json in {ann_dir}; expected the COCO layout "
            "ROOT/annotations/captions_train2014.json (see --help)"
        )
    if len(present) > 1:
        raise RecipeError(f"both 2014 and 2017 annotations are in {ann_dir}: choose one with --year")
    return present[0]  # type: ignore[return-value]


def _image_dir(root: Path, name: str) -> Path:
    for cand in (root / name, root / "images" / name):
        if cand.is_dir():
            return cand
    raise RecipeError(f"image folder {name}/ not found: tried {root / name} and {root / 'images' / name}")


def _load_split(ann_path: Path, skips: SkipCounter) -> list[tuple[int, str, list[tuple[int, str]]]]:
    """``[(image_id, file_name, [(annotation_id, caption), ...]), ...]`` sorted by image id."""
    if not ann_path.is_file():
        raise RecipeError(f"annotation file {ann_path} not found")
    try:
        doc = json.loads(ann_path.read_text(encoding="utf-8"))
        images = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
        caps: dict[int, list[tuple[int, str]]] = {}
        for ann in doc["annotations"]:
            text = clean_caption(ann.get("caption"))
            if text:
                caps.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), text))
            else:
                skips.add("empty caption", f"annotation {ann.get('id')}")
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"{ann_path} is not a COCO captions file ({type(e).__name__}: {e})") from e
    out = []
    for image_id in sorted(images):
        if image_id not in caps:
            skips.add("no caption", images[image_id])
            continue
        out.append((image_id, images[image_id], sorted(caps[image_id])))
    return out


def _existing(
    items: list[tuple[int, str, list[tuple[int, str]]]], image_dir: Path, skips: SkipCounter
) -> list[tuple[int, str, list[tuple[int, str]]]]:
    kept = []
    for item in items:
        if (image_dir / item[1]).is_file():
            kept.append(item)
        else:
            skips.add("missing image", item[1], f"not in {image_dir}")
    return kept


def _fid_image(resolution: int, path: Path) -> bytes | ImageFailure:
    """The FID reference PNG of ``path`` (see ``FID_PREPROCESSING``)."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
        w, h = rgb.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        square = rgb.crop((left, top, left + side, top + side))
        buf = io.BytesIO()
        square.resize((resolution, resolution), Image.Resampling.BICUBIC).save(buf, format="PNG")
        return buf.getvalue()
    except Exception as e:  # noqa: BLE001 - a broken image is skipped, never fatal
        return ImageFailure("unreadable image", f"{type(e).__name__}: {e}")


def _write_fid(
    out: Path,
    items: list[tuple[int, str, list[tuple[int, str]]]],
    image_dir: Path,
    n: int,
    resolution: int,
    seed: int,
    workers: int,
    skips: SkipCounter,
) -> dict[str, Any]:
    ref_dir = out / "fid_reference"
    if ref_dir.exists():
        shutil.rmtree(ref_dir)
    ref_dir.mkdir()
    records: list[dict[str, Any]] = []
    results = ordered_map(partial(_fid_image, resolution), (image_dir / it[1] for it in items), workers)
    for (image_id, file_name, caps), result in zip(items, results):
        if isinstance(result, ImageFailure):
            skips.add(f"FID {result.reason}", file_name, result.detail)
            continue
        caption = random.Random(f"{seed}-fid-{image_id}").choice(caps)[1]
        (ref_dir / f"{len(records):06d}.png").write_bytes(result)
        records.append({"index": len(records), "image_id": image_id, "file_name": file_name, "caption": caption})
        if len(records) == n:
            break
    captions_path = out / "fid_captions.txt"
    captions_path.write_text("".join(r["caption"] + "\n" for r in records), encoding="utf-8")
    (out / "fid_reference.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    if len(records) < n:
        log.warning("FID set has %d images, fewer than --fid_n %d (not enough readable val images)", len(records), n)
    log.info("FID: %d captions in %s, references in %s/", len(records), captions_path.name, ref_dir.name)
    return {
        "n": len(records),
        "captions_file": captions_path.name,
        "captions_sha256": sha256_file(captions_path),
        "reference_dir": ref_dir.name,
        "reference_index": "fid_reference.jsonl",
        "resolution": resolution,
        "preprocessing": FID_PREPROCESSING,
        "selection": "val images shuffled with random.Random(f'{seed}-fid'), first n readable; caption per image "
        "random.Random(f'{seed}-fid-{image_id}').choice(captions sorted by annotation id)",
    }


@dataclass(kw_only=True)
class MSCOCO(ImageRecipe):
    """MS-COCO 2014/2017 captions: train shards and the zero-shot FID captions and reference images."""

    NAME = NAME
    coco_dir: Path
    """COCO root (holds annotations/ and train2014/, val2014/ or their 2017 folders)."""
    year: Year | None = None
    """2014 or 2017 (default: the year whose annotation files are present)."""
    captions_per_image: int | Literal["all"] = "all"
    """``all``: one sample per image-caption pair; N: N random captions per image."""
    max_train_images: int | None = None
    """A random subset of this many train images (default: all)."""
    val_images: int = 1000
    """Val-split images written as val shards (one caption each, for the validation loss)."""
    fid_n: int = 30000
    """FID captions and reference images, as in GLIDE (0: none)."""
    fid_resolution: int = 256
    """Side of the FID reference images in pixels."""
    seed: int = 0
    """Seed of the sample order, the caption choice and the FID subset."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.coco_dir = Path(self.coco_dir)
        cpi = self.captions_per_image
        if cpi is None:  # (Python callers) the same as "all"
            self.captions_per_image = "all"
        elif cpi != "all" and (not isinstance(cpi, int) or cpi < 1):
            raise RecipeError(f"--captions_per_image must be 'all' or >= 1, got {cpi!r}")
        if min(self.val_images, self.fid_n) < 0 or self.fid_resolution < 1 or (
                self.max_train_images is not None and self.max_train_images < 1):
            raise RecipeError("--val_images and --fid_n must be >= 0, --fid_resolution and --max_train_images >= 1")

    def run(self) -> Manifest:
        """Shard COCO's train captions into ``out`` and write the zero-shot FID set from its val split."""
        out, seed, val_images, fid_n = self.out, self.seed, self.val_images, self.fid_n
        captions_per_image = None if self.captions_per_image == "all" else int(self.captions_per_image)
        root = require_dir(self.coco_dir, "--coco_dir", "it should contain annotations/ and train2014/ (or 2017)")
        ann_dir = require_dir(root / "annotations", "annotations folder")
        year = _detect_year(ann_dir, None if self.year is None else str(self.year))
        check_out_dir(out, self.overwrite)
        skips = SkipCounter()

        train_dir = _image_dir(root, f"train{year}")
        train = _existing(_load_split(ann_dir / f"captions_train{year}.json", skips), train_dir, skips)
        random.Random(seed).shuffle(train)
        if self.max_train_images is not None:
            train = train[:self.max_train_images]
        train_entries = []
        for image_id, file_name, caps in train:
            if captions_per_image is not None and captions_per_image < len(caps):
                caps = sorted(random.Random(f"{seed}-captions-{image_id}").sample(caps, captions_per_image))
            keyed = tuple((f"{image_id:012d}_{ann_id}", text) for ann_id, text in caps)
            meta = {"image_id": image_id, "file_name": file_name, "coco_split": f"train{year}"}
            train_entries.append(Entry(train_dir / file_name, file_name, keyed, meta))
        if not train_entries:
            raise RecipeError(f"no usable training images in {train_dir} ({dict(skips.counts)})")

        val: list[tuple[int, str, list[tuple[int, str]]]] = []
        val_dir = None
        if val_images or fid_n:
            val_dir = _image_dir(root, f"val{year}")
            val = _existing(_load_split(ann_dir / f"captions_val{year}.json", skips), val_dir, skips)
            random.Random(f"{seed}-fid").shuffle(val)
        val_entries = []
        for image_id, file_name, caps in val[:val_images]:
            ann_id, text = random.Random(f"{seed}-fid-{image_id}").choice(caps)
            meta = {"image_id": image_id, "file_name": file_name, "coco_split": f"val{year}"}
            assert val_dir is not None
            val_entries.append(Entry(val_dir / file_name, file_name, ((f"{image_id:012d}_{ann_id}", text),), meta))

        prepare_out_dir(out, self.overwrite)
        opts = ImageOptions(image_format="jpg", max_size=self.max_size, exif_transpose=False, reencode=self.reencode)
        checks = self.checks()
        splits = write_entries(out, {"train": train_entries, "val": val_entries}, opts, skips, workers=self.workers,
                               max_per_shard=self.max_per_shard, checks=checks)
        extra: dict[str, Any] = {"preprocessing": opts.to_dict(), "coco_year": year}
        if fid_n:
            if fid_n > len(val):
                log.warning("--fid_n %d exceeds the %d usable val%s images: using all of them", fid_n, len(val), year)
            assert val_dir is not None
            extra["fid"] = _write_fid(out, val, val_dir, min(fid_n, len(val)), self.fid_resolution, seed,
                                      self.workers, skips)
            extra["fid"].update(source=f"val{year}", requested_n=fid_n)
        return finish(out, NAME, {**self.options(), "year": year}, splits, skips, extra, checks)


RECIPE = MSCOCO


def build(out: Path, **options: Any) -> Manifest:
    """:class:`MSCOCO` (its fields are the options) written to ``out``; returns the manifest."""
    return MSCOCO(out=out, **options).run()
