"""Sampling steps that cannot be taken from a checkpoint's diffusion process are refused from its stored
hyper-parameters, before the model is built or its weights loaded: through the real CLI (``python -m
glide_lightning``), on a checkpoint of the tiny model (a 50-step process) whose weights are gone, so that loading it
would fail: the steps error can only come first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hang_guard import HANG_GUARD_S

PROCESS = 50  # tests/conftest.py's tiny_module: DiffusionConfig(steps=50)


@pytest.fixture(scope="module")
def weightless(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint's hyper-parameters with its weights removed: loading it fails (missing keys)."""
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["diffusion"]["steps"] == PROCESS
    state["state_dict"] = {}
    path = tmp_path_factory.mktemp("weightless") / "last.ckpt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def weightless_upsampler(weightless, tmp_path_factory) -> Path:
    """:func:`weightless` with the hyper-parameters of an upsampler (``model.kind: upsample``): read, never loaded."""
    state = torch.load(weightless, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["model"]["kind"] = "upsample"
    path = tmp_path_factory.mktemp("weightless_upsampler") / "last.ckpt"
    torch.save(state, path)
    return path


def glide(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("GLIDE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "glide_lightning", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def steps_error(run: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command (exit status 2, no traceback, no load error)."""
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr and "load_state_dict" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    return errors[0]


def test_the_weightless_checkpoint_cannot_be_loaded(weightless):
    """The premise of the tests below: a command that reached the loader would fail with a load error."""
    from glide_lightning.sampling import load_checkpoint

    with pytest.raises(RuntimeError, match="Missing key"):
        load_checkpoint(weightless)


@pytest.mark.parametrize("steps, said", [
    ("200", "respacing '200': cannot take 200 steps from a section of 50; pass at most 50 steps "
            "(e.g. --sampling.steps 50)"),
    ("ddim30", "no integer stride gives exactly 30 of 50 steps; the nearest ddimN that an integer stride gives on "
               "50 steps: ddim25 or ddim50"),
    ("30,30", "cannot take 30 steps from a section of 25; its 2 sections hold 25,25 steps: take at most that many "
              "from each (e.g. --sampling.steps 25,25)"),
])
def test_sample_refuses_steps_that_do_not_fit_before_loading(weightless, tmp_path, steps, said):
    sampler = "ddim" if steps.startswith("ddim") else "ddpm"  # (ddimN steps are DDIM's alone)
    line = steps_error(glide(tmp_path, "sample", "--ckpt", str(weightless), "--prompt", "x", "--device", "cpu",
                             "--sampling.sampler", sampler, "--sampling.steps", steps, "--out", str(tmp_path / "out")))
    assert line.startswith(f"error: --sampling.steps '{steps}' does not fit the model's process of {PROCESS} steps "
                           f"(model.diffusion.steps={PROCESS} in {weightless}): "), line
    assert said in line, line
    assert not (tmp_path / "out").exists()


def test_sample_refuses_upsample_steps_that_do_not_fit_the_upsampler(weightless, weightless_upsampler, tmp_path):
    line = steps_error(glide(tmp_path, "sample", "--ckpt", str(weightless), "--upsampler", str(weightless_upsampler),
                             "--prompt", "x", "--device", "cpu", "--sampling.steps", "10",
                             "--sampling.upsample_steps", "ddim40", "--out", str(tmp_path / "out")))
    assert line.startswith(f"error: --sampling.upsample_steps 'ddim40' does not fit the upsampler's process of "
                           f"{PROCESS} steps (model.diffusion.steps={PROCESS} in {weightless_upsampler}): "), line
    assert "ddim25 or ddim50" in line


def test_a_model_of_another_kind_is_refused_before_loading(weightless, tmp_path):
    """The other setting a checkpoint's hyper-parameters say cannot fit: an edit needs an inpainting model."""
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    line = steps_error(glide(tmp_path, "sample", "--ckpt", str(weightless), "--inpaint_image", "photo.png", "--mask",
                             "mask.png", "--prompt", "x", "--device", "cpu", "--sampling.steps", "10"))
    assert line.startswith(f"error: the checkpoint's model must be of kind 'inpaint', got 'base' ({weightless}): "
                           f"pass a checkpoint of a 'inpaint' model (e.g. glide-text2im's base_inpaint.pt)"), line


def evaluation_inputs(tmp_path: Path) -> list[str]:
    captions = tmp_path / "captions.txt"
    captions.write_text("a\nb\n")
    (tmp_path / "reference").mkdir()
    for i in range(2):  # enough reference images for the reference check: a command would go on to load the model
        (tmp_path / "reference" / f"{i}.png").write_bytes(b"")
    return ["--captions", str(captions), "--reference", str(tmp_path / "reference"), "--n", "2", "--device", "cpu",
            "--extractor", "random-conv", "--clip_model", "none", "--out", str(tmp_path / "fid")]


def test_fid_refuses_the_default_steps_of_a_run_whose_process_is_shorter(weightless, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(weightless.read_bytes())
    line = steps_error(glide(tmp_path, "fid", "--run_dir", str(run_dir), *evaluation_inputs(tmp_path)))
    assert line.startswith(f"error: --sampling.steps '100' does not fit the model's process of {PROCESS} steps "
                           f"(model.diffusion.steps={PROCESS} in {run_dir / 'checkpoints' / 'last.ckpt'}): "), line
    assert "pass at most 50 steps (e.g. --sampling.steps 50)" in line
    assert not (tmp_path / "fid").exists()


def test_sweep_names_the_step_count_that_does_not_fit(weightless, tmp_path):
    line = steps_error(glide(tmp_path, "sweep", "--ckpt", str(weightless), *evaluation_inputs(tmp_path),
                             "--step_counts", '["10", "60"]', "--scales", "[1]"))
    assert line.startswith(f"error: --step_counts '60' does not fit the model's process of {PROCESS} steps"), line
    assert "pass at most 50 steps (e.g. '50' among --step_counts)" in line  # an item, not the option's value
    assert not (tmp_path / "fid").exists()


def test_steps_are_read_from_the_hyper_parameters_and_released_checkpoints_are_left_to_the_loader(
        weightless, glide_placeholder, tmp_path):
    from glide_lightning.sampling.checkpoints import check_stored_settings, stored_hyper_parameters

    assert stored_hyper_parameters(weightless)["diffusion"]["steps"] == PROCESS
    base = glide_placeholder("base")  # glide-text2im's base.pt: no hyper-parameters, today's behaviour
    assert stored_hyper_parameters(base) is None
    check_stored_settings(base, "--sampling.steps", ["5000", "ddim7"], kind="inpaint")  # left to the loader
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    assert stored_hyper_parameters(broken) is None and stored_hyper_parameters(tmp_path / "absent.ckpt") is None
    check_stored_settings(weightless, "--sampling.steps", ["", "50", "ddim25", "25,25", "fast27"])  # these fit
    with pytest.raises(ValueError, match=r"^--step_counts '51' does not fit the model's process of 50 steps"):
        check_stored_settings(weightless, "--step_counts", ["10", "51"])


def test_fid_refuses_a_resolution_the_model_does_not_make_before_loading(weightless, tmp_path):
    """``--res`` other than what the model makes: read from the stored hyper-parameters, one line, exit 2."""
    line = steps_error(glide(tmp_path, "fid", "--ckpt", str(weightless), *evaluation_inputs(tmp_path), "--res", "64",
                             "--sampling.steps", "10"))
    assert line.startswith("error: --res 64, but the model makes 32 px images: pass --res 32 or leave it out"), line
    assert "--upsampler" in line
