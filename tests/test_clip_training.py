"""Training a noised CLIP: the contrastive loss in closed form, settings refused at construction, the task
switch of the one CLI, and a fit through the real CLI on synthetic shards whose exported encoders
load like glide-text2im's and drive ``sample --clip_dir``."""

import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import yaml

from glide_lightning.cli import task_of
from glide_lightning.clip_module import NoisedCLIPModule, contrastive_loss
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.models.clip import NoisedCLIPConfig, load_noised_clip
from glide_lightning.sampling import SamplingConfig, generate, load_checkpoint, load_guidance_clip

from hang_guard import HANG_GUARD_S
from test_cli import REPO, cli_env, parse_in_process, read_csv_metrics

TINY_PRESET = REPO / "experiments/parts/tiny_clip_model.yaml"
BATCH = 16


def test_contrastive_loss_is_the_symmetric_cross_entropy_in_closed_form():
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = contrastive_loss(image, text, 2.0)
    logits = 2.0 * torch.tensor([[0.0, 1.0], [0.6, 0.8]])  # logits[i, j] = 2·cos(image i, text j)

    def ce(rows):  # mean over i of -log softmax(rows[i])[i]
        return -sum(rows[i, i] - torch.logsumexp(rows[i], 0) for i in range(2)) / 2

    torch.testing.assert_close(out["loss"], (ce(logits) + ce(logits.T)) / 2)
    assert out["accuracy"] == 0.5  # image 0's nearest caption is caption 1, image 1's its own
    torch.testing.assert_close(contrastive_loss(image, image, 1.0)["accuracy"], torch.tensor(1.0))


def test_contrastive_loss_is_fp32_under_bf16_autocast():
    """The encoders' bf16 embeddings (under bf16-mixed) meet in an fp32 similarity and cross-entropy: at logit
    scale 100 a bf16 product would round each logit by up to 0.4."""
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1).bfloat16()
                   for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = contrastive_loss(image, text, torch.tensor(100.0))
    exact = contrastive_loss(image.float(), text.float(), torch.tensor(100.0))
    assert mixed["loss"].dtype == torch.float32
    torch.testing.assert_close(mixed["loss"], exact["loss"], rtol=1e-6, atol=0.0)


def test_settings_that_cannot_train_together_are_refused():
    config = NoisedCLIPConfig(**yaml.safe_load(TINY_PRESET.read_text()))
    with pytest.raises(ValueError, match="n_timesteps 100 must equal model.diffusion.steps 50"):
        NoisedCLIPModule(model=config, diffusion=DiffusionConfig(steps=50))
    with pytest.raises(ValueError, match="n_vocab 1000 is smaller than tokenizer 'clip'"):
        NoisedCLIPModule(model=NoisedCLIPConfig(**{**asdict(config), "n_vocab": 1000}),
                         diffusion=DiffusionConfig(steps=100))


