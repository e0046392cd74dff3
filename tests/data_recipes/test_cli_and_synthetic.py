"""``python -m glide_lightning data <recipe>`` (a real subprocess, and in-process), its alias ``python -m
data_recipes``, and the synthetic recipe."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import yaml
from recipe_helpers import check_manifest, data_cli, read_split, shard_bytes

from data_recipes import NOT_RECIPES, RECIPES, load_recipe
from data_recipes.synthetic import build
from glide_lightning.data.synthetic import parse_caption, synthetic_sample
from hang_guard import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


def test_synthetic_through_the_real_cli(tmp_path):
    out = tmp_path / "shapes"
    cmd = [sys.executable, "-m", "glide_lightning", "data", "synthetic", "--out", str(out), "--train", "25", "--val",
           "6", "--image_size", "32", "--seed", "3", "--max_per_shard", "10"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
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

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr  # one line, no traceback
    assert again.stderr.startswith(f"error: --out {out} already holds the output of an earlier data recipe: ")
    assert "pass --overwrite true to delete that output first" in again.stderr
    before = shard_bytes(out)
    alias = subprocess.run([sys.executable, "-m", "data_recipes", *cmd[4:], "--overwrite"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=HANG_GUARD_S)  # the old spelling: a bare --overwrite
    assert alias.returncode == 0, alias.stderr
    assert shard_bytes(out) == before  # the same dataset, written again


def test_a_folder_holding_files_is_refused_and_overwrite_replaces_only_the_recipe_outputs(tmp_path, capsys):
    """The files of two datasets never mix: a second run into a folder is refused before anything is written,
    and with --overwrite the folder holds the second dataset alone, beside the user's own files."""
    out = tmp_path / "shapes"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    first = ["synthetic", "--out", str(out), "--train", "12", "--val", "3", "--image_size", "16",
             "--max_per_shard", "5"]  # fmt: skip
    assert data_cli(*first) == 2  # foreign files alone make the folder not empty
    assert "already holds 1 file it does not write (README.md); pass --overwrite true" in capsys.readouterr().err
    assert data_cli(*first, "--overwrite", "true") == 0
    assert (out / "fid_reference").is_dir() and len(list(out.glob("train-*.tar"))) == 3
    capsys.readouterr()
    second = ["synthetic", "--out", str(out), "--train", "4", "--val", "0", "--image_size", "16", "--seed", "1"]
    files = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"}  # noqa: E731
    before = files()
    assert data_cli(*second) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 file it does not write (README.md)" in err and "--overwrite" in err
    assert files() == before  # nothing written, nothing removed (the lock names its latest holder)
    assert data_cli(*second, "--overwrite") == 0  # a recipe's bool may be given bare
    assert sorted(p.name for p in out.iterdir()) == [".lock", "README.md", "manifest.json", "train-000000.tar"]
    assert (out / "README.md").read_text() == "my notes"
    doc = check_manifest(out)  # the manifest describes exactly the shards present
    assert doc["args"]["seed"] == 1 and list(doc["splits"]) == ["train"]
    assert [s["name"] for s in doc["splits"]["train"]["shards"]] == ["train-000000.tar"]
    # embed copies shards: its --out cannot be its --shards (--overwrite would delete them first)
    assert data_cli("embed", "--shards", out, "--out", out, "--overwrite", "true", "--text_encoder", "t5",
                    "--text_encoder_name", "none", "--text_ctx", "16") == 2
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
    assert data_cli("imagenet", "--out", "x") == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'imagenet'" in err and all(name in err for name in RECIPES)
    with pytest.raises(KeyError, match="available recipes: embed"):
        load_recipe("imagenet")


def test_the_recipes_are_the_modules_of_the_folder_and_the_makefile_lists_them():
    """Adding a recipe is adding its module: the registry, the front door and the Makefile all follow."""
    import importlib

    modules = {p.stem for p in (REPO / "data_recipes").glob("*.py")} - {"__init__", "__main__"}
    helpers = {m for m in modules if not hasattr(importlib.import_module(f"data_recipes.{m}"), "RECIPE")}
    assert helpers == NOT_RECIPES  # the folder's modules without a RECIPE are the helpers the registry leaves out
    assert set(RECIPES) == modules - NOT_RECIPES
    assert all(load_recipe(name).RECIPE.NAME == name for name in RECIPES)
    made = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    listed = next(line for line in made.stdout.splitlines() if line.strip().startswith("recipes:"))
    assert listed.split(":", 1)[1].split() == sorted(RECIPES)


def test_help_lists_recipes_and_each_recipe_documents_itself(capsys):
    from glide_lightning.commands import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "data" in capsys.readouterr().out
    assert data_cli("--help") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    for name in RECIPES:
        assert data_cli(name, "--help") == 0
        text = capsys.readouterr().out
        assert "--out" in text and "Example" in text and "python -m glide_lightning data " + name in text, name
        assert "--print_config" in text and "--config" in text, name
        for field in dataclasses.fields(load_recipe(name).RECIPE):
            assert f"--{field.name} " in text, (name, field.name)  # every field is an option, as written
    assert data_cli("folder", "--out", "o", "--images", "p", "--val_fraction", "0.1", "--print_config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["val_fraction"] == 0.1 and printed["images"] == "p" and printed["image_size"] == 64


def test_input_errors_are_reported_without_traceback(tmp_path, capsys):
    assert data_cli("folder", "--images", tmp_path / "missing", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --images directory") and "does not exist" in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert data_cli("synthetic", "--out", tmp_path / "o", "--image_size", "8") == 2
    err = capsys.readouterr().err  # a value refused when the command line is parsed: one line, not the usage
    assert err.count("\n") == 1 and err.startswith("error: data synthetic: --image_size must be >= 16 (shapes get "
                                                    "unrecognisable), got 8 (`python -m glide_lightning data "
                                                    "synthetic --help` lists the options)"), err


def test_two_recipes_writing_one_directory_one_is_refused_naming_the_other(tmp_path):
    """Two real processes build the same --out at once (as two fresh-checkout `make train EXP=smoke` did):
    one is refused, naming the other, and the dataset that results is consistent."""
    from glide_lightning.data.shards import verify_manifest

    out = tmp_path / "shapes"
    cmd = [sys.executable, "-m", "glide_lightning", "data", "synthetic", "--out", str(out), "--train", "20000",
           "--val", "0", "--image_size", "16", "--max_per_shard", "2000"]  # fmt: skip  (a few seconds of rendering)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    both = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=HANG_GUARD_S)[1] for p in both]
    codes = [p.returncode for p in both]
    assert sorted(codes) == [0, 2], errors
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert f"is in use by pid {both[winner].pid} on " in errors[loser], errors[loser]
    assert "glide_lightning data synthetic --out" in errors[loser]  # the holder's command
    assert verify_manifest(out) == [] and not list(out.glob(".*.partial"))
