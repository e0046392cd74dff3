"""The eval wandb run of ``fid`` / ``sweep``, read back from its offline files: linked to the training run
(group, ``train_run_id``, checkpoint sha256), metrics against the guidance scale (or NFE) as step metrics, and the
``eval/results`` Table holding what ``results.json`` holds. Through the real ``sweep`` command on a tiny checkpoint
(random features, so every FID here is labelled NOT real)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from glide_lightning.commands import main as glide_main
from glide_lightning.evaluation.results import ScaleResult
from glide_lightning.evaluation.wandb_eval import (
    GUIDANCE_STEP,
    NFE_STEP,
    RANDOM_FEATURES_LABEL,
    RESULTS_TABLE,
    TABLE_COLUMNS,
    sha256_file,
)
from glide_lightning.evaluation.wandb_runs import WandbRun, find_runs
from test_zero_shot import held_out  # noqa: F401  (the fixture: held-out captions and reference images)


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):  # the staged Tables land in the test's folder
        monkeypatch.setenv(var, str(tmp_path / var))


def training_run(tmp_path: Path, checkpoint: Path) -> tuple[Path, str]:
    """A run directory as training leaves it: checkpoint, ``config.yaml``'s run section, ``wandb_id.txt`` and the
    training run's own offline wandb run under that id (group ``abl``)."""
    import wandb

    run_dir = tmp_path / "runs" / "arm_a"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(checkpoint.read_bytes())
    (run_dir / "config.yaml").write_text("run:\n  name: arm_a\n  project: proj\n  group: abl\n  tags: [t1]\n")
    (run_dir / "wandb_id.txt").write_text("trn0001\n")
    train = wandb.init(project="proj", group="abl", job_type="train", name="arm_a", id="trn0001", dir=str(run_dir),
                       mode="offline")
    train.log({"train/loss": 0.5})
    train.finish()
    return run_dir, "trn0001"


def eval_run(run_dir: Path, train_id: str) -> WandbRun:
    runs = find_runs(run_dir)
    train = [r for r in runs if r.job_type == "train"]
    evals = [r for r in runs if r.job_type == "eval"]
    assert [r.id for r in train] == [train_id] and len(evals) == 1, [(r.id, r.job_type) for r in runs]
    return evals[0]


def common(root: Path, tmp_path: Path, n: int) -> list[str]:
    return ["--captions", str(root / "captions.txt"), "--reference", str(root / "reference"), "--n", str(n),
            "--extractor", "random-conv", "--device", "cpu", "--cache_dir", str(tmp_path / "cache")]


