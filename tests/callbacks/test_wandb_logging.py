"""Training runs comparable in wandb, through the real training CLI (in this process) and read back from the offline
wandb run files: group and job type, the resolved config with its lineage and ablation, images seen as the x-axis
of train/* and val/* with min/max summaries, gradient and parameter norms, peak memory, and the ``samples`` Table."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from glide_lightning.callbacks.samples import TABLE_COLUMNS
from glide_lightning.callbacks.wandb_logging import IMAGES_SEEN, PEAK_CUDA, PEAK_RSS, summary_of
from glide_lightning.evaluation.wandb_runs import WandbRun, find_runs, read_run
from wandb_offline import offline_wandb

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a large red circle", "a small blue square above a large yellow triangle"]
SCALES = [1.0, 3.0]
BATCH, STEPS = 4, 3


def callbacks_config(path: Path) -> Path:
    """smoke's callbacks, smaller: its EMA, a grid of 2 prompts × 2 scales every 2 steps with the raw weights in the
    Table too, and generation metrics at the validation of step 3 (a later --config replaces the list)."""
    callbacks = [{"class_path": "glide_lightning.callbacks.WarmupEMA", "init_args": {"decay": 0.999, "warmup": "tf"}},
                 {"class_path": "glide_lightning.callbacks.SampleGrid",
                  "init_args": {"prompts": PROMPTS, "guidance_scales": SCALES, "every_n_steps": 2, "raw_weights": True,
                                "sampling": {"steps": "5"}}},
                 {"class_path": "glide_lightning.callbacks.GenerationMetrics",
                  "init_args": {"num_samples": 4, "guidance_scales": SCALES, "extractor": "random-conv",
                                "adherence": True, "sampling": {"steps": "5"}}}]
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def fit(shards: Path, root: Path, probes: Path, name: str, *extra: str) -> None:
    """``python -m glide_lightning fit --config experiments/smoke.yaml …`` in this process, its wandb run finished."""
    import wandb

    from glide_lightning.cli import GlideCLI

    args = ["fit", "--config", str(REPO / "experiments/smoke.yaml"), "--config", str(probes),
            "--data.train_shards", f"{shards}/train-*.tar", "--data.val_shards", f"{shards}/val-*.tar",
            "--data.num_workers", "0", "--data.batch_size", str(BATCH), "--run.root", str(root), "--run.name", name,
            "--run.group", "arms", "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]
    cli = None
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["glide_lightning"])  # the command line is `args` (not pytest's)
            cli = GlideCLI(args=args)
    finally:
        wandb.finish()
        if cli is not None and cli.lock is not None:
            cli.lock.release()  # as the process's end would


@pytest.fixture(scope="module")
def arms(synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, WandbRun]]:
    """Two smoke arms of the group ``arms``, ``base`` then ``fast`` (another LR and seed), on shards with a manifest,
    then ``fast`` resumed to one more step with half the batch; their offline wandb runs read back (``fast_resumed``: the resumed
    session's)."""
    tmp = tmp_path_factory.mktemp("arms")
    shards = tmp / "shards"
    shutil.copytree(synthetic_shards, shards)
    (shards / "manifest.json").write_text('{"recipe": "synthetic"}\n')  # its bytes matter here, not its content
    root, probes = tmp / "runs", callbacks_config(tmp / "callbacks.yaml")
    with offline_wandb(tmp, chdir=True):
        fit(shards, root, probes, "base")
        fit(shards, root, probes, "fast", "--model.optimizer.lr", "5e-4", "--seed_everything", "1")
        fit(shards, root, probes, "fast", "--model.optimizer.lr", "5e-4", "--seed_everything", "1",
            "--trainer.max_steps", str(STEPS + 1), "--data.batch_size", str(BATCH // 2))  # a smaller batch
    assert [run.name for run in find_runs(root)] == ["base", "fast"]  # fast's two sessions are one wandb run
    sessions = sorted({p.parent for p in root.rglob("run-*.wandb")}, key=lambda p: p.name.split("run-", 1)[-1])
    found = [read_run(folder) for folder in sessions]  # each session apart, oldest first
    assert [run.name for run in found] == ["base", "fast", "fast"]
    runs = dict(zip(["base", "fast", "fast_resumed"], found))
    return root, shards, runs


def test_each_arm_is_a_train_run_of_its_group_with_its_resolved_config_and_lineage(arms):
    root, shards, runs = arms
    # each session's config.yaml (the resume changed max_steps: the first session's is kept as config.v1.yaml)
    saved = {"base": "base/config.yaml", "fast": "fast/config.v1.yaml", "fast_resumed": "fast/config.yaml"}
    for session, run in runs.items():
        assert (run.group, run.job_type) == ("arms", "train")
        config = yaml.safe_load((root / saved[session]).read_text())
        for key in ("trainer", "seed_everything", "run", "model", "data"):
            assert run.config[key] == config[key], key  # the config LightningCLI resolved, as config.yaml holds it
        max_steps, batch = (STEPS + 1, BATCH // 2) if session == "fast_resumed" else (STEPS, BATCH)
        assert run.config["trainer"]["max_steps"] == max_steps and run.config["data"]["batch_size"] == batch
        lineage = run.config["lineage"]
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True) \
            if shutil.which("git") else None
        if head is not None and head.returncode == 0:
            assert lineage["git_commit"] == head.stdout.strip() and isinstance(lineage["git_dirty"], bool)
            assert lineage["git_reason"] is None
        else:
            assert lineage["git_commit"] is None and lineage["git_reason"]
        expected = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
        assert lineage["data_manifest_sha256"] == expected and lineage["data_reason"] is None
    # the second arm differs from the first in the LR only (its seed is listed apart); the first had no sibling yet
    fast = runs["fast"].config["ablation"]
    assert fast["siblings"] == ["base"] and fast["keys"] == ["model.optimizer.lr"]
    assert fast["values"] == {"model.optimizer.lr": {"fast": 5e-4, "base": 1e-3}}
    assert fast["arm"] == "model.optimizer.lr=0.0005" and fast["seed"] == {"fast": 1, "base": 0}
    assert runs["base"].config["ablation"]["siblings"] == []
    # each session writes its own: the resumed one trains to another max_steps with another batch, which its
    # ablation lists too
    resumed = runs["fast_resumed"].config["ablation"]
    assert resumed["keys"] == ["data.batch_size", "model.optimizer.lr", "trainer.max_steps"]
    assert resumed["values"]["trainer.max_steps"] == {"fast": STEPS + 1, "base": STEPS}
    assert runs["fast_resumed"].config["lineage"] == runs["fast"].config["lineage"]
    assert runs["fast_resumed"].id == runs["fast"].id  # the same wandb run, continued


def test_images_seen_continues_across_a_resume_with_another_batch_size(arms):
    """The resumed session's step adds its own batch (BATCH // 2) to the images the checkpoint had seen: the x-axis
    is not recomputed as steps × the new batch (which would put step 4 before step 3)."""
    root, _, runs = arms
    first = [r[IMAGES_SEEN] for r in runs["fast"].history if "train/loss" in r]
    resumed = [r[IMAGES_SEEN] for r in runs["fast_resumed"].history if "train/loss" in r]
    assert first == [BATCH * k for k in range(1, STEPS + 1)]
    assert resumed == [BATCH * STEPS + BATCH // 2]
    last = torch.load(root / "fast/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["callbacks"]["ImagesSeen"] == {"count": BATCH * STEPS + BATCH // 2}


def test_a_checkpoint_without_the_images_seen_counter_resumes_it_from_its_step(synthetic_shards, tmp_path):
    """A checkpoint saved before the counter existed (no ``ImagesSeen`` callback state): the resumed count starts
    at its step × the images per step, then adds the new steps' images."""
    probes = tmp_path / "callbacks.yaml"
    probes.write_text(yaml.safe_dump({"trainer": {"callbacks": []}}))
    last = tmp_path / "runs/old/checkpoints/last.ckpt"
    with offline_wandb(tmp_path, chdir=True):
        fit(synthetic_shards, tmp_path / "runs", probes, "old", "--trainer.max_steps", "2")
        checkpoint = torch.load(last, map_location="cpu", weights_only=True)
        assert checkpoint["callbacks"].pop("ImagesSeen") == {"count": 2 * BATCH}
        torch.save(checkpoint, last)  # as saved before the counter existed
        fit(synthetic_shards, tmp_path / "runs", probes, "old", "--trainer.max_steps", "3")
    assert torch.load(last, map_location="cpu", weights_only=True)["callbacks"]["ImagesSeen"] == {"count": 3 * BATCH}


def test_train_and_val_metrics_are_drawn_against_images_seen_with_min_and_max_summaries(arms):
    _, _, runs = arms
    run = runs["base"]
    for key in ("train/loss", "train/mse", "train/grad_norm", "train/param_norm", "val/loss", "val/fid@3",
                "val/adherence@3", PEAK_RSS):
        assert run.metrics[key]["step_metric"] == IMAGES_SEEN, key
    assert {"train/*", "val/*", "sys/*"} <= set(run.metrics) and IMAGES_SEEN in run.metrics
    assert run.metrics["train/loss"]["summary"] == ["min", "last"] == run.metrics["val/fid@1"]["summary"]
    assert run.metrics["val/adherence@1"]["summary"] == ["max", "last"] == run.metrics[PEAK_RSS]["summary"]
    assert run.metrics["train/grad_norm"]["summary"] == []
    losses = [v for _, v in run.series("train/loss", x=IMAGES_SEEN)]
    assert run.summary["train/loss"] == {"min": min(losses), "last": losses[-1]}
    # images seen: optimizer steps × batch, on every train/* and val/* row (Lightning logs step k's under k - 1)
    assert [x for x, _ in run.series("train/loss", x=IMAGES_SEEN)] == [BATCH * k for k in range(1, STEPS + 1)]
    rows = [r for r in run.history if "train/loss" in r]
    assert [(r[IMAGES_SEEN], r["trainer/global_step"]) for r in rows] == [(BATCH * (s + 1), s) for s in range(STEPS)]
    assert [x for x, _ in run.series("val/fid@3", x=IMAGES_SEEN)] == [BATCH * STEPS]
    assert summary_of("val/kid@3") == "min,last" and summary_of("val/clip_score@3") == "max,last"


def test_grad_and_param_norms_and_peak_memory_at_every_logged_step(arms):
    root, _, runs = arms
    run = runs["base"]
    grads = run.series("train/grad_norm", x=IMAGES_SEEN)
    params = run.series("train/param_norm", x=IMAGES_SEEN)
    assert [x for x, _ in grads] == [x for x, _ in params] == [BATCH * k for k in range(1, STEPS + 1)]
    assert all(np.isfinite(g) and g > 0 for _, g in grads)
    clip = run.config["trainer"]["gradient_clip_val"]
    assert max(g for _, g in grads) > clip, "the norm before clipping (after it, it is at most gradient_clip_val)"
    # the parameter norm after the last step is that of the checkpoint's (raw: not the EMA's) weights at that step
    last = torch.load(root / "base/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == STEPS
    weights = last["current_model_state"]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w, dtype=torch.float64)
                                                 for w in weights.values()])).item()
    assert params[-1][1] == pytest.approx(norm, rel=1e-9)
    assert params[0][1] != params[-1][1]  # measured after each step, not once
    peaks = [v for _, v in run.series(PEAK_RSS, x=IMAGES_SEEN)]
    assert len(peaks) == STEPS and all(p > 50 for p in peaks) and peaks == sorted(peaks)  # MiB, a running peak
    assert (PEAK_CUDA in run.summary) == torch.cuda.is_available()
    # the CSV log is as before: none of this is in it
    csv = "".join(p.read_text() for p in (root / "base/csv").rglob("metrics.csv"))
    assert "train/loss" in csv and "grad_norm" not in csv and "param_norm" not in csv and "images_seen" not in csv


def test_the_samples_table_holds_every_prompt_scale_and_weights_with_its_image_and_adherence(arms):
    root, _, runs = arms
    run = runs["base"]
    first, last = run.table("samples", row=0), run.table("samples")
    assert [r["step"] for r in first] == [2] * 8 and [r["images_seen"] for r in first] == [2 * BATCH] * 8
    assert [r["step"] for r in last] == [STEPS] * 8 and {r["images_seen"] for r in last} == {STEPS * BATCH}
    assert list(last[0]) == list(TABLE_COLUMNS)
    cells = {(r["weights"], r["guidance_scale"], r["prompt"]): r for r in last}
    assert set(cells) == {(w, s, p) for w in ("ema", "raw") for s in SCALES for p in PROMPTS}
    assert all(r["seed"] == PROMPTS.index(r["prompt"]) for r in last)  # SampleGrid's seed 0, + i for prompt i
    assert all(0.0 <= r["adherence"] <= 1.0 and r["clip_score"] is None for r in last)
    grid = np.asarray(Image.open(root / f"base/samples/step{STEPS:08d}.png").convert("RGB"))
    for (weights, scale, prompt), row in cells.items():
        image = np.asarray(Image.open(row["image"]["local_path"]).convert("RGB"))
        assert image.shape == (32, 32, 3)  # the model's image size
        if weights == "ema":  # the grid is the EMA's: row = prompt, column = scale
            i, j = PROMPTS.index(prompt), SCALES.index(scale)
            assert np.array_equal(image, grid[32 * i:32 * (i + 1), 32 * j:32 * (j + 1)])
    # both arms drew the same prompts with the same seeds: the Table groups them by prompt
    other = runs["fast"].table("samples")
    assert sorted((r["prompt"], r["seed"], r["guidance_scale"]) for r in other) == \
        sorted((r["prompt"], r["seed"], r["guidance_scale"]) for r in last)


def test_the_grad_norm_under_a_gradscaler_is_the_unscaled_one(synthetic_shards, tmp_path):
    """16-mixed without clipping: the fused AdamW unscales in its own step, after the hook that reads the norm (with
    clipping, Lightning unscales before it). The first step's norm is the fp32 run's, not 2^16 times it."""
    fp16 = json.dumps({"class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
                       "init_args": {"precision": "16-mixed", "device": "cpu"}})
    probes = tmp_path / "callbacks.yaml"
    probes.write_text(yaml.safe_dump({"trainer": {"callbacks": []}}))
    common = ("--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.gradient_clip_val", "null")
    with offline_wandb(tmp_path, chdir=True):
        fit(synthetic_shards, tmp_path / "runs", probes, "fp32", *common, "--trainer.precision", "32-true")
        fit(synthetic_shards, tmp_path / "runs", probes, "fp16", *common, "--trainer.precision", "null",
            "--trainer.plugins", fp16)
    runs = {run.name: run for run in find_runs(tmp_path / "runs")}
    assert runs["fp16"].config["trainer"]["plugins"]["init_args"]["precision"] == "16-mixed"
    (full,), (half,) = (runs[name].series("train/grad_norm", x=IMAGES_SEEN) for name in ("fp32", "fp16"))
    assert full[0] == half[0] == BATCH
    assert half[1] == pytest.approx(full[1], rel=0.05)  # fp16 autocast's rounding only


def test_adherence_on_prompts_that_are_no_synthetic_captions_is_refused_before_training(make_tiny_module):
    from glide_lightning.callbacks import SampleGrid
    from glide_lightning.sampling import SamplingConfig

    module = make_tiny_module()
    SampleGrid(prompts=PROMPTS, adherence=True, sampling=SamplingConfig(steps="5")).setup(None, module, "fit")
    with pytest.raises(ValueError, match=r"prompt 'a photo of a dog' is not one .*set adherence to null or false"):
        SampleGrid(prompts=[PROMPTS[0], "a photo of a dog"], adherence=True,
                   sampling=SamplingConfig(steps="5")).setup(None, module, "fit")
