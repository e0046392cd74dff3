"""The sbucaptions recipe: line-aligned URL/caption files with local images, and the img2dataset path."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from recipe_helpers import check_manifest, corrupt_file, data_cli, read_split, save_image, shard_bytes

from data_recipes.common import RecipeError
from data_recipes.sbucaptions import CAPTIONS_FILE, URLS_FILE, build

URLS = [f"http://static.flickr.com/{1000 + i}/{4385058960 + i}_b0f2a26e{i:02d}.jpg" for i in range(8)]
CAPTIONS = [f"Man sitting on a bench number {i} " for i in range(8)]
CAPTIONS[5] = "   "


def make_sbu(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / URLS_FILE).write_text("\n".join(URLS) + "\n")
    (root / CAPTIONS_FILE).write_text("\n".join(CAPTIONS) + "\n")
    return root


def img2dataset_layout(images: Path, lines: list[int]) -> None:
    """What img2dataset's "files" output looks like: 00000/<9-digit line index>.jpg + .json with the url."""
    for i in lines:
        stem = images / "00000" / f"{i:09d}"
        save_image(stem.with_suffix(".jpg"), (20 + i, 16), colour=(i * 30, 40, 40))
        stem.with_suffix(".json").write_text(json.dumps({"url": URLS[i], "key": f"{i:09d}"}))
        stem.with_suffix(".txt").write_text("img2dataset caption, ignored")


def test_local_images_by_index_and_by_url_basename(tmp_path):
    sbu = make_sbu(tmp_path / "sbu")
    images = tmp_path / "images"
    img2dataset_layout(images, [0, 1, 2, 5])
    save_image(images / "flat" / URLS[3].rsplit("/", 1)[1])  # by basename
    corrupt_file(images / "flat" / URLS[4].rsplit("/", 1)[1])
    out = tmp_path / "out"
    build(out, sbu_dir=sbu, images_dir=images, max_per_shard=2)
    doc = check_manifest(out)
    samples = read_split(out, "train")
    assert sorted(s["json"]["line"] for s in samples) == [0, 1, 2, 3]
    for s in samples:
        i = s["json"]["line"]
        assert s["txt"] == CAPTIONS[i].strip() and s["json"]["source_id"] == URLS[i] and s["__key__"] == f"{i:07d}"
        assert s["jpg"].mode == "RGB"
    assert s["jpg"].size == tuple(s["json"]["original_size"])
    reasons = {r: v["count"] for r, v in doc["skipped"]["reasons"].items()}
    assert reasons == {"missing image": 2, "unreadable image": 1, "no caption": 1}  # lines 6, 7 | 4 | 5
    assert doc["lines"] == 8

    build(tmp_path / "again", sbu_dir=sbu, images_dir=images, max_per_shard=2)
    assert shard_bytes(out) == shard_bytes(tmp_path / "again")
    only_index = build(tmp_path / "idx", sbu_dir=sbu, images_dir=images, naming="index")
    assert only_index.total_samples == 3


def test_sidecar_url_must_match_the_line(tmp_path):
    sbu = make_sbu(tmp_path / "sbu")
    images = tmp_path / "images"
    img2dataset_layout(images, [1, 2])
    # file 000000002 really holds line 6's URL (img2dataset numbered differently): follow the URL
    (images / "00000" / "000000002.json").write_text(json.dumps({"url": URLS[6]}))
    manifest = build(tmp_path / "out", sbu_dir=sbu, images_dir=images)
    assert sorted(s["json"]["line"] for s in read_split(tmp_path / "out", "train")) == [1, 6]
    assert manifest.total_samples == 2


def test_download_needs_img2dataset(tmp_path, monkeypatch):
    sbu = make_sbu(tmp_path / "sbu")
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # import fails as if not installed
    with pytest.raises(RecipeError, match="pip install img2dataset.*internet"):
        build(tmp_path / "out", sbu_dir=sbu, images_dir=tmp_path / "images", download=True)


def test_download_calls_img2dataset_then_reads_its_files(tmp_path, monkeypatch):
    sbu = make_sbu(tmp_path / "sbu")
    calls = []

    def download(**kw):
        calls.append(kw)
        img2dataset_layout(Path(kw["output_folder"]), [0, 7])

    monkeypatch.setitem(sys.modules, "img2dataset", types.SimpleNamespace(download=download))
    manifest = build(tmp_path / "out", sbu_dir=sbu, images_dir=tmp_path / "images", download=True, download_size=64)
    assert manifest.total_samples == 2
    (kw,) = calls
    assert kw["url_list"] == str(sbu / URLS_FILE) and kw["input_format"] == "txt" and kw["output_format"] == "files"
    assert kw["image_size"] == 64 and kw["resize_mode"] == "keep_ratio" and kw["number_sample_per_shard"] == 10000


def test_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="give --sbu_dir"):
        build(tmp_path / "o", images_dir=tmp_path)
    with pytest.raises(RecipeError, match="URL list .*does not exist"):
        build(tmp_path / "o", sbu_dir=tmp_path, images_dir=tmp_path)
    sbu = make_sbu(tmp_path / "sbu")
    with pytest.raises(RecipeError, match="--images_dir .*does not exist.*--download"):
        build(tmp_path / "o", sbu_dir=sbu, images_dir=tmp_path / "nope")
    (sbu / CAPTIONS_FILE).write_text("only one caption\n")
    with pytest.raises(RecipeError, match="8 lines but .* has 1: the files must be line-aligned"):
        build(tmp_path / "o", sbu_dir=sbu, images_dir=tmp_path)
    make_sbu(sbu)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="none of the 8 lines has an image"):
        build(tmp_path / "o", sbu_dir=sbu, images_dir=tmp_path / "empty")


def test_cli_wiring(tmp_path):
    sbu = make_sbu(tmp_path / "sbu")
    img2dataset_layout(tmp_path / "images", [0])
    argv = ["sbucaptions", "--urls", str(sbu / URLS_FILE), "--captions", str(sbu / CAPTIONS_FILE),
            "--images_dir", str(tmp_path / "images"), "--naming", "index", "--out", str(tmp_path / "o")]  # fmt: skip
    assert data_cli(*argv) == 0
    assert [s["txt"] for s in read_split(tmp_path / "o", "train")] == [CAPTIONS[0].strip()]
