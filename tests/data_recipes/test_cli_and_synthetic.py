"""The `python -m data_recipes` CLI (a real subprocess) and the synthetic recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
from recipe_helpers import check_manifest, read_split, shard_bytes

from data_recipes import RECIPES, load_recipe
from data_recipes.__main__ import main
from data_recipes.synthetic import build
from glide_lightning.data.synthetic import parse_caption, synthetic_sample

REPO = Path(__file__).resolve().parents[2]


def test_synthetic_through_the_real_cli(tmp_path):
    out = tmp_path / "shapes"
    cmd = [sys.executable, "-m", "data_recipes", "synthetic", "--out", str(out), "--train", "25", "--val", "6",
           "--image-size", "32", "--seed", "3", "--max-per-shard", "10"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote train-000002.tar (5 samples" in run.stderr
    doc = check_manifest(out)
    assert doc["recipe"] == "synthetic" and doc["args"]["seed"] == 3 and doc["args"]["image_size"] == 32
    assert [s["num_samples"] for s in doc["splits"]["train"]["shards"]] == [10, 10, 5]
    train = read_split(out, "train")
    assert len(train) == 25 and len(read_split(out, "val")) == 6
    for i, sample in enumerate(train):
        expected = synthetic_sample(3, i, image_size=32)
        assert sample["__key__"] == expected.key and sample["txt"] == expected.caption
        assert sample["png"].mode == "RGB" and sample["png"].size == (32, 32)
        assert np.array_equal(np.array(sample["png"]), np.array(expected.image))  # lossless: exact colours
        assert sample["json"]["scene"] == expected.metadata["scene"]
        parse_caption(sample["txt"])
    # the held-out captions and reference images for zero-shot FID: line i ↔ fid_reference/i.png = val sample i
    val = read_split(out, "val")
    assert (out / "fid_captions.txt").read_text().splitlines() == [s["txt"] for s in val]
    for i, sample in enumerate(val):
        assert np.array_equal(np.array(Image.open(out / "fid_reference" / f"{i:06d}.png")), np.array(sample["png"]))

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr  # one line, no traceback
    assert again.stderr.startswith(f"error: --out {out} already holds the output of an earlier data recipe: ")
    assert "pass --overwrite to delete that output first" in again.stderr


def test_a_folder_holding_files_is_refused_and_overwrite_replaces_only_the_recipe_outputs(tmp_path, capsys):
    """The files of two datasets never mix: a second run into a folder is refused before anything is written,
    and with --overwrite the folder holds the second dataset alone, beside the user's own files."""
    out = tmp_path / "shapes"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    first = ["synthetic", "--out", str(out), "--train", "12", "--val", "3", "--image-size", "16",
             "--max-per-shard", "5"]  # fmt: skip
    assert main(first) == 2  # foreign files alone make the folder not empty
    assert "already holds 1 file it does not write (README.md); pass --overwrite" in capsys.readouterr().err
    assert main([*first, "--overwrite"]) == 0
    assert (out / "fid_reference").is_dir() and len(list(out.glob("train-*.tar"))) == 3
    capsys.readouterr()
    second = ["synthetic", "--out", str(out), "--train", "4", "--val", "0", "--image-size", "16", "--seed", "1"]
    files = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"}  # noqa: E731
    before = files()
    assert main(second) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 file it does not write (README.md)" in err and "--overwrite" in err
    assert files() == before  # nothing written, nothing removed (the lock names its latest holder)
    assert main([*second, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "README.md", "manifest.json", "train-000000.tar"]
    assert (out / "README.md").read_text() == "my notes"
    doc = check_manifest(out)  # the manifest describes exactly the shards present
    assert doc["args"]["seed"] == 1 and list(doc["splits"]) == ["train"]
    assert [s["name"] for s in doc["splits"]["train"]["shards"]] == ["train-000000.tar"]
    # embed copies shards: its --out cannot be its --shards (--overwrite would delete them first)
    assert main(["embed", "--shards", str(out), "--out", str(out), "--overwrite", "--text-encoder", "t5",
                 "--text-encoder-name", "none", "--text-ctx", "16"]) == 2
    assert "is --shards" in capsys.readouterr().err and (out / "train-000000.tar").is_file()


def test_synthetic_is_byte_identical_for_the_same_seed(tmp_path):
    kw = {"train": 12, "val": 3, "image_size": 16, "max_per_shard": 5}
    build(tmp_path / "a", seed=1, **kw)
    build(tmp_path / "b", seed=1, **kw)
    build(tmp_path / "c", seed=2, **kw)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert shard_bytes(tmp_path / "a") != shard_bytes(tmp_path / "c")
    manifest = build(tmp_path / "a", seed=1, overwrite=True, **{**kw, "val": 0})
    assert set(manifest.splits) == {"train"} and not list((tmp_path / "a").glob("val-*"))


def test_unknown_recipe_lists_the_available_ones(capsys):
    assert main(["imagenet", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'imagenet'" in err and all(name in err for name in RECIPES)
    with pytest.raises(KeyError, match="available recipes: synthetic"):
        load_recipe("imagenet")


def test_help_lists_recipes_and_each_recipe_documents_itself(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    for name in RECIPES:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "--out" in text and "Example" in text, name


def test_input_errors_are_reported_without_traceback(tmp_path, capsys):
    assert main(["folder", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: --images directory" in err and "does not exist" in err and "Traceback" not in err
    assert main(["synthetic", "--out", str(tmp_path / "o"), "--image-size", "8"]) == 2
    assert "--image-size must be >= 16" in capsys.readouterr().err


def test_two_recipes_writing_one_directory_one_is_refused_naming_the_other(tmp_path):
    """Two real processes build the same --out at once (as two fresh-checkout `make train EXP=smoke` did):
    one is refused, naming the other, and the dataset that results is consistent."""
    from glide_lightning.data.shards import verify_manifest

    out = tmp_path / "shapes"
    cmd = [sys.executable, "-m", "data_recipes", "synthetic", "--out", str(out), "--train", "20000", "--val", "0",
           "--image-size", "16", "--max-per-shard", "2000"]  # fmt: skip  (a few seconds of rendering)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    both = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=180)[1] for p in both]
    codes = [p.returncode for p in both]
    assert sorted(codes) == [0, 2], errors
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert f"is in use by pid {both[winner].pid} on " in errors[loser], errors[loser]
    assert "data_recipes synthetic --out" in errors[loser]  # the holder's command
    assert verify_manifest(out) == [] and not list(out.glob(".*.partial"))
