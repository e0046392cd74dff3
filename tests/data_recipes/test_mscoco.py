"""The mscoco recipe on a tiny COCO tree in the real 2014 / 2017 layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from recipe_helpers import check_manifest, corrupt_file, data_cli, read_split, save_image, shard_bytes

from data_recipes.common import RecipeError
from data_recipes.mscoco import build


def make_coco(root: Path, year: str = "2014", n_train: int = 5, n_val: int = 6) -> dict[str, dict[int, list[str]]]:
    """``annotations/captions_{split}{year}.json`` + images; returns captions by split and image id."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    captions: dict[str, dict[int, list[str]]] = {}
    ann_id = 100
    for split, n, base in (("train", n_train, 10), ("val", n_val, 500)):
        images, anns = [], []
        captions[split] = {}
        for k in range(n):
            image_id = base + k
            name = f"COCO_{split}{year}_{image_id:012d}.jpg" if year == "2014" else f"{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "width": 48, "height": 32})
            size = (48, 32) if k % 2 else (30, 50)  # landscape and portrait
            save_image(root / f"{split}{year}" / name, size, colour=(k * 40, 90, 20))
            texts = [f"{split} image {image_id} caption {j}" for j in range(3 + k % 3)]
            captions[split][image_id] = texts
            for t in texts:
                anns.append({"id": ann_id, "image_id": image_id, "caption": f"  {t}\n"})
                ann_id += 1
        doc = {"info": {}, "licenses": [], "images": images, "annotations": anns}
        (root / "annotations" / f"captions_{split}{year}.json").write_text(json.dumps(doc))
    return captions