def test_the_task_is_read_from_flags_and_config_files(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("task: noised_clip\n")
    assert task_of(["fit", "--config", str(REPO / "experiments/smoke.yaml")]) == "diffusion"
    assert task_of(["fit", "--config", str(config)]) == "noised_clip"
    assert task_of(["fit", f"--config={config}", "--task", "diffusion"]) == "diffusion"
    assert task_of(["fit", "--task=noised_clip"]) == "noised_clip"


def test_an_unknown_task_names_the_choices(tmp_path):
    run = parse_in_process(["fit", "--task", "clip", "--print_config"], cwd=tmp_path)
    assert run.returncode != 0 and "unknown task 'clip': choose one of diffusion, noised_clip" in run.stderr


@pytest.fixture(scope="module")
def trained_clip(synthetic_shards, tmp_path_factory):
    """experiments/noised_clip.yaml with the tiny preset, 300 steps through the real CLI."""
    root = tmp_path_factory.mktemp("runs")
    run = subprocess.run([sys.executable, "-m", "glide_lightning", "fit", "--config",
                          str(REPO / "experiments/noised_clip.yaml"), "--model.model", str(TINY_PRESET),
                          "--data.train_shards", f"{synthetic_shards}/train-*.tar",
                          "--data.val_shards", f"{synthetic_shards}/val-*.tar", "--data.num_workers", "0",
                          "--data.batch_size", str(BATCH), "--run.root", str(root), "--trainer.max_steps", "300",
                          "--trainer.val_check_interval", "300", "--trainer.log_every_n_steps", "5",
                          "--model.optimizer.warmup_steps", "0", "--model.optimizer.lr", "1e-3",
                          "--model.optimizer.weight_decay", "0", "--trainer.enable_progress_bar", "false"],
                         env=cli_env(root), cwd=root, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "noised_clip"


def test_a_short_fit_through_the_cli_learns_to_match_captions(trained_clip):
    rows = read_csv_metrics(trained_clip)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    chance = math.log(BATCH)  # the loss of embeddings that tell nothing apart
    assert sum(losses[-10:]) / 10 < min(chance - 0.2, sum(losses[:10]) / 10), losses
    val = [(float(r["val/loss"]), float(r["val/accuracy"])) for r in rows if r.get("val/loss")]
    assert val and val[-1][0] < chance and val[-1][1] > 1 / BATCH, val
    scales = [float(r["train/logit_scale"]) for r in rows if r.get("train/logit_scale")]
    assert scales[-1] != pytest.approx(14.2857, abs=1e-3), "the logit scale is learned"


def test_the_export_holds_the_checkpoint_weights_in_glide_text2im_format(trained_clip):
    clip, meta = load_noised_clip(trained_clip / "clip")
    assert meta["process"]["steps"] == 100 and meta["process"]["noise_schedule"] == "cosine"
    assert meta["tokenizer"] == "clip" and clip.config.image_size == 32
    state = torch.load(trained_clip / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key, value in clip.state_dict().items():
        torch.testing.assert_close(value, state[f"clip.{key}"], rtol=0, atol=0)
    assert math.log(clip.config.logit_scale) == pytest.approx(float(state["log_logit_scale"]), abs=1e-5)
    saved = torch.load(trained_clip / "clip/image_enc.pt", weights_only=True)
    assert set(saved) == {k.removeprefix("image_encoder.") for k in clip.state_dict() if k.startswith("image_encoder.")}


def test_the_exported_encoders_drive_clip_guided_sampling(trained_clip, tiny_checkpoint, tmp_path):
    out = tmp_path / "guided"
    run = subprocess.run([sys.executable, "-m", "glide_lightning", "sample", "--ckpt", str(tiny_checkpoint),
                          "--prompt", "a large red circle", "--clip_dir", str(trained_clip / "clip"),
                          "--sampling.clip_guidance_scale", "10", "--sampling.guidance_scale", "1",
                          "--sampling.steps", "10", "--out", str(out), "--device", "cpu"],
                         env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["clip_guidance_scale"] == 10 and "noised_clip export" in meta["images"][0]["clip"]
    # the trained CLIP's own similarity of the samples to their prompts rises with guidance (same seeds)
    base = load_checkpoint(tiny_checkpoint)
    guide = load_guidance_clip(trained_clip / "clip", base.image_size)
    prompts = ["a large red circle", "a small blue square", "a large green triangle", "a small yellow circle"]
    seeds = [0, 1, 2, 3]
    config = SamplingConfig(steps="10", guidance_scale=1.0)
    similarity = []
    for scale in (0.0, 10.0):
        images = generate(base, prompts, seeds, SamplingConfig(**{**asdict(config), "clip_guidance_scale": scale}),
                          clip=guide)
        tokens, mask = guide.tokenizer(prompts)
        with torch.no_grad():
            text = guide.clip.text_embeddings(tokens, mask)
            similarity.append(guide.clip.similarity(images.float() / 127.5 - 1, torch.zeros(4, dtype=torch.long), text))
    assert similarity[1].mean() > similarity[0].mean(), similarity
