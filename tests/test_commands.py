"""The front door: every command parsed by jsonargparse from typed configs (in process, cheap)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from glide_lightning.commands import COMMANDS, build_parser, main, parse
from glide_lightning.evaluation.fid_cli import FIDCommand, SweepCommand
from glide_lightning.sampling import DEFAULT_GUIDANCE_SWEEP, SamplingConfig
from glide_lightning.sampling.command import SampleCommand

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"sample": ["--ckpt", "model.ckpt"], "compare": ["--runs", "[runs/a]"], "ablation": ["minig"]}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_takes_help_config_and_print_config(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert "--config" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([name, *REQUIRED.get(name, []), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    fields = {f.name for f in dataclasses.fields(COMMANDS[name])}
    assert set(printed) - {"config"} == fields  # every option is a field of the command's dataclass
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(printed))
    command = parse([name, "--config", str(tmp_path / "c.yaml")])  # the printed config is a valid --config
    assert isinstance(command, COMMANDS[name])


def test_sampling_options_are_the_sampling_config_fields_with_its_defaults(capsys):
    for name in ("sample", "fid", "sweep"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        for f in dataclasses.fields(SamplingConfig):
            assert f"--sampling.{f.name}" in text  # not mirrored by hand: read from the dataclass
    command = parse(["sample", "--ckpt", "m.ckpt", "--prompt", "a corgi", "--prompt+", "a cat",
                     "--sampling.sampler", "ddim", "--sampling.steps", "ddim25", "--sampling.eta", "0.5"])
    assert isinstance(command, SampleCommand) and command.prompt == ["a corgi", "a cat"]
    assert command.sampling == SamplingConfig(sampler="ddim", steps="ddim25", eta=0.5)
    assert parse(["fid", "--ckpt", "m.ckpt"]).sampling == SamplingConfig()  # the one default


def test_sweep_scales_default_to_the_one_sweep_list_and_fid_to_the_sampling_scale():
    assert parse(["sweep", "--ckpt", "m.ckpt"]).scales == list(DEFAULT_GUIDANCE_SWEEP)
    fid = parse(["fid", "--ckpt", "m.ckpt"])
    assert isinstance(fid, FIDCommand) and not isinstance(fid, SweepCommand) and fid.scales is None
    assert parse(["sweep", "--ckpt", "m.ckpt", "--scales", "[1.5, 3]"]).scales == [1.5, 3.0]
    sweep = parse(["sweep", "--ckpt", "m.ckpt", "--samplers", "[ddim, unipc]", "--step_counts", '["10", "25"]',
                   "--sampling.guidance_interval", "[0.3, 5]"])
    assert [(s.sampler, s.steps, s.guidance_interval) for s in sweep.samplings()] == [
        (sampler, steps, (0.3, 5.0)) for sampler in ("ddim", "unipc") for steps in ("10", "25")]


@pytest.mark.parametrize("argv, expected", [
    (["sample", "--ckpt", "m.ckpt", "--sampling.steps", "ddim50"], "steps 'ddim50' is DDIM's stride spacing"),
    (["fid", "--ckpt", "m.ckpt", "--sampling.eta", "0.3"], "eta 0.3 is DDIM's noise level"),
    (["sweep", "--ckpt", "m.ckpt", "--sampling.sampler", "ddmi"], "sampling.sampler"),
    (["fid", "--ckpt", "m.ckpt", "--n", "0"], "n must be >= 1"),
    (["bench", "--presets", "[huge]"], "presets"),
    (["sample", "--ckpt", "m.ckpt", "--prompt", "a", "--prompt", "b"], "--prompt is given more than once"),
    (["sample", "--ckpt", "m.ckpt", "--sampling.precision", "fp16"], "sampling.precision"),
    (["fid", "--ckpt", "m.ckpt", "--sampling.guidance_interval", "[5, 1]"], "guidance_interval (low, high]"),
    (["sweep", "--ckpt", "m.ckpt", "--samplers", "[euler]"], "samplers"),
    (["sweep", "--ckpt", "m.ckpt", "--step_counts", '["ddim10"]'], "steps 'ddim10' is DDIM's stride spacing"),
])
def test_contradicting_or_unknown_values_fail_at_parse_time_naming_the_field(argv, expected, capsys):
    with pytest.raises(SystemExit) as done:
        parse(argv)
    assert done.value.code == 2
    assert expected in capsys.readouterr().err


def test_fit_and_validate_are_listed_and_handed_to_lightning_cli(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in ("fit", "validate", *COMMANDS):
        assert name in text


EVAL_CONFIGS = sorted((REPO / "experiments/eval").glob("*.yaml"))


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda path: path.stem)
def test_each_experiments_evaluation_settings_are_a_config_of_the_evaluation_commands(config):
    """experiments/eval/<name>.yaml belongs to an experiment (or an ablation's arms) and parses as ``sweep``'s
    config (and as ``fid``'s where it sets no sweep-only option); ``make fid|sweep EXP=<name>`` passes it first."""
    import subprocess

    assert (REPO / "experiments" / f"{config.stem}.yaml").is_file() or (REPO / "experiments" / config.stem).is_dir()
    values = yaml.safe_load(config.read_text())
    sweep = parse(["sweep", "--config", str(config), "--run_dir", "runs/x"])
    assert sweep.n == values.get("n", sweep.n) and sweep.scales == values.get("scales", sweep.scales)
    for key, value in (values.get("sampling") or {}).items():
        assert getattr(sweep.sampling, key) == value, key
    if not {"samplers", "step_counts"} & values.keys():
        assert parse(["fid", "--config", str(config), "--run_dir", "runs/x", "--n", "7"]).n == 7  # flags win
        if (REPO / "experiments" / f"{config.stem}.yaml").is_file():
            made = subprocess.run(["make", "-n", "fid", f"EXP={config.stem}", "N=7"], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout
            command = next(line for line in made.splitlines() if " -m glide_lightning fid " in line)
            assert f"fid --config experiments/eval/{config.stem}.yaml" in command and "--n 7" in command


def test_an_experiment_without_evaluation_settings_is_evaluated_with_the_commands_defaults():
    import subprocess

    made = subprocess.run(["make", "-n", "fid", "EXP=minig_hybrid"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    command = next(line for line in made.splitlines() if " -m glide_lightning fid " in line)
    assert "--config" not in command and "--run_dir runs/minig_hybrid" in command
    assert parse(["fid", "--run_dir", "runs/minig_hybrid"]).captions == "data/mscoco/fid_captions.txt"
