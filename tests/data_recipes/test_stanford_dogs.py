"""The stanford_dogs recipe on a small Images/<synset>-<breed>/ tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from recipe_helpers import check_manifest, corrupt_file, read_split, save_image, shard_bytes

from data_recipes.common import RecipeError, hash_split
from data_recipes.stanford_dogs import article, breed_caption, breed_name, build

BREEDS = {
    "n02085620-Chihuahua": "a photo of a chihuahua",
    "n02085782-Japanese_spaniel": "a photo of a japanese spaniel",
    "n02088094-Afghan_hound": "a photo of an afghan hound",
    "n02095314-wire-haired_fox_terrier": "a photo of a wire-haired fox terrier",
    "n02101556-clumber": "a photo of a clumber",
}


def make_dogs(root: Path, per_breed: int = 3) -> Path:
    for folder in BREEDS:
        synset = folder.split("-")[0]
        for k in range(per_breed):
            save_image(root / "Images" / folder / f"{synset}_{1000 + k}.jpg", (30 + k, 20), colour=(k * 50, 10, 10))
    return root


def test_breed_names_and_articles():
    assert breed_name("n02085782-Japanese_spaniel") == "japanese spaniel"
    assert breed_name("n02095314-wire-haired_fox_terrier") == "wire-haired fox terrier"
    words = ("english setter", "irish wolfhound", "beagle", "otterhound")
    assert [article(w) for w in words] == ["an", "an", "a", "an"]
    assert breed_caption("eskimo dog") == "a photo of an eskimo dog"
    assert breed_caption("pug", "{breed}, a dog") == "pug, a dog"
    with pytest.raises(ValueError, match="not a Stanford Dogs breed folder"):
        breed_name("Chihuahua")


def test_dogs_tree_to_shards_with_hash_split(tmp_path):
    root = make_dogs(tmp_path / "dogs")
    corrupt_file(root / "Images" / "n02085620-Chihuahua" / "n02085620_9999.jpg")
    (root / "Images" / "README.txt").write_text("not a breed")
    out = tmp_path / "out"
    manifest = build(out, dogs_dir=root, val_fraction=0.3, max_per_shard=4)
    doc = check_manifest(out)
    samples = read_split(out, "train") + read_split(out, "val")
    assert len(samples) == 15 and manifest.total_samples == 15
    for s in samples:
        folder = next(f for f in BREEDS if f.startswith(s["json"]["synset"]))
        assert s["txt"] == BREEDS[folder] and s["json"]["breed"] == breed_name(folder)
        assert s["jpg"].mode == "RGB" and list(s["jpg"].size) == s["json"]["original_size"]
        assert s["__key__"] == Path(s["json"]["source_id"]).stem
    val = {s["json"]["source_id"] for s in read_split(out, "val")}
    assert val == {s["json"]["source_id"] for s in samples if hash_split(s["json"]["source_id"], 0.3) == "val"}
    assert doc["skipped"]["reasons"]["unreadable image"]["count"] == 1
    assert doc["args"]["split"] == "hash" and doc["breeds"] == sorted(breed_name(f) for f in BREEDS)

    again = tmp_path / "again"
    build(again, dogs_dir=root, val_fraction=0.3, max_per_shard=4)
    assert shard_bytes(out) == shard_bytes(again)


def write_mat_list(path: Path, files: list[str]) -> None:
    """A list as the dataset ships it: a MATLAB file whose ``file_list`` is an N×1 cell array of paths."""
    from scipy.io import savemat

    cells = np.empty((len(files), 1), dtype=object)
    for i, name in enumerate(files):
        cells[i, 0] = np.array([name])
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"file_list": cells, "labels": np.arange(len(files)).reshape(-1, 1) + 1})


def test_official_split_follows_the_mat_lists_and_skips_images_in_neither(tmp_path):
    root = make_dogs(tmp_path / "dogs", per_breed=3)
    images = sorted(f"{p.parent.name}/{p.name}" for p in (root / "Images").rglob("*.jpg"))
    train, val, neither = images[0::3] + images[1::3], images[2::3][1:], images[2::3][0]
    write_mat_list(root / "lists" / "train_list.mat", train)
    write_mat_list(root / "lists" / "test_list.mat", val)
    for split in ("official", "auto"):  # auto: both lists are there
        out = tmp_path / split
        build(out, dogs_dir=root, split=split, max_per_shard=4)
        doc = check_manifest(out)
        assert doc["args"]["split"] == "official"
        for name, expected in (("train", train), ("val", val)):
            assert sorted(s["json"]["source_id"] for s in read_split(out, name)) == sorted(expected)
        assert doc["skipped"]["reasons"]["not in the official lists"]["count"] == 1
        assert neither not in {s["json"]["source_id"] for s in read_split(out, "train") + read_split(out, "val")}
    (root / "lists" / "test_list.mat").unlink()  # one list missing: auto falls back to the hash split
    assert build(tmp_path / "hash", dogs_dir=root, split="auto", max_per_shard=4).args["split"] == "hash"
    (root / "lists" / "train_list.mat").write_bytes(b"MATLAB 5.0 but cut off")
    write_mat_list(root / "lists" / "test_list.mat", val)
    with pytest.raises(RecipeError, match="cannot read the file list in .*train_list.mat"):
        build(tmp_path / "bad", dogs_dir=root, split="official")


def test_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="--dogs_dir .*nope does not exist"):
        build(tmp_path / "o", dogs_dir=tmp_path / "nope")
    (tmp_path / "empty" / "Images").mkdir(parents=True)
    with pytest.raises(RecipeError, match="no breed folders such as Images/n02085620-Chihuahua"):
        build(tmp_path / "o", dogs_dir=tmp_path / "empty")
    with pytest.raises(RecipeError, match="must contain \\{breed\\}"):
        build(tmp_path / "o", dogs_dir=tmp_path / "empty", template="a dog")
    root = make_dogs(tmp_path / "dogs", per_breed=1)
    with pytest.raises(RecipeError, match="official needs train_list.mat"):
        build(tmp_path / "o", dogs_dir=root, split="official")


def test_cli_wiring(tmp_path):
    """Through the alias ``python -m data_recipes``, with the old hyphenated spellings of the options."""
    from data_recipes.__main__ import main

    root = make_dogs(tmp_path / "dogs", per_breed=1)
    argv = ["stanford_dogs", "--dogs-dir", str(root), "--out", str(tmp_path / "o"), "--split", "hash",
            "--val-fraction", "0", "--template", "{breed}, a kind of dog"]  # fmt: skip
    assert main(argv) == 0
    assert "chihuahua, a kind of dog" in {s["txt"] for s in read_split(tmp_path / "o", "train")}
