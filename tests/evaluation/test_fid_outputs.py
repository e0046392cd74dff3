"""``fid`` and ``sweep`` never share a results folder (glide_lightning.outputs): one folder per evaluation
setting, refused before any model is loaded when it holds results already; ``--overwrite true`` deletes those
results first and keeps the setting's image cache (reused) and every file the commands do not write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glide_lightning.commands import main as glide_main
from glide_lightning.evaluation import fid_cli
from test_outputs import refusal
from test_zero_shot import held_out  # noqa: F401  (the fixture: held-out captions and reference images)


def evaluation(held_out: tuple[Path, list[str]], tmp_path: Path) -> list[str]:
    """The options of a 4-caption, random-feature evaluation of ``held_out`` into ``tmp_path / "fid"``."""
    root, _ = held_out
    return ["--captions", str(root / "captions.txt"), "--reference", str(root / "reference"), "--n", "4",
            "--extractor", "random-conv", "--clip_model", "none", "--sampling.batch_size", "4", "--device", "cpu",
            "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "fid")]


def test_fid_and_sweep_never_share_a_results_folder_and_overwrite_reuses_the_image_cache(
        tiny_checkpoint, held_out, tmp_path, monkeypatch, capsys):
    options = ["--ckpt", str(tiny_checkpoint), *evaluation(held_out, tmp_path)]
    glide_main(["fid", *options, "--scales", "[1]", "--sampling.steps", "2"])
    setting = tmp_path / "fid" / "res32_ddpm2_n4"
    (setting / "notes.txt").write_text("mine")
    (cache,) = setting.glob("images-*")
    made = {p: p.stat().st_mtime_ns for p in cache.rglob("*.png")}
    # another setting is another folder: evaluated beside the first, which it leaves alone
    glide_main(["fid", *options, "--scales", "[1]", "--sampling.steps", "3"])
    assert sorted(p.name for p in (tmp_path / "fid").iterdir()) == ["res32_ddpm2_n4", "res32_ddpm3_n4"]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.png")} == made
    # the same setting again: refused before any model is loaded
    monkeypatch.setattr(fid_cli, "load_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    message = refusal(capsys, ["sweep", *options, "--scales", "[1, 3]", "--sampling.steps", "2"])
    assert message.startswith(f"sweep: the results folder {setting} already holds the output of an earlier fid or "
                              f"sweep: 1 file (results.json), and 1 file it does not write (notes.txt)")
    monkeypatch.undo()
    results = glide_main(["sweep", *options, "--scales", "[1, 3]", "--sampling.steps", "2", "--overwrite", "true"])
    assert sorted(p.name for p in setting.iterdir()) == [cache.name, "notes.txt", "results.json", "sweep.json",
                                                         "sweep.md", "sweep.png"]
    written = json.loads((setting / "results.json").read_text())["results"]
    assert [r["guidance_scale"] for r in written] == [1.0, 3.0] == [r.guidance_scale for r in results]
    kept = {p: p.stat().st_mtime_ns for p in cache.rglob("*.png") if p in made}
    assert kept == made  # scale 1's images came from the cache, not regenerated


def test_a_sweep_over_samplers_refuses_an_earlier_nfe_sweep_before_loading(tmp_path, capsys):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "nfe_sweep.md").write_text("earlier")
    (root / "res32_ddim2_n4").mkdir()  # another setting's folder: not this sweep's concern
    message = refusal(capsys, ["sweep", "--ckpt", str(tmp_path / "missing.ckpt"), "--res", "32", "--n", "4",
                               "--samplers", "[ddim, dpmpp_2m]", "--step_counts", '["2"]', "--out", str(root)])
    # (the checkpoint does not even exist: the refusal comes before anything is loaded)
    assert message.startswith(f"sweep: --out {root} already holds the output of an earlier sweep: 1 file "
                              f"(nfe_sweep.md); pass --overwrite true")
