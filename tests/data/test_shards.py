"""Shard writing: image encoding, the shard/manifest contract, atomicity, determinism."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from glide_lightning.data.shards import (
    MANIFEST_NAME,
    Sample,
    encode_image,
    load_manifest,
    sha256_file,
    verify_manifest,
    write_manifest,
    write_shards,
)


def samples(n: int, size: int = 16, start: int = 0) -> Iterator[Sample]:
    for i in range(start, start + n):
        arr = np.full((size, size, 3), (i * 37) % 256, np.uint8)
        arr[0, :, 0] = np.arange(size)
        yield Sample(f"{i:06d}", Image.fromarray(arr), f"caption number {i} é", {"source_id": f"s{i}", "i": i})


def read(paths: list[Path]) -> list[dict]:
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("pil"))


# ---------------------------------------------------------------- encoding


def test_encode_image_jpg_and_png():
    img = Image.new("RGBA", (8, 6), (10, 20, 30, 255))
    png = encode_image(img, "png")
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).mode == "RGB"
    assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == (10, 20, 30)
    jpg = encode_image(img, "jpg")
    assert jpg.startswith(b"\xff\xd8") and Image.open(io.BytesIO(jpg)).size == (8, 6)
    assert encode_image(img, "jpg") == jpg  # deterministic
    with pytest.raises(ValueError, match="image format must be one of"):
        encode_image(img, "gif")  # type: ignore[arg-type]


# ---------------------------------------------------------------- writing + reading back


def test_write_shards_round_trip(tmp_path):
    split = write_shards(samples(7), tmp_path, "train", max_per_shard=3, image_format="png")
    assert [s.name for s in split.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s.num_samples for s in split.shards] == [3, 3, 1] and split.num_samples == 7
    for shard in split.shards:
        assert sha256_file(tmp_path / shard.name) == shard.sha256
        assert (tmp_path / shard.name).stat().st_size == shard.num_bytes
    got = read([tmp_path / s.name for s in split.shards])
    expected = list(samples(7))
    assert [g["__key__"] for g in got] == [e.key for e in expected]
    for g, e in zip(got, expected):
        assert g["txt"] == e.caption and g["json"] == dict(e.metadata)
        assert g["png"].mode == "RGB" and np.array_equal(np.array(g["png"]), np.array(e.image))  # lossless
    caps = split.captions
    assert (caps.count, caps.min_words, caps.max_words, caps.unique) == (7, 4, 4, 7)
    assert caps.examples == tuple(e.caption for e in expected[:5])


def test_prencoded_bytes_are_written_as_is_and_checked(tmp_path):
    jpg = encode_image(Image.new("RGB", (5, 4), (1, 2, 3)), "jpg")
    split = write_shards([Sample("a", jpg, "x y")], tmp_path, "val")
    (got,) = read([tmp_path / split.shards[0].name])
    assert got["jpg"].size == (5, 4)
    with pytest.raises(ValueError, match="not png data"):
        write_shards([Sample("a", jpg, "x")], tmp_path, "val", image_format="png")


@pytest.mark.parametrize(
    ("sample", "match"),
    [
        (Sample("a.b", Image.new("RGB", (2, 2)), "c"), "no dots"),
        (Sample("a", Image.new("RGB", (2, 2)), "  "), "empty caption"),
        (Sample("a", "not an image", "c"), "must be a PIL image or bytes"),  # type: ignore[arg-type]
    ],
)
def test_bad_samples_are_clear_errors(tmp_path, sample, match):
    with pytest.raises((ValueError, TypeError), match=match):
        write_shards([sample], tmp_path, "train")


def test_duplicate_keys_and_bad_arguments(tmp_path):
    dup = [Sample("k", Image.new("RGB", (2, 2)), "c"), Sample("k", Image.new("RGB", (2, 2)), "d")]
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        write_shards(dup, tmp_path, "train")
    with pytest.raises(ValueError, match="split name 'tr-ain' is invalid"):
        write_shards([], tmp_path, "tr-ain")
    with pytest.raises(ValueError, match="max_per_shard must be >= 1"):
        write_shards([], tmp_path, "train", max_per_shard=0)


def test_same_input_gives_byte_identical_shards(tmp_path):
    a = write_shards(samples(5), tmp_path / "a", "train", max_per_shard=2)
    b = write_shards(samples(5), tmp_path / "b", "train", max_per_shard=2)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_interrupted_write_leaves_no_partial_shard_and_no_manifest(tmp_path):
    write_shards(samples(4), tmp_path, "train", max_per_shard=2)
    write_manifest(tmp_path, "test", {}, [write_shards(samples(2), tmp_path, "val")])
    assert (tmp_path / MANIFEST_NAME).is_file()

    def broken() -> Iterator[Sample]:
        yield from samples(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(broken(), tmp_path, "train", max_per_shard=2)
    assert not (tmp_path / MANIFEST_NAME).exists()  # the old manifest no longer describes the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "val-000000.tar"]  # no .partial
    with pytest.raises(FileNotFoundError, match="not a finished dataset"):
        load_manifest(tmp_path)


def test_rewriting_a_split_removes_its_stale_shards(tmp_path):
    write_shards(samples(6), tmp_path, "train", max_per_shard=2)
    write_shards(samples(3), tmp_path, "val", max_per_shard=2)
    write_shards(samples(2), tmp_path, "train", max_per_shard=2)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000000.tar", "val-000001.tar"]


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip_and_verification(tmp_path):
    train = write_shards(samples(5), tmp_path, "train", max_per_shard=2)
    val = write_shards(samples(2, start=10), tmp_path, "val")
    write_manifest(tmp_path, "unit", {"n": 5, "out": str(tmp_path)}, [train, val], extra={"skipped": {"total": 0}})
    doc = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert doc["recipe"] == "unit" and doc["total_samples"] == 7 and doc["skipped"] == {"total": 0}
    assert doc["splits"]["train"]["captions"]["examples"][0] == "caption number 0 é"
    m = load_manifest(tmp_path)
    assert m.splits["train"] == train and m.splits["val"] == val and m.extra == {"skipped": {"total": 0}}
    assert m.shard_paths("val") == [tmp_path.resolve() / "val-000000.tar"]
    with pytest.raises(KeyError, match="split 'test' not in"):
        m.shard_paths("test")
    assert verify_manifest(tmp_path) == []
    shard = tmp_path / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    assert verify_manifest(tmp_path) == ["train-000001.tar: sha256 differs from the manifest"]


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    split = write_shards(samples(1), tmp_path, "train")
    (tmp_path / "train-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="lists shards missing"):
        write_manifest(tmp_path, "unit", {}, [split])
    (tmp_path / MANIFEST_NAME).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a valid shard manifest"):
        load_manifest(tmp_path)
    with pytest.raises(ValueError, match="may not override"):
        write_manifest(tmp_path, "unit", {}, [], extra={"splits": {}})
