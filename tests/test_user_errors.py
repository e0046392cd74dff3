"""A user's mistake ends in one ``error:`` line naming the input and the fix, exit status 2, no traceback, through
the real front door (``python -m glide_lightning``); ``--debug`` shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hang_guard import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


def glide(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("GLIDE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "glide_lightning", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


def one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    return errors[0]


def test_comparing_a_run_that_does_not_exist(tmp_path):
    line = one_error_line(glide(tmp_path, "compare", "--runs", "[runs/nosuchrun]", "--out", str(tmp_path / "r.md")))
    assert "runs/nosuchrun" in line


def test_a_yaml_config_indented_with_tabs_names_the_file_the_line_and_the_fix(tmp_path):
    config = tmp_path / "tabs.yaml"
    config.write_text("trainer:\n\tmax_steps: 5\n")
    line = one_error_line(glide(tmp_path, "fit", "--config", str(REPO / "experiments/smoke.yaml"), "--config",
                                str(config)))
    assert str(config) in line and "line 2" in line and "spaces, not tabs" in line


def test_a_truncated_checkpoint_and_the_debug_switch(tmp_path):
    ckpt = tmp_path / "broken.ckpt"
    ckpt.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    line = one_error_line(glide(tmp_path, "sample", "--ckpt", str(ckpt), "--prompt", "a", "--out", str(tmp_path / "o")))
    assert str(ckpt) in line
    debug = glide(tmp_path, "sample", "--ckpt", str(ckpt), "--prompt", "a", "--out", str(tmp_path / "o"), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_cuda_device_on_a_machine_without_one_is_refused_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    unreadable = tmp_path / "model.ckpt"
    unreadable.write_bytes(b"")  # exists (a missing one is refused when parsed), but loading it would fail
    line = one_error_line(glide(tmp_path, "sample", "--ckpt", str(unreadable), "--prompt", "a",
                                "--device", "cuda", "--out", str(tmp_path / "o")))
    assert "--device cuda: torch sees no CUDA GPU" in line  # said before the checkpoint is even opened


@pytest.mark.parametrize("images", [None, 0, 1])
def test_fid_checks_its_reference_folder_before_loading_anything(tmp_path, images):
    reference = tmp_path / "reference"
    if images is not None:
        reference.mkdir()
        for i in range(images):
            (reference / f"{i}.png").write_bytes(b"")
    captions = tmp_path / "captions.txt"
    captions.write_text("a\nb\n")
    unreadable = tmp_path / "model.ckpt"
    unreadable.write_bytes(b"")  # exists (a missing one is refused when parsed), but loading it would fail
    line = one_error_line(glide(tmp_path, "fid", "--ckpt", str(unreadable), "--n", "2", "--captions",
                                str(captions), "--reference", str(reference), "--out", str(tmp_path / "fid")))
    assert str(reference) in line  # named before the checkpoint is opened
    assert (line.startswith(f"error: --reference: {reference} does not exist") if images is None
            else f"holds {images} image(s)" in line)


def test_guidance_scale_0_is_recorded_as_the_unconditional_model(tiny_checkpoint, tmp_path):
    from PIL import Image

    run = glide(tmp_path, "sample", "--ckpt", str(tiny_checkpoint), "--prompt", "a red circle", "--sampling.steps",
                "2", "--sampling.guidance_scale", "0", "--device", "cpu", "--out", str(tmp_path / "u"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "samples the unconditional model: the prompts are not used" in run.stderr
    with Image.open(tmp_path / "u/0000.png") as image:
        assert image.text["conditioning"].startswith("unconditional") and image.text["prompt"] == "a red circle"
    conditional = glide(tmp_path, "sample", "--ckpt", str(tiny_checkpoint), "--prompt", "a red circle",
                        "--sampling.steps", "2", "--device", "cpu", "--out", str(tmp_path / "c"))
    assert conditional.returncode == 0, conditional.stderr[-3000:]
    with Image.open(tmp_path / "c/0000.png") as image:
        assert image.text["conditioning"] == "the prompt"


def test_a_prompt_longer_than_the_context_is_warned_about_and_recorded_as_read(tiny_checkpoint, tmp_path):
    import json

    from glide_lightning.sampling import load_checkpoint

    text_ctx = load_checkpoint(tiny_checkpoint).tokenizer.text_ctx
    prompts = ["a red circle", " ".join(["a blue square"] * text_ctx)]  # ≥ 3 tokens a repeat: over the context
    run = glide(tmp_path, "sample", "--ckpt", str(tiny_checkpoint), "--prompt", prompts[0], "--prompt+", prompts[1],
                "--sampling.steps", "2", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"1 of 2 prompts are longer than the base model's context of {text_ctx} tokens" in run.stderr
    short, long = json.loads((tmp_path / "o/metadata.json").read_text())["images"]
    assert short["prompt_tokens"] == {"base": 5} and "prompt_used" not in short  # sot a red circle eot
    assert long["prompt"] == prompts[1] and long["prompt_tokens"] == {"base": text_ctx}
    used = long["prompt_used"]["base"]
    assert prompts[1].startswith(used) and len(used.split()) == text_ctx - 2  # sot + (text_ctx - 2) words + eot


def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(tmp_path):
    probe = Path("/sys/glide_lightning_probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here: no read-only location to test with")
    line = one_error_line(glide(tmp_path, "sample", "--ckpt", str(tmp_path / "absent.ckpt"), "--prompt", "a",
                                "--out", str(probe / "samples")))
    assert f"--out {probe / 'samples'} cannot be written" in line  # before the (missing) checkpoint is opened
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = one_error_line(glide(tmp_path, "sample", "--ckpt", str(tmp_path / "absent.ckpt"), "--prompt", "a",
                                "--out", str(blocker / "samples")))
    assert f"{blocker} is a file, not a folder" in line


def test_a_misspelt_training_option_is_one_line_naming_the_nearest_one(tmp_path):
    run = glide(tmp_path, "fit", "--config", str(REPO / "experiments/smoke.yaml"), "--trainer.max_stepz", "5")
    line = one_error_line(run)
    assert "unrecognized arguments: --trainer.max_stepz 5" in line
    assert "did you mean --trainer.max_steps?" in line and "python -m glide_lightning fit --help" in line
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr  # not the 130 lines of fit's usage


def test_training_shards_that_do_not_exist_are_said_before_the_run_starts(tmp_path):
    line = one_error_line(glide(tmp_path, "fit", "--config", str(REPO / "experiments/smoke.yaml"),
                                "--data.train_shards", str(tmp_path / "nowhere/train-*.tar"), "--run.root",
                                str(tmp_path / "runs")))
    assert f"no shards match the pattern '{tmp_path / 'nowhere/train-*.tar'}'" in line
    assert not (tmp_path / "runs").exists(), "no run folder, wandb run or log was started"


@pytest.mark.parametrize("argv, said", [
    (["sample", "--ckpt", "x", "--promt", "a"], "did you mean --prompt?"),
    (["sample", "--ckpt", "x", "--prompt", "a", "--num_per_prompt", "0"], "num_per_prompt must be >= 1"),
    (["data", "folder", "--imags", "x"], "did you mean --images?"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["sample", "--prompt", "a"], "the following arguments are required: --ckpt ("),
    (["data", "foldr"], "did you mean folder? (`python -m glide_lightning data --help`"),
    (["sample", "--ckpt", "x", "--prompt", "a", "--sampling.steps", "ddim5"], "bad sampling options: - steps"),
])
def test_a_command_line_mistake_of_the_other_commands_is_one_line(argv, said, capsys):
    from glide_lightning.commands import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and said in err, err
    assert "--help` lists the options" in err and "usage:" not in err


def test_ctrl_c_is_one_line_with_the_status_of_an_interrupt(monkeypatch, capsys):
    from glide_lightning import commands

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "parse", interrupted)
    with pytest.raises(SystemExit) as done:
        commands.main(["sample", "--ckpt", "x", "--prompt", "a"])
    err = capsys.readouterr().err
    assert done.value.code == 130 and err.count("\n") == 1 and err.startswith("interrupted (Ctrl-C)"), err


def test_an_empty_prompts_file_and_a_checkpoint_folder_or_non_checkpoint_are_named(tmp_path):
    from glide_lightning.sampling import load_checkpoint
    from glide_lightning.sampling.command import read_prompts

    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=f"--prompts_file {empty} holds no prompt"):
        read_prompts(None, str(empty))
    run = tmp_path / "runs/smoke"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/last.ckpt").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=f"its newest checkpoint is {run / 'checkpoints/last.ckpt'}"):
        load_checkpoint(run)
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot be read as a checkpoint: it is not a file torch.save wrote"):
        load_checkpoint(png)


def test_a_gpu_accelerator_on_a_machine_without_one_is_refused_before_the_run_starts(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = one_error_line(glide(tmp_path, "fit", "--config", str(REPO / "experiments/smoke.yaml"),
                                "--trainer.accelerator", "gpu", "--run.root", str(tmp_path / "runs")))
    assert "--trainer.accelerator gpu: torch sees no CUDA GPU" in line and "--trainer.accelerator cpu" in line
    assert not (tmp_path / "runs").exists()
