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
from glide_lightning.editing import edit
from glide_lightning.cascade import generate
from glide_lightning.sampling import SamplingConfig, SamplingModel, load_checkpoint, sample_conditioned

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
    import glide_lightning.sampling as sampling_module
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


# ----------------------------------------------------------------------- upsample_inpaint checkpoints before issue 22
NEW_TO_OLD = [0, 1, 2, 7, 8, 9, 3, 4, 5, 6]
"""The first convolution's input columns in this project's order before issue 22, [x | upsampled | image·mask | mask],
as indices into glide-text2im's [x | image·mask | mask | upsampled] (written out here, not taken from the code)."""
FIRST_CONV = "model.input_blocks.0.0.weight"


def _to_old_order(checkpoint: dict) -> dict:
    """A checkpoint as this project wrote it before issue 22: old column order everywhere the first convolution's
    weight lives (weights, raw weights, AdamW moments), and no ``input_order`` marker."""
    old = {k: v for k, v in checkpoint.items() if k != "input_order"}
    old["state_dict"] = {**checkpoint["state_dict"], FIRST_CONV: checkpoint["state_dict"][FIRST_CONV][:, NEW_TO_OLD]}
    raw = checkpoint["current_model_state"]
    old["current_model_state"] = {**raw, FIRST_CONV: raw[FIRST_CONV][:, NEW_TO_OLD]}
    shape = raw[FIRST_CONV].shape
    old["optimizer_states"] = []
    for state in checkpoint["optimizer_states"]:
        moments = {i: {k: v[:, NEW_TO_OLD] if isinstance(v, torch.Tensor) and v.shape == shape else v
                       for k, v in m.items()} for i, m in state["state"].items()}
        old["optimizer_states"].append({**state, "state": moments})
    return old


@pytest.fixture(scope="module")
def upsample_inpaint_run(synthetic_shards, tmp_path_factory):
    """A real ``Trainer.fit`` (2 steps, Lightning's EMA) of a tiny upsample_inpaint model, its last checkpoint (new
    order, with the marker) and the same checkpoint in the old order without the marker."""
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    from glide_lightning.data import GlideDataModule
    from glide_lightning.module import GlideModule

    def module():
        torch.manual_seed(0)
        made = GlideModule(model=ModelConfig(**{**TINY.to_dict(), "kind": "upsample_inpaint"}),
                           diffusion=DiffusionConfig(steps=20))
        for p in made.model.parameters():
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.05)
        return made

    folder = tmp_path_factory.mktemp("upsample_inpaint")

    def trainer(max_steps, *callbacks):  # default_root_dir: Lightning's own checkpoints go here, not into the cwd
        return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(folder / "lightning"),
                         callbacks=[EMAWeightAveraging(decay=0.5), *callbacks])

    def dm():
        return GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=32, text_ctx=16,
                               tokenizer="clip", bpe_dir=None, batch_size=4, num_workers=0,
                               model_kind="upsample_inpaint", low_res_size=16)

    trainer(2, ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2, save_top_k=0)).fit(
        module(), datamodule=dm())
    new = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    torch.save(_to_old_order(new), folder / "old.ckpt")
    return dict(new_path=folder / "last.ckpt", old_path=folder / "old.ckpt", new=new, module=module, trainer=trainer,
                datamodule=dm)


def _input_order_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "glide_lightning.input_order"]


def test_an_old_order_upsample_inpaint_checkpoint_samples_as_the_new_order_model(upsample_inpaint_run, caplog):
    run = upsample_inpaint_run
    assert run["new"]["input_order"] == ["x", "inpaint_image*inpaint_mask", "inpaint_mask", "upsampled"]  # the marker
    torch.manual_seed(3)
    x, t, low_res = torch.randn(2, 3, 32, 32), torch.tensor([3, 15]), torch.rand(2, 3, 16, 16) * 2 - 1
    image, keep = images_and_mask(2)
    with caplog.at_level("WARNING"):
        for weights, saved in (("ema", "state_dict"), ("raw", "current_model_state")):
            caplog.clear()
            new = load_checkpoint(run["new_path"], weights=weights)
            assert _input_order_warnings(caplog) == []  # a marked checkpoint is read as it is
            old = load_checkpoint(run["old_path"], weights=weights)
            [warning] = _input_order_warnings(caplog)
            assert "no input_order recorded" in warning and "input_blocks.0.0.weight" in warning
            assert "state_dict, current_model_state" in warning
            expected = {k.removeprefix("model."): v for k, v in run["new"][saved].items() if k.startswith("model.")}
            assert all(torch.equal(v, expected[k]) for k, v in old.model.state_dict().items())
            tokens, mask = new.tokenizer(["a red circle", "a blue square"])
            kwargs = dict(low_res=low_res, inpaint_image=image, inpaint_mask=keep, tokens=tokens, mask=mask)
            with torch.no_grad():
                reference = new.model(x, t, **kwargs)
                assert torch.equal(old.model(x, t, **kwargs), reference)
                # the same file read without the conversion (the code before issue 22 read it so, into its own order)
                unconverted = load_checkpoint(run["new_path"], weights=weights).model
                old_weight = expected["input_blocks.0.0.weight"][:, NEW_TO_OLD]
                unconverted.get_parameter("input_blocks.0.0.weight").copy_(old_weight)
                relative = float((unconverted(x, t, **kwargs) - reference).norm() / reference.norm())
            print(f"{weights}: old-order weights unconverted vs the new-order model: relative difference "
                  f"{relative:.3g}")
            assert relative > 0.01
    config = SamplingConfig(steps="2", guidance_scale=3.0)
    samples = [sample_conditioned(load_checkpoint(p), ["a red circle"], [0], config, low_res=low_res[:1],
                                  image=image[:1], keep=keep[:1]) for p in (run["new_path"], run["old_path"])]
    assert torch.equal(*samples)


