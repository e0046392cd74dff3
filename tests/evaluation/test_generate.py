import json
from pathlib import Path

import pytest
import torch

from glide_lightning.evaluation.generate import SamplingConfig, generate, image_grid, load_sampling_model
from glide_lightning.data.images import read_png_metadata
from glide_lightning.evaluation.sample_cli import main as sample_main
from glide_lightning.models import from_glide_text2im
from glide_lightning.models.glide_text2im import glide_config

FAST = SamplingConfig(steps="5", batch_size=2)


def test_images_depend_on_prompt_and_seed_only(tiny_checkpoint):
    loaded = load_sampling_model(tiny_checkpoint)
    prompts = ["a large red circle", "a small blue square", "a large green triangle"]
    together = generate(loaded, prompts, [1, 2, 3], FAST)
    assert together.dtype == torch.uint8 and together.shape == (3, 3, 32, 32)
    alone = generate(loaded, prompts[1:2], [2], SamplingConfig(steps="5", batch_size=1))
    diff = (together[1].int() - alone[0].int()).abs()  # the same up to float differences between batch sizes
    assert diff.float().mean() < 0.5 and (diff > 8).float().mean() < 0.01
    assert not torch.equal(generate(loaded, prompts[1:2], [9], FAST)[0], alone[0])


def test_guidance_changes_images_and_scale_one_is_the_conditional_model(tiny_checkpoint):
    loaded = load_sampling_model(tiny_checkpoint)
    prompts = ["a large red circle", "a small blue square"]
    at = {s: generate(loaded, prompts, [0, 1], SamplingConfig(steps="5", guidance_scale=s)) for s in (1.0, 8.0)}
    assert not torch.equal(at[1.0], at[8.0])


def test_grid_layout():
    images = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1, 1).expand(6, 3, 2, 2)
    grid = image_grid(images, rows=2)
    assert grid.shape == (3, 4, 6)
    assert grid[0, 0, 0] == 0 and grid[0, 0, 2] == 1 and grid[0, 2, 0] == 3  # row-major


def test_sample_command_writes_pngs_with_metadata(tiny_checkpoint, tmp_path):
    out = sample_main(["--ckpt", str(tiny_checkpoint), "--prompt", "a large red circle", "--prompt", "a small blue square",
                       "--num-per-prompt", "2", "--steps", "4", "--sampler", "ddim", "--seed", "7",
                       "--guidance-scale", "2.5", "--out", str(tmp_path / "s"), "--device", "cpu"])
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    meta = read_png_metadata(out / "0002.png")
    assert meta["prompt"] == "a small blue square" and meta["seed"] == "9" and meta["guidance_scale"] == "2.5"
    assert meta["sampler"] == "ddim" and meta["steps"] == "4" and str(tiny_checkpoint) in meta["checkpoint"]
    assert json.loads((out / "metadata.json").read_text())["config"]["guidance_scale"] == 2.5


def placeholder_glide_checkpoint(kind: str, path: Path) -> Path:
    """A file with the released model's keys and shapes whose tensors are stride-0 views of one number
    (a few kB instead of 1.5 GB): the loading and forward paths of the real checkpoint, cheaply."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in from_glide_text2im(kind).state_dict().items()}
    value = torch.full((1,), 0.01)
    torch.save({k: value.expand(shape) if len(shape) else value[0].clone() for k, shape in shapes.items()}, path)
    return path


@pytest.fixture
def gpt2_bpe(monkeypatch):
    fixtures = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "gpt2_bpe"
    if not fixtures.is_dir():
        pytest.skip(f"GPT-2 BPE fixture not found at {fixtures}")
    monkeypatch.setenv("GLIDE_GPT2_BPE_DIR", str(fixtures))


@pytest.mark.slow
def test_upsampler_takes_base_samples_to_256_px(tiny_checkpoint, tmp_path, gpt2_bpe):
    base = load_sampling_model(tiny_checkpoint)
    upsampler = load_sampling_model(placeholder_glide_checkpoint("upsample", tmp_path / "upsample.pt"))
    assert upsampler.image_size == 256 and upsampler.diffusion_config.noise_schedule == "linear"
    images = generate(base, ["a large red circle"], [0], SamplingConfig(steps="2", upsample_steps="1"),
                      upsampler=upsampler)
    assert images.shape == (1, 3, 256, 256) and images.dtype == torch.uint8


def test_glide_text2im_checkpoint_is_recognised_and_samples(tmp_path, gpt2_bpe):
    """A released-format base.pt (placeholder weights, the real keys and shapes) loads with its GPT-2
    tokenizer, cosine process and 64 px; a guided sample runs."""
    loaded = load_sampling_model(placeholder_glide_checkpoint("base", tmp_path / "base.pt"))
    assert loaded.model_config == glide_config("base") and loaded.tokenizer.n_vocab == 50257
    assert loaded.diffusion_config.noise_schedule == "cosine" and "glide-text2im base" in loaded.source
    images = generate(loaded, ["a corgi"], [0], SamplingConfig(steps="1"))
    assert images.shape == (1, 3, 64, 64)


def test_unknown_checkpoint_is_explained(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="neither a glide_lightning checkpoint nor"):
        load_sampling_model(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_sampling_model(tmp_path / "missing.ckpt")
