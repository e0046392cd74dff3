"""The folder recipe: sidecar .txt, CSV and JSONL captions, every image mode, skipped inputs, splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from recipe_helpers import check_manifest, corrupt_file, data_cli, image_of, read_split, save_image, shard_bytes

from data_recipes.common import RecipeError, hash_split
from data_recipes.folder import build


def make_folder(root: Path) -> dict[str, str]:
    """Images in many modes with sidecar captions, plus a corrupt one and caption problems."""
    captions = {
        "rgb.jpg": "a red photo",
        "sub/gray.png": "a grey  picture\nover two lines",
        "rgba.png": "a see-through image",
        "sixteen.png": "a sixteen bit scan",
        "palette.gif": "a palette image",
        "cmyk.jpg": "a print proof",
        "rotated.jpg": "a rotated photo",
    }
    save_image(root / "rgb.jpg", (40, 30), quality=90)
    (root / "sub").mkdir(parents=True)
    Image.new("L", (20, 10), 77).save(root / "sub/gray.png")
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half fully transparent (black underneath)
    rgba.save(root / "rgba.png")
    Image.fromarray(np.full((12, 8), 257 * 200, np.uint16)).save(root / "sixteen.png")
    Image.new("RGB", (10, 10), (10, 200, 30)).convert("P").save(root / "palette.gif")
    Image.new("CMYK", (14, 9), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    save_image(root / "rotated.jpg", (30, 20), exif=exif.tobytes())
    for name, text in captions.items():
        (root / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    corrupt_file(root / "broken.jpg")
    (root / "broken.txt").write_text("never seen")
    save_image(root / "uncaptioned.png")
    save_image(root / "blank.png")
    (root / "blank.txt").write_text("  \n")
    (root / "notes.md").write_text("not an image")
    return {k: " ".join(v.split()) for k, v in captions.items()}


def test_sidecar_folder_every_mode_and_skips(tmp_path):
    expected = make_folder(tmp_path / "photos")
    out = tmp_path / "out"
    manifest = build(out, images=tmp_path / "photos", max_per_shard=3)
    doc = check_manifest(out)
    samples = read_split(out, "train")
    assert len(samples) == len(expected) == manifest.splits["train"].num_samples
    by_source = {s["json"]["source_id"]: s for s in samples}
    assert {k: s["txt"] for k, s in by_source.items()} == expected
    for s in samples:
        img = image_of(s)
        assert img.mode == "RGB" and list(img.size) == s["json"]["size"]
        if s["json"]["source_id"] != "rotated.jpg":
            assert s["json"]["size"] == s["json"]["original_size"]
    assert by_source["rotated.jpg"]["jpg"].size == (20, 30)  # EXIF orientation applied
    assert by_source["rotated.jpg"]["json"]["original_size"] == [30, 20]
    rgba = np.array(by_source["rgba.png"]["jpg"]).astype(float)
    assert rgba[:, :6].min() > 235 and rgba[:, 10:, 2].mean() > 230  # transparent -> white, opaque blue kept
    assert abs(np.array(by_source["sixteen.png"]["jpg"]).mean() - 200) < 3  # 16-bit scaled, not clipped
    red = np.array(by_source["cmyk.jpg"]["jpg"]).reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    skipped = doc["skipped"]["reasons"]
    assert doc["skipped"]["total"] == 3
    assert skipped["unreadable image"]["count"] == 1 and "broken.jpg" in skipped["unreadable image"]["examples"][0]
    assert skipped["no caption"]["count"] == 2
    assert doc["caption_source"] == "sidecar" and doc["preprocessing"]["exif_transpose"] is True


def test_rgb_jpeg_kept_byte_for_byte_unless_reencode(tmp_path):
    root = tmp_path / "p"
    src = save_image(root / "a.jpg", (24, 24), quality=70)
    (root / "a.txt").write_text("a thing")
    build(tmp_path / "keep", images=root)
    build(tmp_path / "re", images=root, reencode=True, max_per_shard=5)
    assert src.read_bytes() in shard_bytes(tmp_path / "keep")["train-000000.tar"]
    assert src.read_bytes() not in shard_bytes(tmp_path / "re")["train-000000.tar"]
    manifest = build(tmp_path / "small", images=root, max_size=12)
    assert image_of(read_split(tmp_path / "small", "train")[0]).size == (12, 12)
    assert manifest.extra["preprocessing"]["max_size"] == 12


def test_csv_and_jsonl_captions(tmp_path):
    root = tmp_path / "imgs"
    save_image(root / "a.jpg")
    save_image(root / "b.png", (20, 20))
    corrupt_file(root / "c.jpg")
    (tmp_path / "captions.csv").write_text(
        "file,caption,other\na.jpg,first caption of a,x\na.jpg,second caption of a,y\nb.png,\"b, with a comma\",z\n"
        "missing.jpg,ghost,w\nc.jpg,corrupt,v\nb.png,,u\n",
        encoding="utf-8",
    )
    out = tmp_path / "csv_out"
    build(out, csv=tmp_path / "captions.csv", images=root)
    doc = check_manifest(out)
    caps = sorted(s["txt"] for s in read_split(out, "train"))
    assert caps == ["b, with a comma", "first caption of a", "second caption of a"]
    assert {r: v["count"] for r, v in doc["skipped"]["reasons"].items()} == {
        "missing image": 1, "unreadable image": 1, "no caption": 1,
    }  # fmt: skip

    lines = [
        json.dumps({"path": "imgs/a.jpg", "text": "a from jsonl"}),
        "{not json",
        "",
        json.dumps({"path": "imgs/b.png", "text": "b from jsonl"}),
    ]
    (tmp_path / "meta.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "jsonl_out"
    build(out, jsonl=tmp_path / "meta.jsonl", image_key="path", caption_key="text")  # paths relative to the file
    doc = check_manifest(out)
    assert sorted(s["txt"] for s in read_split(out, "train")) == ["a from jsonl", "b from jsonl"]
    assert doc["skipped"]["reasons"]["bad jsonl line"]["count"] == 1


def test_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="--images directory .*nope does not exist"):
        build(tmp_path / "o", images=tmp_path / "nope")
    with pytest.raises(RecipeError, match="--csv file .*none.csv does not exist"):
        build(tmp_path / "o", csv=tmp_path / "none.csv")
    (tmp_path / "c.csv").write_text("image,text\na.jpg,x\n")
    with pytest.raises(RecipeError, match=r"no column 'file'; its columns are \['image', 'text'\]"):
        build(tmp_path / "o", csv=tmp_path / "c.csv")
    with pytest.raises(RecipeError, match="either --csv or --jsonl"):
        build(tmp_path / "o", csv=tmp_path / "c.csv", jsonl=tmp_path / "c.csv")
    (tmp_path / "j.jsonl").write_text('{"file": "a.jpg"}\n')
    with pytest.raises(RecipeError, match="has no key 'image'"):
        build(tmp_path / "o", jsonl=tmp_path / "j.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no usable image-caption pairs"):
        build(tmp_path / "o", images=tmp_path / "empty")
    with pytest.raises(RecipeError, match=r"--val_fraction must be in \[0, 1\)"):
        build(tmp_path / "o", images=tmp_path / "empty", val_fraction=1.5)


def test_val_split_by_file_name_hash_and_determinism(tmp_path):
    root = tmp_path / "many"
    for i in range(40):
        save_image(root / f"img{i:02d}.png", (8, 8), colour=(i * 6, 0, 0))
        (root / f"img{i:02d}.txt").write_text(f"image number {i}")
    a = build(tmp_path / "a", images=root, val_fraction=0.3, max_per_shard=7)
    build(tmp_path / "b", images=root, val_fraction=0.3, max_per_shard=7, workers=2)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")  # same input -> same bytes, any workers
    val = {s["json"]["source_id"] for s in read_split(tmp_path / "a", "val")}
    assert val == {f"img{i:02d}.png" for i in range(40) if hash_split(f"img{i:02d}.png", 0.3) == "val"}
    assert 4 <= len(val) <= 20 and a.splits["train"].num_samples + len(val) == 40
    order = [s["json"]["source_id"] for s in read_split(tmp_path / "a", "train")]
    assert order != sorted(order)  # shuffled with the seed


def test_all_inputs_unreadable_is_an_error_and_bad_sizes_are_rejected(tmp_path):
    root = tmp_path / "bad"
    corrupt_file(root / "x.jpg")
    (root / "x.txt").write_text("a caption")
    with pytest.raises(RecipeError, match="no sample could be written"):
        build(tmp_path / "o", images=root)
    assert not (tmp_path / "o" / "manifest.json").exists()
    save_image(root / "y.jpg")
    (root / "y.txt").write_text("another caption")
    with pytest.raises(RecipeError, match="--max_size must be >= 1"):
        build(tmp_path / "o2", images=root, max_size=0)
    with pytest.raises(RecipeError, match="--workers must be >= 1"):
        build(tmp_path / "o3", images=root, workers=0)


def test_cli_wiring(tmp_path):
    root = tmp_path / "imgs"
    save_image(root / "a.jpg")
    (tmp_path / "c.csv").write_text("path,text\na.jpg,hello there\n")
    argv = ["folder", "--csv", str(tmp_path / "c.csv"), "--images", str(root), "--image_col", "path",
            "--caption_col", "text", "--image_format", "png", "--max_size", "10", "--out", str(tmp_path / "o")]  # fmt: skip
    assert data_cli(*argv) == 0
    (sample,) = read_split(tmp_path / "o", "train")
    assert sample["txt"] == "hello there" and min(sample["png"].size) == 10


def test_manifest_records_native_and_stored_image_sizes(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    for i, (w, h) in enumerate([(8, 8), (10, 6), (12, 20), (40, 30)]):
        Image.new("RGB", (w, h), (i * 50, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image {i}")
    corrupt_file(root / "bad.png")
    (root / "bad.txt").write_text("never read")
    build(tmp_path / "out", images=root, max_size=16)
    sizes = json.loads((tmp_path / "out/manifest.json").read_text())["image_sizes"]
    assert sizes["images"] == 4  # the unreadable image is not counted
    assert sizes["native"] == {"width": {"min": 8, "median": 11, "max": 40},
                               "height": {"min": 6, "median": 14, "max": 30}}
    # --max_size 16 shrinks the one image whose shorter side exceeds 16: 40x30 → 21x16
    assert sizes["stored"] == {"width": {"min": 8, "median": 11, "max": 21},
                               "height": {"min": 6, "median": 12, "max": 20}}


@pytest.mark.parametrize("source_size,warned", [(8, True), (32, False)])
def test_a_model_far_above_the_images_size_is_warned_about_when_the_data_is_set_up(
        folder_shards, source_size, warned, caplog):
    """8 px sources and a 32 px model: a warning naming the manifest and a smaller image_size; 32 px
    sources: none."""
    from glide_lightning.data import GlideDataModule, TokenizerSpec

    shards = folder_shards(source_size)
    dm = GlideDataModule(train_shards=f"{shards}/train-*.tar", image_size=32, tokenizer_spec=TokenizerSpec("clip", 16),
                         num_workers=0)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    messages = [r.getMessage() for r in caplog.records  # (the recipe's own warning when it built them aside)
                if r.name.startswith("glide_lightning") and "model.model.image_size" in r.getMessage()]
    assert bool(messages) == warned
    if warned:
        assert "4.0x the median size of the training images (8 px" in messages[0]
        assert str(shards / "manifest.json") in messages[0] and "--model.model.image_size 16" in messages[0]
        assert "several times faster" in messages[0]
