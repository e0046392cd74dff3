"""Every model kind trains through the real CLI on synthetic shards (the tiny presets, a few steps) and its
checkpoint samples through the ``sample`` command (the front door's ``main``, in-process): the upsampler in a
cascade (and in ``fid``, whose results say which upsampler, steps and temperature made them), the inpainting
models in edits, chained from the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hang_guard import HANG_GUARD_S
from tiny_model_config import TINY
from test_cli import cli_env

REPO = Path(__file__).resolve().parents[1]
GRID = {"class_path": "glide_lightning.callbacks.SampleGrid",
        "init_args": {"prompts": ["a", "b"], "guidance_scales": [1.0, 3.0], "every_n_steps": 2,
                      "sampling": {"steps": "2"}}}


def fit(experiment: str, shards: Path, root: Path, *extra: str) -> Path:
    """Train ``experiments/<experiment>.yaml`` for 2 steps (batch 4, a sample grid at step 2); its run directory."""
    callbacks = root / f"{experiment}_callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [GRID]}}))
    command = [sys.executable, "-m", "glide_lightning", "fit", "--config", str(REPO / f"experiments/{experiment}.yaml"),
               "--config", str(callbacks), "--data.train_shards", f"{shards}/train-*.tar",
               "--data.val_shards", f"{shards}/val-*.tar", "--data.num_workers", "0", "--data.batch_size", "4",
               "--run.root", str(root), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]
    run = subprocess.run(command, env=cli_env(root), cwd=root, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    name = next((extra[i + 1] for i, a in enumerate(extra) if a == "--run.name"), experiment)
    return root / name


def glide(root: Path, *args: str) -> None:
    """``python -m glide_lightning <args> --device cpu`` in ``root``, run in this process (the front door's own
    ``main``; a user error would end it with SystemExit 2 and fail the test): a fresh interpreter's import
    costs more than these tiny commands, and their claims are the files they write."""
    from glide_lightning.commands import main as glide_main

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", ["glide_lightning", *args, "--device", "cpu"])
        glide_main([*args, "--device", "cpu"])


def grid_size(run_dir: Path) -> tuple[int, int]:
    with Image.open(run_dir / "samples/step00000002.png") as grid:
        return grid.size


def base_checkpoint(path: Path, image_size: int) -> Path:
    """An (untrained) base model of ``image_size`` px saved by a real Trainer: the first stage of a cascade."""
    from glide_lightning.diffusion import DiffusionConfig
    from glide_lightning.models import ModelConfig
    from glide_lightning.module import GlideModule

    torch.manual_seed(0)
    module = GlideModule(model=ModelConfig(**{**TINY.to_dict(), "image_size": image_size}),
                         diffusion=DiffusionConfig(steps=50))
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def test_the_upsampler_trains_and_samples_a_cascade_and_fid_records_it(synthetic_shards, tmp_path):
    run_dir = fit("smoke_upsample", synthetic_shards, tmp_path)
    last = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["hyper_parameters"]["model"]["kind"] == "upsample" and last["global_step"] == 2
    assert last["datamodule_hyper_parameters"]["low_res_size"] == 16
    assert last["datamodule_hyper_parameters"]["model_kind"] == "upsample"  # linked from model.model.kind
    assert grid_size(run_dir) == ((1 + 2 + 1) * 32, 2 * 32)  # low-res | guidance 1, 3 | real; 2 rows
    base = base_checkpoint(tmp_path / "base16.ckpt", 16)
    upsampler = run_dir / "checkpoints/last.ckpt"
    out = tmp_path / "cascade"
    glide(tmp_path, "sample", "--ckpt", str(base), "--upsampler", str(upsampler), "--prompt", "a large red circle",
          "--num_per_prompt", "2", "--sampling.steps", "2", "--sampling.upsample_steps", "3", "--out", str(out))
    with Image.open(out / "0001.png") as image:
        assert image.size == (32, 32) and str(upsampler) in image.text["upsampler"]
        assert image.text["upsample_sampler"] == "ddim"  # glide-text2im's text2im notebook's upsampler sampler
    # the cascade in evaluation: fid with our upsampler says which upsampler, steps and temperature made each number
    captions = tmp_path / "captions.txt"
    captions.write_text("a large red circle\na small blue square\n")
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), colour).save(reference / f"{i}.png")
    glide(tmp_path, "fid", "--ckpt", str(base), "--upsampler", str(upsampler), "--res", "32", "--n", "2",
          "--captions", str(captions), "--reference", str(reference), "--extractor", "random-conv",
          "--clip_model", "none", "--scales", "[3]", "--sampling.steps", "2", "--sampling.upsample_steps", "3",
          "--sampling.upsample_temp", "0.99", "--out", str(tmp_path / "fid"), "--cache_dir", str(tmp_path / "cache"))
    results = json.loads(next((tmp_path / "fid").glob("*/results.json")).read_text())["results"]
    assert results[0]["resolution"] == 32 and str(upsampler) in results[0]["upsampler"]
    assert results[0]["upsample_steps"] == "3" and results[0]["upsample_temp"] == 0.99
    assert results[0]["upsample_sampler"] == "ddim"


def test_inpainting_models_train_and_edit_from_the_command_line_chained(synthetic_shards, tmp_path):
    inpaint = fit("smoke_inpaint", synthetic_shards, tmp_path, "--model.model.image_size", "16",
                  "--run.name", "inpaint16")
    up = fit("smoke_inpaint", synthetic_shards, tmp_path, "--model.model.kind", "upsample_inpaint",
             "--data.low_res_size", "16", "--run.name", "upsample_inpaint")
    for run_dir, kind, size in ((inpaint, "inpaint", 16), (up, "upsample_inpaint", 32)):
        last = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        assert last["hyper_parameters"]["model"]["kind"] == kind
        assert grid_size(run_dir) == ((1 + 2 + 1) * size, 2 * size)  # known pixels | guidance 1, 3 | real
    photo = _photo()
    Image.fromarray(photo).save(tmp_path / "photo.png")
    white = np.zeros((32, 32), np.uint8)
    white[8:24, 4:20] = 255
    Image.fromarray(white).save(tmp_path / "mask.png")
    known = white == 0
    first = tmp_path / "edit1"
    glide(tmp_path, "sample", "--ckpt", str(inpaint / "checkpoints/last.ckpt"), "--upsampler",
          str(up / "checkpoints/last.ckpt"), "--inpaint-image", str(tmp_path / "photo.png"), "--mask",
          str(tmp_path / "mask.png"), "--prompt", "a large red circle", "--sampling.steps", "3",
          "--sampling.upsample_steps", "3", "--out", str(first))
    edited = np.array(Image.open(first / "0000.png"))
    assert edited.shape == (32, 32, 3)
    assert np.array_equal(edited[known], photo[known])  # unmasked pixels preserved exactly
    assert np.abs(edited[~known].astype(int) - photo[~known]).mean() > 1
    # the result edited again, by the inpainting model alone (16 px: the picture is resized, and so is the mask)
    second = tmp_path / "edit2"
    glide(tmp_path, "sample", "--ckpt", str(inpaint / "checkpoints/last.ckpt"), "--inpaint_image",
          str(first / "0000.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "a small blue square",
          "--sampling.steps", "3", "--out", str(second))
    again = np.array(Image.open(second / "0000.png"))
    small = np.array(Image.fromarray(edited).resize((16, 16), Image.Resampling.BICUBIC))
    kept = np.array(Image.fromarray(white).resize((16, 16), Image.Resampling.BOX)) == 0
    assert again.shape == (16, 16, 3) and np.abs(again[kept].astype(int) - small[kept]).max() <= 3
    meta = Image.open(second / "0000.png").text
    assert meta["inpaint_image"] == str(first / "0000.png") and meta["mask"] == str(tmp_path / "mask.png")


def _photo() -> np.ndarray:
    """A 32 px picture of the synthetic shapes (the edit's input)."""
    from glide_lightning.data.synthetic import synthetic_samples

    return np.array(next(iter(synthetic_samples(5, 1, split="val", image_size=32))).image.convert("RGB"))


def test_an_edit_needs_an_inpainting_model_and_both_files(tiny_checkpoint, tmp_path, capsys):
    from glide_lightning.commands import main as glide_main

    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    with pytest.raises(SystemExit) as exit_:
        glide_main(["sample", "--ckpt", str(tiny_checkpoint), "--inpaint-image", str(tmp_path / "photo.png"),
                    "--prompt", "a"])
    assert exit_.value.code == 2
    assert "an edit needs both --inpaint_image (the picture) and --mask" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        glide_main(["sample", "--ckpt", str(tiny_checkpoint), "--inpaint_image", str(tmp_path / "photo.png"),
                    "--mask", str(tmp_path / "mask.png"), "--prompt", "a", "--device", "cpu"])
    assert exit_.value.code == 2
    assert re.search("checkpoint's model must be of kind 'inpaint', got 'base' .*base_inpaint.pt",
                     capsys.readouterr().err)
    Image.new("L", (16, 8), 255).save(tmp_path / "wide_mask.png")
    with pytest.raises(ValueError, match="--mask is 16x8 px but --inpaint_image is 32x32: .* aspect ratio"):
        from glide_lightning.sampling.command import read_edit_inputs

        read_edit_inputs(str(tmp_path / "photo.png"), str(tmp_path / "wide_mask.png"))


def test_the_mask_of_an_edit_serves_to_edit_its_smaller_result_again(tmp_path):
    """README's chained edit: photo.png (64 px) and mask.png edited by a 16 px model give a 16 px result, which is
    edited again with the same mask.png: the mask is resized to the picture, kept only where wholly kept."""
    from glide_lightning.sampling.command import read_edit_inputs

    white = np.zeros((64, 64), np.uint8)
    white[16:48, 18:48] = 255  # columns 18..47: the 16 px pixel of columns 16..19 is partly white
    Image.fromarray(white).save(tmp_path / "mask.png")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "edit1.png")
    image, keep = read_edit_inputs(str(tmp_path / "edit1.png"), str(tmp_path / "mask.png"))
    assert image.shape == (1, 3, 16, 16) and keep.shape == (1, 1, 16, 16)
    expected = np.ones((16, 16), np.float32)
    expected[4:12, 4:12] = 0  # regenerated wherever any of the 4x4 block was white
    assert np.array_equal(keep[0, 0].numpy(), expected)
    # a smaller mask is scaled up to the picture
    Image.fromarray(white).resize((16, 16), Image.Resampling.NEAREST).save(tmp_path / "small_mask.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    _, keep = read_edit_inputs(str(tmp_path / "photo.png"), str(tmp_path / "small_mask.png"))
    assert keep.shape == (1, 1, 64, 64) and keep[0, 0, 16:48, 16:48].sum() == 0 and keep.sum() == 64 * 64 - 32 * 32
