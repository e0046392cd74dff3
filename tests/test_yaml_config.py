"""Config files are read strictly: a key given twice is an error naming it and its lines, through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from glide_lightning.yaml_config import DuplicateKeyError, check_duplicate_keys
from hang_guard import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


def test_duplicate_keys_anywhere_in_a_document_are_found_with_their_lines():
    check_duplicate_keys("trainer:\n  max_steps: 5\nmodel:\n  max_steps: 7\n")  # same key, other mappings: fine
    check_duplicate_keys("- {a: 1}\n- {a: 2}\n")
    check_duplicate_keys("not: [valid")  # broken YAML is the loader's to report
    with pytest.raises(DuplicateKeyError, match=r"duplicate key 'max_steps' \(first given at line 2\)") as error:
        check_duplicate_keys("trainer:\n  max_steps: 5\n  max_steps: 7\n")
    assert error.value.problem_mark.line + 1 == 3
    with pytest.raises(DuplicateKeyError, match="duplicate key 'lr'"):
        check_duplicate_keys("callbacks:\n  - init_args: {lr: 1, lr: 2}\n")


def test_the_training_cli_refuses_a_config_with_a_duplicate_key_before_anything_runs(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("trainer:\n  max_steps: 5\n  max_steps: 7\n")
    run = subprocess.run([sys.executable, "-m", "glide_lightning", "fit", "--config", str(REPO / "experiments/smoke.yaml"),
                          "--config", str(config), "--run.root", str(tmp_path / "runs"), "--print_config"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert run.returncode != 0
    assert "duplicate key 'max_steps' (first given at line 2)" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_option_error_is_one_line_with_the_nearest_option_of_a_subcommand():
    from jsonargparse import ArgumentError, ArgumentParser

    from glide_lightning.yaml_config import option_error

    parser = ArgumentParser(prog="glide", exit_on_error=False)
    subcommands = parser.add_subcommands(dest="command")
    sub = ArgumentParser(exit_on_error=False)
    sub.add_argument("--num_per_prompt", type=int, default=1)
    subcommands.add_subcommand("sample", sub)
    with pytest.raises(ArgumentError) as raised:
        parser.parse_args(["sample", "--num_per_promt", "2"])
    message = str(option_error(raised.value, parser, "glide sample"))
    assert "\n" not in message and "did you mean --num_per_prompt?" in message
    assert message.endswith("(`glide sample --help` lists the options)")
    with pytest.raises(ArgumentError) as raised:
        parser.parse_args(["sample", "--num_per_prompt", "two"])
    message = str(option_error(raised.value, parser, "glide sample"))
    assert "\n" not in message and "num_per_prompt" in message and "did you mean" not in message
