"""Input path options (a checkpoint, a run folder, captions, reference images, …) that name nothing on disk are
refused by the front door when the command line is parsed, before any model is loaded: one line
``error: --<option>: <path> does not exist (…)``, exit status 2. The options are read from the commands' own
fields (their ``input_path`` metadata), so a new one is covered here by declaring it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from glide_lightning.commands import COMMANDS, main
from glide_lightning.sampling.inputs import INPUT_PATH, RUN_HINT

CHECKED = ("sample", "fid", "sweep", "compare")


def input_options(command: str) -> list[str]:
    """The fields of ``command`` checked as input paths (their ``input_path`` metadata)."""
    return [f.name for f in dataclasses.fields(COMMANDS[command]) if INPUT_PATH in f.metadata]


def test_the_input_path_options_are_every_option_that_reads_a_path():
    """Every string option is either an input path or listed here as something else (an output, a name that need
    not be a file, a choice): a new path option without ``input_path`` metadata fails this test."""
    inputs = {"sample": {"ckpt", "prompts_file", "upsampler", "clip_dir", "inpaint_image", "mask"},
              "fid": {"ckpt", "run_dir", "captions", "reference", "inception_weights", "upsampler"},
              "compare": {"runs"}}
    inputs["sweep"] = inputs["fid"]
    others = {"sample": {"prompt", "out", "weights", "device"},
              "fid": {"out", "cache_dir", "dinov2", "clip_model", "clip_pretrained", "extractor", "weights", "device",
                      "metrics"},  # dinov2 / clip_pretrained: a hub name or tag as well as a path
              "compare": {"out"}}
    others["sweep"] = others["fid"] | {"step_counts"}
    for command in CHECKED:
        assert set(input_options(command)) == inputs[command], command
        textual = {f.name for f in dataclasses.fields(COMMANDS[command]) if "str" in str(f.type)
                   or "Literal" in str(f.type) or "Weights" in str(f.type)}
        assert textual - inputs[command] == others[command], command


@pytest.fixture
def present(tmp_path: Path, monkeypatch) -> dict[str, list[str]]:
    """Per command, options whose paths all exist (files that could not be loaded: loading would fail the test),
    in the working directory ``tmp_path``; the model readers fail the test if called."""
    monkeypatch.chdir(tmp_path)
    for module in ("glide_lightning.sampling.command", "glide_lightning.evaluation.fid_cli"):
        monkeypatch.setattr(f"{module}.load_checkpoint", _no_loading)
    for name in ("model.ckpt", "prompts.txt", "photo.png", "mask.png", "captions.txt", "inception.pt"):
        (tmp_path / name).write_text("x\n")
    for folder in ("clip", "reference", "runs/tiny/checkpoints"):
        (tmp_path / folder).mkdir(parents=True)
    evaluation = ["--ckpt", "model.ckpt", "--run_dir", "runs/tiny", "--captions", "captions.txt", "--reference",
                  "reference", "--inception_weights", "inception.pt", "--upsampler", "model.ckpt", "--out", "fid"]
    return {"sample": ["--ckpt", "model.ckpt", "--prompts_file", "prompts.txt", "--upsampler", "model.ckpt",
                       "--clip_dir", "clip", "--sampling.clip_guidance_scale", "3", "--inpaint_image", "photo.png",
                       "--mask", "mask.png", "--device", "cpu"],
            "fid": evaluation, "sweep": evaluation, "compare": ["--runs", "[runs/tiny]", "--out", "report.md"]}


def _no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the missing input was refused")


def with_value(argv: list[str], option: str, value: str) -> list[str]:
    at = argv.index(f"--{option}")
    return [*argv[:at + 1], value, *argv[at + 2:]]


@pytest.mark.parametrize("command, option", [(c, o) for c in CHECKED for o in input_options(c)])
def test_an_input_path_that_does_not_exist_is_refused_naming_the_option(command, option, present, capsys):
    runs = option in ("run_dir", "runs")
    missing = "runs/nope" if runs else f"nowhere/{option}.x"
    value = f"[{missing}]" if option == "runs" else missing
    with pytest.raises(SystemExit) as done:
        main([command, *with_value(present[command], option, value)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --{option}: {missing} does not exist"), err
    if runs:  # the run folders that do exist, and how one is made
        assert "the run folders in runs/ are tiny" in err and RUN_HINT in err, err


def test_a_missing_checkpoint_hints_at_what_is_beside_it_and_how_one_is_made(present, capsys):
    with pytest.raises(SystemExit) as done:
        main(["sample", "--ckpt", "runs/tiny/checkpoints/last.ckpt", "--prompt", "a", "--device", "cpu"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err == (
        "error: --ckpt: runs/tiny/checkpoints/last.ckpt does not exist (runs/tiny/checkpoints/ is empty; `make train "
        "EXP=<experiment>` writes runs/<experiment>/checkpoints/last.ckpt; glide-text2im's base.pt works too)\n")


def test_fid_defaults_name_the_option_and_a_run_without_a_checkpoint_names_run_dir(present, capsys):
    with pytest.raises(SystemExit) as done:  # the mscoco defaults, never built here
        main(["fid", "--ckpt", "model.ckpt", "--out", "fid"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: --captions: data/mscoco/fid_captions.txt does not exist ")
    assert "`python -m glide_lightning data mscoco` writes data/mscoco/fid_captions.txt" in err
    with pytest.raises(SystemExit) as done:  # the run exists, its checkpoint does not (yet)
        main(["fid", "--run_dir", "runs/tiny", "--captions", "captions.txt", "--reference", "reference",
              "--out", "fid"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith(
        "error: --run_dir: runs/tiny has no checkpoint yet (runs/tiny/checkpoints/last.ckpt does not exist)"), err


def test_an_output_folder_to_refuse_is_still_said_before_a_missing_input(present, tmp_path, capsys):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "0000.png").write_bytes(b"")
    with pytest.raises(SystemExit) as done:
        main(["sample", "--ckpt", "nowhere.ckpt", "--prompt", "a", "--device", "cpu"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "already holds the output of an earlier sample" in err, err