def test_resuming_an_old_order_upsample_inpaint_checkpoint_restores_converted_weights_ema_and_adamw_moments(
        upsample_inpaint_run, tmp_path, caplog, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "helpers"))
    from glide_test_probes import StateProbe

    run = upsample_inpaint_run
    with caplog.at_level("WARNING"):
        run["trainer"](3, StateProbe(str(tmp_path))).fit(run["module"](), datamodule=run["datamodule"](),
                                                         ckpt_path=run["old_path"])
    [warning] = _input_order_warnings(caplog)
    assert "state_dict, current_model_state, optimizer_states[0] (exp_avg, exp_avg_sq)" in warning
    probe = torch.load(tmp_path / "start_2.pt", map_location="cpu", weights_only=False)
    new = run["new"]
    for got, expected in ((probe["model"], new["current_model_state"]), (probe["ema"], new["state_dict"])):
        assert got.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in got.items())
    restored, saved = probe["optimizer"]["state"], new["optimizer_states"][0]["state"]
    assert restored.keys() == saved.keys()
    for i, moments in saved.items():
        for name, value in moments.items():
            assert torch.equal(restored[i][name], value), (i, name)
    shape = new["state_dict"][FIRST_CONV].shape
    assert sum(m["exp_avg"].shape == shape for m in saved.values()) == 1  # the first convolution's, converted above


def test_a_released_upsample_inpaint_file_loads_unchanged_and_unsound_conversions_are_refused(glide_placeholder,
                                                                                               tmp_path, caplog,
                                                                                               monkeypatch):
    from glide_lightning.input_order import convert_input_order

    if not GPT2_BPE.is_dir():
        pytest.skip(f"GPT-2 BPE fixture not found at {GPT2_BPE}")
    monkeypatch.setenv("GLIDE_GPT2_BPE_DIR", str(GPT2_BPE))
    state = torch.load(glide_placeholder("upsample-inpaint"), map_location="cpu", weights_only=True)
    state["input_blocks.0.0.weight"] = torch.randn(192, 10, 3, 3)  # distinct columns: a permutation would show
    torch.save(state, tmp_path / "upsample_inpaint.pt")
    with caplog.at_level("WARNING"):
        loaded = load_checkpoint(tmp_path / "upsample_inpaint.pt", kind="upsample_inpaint")
    assert torch.equal(loaded.model.get_parameter("input_blocks.0.0.weight"), state["input_blocks.0.0.weight"])
    assert _input_order_warnings(caplog) == []
    model = tiny("upsample_inpaint").model
    weight = {FIRST_CONV: torch.zeros(32, 10, 3, 3)}
    with pytest.raises(ValueError, match="is not a reordering of this model's"):
        convert_input_order({"input_order": ["x", "low_res", "mask"], "state_dict": weight}, model,
                            "upsample_inpaint", where="bad.ckpt")
    with pytest.raises(ValueError, match=r"should be a \[out, 10, k, k\] convolution weight, got \[32, 7, 3, 3\]"):
        convert_input_order({"state_dict": {FIRST_CONV: torch.zeros(32, 7, 3, 3)}}, model, "upsample_inpaint",
                            where="bad.ckpt")
    with pytest.raises(ValueError, match="holds 1 parameters"):
        one_parameter = [{"state": {}, "param_groups": [{"params": [0]}]}]
        convert_input_order({"state_dict": weight, "optimizer_states": one_parameter}, model, "upsample_inpaint",
                            where="bad.ckpt", weight_decay=0.0)
    unchanged = {"state_dict": dict(weight)}  # other kinds' order never changed: nothing to convert
    assert convert_input_order(unchanged, tiny("upsample").model, "upsample", where="x.ckpt") == []
