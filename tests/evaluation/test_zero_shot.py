import json
import logging
import re
from dataclasses import replace

import pytest

from glide_lightning.commands import main as glide_main
from glide_lightning.data.images import read_png_metadata
from held_out import write_held_out
from glide_lightning.evaluation.fid import ReferenceStatsCache
from glide_lightning.evaluation.results import read_results
from glide_lightning.evaluation.zero_shot import (
    FIDJob,
    generate_missing,
    images_dir,
    random_conv_features,
    run,
    scale_dir,
)
from glide_lightning.sampling import SamplingConfig, load_checkpoint


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Synthetic validation captions and their reference images (64 px PNG), as the recipes write them."""
    root = tmp_path_factory.mktemp("heldout")
    _, _, captions = write_held_out(root, 12, 64)
    return root, captions


def test_killed_fid_run_resumes_byte_identical(tiny_checkpoint, held_out, tmp_path):
    root, captions = held_out
    loaded = load_checkpoint(tiny_checkpoint)
    job = FIDJob(captions=captions[:6], reference=str(root / "reference"), out_dir=tmp_path,
                 sampling=SamplingConfig(steps="3", batch_size=4), scales=[2.0])
    assert generate_missing(loaded, job, 2.0) == 6
    folder = scale_dir(images_dir(job, loaded), 2.0)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.png")}
    # a run killed mid-way: two images never written, one half-written temp file left behind
    (folder / "000002.png").unlink(), (folder / "000005.png").unlink()
    (folder / ".000005.png.tmp").write_bytes(b"partial")
    assert generate_missing(loaded, job, 2.0) == 2
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.png")}
    assert set(after) == set(before)
    for name in before:  # regenerated in their own blocks: the same bytes; the others untouched
        assert after[name][1] == before[name][1]
        if name not in ("000002.png", "000005.png"):
            assert after[name][0] == before[name][0]
    assert generate_missing(loaded, job, 2.0) == 0
    assert read_png_metadata(folder / "000002.png")["prompt"] == captions[2]


def test_ranks_generate_disjoint_blocks_identical_to_one_process(tiny_checkpoint, held_out, tmp_path):
    root, captions = held_out
    loaded = load_checkpoint(tiny_checkpoint)

    def job(out):
        return FIDJob(captions=captions[:5], reference=str(root / "reference"), out_dir=out,
                      sampling=SamplingConfig(steps="2", batch_size=2), scales=[1.0])

    assert generate_missing(loaded, job(tmp_path / "two"), 1.0, rank=1, world=2) == 2  # block [2, 3]
    shard = scale_dir(images_dir(job(tmp_path / "two"), loaded), 1.0)
    assert sorted(p.name for p in shard.glob("*.png")) == ["000002.png", "000003.png"]
    assert generate_missing(loaded, job(tmp_path / "two"), 1.0, rank=0, world=2) == 3  # blocks [0, 1], [4]
    assert generate_missing(loaded, job(tmp_path / "one"), 1.0) == 5
    alone = scale_dir(images_dir(job(tmp_path / "one"), loaded), 1.0)
    for i in range(5):
        assert (shard / f"{i:06d}.png").read_bytes() == (alone / f"{i:06d}.png").read_bytes()


def test_images_are_cached_under_everything_that_determines_them(tiny_checkpoint, make_tiny_module, held_out,
                                                                 tmp_path):
    """Another checkpoint, seed, caption list, sampler option or batch size never reuses images."""
    import lightning as L

    root, captions = held_out
    other_ckpt = tmp_path / "other.ckpt"
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(make_tiny_module(seed=1))
    trainer.save_checkpoint(other_ckpt)
    base, other = load_checkpoint(tiny_checkpoint), load_checkpoint(other_ckpt)
    job = FIDJob(captions=captions[:3], reference=str(root / "reference"), out_dir=tmp_path / "fid",
                 sampling=SamplingConfig(steps="2"), scales=[3.0])
    variants = {"other checkpoint": (other, job), "seed": (base, replace(job, seed=123)),
                "captions": (base, replace(job, captions=captions[3:6])),
                "sampler": (base, replace(job, sampling=SamplingConfig(steps="2", sampler="ddim"))),
                "batch size": (base, replace(job, sampling=SamplingConfig(steps="2", batch_size=2))),
                "guidance interval": (base, replace(job, sampling=SamplingConfig(steps="2",
                                                                                 guidance_interval=(0.5, 5.0))))}
    assert generate_missing(base, job, 3.0) == 3
    assert generate_missing(base, job, 3.0) == 0  # the same model and settings: reused
    folders = {images_dir(job, base)}
    for name, (model, variant) in variants.items():
        assert generate_missing(model, variant, 3.0) == 3, name
        folders.add(images_dir(variant, model))
    assert len(folders) == len(variants) + 1
    recorded = json.loads((images_dir(variants["seed"][1], base) / "generation.json").read_text())
    assert recorded["seed"] == 123 and str(tiny_checkpoint) in recorded["sources"]["base"]


def test_fid_results_say_how_they_were_computed_and_flag_random_weights(tiny_checkpoint, held_out, tmp_path, caplog):
    root, captions = held_out
    loaded = load_checkpoint(tiny_checkpoint)
    job = FIDJob(captions=captions[:8], reference=str(root / "reference"), out_dir=tmp_path,
                 sampling=SamplingConfig(steps="3", batch_size=4), scales=[1.0, 4.0], clip_model=None)
    cache = ReferenceStatsCache(tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="glide_lightning.evaluation.zero_shot"):
        results = run(job, loaded, random_conv_features(), cache)
    # the work is announced before it starts, and the time left is extrapolated from the first block on
    assert "rank 0: 2 scale(s) x 8 captions, ddpm 3 steps: 16 images to generate" in caplog.text
    assert re.search(r"4 / 16 images in \S+ \([\d.]+ s per image\): about \S+ left", caplog.text)
    assert "16 / 16 images" in caplog.text
    assert [r.guidance_scale for r in results] == [1.0, 4.0]
    for r in results:
        assert r.n == 8 and r.resolution == 32 and r.sampler == "ddpm" and r.steps == "3"
        assert r.fid.random_weights and r.fid.label.startswith("NOT a real FID")
        assert r.fid.n_reference == 12 and r.fid.resolution == 32  # references resized to 32 px
        assert 0.0 <= r.adherence <= 1.0  # synthetic captions: adherence is scored
        assert r.clip_score is None and str(tiny_checkpoint) in r.checkpoint
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # one reference entry, reused by both scales
    assert read_results(tmp_path / "results.json") == results
    assert json.loads((tmp_path / "results.json").read_text())["sampling"]["steps"] == "3"


def test_sweep_command_writes_table_plot_and_wandb_summary(tiny_checkpoint, held_out, tmp_path, monkeypatch):
    root, _ = held_out
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var))
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(tiny_checkpoint.read_bytes())
    (run_dir / "config.yaml").write_text("run:\n  name: tiny\n  group: test\n")
    results = glide_main(["sweep", "--run_dir", str(run_dir), "--captions", str(root / "captions.txt"),
                          "--reference", str(root / "reference"), "--n", "6", "--scales", "[1, 3]",
                          "--extractor", "random-conv", "--clip_pretrained", "none", "--sampling.steps", "2",
                          "--device", "cpu", "--cache_dir", str(tmp_path / "cache")])
    out = run_dir / "fid" / "res32_ddpm2_n6"
    table = (out / "sweep.md").read_text()
    assert "| 1 |" in table and "| 3 |" in table and "NOT a real FID" in table
    assert (out / "sweep.png").stat().st_size > 1000
    assert results[0].clip_score.random_weights
    assert json.loads((out / "sweep.json").read_text()) == [r.to_dict() for r in results]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "the figures go to a wandb run beside the training run"


def test_sweep_over_samplers_and_steps_plots_quality_against_model_evaluations(tiny_checkpoint, held_out, tmp_path):
    root, _ = held_out
    results = glide_main(["sweep", "--ckpt", str(tiny_checkpoint), "--captions", str(root / "captions.txt"),
                          "--reference", str(root / "reference"), "--n", "4", "--scales", "[1, 3]",
                          "--extractor", "random-conv", "--clip_model", "none", "--samplers", "[ddim, dpmpp_2m]",
                          "--step_counts", '["2", "3"]', "--sampling.batch_size", "4", "--device", "cpu",
                          "--out", str(tmp_path / "sweep"), "--cache_dir", str(tmp_path / "cache")])
    settings = {(r.sampler, r.steps, r.guidance_scale): r.nfe for r in results}
    assert settings == {(sampler, steps, scale): int(steps) * (1 if scale == 1 else 2)
                        for sampler in ("ddim", "dpmpp_2m") for steps in ("2", "3") for scale in (1.0, 3.0)}
    for folder in ("res32_ddim2_n4", "res32_ddim3_n4", "res32_dpmpp_2m2_n4", "res32_dpmpp_2m3_n4"):
        assert (tmp_path / "sweep" / folder / "sweep.md").is_file()
    table = (tmp_path / "sweep" / "nfe_sweep.md").read_text()
    assert "NOT a real FID" in table and "| dpmpp_2m | 3 | 3 | 6 |" in table
    assert (tmp_path / "sweep" / "nfe_sweep.png").stat().st_size > 1000
    assert [r["nfe"] for r in json.loads((tmp_path / "sweep" / "nfe_sweep.json").read_text())] == [2, 3, 4, 6] * 2
    with pytest.raises(SystemExit):  # DDIM's stride spacing with another sampler: refused when parsed
        glide_main(["sweep", "--ckpt", str(tiny_checkpoint), "--samplers", "[ddpm]", "--step_counts", '["ddim2"]'])


def test_fid_command_needs_enough_captions(tiny_checkpoint, held_out, tmp_path, capsys):
    root, _ = held_out
    with pytest.raises(SystemExit) as done:  # a user's mistake: one error line, exit status 2
        glide_main(["fid", "--ckpt", str(tiny_checkpoint), "--captions", str(root / "captions.txt"), "--n", "100",
                    "--reference", str(root / "reference"), "--out", str(tmp_path)])
    assert done.value.code == 2 and "fewer than --n 100" in capsys.readouterr().err
