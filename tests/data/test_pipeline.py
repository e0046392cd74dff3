"""Tests for glide_lightning.data.pipeline: shard expansion, image decoding and resizing,
captions, tar reading with bad input, the benchmark helper."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds
from PIL import Image

from glide_lightning.data.datamodule import expand_shards, measure_pipeline
from glide_lightning.data.tokenizers import TokenizerSpec
from glide_lightning.data.pipeline import (
    BadSample,
    ShardError,
    get_caption,
    iter_shard,
    load_image,
    parse_caption_keys,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, Any]]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def simple_samples(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"__key__": f"{prefix}{i:03d}", "png": encode(Image.new("RGB", (8, 8), RED)), "txt": f"red {i}"}
            for i in range(n)]


# ------------------------------------------------------------------------------------------ shards
def test_expand_braces_directory_glob_list_and_urls(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a shard")
    names = [str(tmp_path / f"train-{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "train-{000000..000002}.tar")) == names
    assert expand_shards(str(tmp_path)) == names  # directory: its *.tar, sorted
    assert expand_shards(str(tmp_path / "train-*.tar")) == names
    assert expand_shards([names[2], str(tmp_path / "train-{000000..000001}.tar")]) == [names[2], *names[:2]]
    assert expand_shards(f"file:{names[0]}") == [names[0]]
    remote = "pipe:aws s3 cp s3://bucket/train-{0..1}.tar -"
    assert expand_shards(remote) == [f"pipe:aws s3 cp s3://bucket/train-{i}.tar -" for i in (0, 1)]
    assert expand_shards("https://host/x.tar") == ["https://host/x.tar"]


def test_directory_with_several_splits_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert len(expand_shards(str(tmp_path))) == 3
    assert "several splits ['train', 'val']" in caplog.text and "train-*.tar" in caplog.text
    assert len(expand_shards(str(tmp_path / "train-*.tar"))) == 2


def test_expand_errors_name_what_was_looked_at(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards in directory"):
        expand_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pattern .*nothing-\\*.tar"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="2 shard\\(s\\) of spec .*train-\\{0..1\\}.tar"):
        expand_shards(str(tmp_path / "train-{0..1}.tar"))


# ------------------------------------------------------------------------------------------ images
def _wide_red_left_quarter() -> Image.Image:
    img = Image.new("RGB", (256, 64), BLUE)
    img.paste(RED, (0, 0, 64, 64))  # left quarter red
    return img


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_squish_vs_center_crop_geometry(fmt: str) -> None:
    data = encode(_wide_red_left_quarter(), fmt)
    squish = load_image(data, 32, "squish")
    crop = load_image(data, 32, "center_crop")
    assert squish.shape == crop.shape == (3, 32, 32) and squish.dtype == torch.uint8
    red = lambda x: (x[0].float() - x[2].float()).mean() > 100  # noqa: E731
    assert red(squish[:, :, :4]) and not red(squish[:, :, -4:])  # squish keeps the red left edge
    assert not red(crop[:, :, :4]) and not red(crop)  # the centre square is all blue


def test_center_crop_keeps_aspect() -> None:
    img = Image.new("RGB", (64, 128), BLUE)
    img.paste(RED, (0, 48, 64, 80))  # a centred horizontal band, 1/4 of the height
    crop = load_image(encode(img), 32, "center_crop")
    rows_red = [(crop[0, r].float() - crop[2, r].float()).mean() > 100 for r in range(32)]
    assert 14 <= sum(rows_red) <= 18  # square crop of the centre: the band covers half of it


def test_large_jpeg_draft_decode_and_corrupt_data() -> None:
    big = Image.new("RGB", (1024, 512), RED)
    out = load_image(encode(big, "JPEG"), 64, "squish")
    assert out.shape == (3, 64, 64) and out[0].float().mean() > 240
    with pytest.raises(Exception):
        load_image(b"not an image at all", 64)
    with pytest.raises(Exception):
        load_image(encode(big, "JPEG")[:300], 64)  # truncated


# ---------------------------------------------------------------------------------------- captions
def test_captions_from_txt_json_nested_and_lists() -> None:
    sample = {"__key__": "k", "txt": b"  a red square \n", "json": json.dumps(
        {"caption": "from json", "meta": {"alt": "nested"}, "all": ["", "first of many"], "empty": " "}).encode()}
    assert get_caption(sample, parse_caption_keys("txt")) == "a red square"
    assert get_caption(sample, parse_caption_keys("json:caption")) == "from json"
    assert get_caption(sample, parse_caption_keys("json:meta.alt")) == "nested"
    assert get_caption(sample, parse_caption_keys("json:all")) == "first of many"
    assert get_caption(sample, parse_caption_keys(["json:empty", "json:missing", "txt"])) == "a red square"
    with pytest.raises(BadSample, match="no caption"):
        get_caption(sample, parse_caption_keys("json:empty"))
    with pytest.raises(BadSample, match="no caption"):
        get_caption({"__key__": "k", "jpg": b""}, ("txt",))
    with pytest.raises(ValueError, match="invalid caption_key"):
        parse_caption_keys("json:")


# ------------------------------------------------------------------------------------- tar reading
def test_iter_shard_truncated_and_garbage(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "ok.tar", simple_samples("a", 4))
    samples = list(iter_shard(str(path)))
    assert [s["__key__"] for s in samples] == ["a000", "a001", "a002", "a003"]
    assert samples[0]["__url__"] == str(path) and samples[0]["txt"] == b"red 0"

    with tarfile.open(path) as tar:
        last_png = [m for m in tar.getmembers() if m.name == "a003.png"][0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: last_png.offset_data + 10])  # inside the last image
    events = list(iter_shard(str(cut)))
    assert [e["__key__"] for e in events[:-1]] == ["a000", "a001", "a002"]
    assert isinstance(events[-1], ShardError) and events[-1].key == "a002"  # failed after a002

    cut.write_bytes(path.read_bytes()[: last_png.offset_data + 1024 + 2])  # inside the last caption
    events = list(iter_shard(str(cut)))
    assert [e["__key__"] for e in events[:-1]] == ["a000", "a001", "a002", "a003"]
    assert "txt" not in events[-2] and "png" in events[-2]  # incomplete: skipped downstream
    assert isinstance(events[-1], ShardError) and events[-1].key == "a003"

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(3000))
    events = list(iter_shard(str(garbage)))
    assert len(events) == 1 and isinstance(events[0], ShardError) and events[0].key is None
    events = list(iter_shard(str(tmp_path / "missing.tar")))
    assert len(events) == 1 and isinstance(events[0].error, FileNotFoundError)


def test_measure_pipeline(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "bench.tar", simple_samples("b", 12))
    rate = measure_pipeline(str(shard), image_size=32, val_batch_size=4, num_workers=0,
                            tokenizer_spec=TokenizerSpec("clip", 16))
    assert rate > 0