def test_a_sweep_logs_an_eval_run_linked_to_its_training_run(tiny_checkpoint, held_out, tmp_path,  # noqa: F811
                                                            offline_wandb):
    root, _ = held_out
    run_dir, train_id = training_run(tmp_path, tiny_checkpoint)
    results = glide_main(["sweep", "--run_dir", str(run_dir), *common(root, tmp_path, 6), "--scales", "[3, 1]",
                          "--clip_pretrained", "none", "--sampling.steps", "2", "--kid_subsets", "10"])
    records = json.loads((run_dir / "fid" / "res32_ddpm2_n6" / "results.json").read_text())["results"]
    run = eval_run(run_dir, train_id)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    # lineage: the training run's project and group, its wandb id, the checkpoint's bytes
    assert (run.project, run.group, run.tags) == ("proj", "abl", ["t1"])
    assert run.name == "arm_a-eval-last-ddpm2-n6-res32"
    assert run.config["train_run_id"] == (run_dir / "wandb_id.txt").read_text().strip() == train_id
    assert run.config["checkpoint"] == str(checkpoint)
    assert run.config["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (run.config["sampler"], run.config["steps"], run.config["n"], run.config["resolution"]) == \
        ("ddpm", "2", 6, 32)
    assert run.config["extractor"] == results[0].fid.extractor_name and run.config["random_features"] is True
    assert run.config["label"] == RANDOM_FEATURES_LABEL and run.config["guidance_scales"] == [1.0, 3.0]
    # every metric drawn against the guidance scale: one step per scale, in increasing scale
    for name in ("fid", "kid", "kid_std", "precision", "recall", "clip_score", "adherence"):
        assert run.metrics[f"eval/{name}"]["step_metric"] == GUIDANCE_STEP, name
    assert run.metrics["eval/fid"]["summary"] == ["min"] and run.metrics["eval/kid"]["summary"] == ["min"]
    assert run.metrics["eval/clip_score"]["summary"] == ["max"] and "eval/fd_dinov2" not in run.metrics
    scale_steps = [step for step in run.history if GUIDANCE_STEP in step]
    assert [step[GUIDANCE_STEP] for step in scale_steps] == [1.0, 3.0]
    by_scale = {r["guidance_scale"]: r for r in records}
    assert run.series("eval/fid", x=GUIDANCE_STEP) == [(s, by_scale[s]["fid"]["fid"]) for s in (1.0, 3.0)]
    assert run.series("eval/kid", x=GUIDANCE_STEP) == [(s, by_scale[s]["kid"]["mean"]) for s in (1.0, 3.0)]
    assert run.series("eval/clip_score", x=GUIDANCE_STEP) == \
        [(s, by_scale[s]["clip_score"]["mean"]) for s in (1.0, 3.0)]
    assert run.series("eval/adherence", x=GUIDANCE_STEP) == [(s, by_scale[s]["adherence"]) for s in (1.0, 3.0)]
    # summaries: the best value, and the per-scale keys of earlier versions
    fids = [r["fid"]["fid"] for r in records]
    assert run.summary["eval/fid"] == {"min": min(fids)}
    assert run.summary["eval/clip_score"] == {"max": max(r["clip_score"]["mean"] for r in records)}
    for r in results:
        s = f"{r.guidance_scale:g}"
        assert run.summary[f"eval/fid@{s}"] == r.fid.fid and run.summary[f"eval/kid@{s}"] == r.kid.mean
        assert (run.summary[f"eval/precision@{s}"], run.summary[f"eval/recall@{s}"]) == (r.precision, r.recall)
        assert run.summary[f"eval/kid_std@{s}"] == r.kid.std
    assert run.summary["eval/fid_label"] == results[0].fid.label
    # the results Table: one row per result, the named columns, then the other fields of results.json
    rows = run.table(RESULTS_TABLE)
    assert len(rows) == len(records) == 2
    assert list(rows[0])[:len(TABLE_COLUMNS)] == list(TABLE_COLUMNS)
    assert [row["fid"] for row in rows] == [r["fid"]["fid"] for r in records]
    assert [row["guidance_scale"] for row in rows] == [r["guidance_scale"] for r in records] == [3.0, 1.0]
    for row, record in zip(rows, records):
        assert row["checkpoint_sha256"] == run.config["checkpoint_sha256"] and row["label"] == RANDOM_FEATURES_LABEL
        assert (row["sampler"], row["steps"], row["nfe"], row["n"]) == ("ddpm", "2", record["nfe"], 6)
        assert (row["kid"], row["kid_std"]) == (record["kid"]["mean"], record["kid"]["std"])
        assert (row["precision"], row["recall"]) == (record["precision_recall"]["precision"],
                                                     record["precision_recall"]["recall"])
        assert row["clip_score"] == record["clip_score"]["mean"] and row["adherence"] == record["adherence"]
        assert row["kid.subset_size"] == record["kid"]["subset_size"] == 6  # a field not named: flattened in
        assert row["fid.label"] == record["fid"]["label"] and row["run"] == "arm_a"
    # bootstrap intervals, whichever ScaleResult records: table columns <metric>_interval.lo/hi, eval/<metric>_lo/hi
    intervals = [f.name for f in dataclasses.fields(ScaleResult) if f.name.endswith("_interval")]
    assert "fid_interval" in intervals or not intervals
    for field in (f for f in intervals if f in records[0]):
        metric = field.removesuffix("_interval")
        for row, record in zip(rows, records):
            assert (row[f"{field}.lo"], row[f"{field}.hi"]) == (record[field]["lo"], record[field]["hi"])
        assert run.series(f"eval/{metric}_lo", x=GUIDANCE_STEP) == [(s, by_scale[s][field]["lo"]) for s in (1.0, 3.0)]
        assert run.series(f"eval/{metric}_hi", x=GUIDANCE_STEP) == [(s, by_scale[s][field]["hi"]) for s in (1.0, 3.0)]
    assert not intervals or "fid_interval" in records[0]  # the sweep bootstraps by default
    # FID against CLIP score, drawn from the table (CLIP scores exist here)
    assert any("eval/fid_vs_clip_score_table" in step for step in run.history)


def test_a_sampler_sweep_draws_quality_against_model_evaluations(tiny_checkpoint, held_out, tmp_path,  # noqa: F811
                                                                 offline_wandb):
    root, _ = held_out
    run_dir, train_id = training_run(tmp_path, tiny_checkpoint)
    glide_main(["sweep", "--run_dir", str(run_dir), *common(root, tmp_path, 4), "--scales", "[1, 3]",
                "--clip_model", "none", "--samplers", "[ddim, dpmpp_2m]", "--step_counts", '["2", "3"]',
                "--sampling.batch_size", "4", "--metrics", "[]"])
    nfe_sweep = json.loads((run_dir / "fid" / "nfe_sweep.json").read_text())
    run = eval_run(run_dir, train_id)  # one eval run for the whole sweep
    assert run.name == "arm_a-eval-last-nfe-ddim+dpmpp_2m-n4-res32"
    assert run.config["settings"] == ["ddim2", "ddim3", "dpmpp_2m2", "dpmpp_2m3"]
    assert run.config["samplers"] == ["ddim", "dpmpp_2m"] and run.config["train_run_id"] == train_id
    for sampler in ("ddim", "dpmpp_2m"):
        for scale in ("1", "3"):
            assert run.metrics[f"eval/{sampler}/fid@{scale}"]["step_metric"] == NFE_STEP
            expected = [(r["nfe"], r["fid"]["fid"]) for r in nfe_sweep
                        if r["sampler"] == sampler and f"{r['guidance_scale']:g}" == scale]
            assert run.series(f"eval/{sampler}/fid@{scale}", x=NFE_STEP) == sorted(expected)
            assert len(expected) == 2
    nfes = [step[NFE_STEP] for step in run.history if NFE_STEP in step]
    assert nfes == sorted(nfes) and sorted(nfes) == sorted(r["nfe"] for r in nfe_sweep) == [2, 2, 3, 3, 4, 4, 6, 6]
    assert not any(GUIDANCE_STEP in step for step in run.history)
    rows = run.table(RESULTS_TABLE)
    assert len(rows) == len(nfe_sweep) == 8
    assert sorted((row["sampler"], row["steps"], row["guidance_scale"], row["nfe"], row["fid"]) for row in rows) == \
        sorted((r["sampler"], r["steps"], r["guidance_scale"], r["nfe"], r["fid"]["fid"]) for r in nfe_sweep)
    assert all(row["kid"] is None and row["clip_score"] is None for row in rows)  # not measured: empty cells
    assert any("eval/fid_vs_nfe_table" in step for step in run.history)
    assert not any("eval/fid_vs_clip_score_table" in step for step in run.history)  # no CLIP scores: no such plot


def test_sha256_is_streamed(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk_bytes=1000) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")
