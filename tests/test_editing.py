"""Conditioning inputs of the upsampling and inpainting kinds (training side), and editing / conditioned
sampling (sampling side): known pixels preserved, the prompt reaching the masked region, the low-res noise
level reaching the upsampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glide_lightning.conditioning import conditioning_kwargs
from glide_lightning.data import build_tokenizer
from glide_lightning.data.images import to_uint8
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.diffusion.inpainting import keep_known
from glide_lightning.models import ModelConfig, build_model
from glide_lightning.sampling import SamplingConfig, SamplingModel, edit, generate, load_checkpoint, sample_conditioned

from tiny_model_config import TINY

GPT2_BPE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "gpt2_bpe"


def tiny(kind: str, seed: int = 0, **options) -> SamplingModel:
    """A tiny model of ``kind`` whose zero-initialised output layers are made non-zero (a fresh ADM model outputs 0)."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY.to_dict(), "kind": kind, **options})
    model = build_model(config).eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return SamplingModel(model, DiffusionConfig(steps=20), build_tokenizer("clip", TINY.text_ctx), config, "tiny")


def images_and_mask(count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit-exact pictures in [-1, 1] and a keep-mask erasing a centre square."""
    images = torch.randint(0, 256, (count, 3, 32, 32)).float() / 127.5 - 1
    keep = torch.ones(count, 1, 32, 32)
    keep[:, :, 8:20, 10:24] = 0
    return images, keep


def test_edit_keeps_known_pixels_exactly_and_the_prompt_changes_the_masked_region():
    model = tiny("inpaint")
    images, keep = images_and_mask()
    config = SamplingConfig(steps="8", guidance_scale=3.0)
    first = edit(model, images, keep, ["a large red circle", "a small blue square"], [0, 1], config)
    original = to_uint8(images)
    known = keep.bool().expand_as(original)
    assert torch.equal(first[known], original[known])  # equal outside the mask (8-bit exact input)
    assert (first[~known].float() - original[~known].float()).abs().mean() > 5
    other = edit(model, images, keep, ["a large green triangle", "a small blue square"], [0, 1], config)
    assert torch.equal(other[known], original[known])
    assert (other[0].float() - first[0].float()).abs().mean() > 0.5  # another prompt, another fill
    assert torch.equal(other[1], first[1])  # same prompt and seed: same image
    # a DDIM edit too: the known region is pasted into every pred_xstart and into the result
    ddim = edit(model, images, keep, ["a", "b"], [0, 1], SamplingConfig(steps="4", sampler="ddim"))
    assert torch.equal(ddim[known], original[known])


def test_edit_through_an_inpainting_upsampler_keeps_the_source_at_its_size():
    base, upsampler = tiny("inpaint", image_size=16), tiny("upsample_inpaint")
    base = SamplingModel(base.model, base.diffusion_config, base.tokenizer,
                         ModelConfig(**{**TINY.to_dict(), "kind": "inpaint", "image_size": 16}), "tiny16")
    images, keep = images_and_mask(1)
    result = edit(base, images, keep, ["a red circle"], [3], SamplingConfig(steps="4", upsample_steps="3"),
                  upsampler=upsampler)
    assert result.shape == (1, 3, 32, 32)
    known = keep.bool().expand_as(result)
    assert torch.equal(result[known], to_uint8(images)[known])
    with pytest.raises(ValueError, match="upsampler must be of kind 'upsample_inpaint'"):
        edit(base, images, keep, ["a"], [0], upsampler=tiny("upsample"))
    with pytest.raises(ValueError, match="editing needs an inpainting model: the base model must be of kind 'inpaint'"):
        edit(upsampler, images, keep, ["a"], [0])


def test_an_edit_with_dynamic_thresholding_thresholds_each_step_then_keeps_the_known_pixels(monkeypatch):
    import glide_lightning.sampling.batch as sampling_module
    from glide_lightning.diffusion import dynamic_threshold

    model = tiny("inpaint")
    images, keep = images_and_mask()
    calls: list[float] = []

    def probe(pred_xstart, percentile):
        calls.append(percentile)
        return dynamic_threshold(pred_xstart, percentile)

    monkeypatch.setattr(sampling_module, "dynamic_threshold", probe)
    config = SamplingConfig(steps="8", guidance_scale=8.0)
    plain = edit(model, images, keep, ["a large red circle", "a small blue square"], [0, 1], config)
    assert calls == []
    config = SamplingConfig(steps="8", guidance_scale=8.0, dynamic_threshold=0.6)
    thresholded = edit(model, images, keep, ["a large red circle", "a small blue square"], [0, 1], config)
    assert calls == [0.6] * 8  # every step's pred_xstart is thresholded
    original = to_uint8(images)
    known = keep.bool().expand_as(original)
    assert torch.equal(thresholded[known], original[known])  # and the known pixels still pasted, exactly
    assert not torch.equal(thresholded, plain)
    # the order: thresholding first, then the paste (a paste first would let the threshold rescale known pixels)
    composed = sampling_module._denoised_fn(config, keep_known(images, keep))
    pred = 3 * torch.randn_like(images)
    assert torch.equal(composed(pred)[known], images[known])


def test_keep_known_pastes_the_known_region():
    image, keep = images_and_mask(1)
    x = torch.zeros_like(image)
    pasted = keep_known(image, keep)(x)
    assert torch.equal(pasted, image * keep)


def test_conditioning_kwargs_per_kind_and_the_augmentation_closed_form():
    batch = {"image": torch.rand(3, 3, 32, 32), "low_res": torch.rand(3, 3, 8, 8),
             "inpaint_mask": torch.ones(3, 1, 32, 32)}
    assert conditioning_kwargs("base", batch) == {}
    assert conditioning_kwargs("upsample", batch)["low_res"] is batch["low_res"]
    both = conditioning_kwargs("upsample_inpaint", batch)
    assert both["inpaint_image"] is batch["image"] and both["inpaint_mask"] is batch["inpaint_mask"]
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=100))
    augmented = conditioning_kwargs("upsample", batch, diffusion=diffusion, low_res_noise=0.3, noise_cond=True,
                                    generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    t = torch.randint(0, 30, (3,), generator=generator)  # ⌊0.3 · 99⌋ = 29: uniform in {0, …, 29}
    noise = torch.randn(3, 3, 8, 8, generator=generator)
    abar = diffusion.table("alphas_cumprod")[t].float().reshape(3, 1, 1, 1)
    assert torch.equal(augmented["low_res_t"], t)
    torch.testing.assert_close(augmented["low_res"], abar.sqrt() * batch["low_res"] + (1 - abar).sqrt() * noise)
    with pytest.raises(ValueError, match="needs the batch's low_res: give the data module model_kind='upsample'"):
        conditioning_kwargs("upsample", {"image": batch["image"]})
    with pytest.raises(ValueError, match="needs the batch's inpaint_mask"):
        conditioning_kwargs("inpaint", {"image": batch["image"]})


@pytest.mark.parametrize("steps", [100, 1000, 4000])
def test_sampling_noises_low_res_at_the_largest_step_training_drew(steps):
    """``--sampling.upsample_noise f`` must be a step that ``low_res_noise f`` trained on (the largest one),
    for every f: training draws s <= floor(f (T - 1)); round() was one step above it (0.2 of 1000: 200 vs 199)."""
    from glide_lightning.conditioning import sampling_low_res_kwargs

    config = DiffusionConfig(steps=steps)
    diffusion = GaussianDiffusion.from_config(config)
    low_res = torch.zeros(20 * steps, 1, 1, 1)  # 20 draws per possible step: the top step is drawn (P(miss) < 1e-8)
    for f in (0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.999, 1.0):
        trained = conditioning_kwargs("upsample", {"image": low_res, "low_res": low_res}, diffusion=diffusion,
                                      low_res_noise=f, noise_cond=True,
                                      generator=torch.Generator().manual_seed(0))["low_res_t"]
        sampled = sampling_low_res_kwargs(low_res[:1], config, f, True, [torch.Generator().manual_seed(0)])
        assert int(sampled["low_res_t"][0]) == int(trained.max()) == int(f * (steps - 1) + 1e-9), f


def test_the_low_res_noise_level_reaches_the_upsampler_and_sampling_tells_it():
    model = tiny("upsample", low_res_noise_cond=True)
    assert "low_res_noise_embed.0.weight" in model.model.state_dict()
    assert not any(k.startswith("low_res_noise_embed") for k in tiny("upsample").model.state_dict())
    x, low_res = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 8, 8)
    t = torch.tensor([5, 5])
    tokens, mask = model.tokenizer(["a", "b"])
    outputs = [model.model(x, t, low_res=low_res, tokens=tokens, mask=mask, low_res_t=torch.tensor([s, s]))
               for s in (0, 10)]
    assert not torch.allclose(outputs[0], outputs[1])
    with pytest.raises(ValueError, match="pass low_res_t"):
        model.model(x, t, low_res=low_res, tokens=tokens, mask=mask)
    low = torch.rand(2, 3, 16, 16) * 2 - 1
    clean = sample_conditioned(model, ["a", "b"], [0, 1], SamplingConfig(steps="3"), low_res=low)
    noisy = sample_conditioned(model, ["a", "b"], [0, 1], SamplingConfig(steps="3", upsample_noise=0.5), low_res=low)
    assert not torch.allclose(clean, noisy)
    with pytest.raises(ValueError, match="was not trained with noise augmentation"):
        base = tiny("base")
        generate(base, ["a"], [0], SamplingConfig(steps="2", upsample_noise=0.2), upsampler=tiny("upsample"))


def test_training_with_low_res_noise_needs_the_conditioning_of_the_model():
    from glide_lightning.module import GlideModule

    with pytest.raises(ValueError, match="set model.model.low_res_noise_cond: true"):
        GlideModule(model=ModelConfig(**{**TINY.to_dict(), "kind": "upsample"}), diffusion=DiffusionConfig(steps=10),
                    low_res_noise=0.2)
    with pytest.raises(ValueError, match="low_res_noise_cond is for the upsampling kinds"):
        ModelConfig(**{**TINY.to_dict(), "kind": "inpaint", "low_res_noise_cond": True})


@pytest.mark.slow
def test_a_released_inpainting_model_edits(glide_placeholder, monkeypatch):
    """glide-text2im's base_inpaint.pt (its keys and shapes, placeholder weights) loads strictly and edits a 64 px
    picture, keeping the known pixels."""
    if not GPT2_BPE.is_dir():
        pytest.skip(f"GPT-2 BPE fixture not found at {GPT2_BPE}")
    monkeypatch.setenv("GLIDE_GPT2_BPE_DIR", str(GPT2_BPE))
    loaded = load_checkpoint(glide_placeholder("base-inpaint"), kind="inpaint")
    images = torch.randint(0, 256, (1, 3, 64, 64)).float() / 127.5 - 1
    keep = torch.ones(1, 1, 64, 64)
    keep[..., 20:, :] = 0
    result = edit(loaded, images, keep, ["a corgi"], [0], SamplingConfig(steps="1", guidance_scale=1.0))
    known = keep.bool().expand_as(result)
    assert result.shape == (1, 3, 64, 64) and torch.equal(result[known], to_uint8(images)[known])


def test_a_training_step_with_low_res_noise_trains_the_noise_level_embedding():
    from glide_lightning.module import GlideModule

    torch.manual_seed(0)
    module = GlideModule(model=ModelConfig(**{**TINY.to_dict(), "kind": "upsample", "low_res_noise_cond": True}),
                         diffusion=DiffusionConfig(steps=20), low_res_noise=0.5)
    for p in module.model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    tokens, mask = module.tokenizer(["a red circle", "a blue square"])
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "low_res": torch.rand(2, 3, 8, 8) * 2 - 1,
             "tokens": tokens, "mask": mask}
    module.log = lambda *args, **kwargs: None  # no trainer to log to
    module.training_step(batch, 0).backward()
    grad = module.model.low_res_noise_embed[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_an_upsampler_without_noise_conditioning_initialises_one_with_it_and_predicts_the_same(tmp_path):
    """init_from an upsampler trained without augmentation (as glide-text2im's upsample.pt): the new noise-level
    embedding starts at zero output, so the network predicts what the source predicts, at any low_res_t."""
    import lightning as L

    from glide_lightning.module import GlideModule

    upsample = ModelConfig(**{**TINY.to_dict(), "kind": "upsample"})
    source = GlideModule(model=upsample, diffusion=DiffusionConfig(steps=20))
    for p in source.model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(source)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    target = GlideModule(model=ModelConfig(**{**upsample.to_dict(), "low_res_noise_cond": True}),
                         diffusion=DiffusionConfig(steps=20), low_res_noise=0.3)
    target.load_initial_weights(str(tmp_path / "plain.ckpt"))
    x, low_res, t = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 8, 8), torch.tensor([3, 7])
    tokens, mask = target.tokenizer(["a", "b"])
    with torch.no_grad():
        expected = source.model.eval()(x, t, low_res=low_res, tokens=tokens, mask=mask)
        got = target.model.eval()(x, t, low_res=low_res, tokens=tokens, mask=mask, low_res_t=torch.tensor([0, 15]))
    torch.testing.assert_close(got, expected)