def test_coco_2014_all_pairs_val_and_fid(tmp_path):
    coco = tmp_path / "coco"
    caps = make_coco(coco)
    corrupt_file(coco / "train2014" / "COCO_train2014_000000000012.jpg")
    (coco / "train2014" / "COCO_train2014_000000000013.jpg").unlink()
    out = tmp_path / "out"
    manifest = build(out, coco_dir=coco, fid_n=4, fid_resolution=16, val_images=2, max_per_shard=4)
    doc = check_manifest(out)
    train = read_split(out, "train")
    usable = {i: c for i, c in caps["train"].items() if i not in (12, 13)}
    assert sorted(s["txt"] for s in train) == sorted(t for c in usable.values() for t in c)  # every pair
    assert len({s["__key__"] for s in train}) == len(train)
    for s in train:
        assert s["jpg"].mode == "RGB" and list(s["jpg"].size) == s["json"]["original_size"]
        assert s["txt"] in caps["train"][s["json"]["image_id"]]
    assert {r: v["count"] for r, v in doc["skipped"]["reasons"].items()} == {"missing image": 1, "unreadable image": 1}
    assert manifest.splits["val"].num_samples == 2 and doc["coco_year"] == "2014"

    lines = (out / "fid_captions.txt").read_text().splitlines()
    index = [json.loads(x) for x in (out / "fid_reference.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and [r["caption"] for r in index] == lines
    assert len({r["image_id"] for r in index}) == 4  # one caption per distinct image
    assert all(r["caption"] in caps["val"][r["image_id"]] for r in index)
    pngs = sorted((out / "fid_reference").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(4)]
    for p, r in zip(pngs, index):
        ref = Image.open(p)
        assert ref.mode == "RGB" and ref.size == (16, 16)
        src = Image.open(coco / "val2014" / r["file_name"]).convert("RGB")
        side = min(src.size)
        left, top = (src.size[0] - side) // 2, (src.size[1] - side) // 2
        expected = src.crop((left, top, left + side, top + side)).resize((16, 16), Image.Resampling.BICUBIC)
        assert np.array_equal(np.array(ref), np.array(expected))
    fid = doc["fid"]
    assert fid["n"] == 4 and fid["resolution"] == 16 and "centred square" in fid["preprocessing"]
    assert fid["source"] == "val2014" and "BICUBIC" in fid["preprocessing"]


def test_captions_per_image_seed_and_determinism(tmp_path):
    coco = tmp_path / "coco"
    caps = make_coco(coco, n_train=4, n_val=5)
    kw = {"coco_dir": coco, "captions_per_image": 1, "fid_n": 3, "fid_resolution": 8, "val_images": 0}
    build(tmp_path / "a", seed=0, **kw)
    build(tmp_path / "b", seed=0, **kw)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert (tmp_path / "a/fid_captions.txt").read_bytes() == (tmp_path / "b/fid_captions.txt").read_bytes()
    train = read_split(tmp_path / "a", "train")
    assert len(train) == 4 and {s["json"]["image_id"] for s in train} == set(caps["train"])
    picks = {
        seed: tuple((tmp_path / f"s{seed}").joinpath("fid_captions.txt").read_text().splitlines())
        for seed in range(4)
        if build(tmp_path / f"s{seed}", seed=seed, **kw)
    }
    assert len(set(picks.values())) > 1  # the seed chooses the FID images / captions


def test_coco_2017_layout_and_fid_n_larger_than_val(tmp_path):
    coco = tmp_path / "coco2017"
    make_coco(coco, year="2017", n_train=2, n_val=3)
    # images under ROOT/images/ also work
    (coco / "images").mkdir()
    (coco / "val2017").rename(coco / "images" / "val2017")
    manifest = build(tmp_path / "out", coco_dir=coco, fid_n=30000, fid_resolution=8, val_images=1)
    assert manifest.extra["coco_year"] == "2017" and manifest.extra["fid"]["n"] == 3
    assert manifest.extra["fid"]["requested_n"] == 30000 and manifest.args["fid_n"] == 30000
    assert len(list((tmp_path / "out" / "fid_reference").iterdir())) == 3
    assert all(s["json"]["file_name"].startswith("0000") for s in read_split(tmp_path / "out", "train"))


def test_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="--coco_dir .* does not exist"):
        build(tmp_path / "o", coco_dir=tmp_path / "nope")
    (tmp_path / "c" / "annotations").mkdir(parents=True)
    with pytest.raises(RecipeError, match="no captions_train2014.json or captions_train2017.json"):
        build(tmp_path / "o", coco_dir=tmp_path / "c")
    make_coco(tmp_path / "c", year="2014", n_train=1, n_val=1)
    make_coco(tmp_path / "c", year="2017", n_train=1, n_val=1)
    with pytest.raises(RecipeError, match="choose one with --year"):
        build(tmp_path / "o", coco_dir=tmp_path / "c")
    (tmp_path / "c" / "annotations" / "captions_train2014.json").write_text("{}")
    with pytest.raises(RecipeError, match="is not a COCO captions file"):
        build(tmp_path / "o", coco_dir=tmp_path / "c", year="2014")


def test_cli_wiring(tmp_path):
    make_coco(tmp_path / "coco", n_train=2, n_val=2)
    argv = ["mscoco", "--coco_dir", str(tmp_path / "coco"), "--out", str(tmp_path / "o"), "--captions_per_image", "2",
            "--fid_n", "2", "--fid_resolution", "8", "--val_images", "1", "--seed", "1"]  # fmt: skip
    assert data_cli(*argv) == 0
    doc = check_manifest(tmp_path / "o")
    assert doc["splits"]["train"]["num_samples"] == 4 and doc["args"]["captions_per_image"] == 2


def test_captions_per_image_flag_validation(capsys):
    from glide_lightning.commands import parse

    base = ["data", "mscoco", "--coco_dir", "coco", "--out", "o", "--captions_per_image"]
    assert parse([*base, "all"]).captions_per_image == "all" and parse([*base, "3"]).captions_per_image == 3
    for bad in ("0", "some"):
        with pytest.raises(SystemExit) as done:
            parse([*base, bad])
        assert done.value.code == 2 and "captions_per_image" in capsys.readouterr().err
