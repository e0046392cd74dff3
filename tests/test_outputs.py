"""A command never mixes its output with an earlier one's (glide_lightning.outputs): ``sample``, ``fid`` /
``sweep`` and ``compare`` refuse a folder that holds an earlier run's files before any model is loaded, in
one line naming the folder and ``--overwrite true``; with it, the earlier run's files are deleted first and
every other file stays. (``fid`` / ``sweep``: tests/evaluation/test_zero_shot.py; the data recipes:
tests/data_recipes/test_cli_and_synthetic.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glide_lightning.commands import main as glide_main
from glide_lightning.data.images import read_png_metadata
from glide_lightning.outputs import OutputFolder, OutputNotEmpty
from hang_guard import HANG_GUARD_S
from test_cli import cli_env


def refusal(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The one ``error:`` line the front door prints when ``argv`` is refused (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        glide_main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "--overwrite true" in err, err
    return err.removeprefix("error: ")


def test_the_rule_keeps_what_it_does_not_own_and_what_it_is_told_to_keep(tmp_path):
    folder = OutputFolder(tmp_path / "out", "cmd", (r"\d+\.png", r"cache"), kept=(r"\.lock",))
    folder.check(False)  # absent: nothing to refuse
    folder.claim(False)
    (tmp_path / "out" / ".lock").write_text("")
    folder.check(False)  # a kept entry does not count
    (tmp_path / "out" / "0001.png").write_bytes(b"x")
    (tmp_path / "out" / "cache").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    with pytest.raises(OutputNotEmpty) as refused:
        folder.check(False)
    assert str(refused.value) == (
        f"cmd: --out {tmp_path / 'out'} already holds the output of an earlier cmd: 2 files (0001.png, cache/), "
        f"and 1 file it does not write (mine.txt); pass --overwrite true to delete that output first (the other "
        f"files stay), or choose another --out")
    folder.claim(True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "mine.txt"]
    with pytest.raises(OutputNotEmpty, match=r"holds 1 file it does not write \(mine.txt\); pass --overwrite true to "
                                             r"write there anyway \(nothing is deleted\)"):
        folder.check(False)  # foreign files alone still make a folder not empty
    shared = OutputFolder(tmp_path / "out", "cmd", (r"\d+\.png",), shared=True)
    shared.check(False)  # a shared folder: only the command's own files count
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputNotEmpty, match="exists and is not a directory"):
        OutputFolder(tmp_path / "file", "cmd", ()).check(True)


# ------------------------------------------------------------------------------------------------ sample
def test_sample_refuses_an_earlier_runs_folder_before_loading_and_overwrite_keeps_only_the_new_run(
        tiny_checkpoint, tmp_path):
    out = tmp_path / "s"
    common = ["--prompt", "a large red circle", "--sampling.steps", "2", "--device", "cpu", "--out", str(out)]
    glide_main(["sample", "--ckpt", str(tiny_checkpoint), "--num_per_prompt", "4", *common])
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the real CLI, with a checkpoint that does not exist: the refusal comes first, so nothing is loaded
    command = [sys.executable, "-m", "glide_lightning", "sample", "--ckpt", str(tmp_path / "missing.ckpt"),
               "--num_per_prompt", "2", *common]
    run = subprocess.run(command, env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "not found" not in run.stderr, run.stderr
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: sample: --out {out} already holds the output of an earlier sample: 6 files")
    assert "1 file it does not write (notes.txt)" in message and "--overwrite true" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    glide_main(["sample", "--ckpt", str(tiny_checkpoint), "--num_per_prompt", "2", "--seed", "5",
                "--overwrite", "true", *common])
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "grid.png", "metadata.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    records = json.loads((out / "metadata.json").read_text())["images"]
    assert [r["file"] for r in records] == sorted(p.name for p in out.glob("[0-9]*.png"))
    assert [r["seed"] for r in records] == [5, 6] == [int(read_png_metadata(out / r["file"])["seed"]) for r in records]


# ------------------------------------------------------------------------------------------------ compare
def fake_run(root: Path, name: str, with_fid: bool) -> str:
    """A run directory as compare reads it: metrics, and optionally one evaluation's results.json."""
    run = root / name
    (run / "csv" / "version_0").mkdir(parents=True)
    (run / "csv" / "version_0" / "metrics.csv").write_text("step,train/loss\n0,1.0\n1,0.5\n2,0.25\n")
    if with_fid:
        (run / "fid" / "res32_ddpm2_n6").mkdir(parents=True)
        fid = {"fid": 187.25, "n_generated": 6, "n_reference": 6, "resolution": 32, "extractor_name": "random-conv",
               "weights_id": "random-conv", "random_weights": True, "standard_extractor": False, "method": "m",
               "label": "NOT a real FID (random feature extractor): 187.2500"}
        record = {"guidance_scale": 3.0, "n": 6, "resolution": 32, "sampler": "ddpm", "steps": "2",
                  "checkpoint": "c", "reference": "r", "fid": fid, "clip_score": None, "adherence": None}
        (run / "fid" / "res32_ddpm2_n6" / "results.json").write_text(json.dumps({"results": [record]}))
    return str(run)


def test_compare_refuses_an_earlier_report_and_overwrite_leaves_none_of_its_plots(tmp_path, capsys):
    out = tmp_path / "reports" / "a_vs_b.md"
    runs = [fake_run(tmp_path, "a", True), fake_run(tmp_path, "b", False)]
    glide_main(["compare", "--runs", f"[{', '.join(runs)}]", "--out", str(out)])
    assert {p.name for p in out.parent.iterdir()} == {"a_vs_b.md", "a_vs_b_losses.png", "a_vs_b_fid.png"}
    (out.parent / "other.md").write_text("another report")
    # a run that does not exist: the report is refused before any run is read
    message = refusal(capsys, ["compare", "--runs", f"[{tmp_path / 'missing'}]", "--out", str(out)])
    assert message.startswith(f"compare: the folder of --out {out} already holds the output of an earlier compare: "
                              f"3 files (a_vs_b.md, a_vs_b_fid.png, a_vs_b_losses.png)")
    glide_main(["compare", "--runs", f"[{runs[1]}]", "--out", str(out), "--overwrite", "true"])
    assert {p.name for p in out.parent.iterdir()} == {"a_vs_b.md", "a_vs_b_losses.png", "other.md"}
    assert "a_vs_b_losses.png" in out.read_text() and "| a |" not in out.read_text()
