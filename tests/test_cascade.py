"""The cascade's upsampler stage samples as glide-text2im's notebooks do: DDIM (η = 0) from noise × temperature
for text-to-image (text2im.ipynb, clip_guided.ipynb: ``diffusion_up.ddim_sample_loop(..., noise=randn *
upsample_temp)``), the ancestral loop for edits (inpaint.ipynb: ``p_sample_loop``); results and cached images
record which."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glide_lightning.data import build_tokenizer
from glide_lightning.data.images import to_uint8
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.diffusion.schedules import space_timesteps
from glide_lightning.evaluation.zero_shot import FIDJob, generation_identity
from glide_lightning.models import ModelConfig, build_model
from glide_lightning.sampling import SamplingConfig, SamplingModel, edit, generate, sample_generators, upsample_batch

from tiny_model_config import TINY


def tiny(kind: str, seed: int = 0) -> SamplingModel:
    """A tiny model of ``kind`` whose zero-initialised output layers are made non-zero."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY.to_dict(), "kind": kind})
    model = build_model(config).eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return SamplingModel(model, DiffusionConfig(steps=40), build_tokenizer("clip", TINY.text_ctx), config, "tiny")


def glide_ddim_upsample(up: SamplingModel, low_res: torch.Tensor, prompts: list[str], seeds: list[int],
                        respacing: str, temp: float) -> torch.Tensor:
    """glide-text2im's upsampler stage written out: ``ddim_sample_loop`` (eta 0, clip_denoised) over the respaced
    steps, from noise × temp, the network called with the original step index and 8-bit low-res samples.
    Per step (its ``ddim_sample``): x̂_0 = clip(√(1/ᾱ_t)·x − √(1/ᾱ_t − 1)·ε̂), ε = (√(1/ᾱ_t)·x − x̂_0)/√(1/ᾱ_t − 1),
    x ← √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev)·ε."""
    abar = GaussianDiffusion.from_config(up.diffusion_config).table("alphas_cumprod")  # float64, unrespaced
    kept = sorted(space_timesteps(up.diffusion_config.steps, respacing))
    size = up.image_size
    noise = torch.stack([torch.randn(3, size, size, generator=g) for g in sample_generators(seeds, offset=1)])
    x = (noise * temp).double()
    tokens, mask = up.tokenizer(prompts)
    low = to_uint8(low_res).float() / 127.5 - 1
    for i in reversed(range(len(kept))):
        t = torch.full((len(prompts),), kept[i])
        eps = up.model(x.float(), t, tokens=tokens, mask=mask, low_res=low)[:, :3].double()
        a, a_prev = abar[kept[i]], (abar[kept[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64))
        x0 = ((1 / a).sqrt() * x - (1 / a - 1).sqrt() * eps).clamp(-1, 1)
        eps = ((1 / a).sqrt() * x - x0) / (1 / a - 1).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.float()


@torch.no_grad()
def test_text_to_image_upsamples_with_glide_text2ims_ddim_and_edits_with_the_ancestral_loop():
    up = tiny("upsample")
    low_res = torch.rand(2, 3, 16, 16) * 2 - 1
    prompts, seeds = ["a large red circle", "a small blue square"], [3, 4]
    # the reference runs NCHW: the same layout here (channels-last's float rounding is test_sampling's subject)
    config = SamplingConfig(upsample_steps="5", upsample_temp=0.997, memory_format="contiguous")
    expected = glide_ddim_upsample(up, low_res, prompts, seeds, "5", 0.997)
    text2im = upsample_batch(up, low_res, prompts, seeds, config, task="text2im")
    torch.testing.assert_close(text2im, expected, rtol=0, atol=1e-4)
    assert config.upsample_sampler_for("text2im") == "ddim" and config.upsample_sampler_for("edit") == "ddpm"
    ancestral = upsample_batch(up, low_res, prompts, seeds, SamplingConfig(upsample_steps="5", upsample_sampler="ddpm",
                                                                           memory_format="contiguous"), task="text2im")
    assert torch.equal(upsample_batch(up, low_res, prompts, seeds, config, task="edit"), ancestral)
    assert (ancestral - expected).abs().max() > 1e-2  # the two samplers differ: the test can tell them apart
    forced = upsample_batch(up, low_res, prompts, seeds, SamplingConfig(upsample_steps="5", upsample_sampler="ddim",
                                                                        memory_format="contiguous"), task="edit")
    assert torch.equal(forced, text2im)
    with pytest.raises(ValueError, match="upsample_sampler 'dpm' is unknown"):
        SamplingConfig(upsample_sampler="dpm")


@torch.no_grad()
def test_generate_runs_the_upsampler_stage_as_the_text2im_notebook():
    base, up = tiny("base"), tiny("upsample", seed=1)
    prompts, seeds = ["a large red circle"], [7]
    config = SamplingConfig(steps="3", upsample_steps="4")
    low = generate(base, prompts, seeds, config)  # uint8 base samples, as the cascade passes them on
    cascade = generate(base, prompts, seeds, config, upsampler=up)
    expected = to_uint8(glide_ddim_upsample(up, low.float() / 127.5 - 1, prompts, seeds, "4", config.upsample_temp))
    assert (cascade.int() - expected.int()).abs().max() <= 1


WRAPPER_OPTIONS = {
    "off": dict(memory_format="contiguous"),
    "channels_last": dict(memory_format="channels_last"),
    "bf16": dict(precision="bf16", memory_format="contiguous"),
    "compile": dict(compile=True),
}


@pytest.mark.parametrize("task", ["text2im", "edit"])
@pytest.mark.parametrize("option", list(WRAPPER_OPTIONS))
@torch.no_grad()
def test_the_upsampler_stage_runs_through_the_denoiser_wrapper(monkeypatch, task, option):
    """The sampling options of the network's call (channels-last, bf16 autocast, torch.compile) reach the upsampler's
    network as they reach the base model's: both stages, of generate and of edit, call their network through the
    one denoiser wrapper (observed on the upsampler alone: its input's layout, a convolution's output dtype, and a
    spy on torch.compile that hands the model back uncompiled)."""
    if task == "text2im":
        base, up = tiny("base"), tiny("upsample", seed=1)

        def run(config: SamplingConfig) -> torch.Tensor:
            return generate(base, ["a red circle"], [0], config, upsampler=up)
    else:
        base, up = tiny("inpaint"), tiny("upsample_inpaint", seed=1)
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        keep = torch.ones(1, 1, 32, 32)
        keep[..., 8:20, 10:24] = 0

        def run(config: SamplingConfig) -> torch.Tensor:
            return edit(base, image, keep, ["a red circle"], [0], config, upsampler=up)

    layouts: set[bool] = set()
    dtypes: set[torch.dtype] = set()
    compiled: list[torch.nn.Module] = []
    conv = next(m for m in up.model.modules() if isinstance(m, torch.nn.Conv2d))
    hooks = [up.model.register_forward_pre_hook(
                 lambda module, args: layouts.add(args[0].is_contiguous(memory_format=torch.channels_last))),
             conv.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))]
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(model) or model)
    try:
        images = run(SamplingConfig(steps="2", upsample_steps="2", **WRAPPER_OPTIONS[option]))
    finally:
        for hook in hooks:
            hook.remove()
    assert images.shape == (1, 3, 32, 32) and layouts and dtypes
    assert layouts == {option == "channels_last"}  # x_t reaches the upsampler channels-last only when asked
    assert dtypes == {torch.bfloat16 if option == "bf16" else torch.float32}
    assert any(model is up.model for model in compiled) == (option == "compile")
    assert all(p.is_contiguous() for p in up.model.parameters())  # its own memory format restored


def test_cached_images_and_results_name_the_upsampler_sampler(tmp_path: Path):
    base, up = tiny("base"), tiny("upsample", seed=1)

    def identity(**sampling):
        job = FIDJob(captions=["a"], reference=str(tmp_path), out_dir=tmp_path, sampling=SamplingConfig(**sampling))
        return generation_identity(job, base, up)

    assert identity()["sampling"]["upsample_sampler"] == "ddim"  # auto, resolved for text-to-image
    assert identity(upsample_sampler="ddim") == identity()
    # ancestral was the only upsampler sampler before the choice existed: those cached images keep their key
    assert "upsample_sampler" not in identity(upsample_sampler="ddpm")["sampling"]
    job = FIDJob(captions=["a"], reference=str(tmp_path), out_dir=tmp_path)
    assert "upsample_sampler" not in generation_identity(job, base)["sampling"]  # no upsampler, no key
