import io
import json

import numpy as np
from PIL import Image

import pytest

from glide_lightning.data.images import read_png_metadata
from glide_lightning.data.synthetic import synthetic_samples
from glide_lightning.evaluation.fid import ReferenceStatsCache
from glide_lightning.evaluation.fid_cli import main as fid_main
from glide_lightning.evaluation.results import read_results
from glide_lightning.evaluation.zero_shot import FIDJob, generate_missing, random_conv_features, run, scale_dir
from glide_lightning.sampling import SamplingConfig, load_checkpoint


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Synthetic validation captions and their reference images (64 px PNG), as the recipes write them."""
    root = tmp_path_factory.mktemp("heldout")
    (root / "reference").mkdir()
    captions = []
    for sample in synthetic_samples(0, 12, split="val", image_size=64):
        sample.image.save(root / "reference" / f"{sample.key}.png")
        captions.append(sample.caption)
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    return root, captions


def test_killed_fid_run_resumes_without_regenerating_finished_images(tiny_checkpoint, held_out, tmp_path):
    root, captions = held_out
    loaded = load_checkpoint(tiny_checkpoint)
    job = FIDJob(captions=captions[:6], reference=str(root / "reference"), out_dir=tmp_path,
                 sampling=SamplingConfig(steps="3", batch_size=4), scales=[2.0])
    assert generate_missing(loaded, job, 2.0) == 6
    folder = scale_dir(tmp_path, 2.0)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.png")}
    # a run killed mid-way: two images never written, one half-written temp file left behind
    (folder / "000002.png").unlink(), (folder / "000005.png").unlink()
    (folder / ".000005.png.tmp").write_bytes(b"partial")
    assert generate_missing(loaded, job, 2.0) == 2
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.png")}
    assert set(after) == set(before)
    for name in before:  # finished images untouched; regenerated ones the same (per-image seeds)
        if name in ("000002.png", "000005.png"):  # up to float differences between batch sizes
            diff = (np.asarray(Image.open(folder / name), dtype=int) -
                    np.asarray(Image.open(io.BytesIO(before[name][1])), dtype=int))
            assert np.abs(diff).mean() < 0.5 and (np.abs(diff) > 8).mean() < 0.01
        else:
            assert after[name] == before[name]
    assert generate_missing(loaded, job, 2.0) == 0
    assert read_png_metadata(folder / "000002.png")["prompt"] == captions[2]


def test_ranks_generate_disjoint_shares(tiny_checkpoint, held_out, tmp_path):
    root, captions = held_out
    loaded = load_checkpoint(tiny_checkpoint)
    job = FIDJob(captions=captions[:5], reference=str(root / "reference"), out_dir=tmp_path,
                 sampling=SamplingConfig(steps="2"), scales=[1.0])
    assert generate_missing(loaded, job, 1.0, rank=1, world=2) == 2  # images 1 and 3
    assert sorted(p.name for p in scale_dir(tmp_path, 1.0).glob("*.png")) == ["000001.png", "000003.png"]


def test_fid_results_say_how_they_were_computed_and_flag_random_weights(tiny_checkpoint, held_out, tmp_path):
    root, captions = held_out
    loaded = load_checkpoint(tiny_checkpoint)
    job = FIDJob(captions=captions[:8], reference=str(root / "reference"), out_dir=tmp_path,
                 sampling=SamplingConfig(steps="3"), scales=[1.0, 4.0], clip_model=None)
    cache = ReferenceStatsCache(tmp_path / "cache")
    results = run(job, loaded, random_conv_features(), cache)
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
    results = fid_main("sweep", ["--run-dir", str(run_dir), "--captions", str(root / "captions.txt"),
                                 "--reference", str(root / "reference"), "--n", "6", "--scales", "1", "3",
                                 "--extractor", "random-conv", "--clip-pretrained", "none", "--steps", "2",
                                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache")])
    out = run_dir / "fid" / "res32_ddpm2_n6"
    table = (out / "sweep.md").read_text()
    assert "| 1 |" in table and "| 3 |" in table and "NOT a real FID" in table
    assert (out / "sweep.png").stat().st_size > 1000
    assert results[0].clip_score.random_weights
    assert json.loads((out / "sweep.json").read_text()) == [r.to_dict() for r in results]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "the figures go to a wandb run beside the training run"


def test_fid_command_needs_enough_captions(tiny_checkpoint, held_out, tmp_path):
    root, _ = held_out
    with pytest.raises(ValueError, match="fewer than --n 100"):
        fid_main("fid", ["--ckpt", str(tiny_checkpoint), "--captions", str(root / "captions.txt"), "--n", "100",
                         "--reference", str(root / "reference"), "--out", str(tmp_path)])
