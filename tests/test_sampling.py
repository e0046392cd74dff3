"""glide_lightning.sampling: the one checkpoint reader (ours with and without EMA, glide-text2im's
released files), the released-model registry and guided generation, and the ``sample`` command."""

import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from glide_lightning.data import GlideDataModule, TokenizerSpec
from glide_lightning.data.images import read_png_metadata
from glide_lightning.commands import main as glide_main
from glide_lightning.models import CheckpointMismatchError
from glide_lightning.models.glide_text2im import glide_config
from glide_lightning.sampling import (RELEASED_MODELS, SamplingConfig, generate, load_checkpoint, released_model,
                                     sample_batch)

FAST = SamplingConfig(steps="5", batch_size=2)
SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def test_images_depend_on_prompt_and_seed_only(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    prompts = ["a large red circle", "a small blue square", "a large green triangle"]
    together = generate(loaded, prompts, [1, 2, 3], FAST)
    assert together.dtype == torch.uint8 and together.shape == (3, 3, 32, 32)
    alone = generate(loaded, prompts[1:2], [2], SamplingConfig(steps="5", batch_size=1))
    diff = (together[1].int() - alone[0].int()).abs()  # the same up to float differences between batch sizes
    assert diff.float().mean() < 0.5 and (diff > 8).float().mean() < 0.01
    assert not torch.equal(generate(loaded, prompts[1:2], [9], FAST)[0], alone[0])


def test_guidance_changes_images_and_scale_one_is_the_conditional_model(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    prompts = ["a large red circle", "a small blue square"]
    at = {s: generate(loaded, prompts, [0, 1], SamplingConfig(steps="5", guidance_scale=s)) for s in (1.0, 8.0)}
    assert not torch.equal(at[1.0], at[8.0])


def test_sample_command_writes_pngs_with_metadata(tiny_checkpoint, tmp_path):
    out = glide_main(["sample", "--ckpt", str(tiny_checkpoint), "--prompt", "a large red circle",
                      "--prompt+", "a small blue square", "--num_per_prompt", "2", "--sampling.steps", "4",
                      "--sampling.sampler", "ddim", "--seed", "7", "--sampling.guidance_scale", "2.5",
                      "--out", str(tmp_path / "s"), "--device", "cpu"])
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    meta = read_png_metadata(out / "0002.png")
    assert meta["prompt"] == "a small blue square" and meta["seed"] == "9" and meta["guidance_scale"] == "2.5"
    assert meta["sampler"] == "ddim" and meta["steps"] == "4" and str(tiny_checkpoint) in meta["checkpoint"]
    assert json.loads((out / "metadata.json").read_text())["config"]["guidance_scale"] == 2.5


# ----------------------------------------------------------------------------------- our checkpoints
@pytest.fixture(scope="module")
def fitted_checkpoint(synthetic_shards, make_tiny_module, tmp_path_factory) -> Path:
    """A checkpoint written by a real ``Trainer.fit`` of the tiny model with Lightning's EMA, as every
    training run before this module existed wrote them (EMA in ``state_dict``, raw weights in
    ``current_model_state``)."""
    folder = tmp_path_factory.mktemp("fit")
    checkpoints = ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=3, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[EMAWeightAveraging(decay=0.5), checkpoints])
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=32,
                         tokenizer_spec=TokenizerSpec("clip", 16), batch_size=4,
                         num_workers=0)
    trainer.fit(make_tiny_module(), datamodule=dm)
    return folder / "last.ckpt"  # saved during training (after fit, Lightning copies the EMA into the model)


def _weights(state: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def test_a_trained_checkpoint_loads_ema_or_raw_weights_and_samples(fitted_checkpoint):
    saved = torch.load(fitted_checkpoint, map_location="cpu", weights_only=True)
    ema_saved, raw_saved = _weights(saved["state_dict"]), _weights(saved["current_model_state"])
    assert any(not torch.equal(ema_saved[k], raw_saved[k]) for k in ema_saved), "EMA and raw weights must differ"
    ema = load_checkpoint(fitted_checkpoint)
    raw = load_checkpoint(fitted_checkpoint, weights="raw")
    for loaded, expected in ((ema, ema_saved), (raw, raw_saved)):
        for name, value in loaded.model.state_dict().items():
            assert torch.equal(value, expected[name]), name
        assert not loaded.model.training and loaded.image_size == 32
    assert "(EMA weights, step 3)" in ema.source and "(raw weights, step 3)" in raw.source
    images = generate(ema, ["a large red circle", "a small blue square"], [0, 1], FAST)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8 and images.float().std() > 0


def test_sample_command_picks_ema_or_raw_weights(fitted_checkpoint, tmp_path):
    for weights in ("ema", "raw"):
        out = glide_main(["sample", "--ckpt", str(fitted_checkpoint), "--prompt", "a large red circle",
                          "--sampling.steps", "2", "--weights", weights, "--out", str(tmp_path / weights),
                          "--device", "cpu"])
        expected = "EMA weights" if weights == "ema" else "raw weights"
        assert f"({expected}, step 3)" in read_png_metadata(out / "0000.png")["checkpoint"]


def test_a_checkpoint_without_ema_says_its_weights_are_raw(tiny_checkpoint):
    saved = _weights(torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    loaded = load_checkpoint(tiny_checkpoint)
    assert "raw weights: this run kept no EMA" in loaded.source
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())
    assert "(raw weights, step 0)" in load_checkpoint(tiny_checkpoint, weights="raw").source
    with pytest.raises(ValueError, match="unknown weights 'best'; choose ema or raw"):
        load_checkpoint(tiny_checkpoint, weights="best")


# ----------------------------------------------------------------------------------- released checkpoints
@pytest.fixture
def gpt2_bpe(monkeypatch):
    fixtures = SHARED_FIXTURES / "gpt2_bpe"
    if not fixtures.is_dir():
        pytest.skip(f"GPT-2 BPE fixture not found at {fixtures}")
    monkeypatch.setenv("GLIDE_GPT2_BPE_DIR", str(fixtures))


def test_the_registry_holds_every_released_model_with_glide_text2im_settings():
    path = SHARED_FIXTURES / "glide_text2im_state_dicts.json"
    if not path.is_file():
        pytest.skip(f"glide-text2im fixture not found at {path}")
    fixture = json.loads(path.read_text())
    schedules = {"squaredcos_cap_v2": "cosine", "linear": "linear"}
    files = {"base": "base.pt", "upsample": "upsample.pt", "base-inpaint": "base_inpaint.pt",
             "upsample-inpaint": "upsample_inpaint.pt"}
    assert {kind: r.file for kind, r in RELEASED_MODELS.items()} == files
    for kind, released in RELEASED_MODELS.items():
        options = fixture[kind]["options"]
        assert released.diffusion.steps == options["diffusion_steps"]
        assert released.diffusion.noise_schedule == schedules[options["noise_schedule"]], kind
        assert released.diffusion.variance_type == "learned_range" and released.model.learn_sigma
        assert released.tokenizer == "gpt2" and released.model.text_ctx == options["text_ctx"] == 128
        assert released.model == glide_config(kind) and released.model.n_vocab == 50257
    assert released_model(model_kind="inpaint").kind == "base-inpaint"
    with pytest.raises(ValueError, match="choose one of base, upsample, base-inpaint, upsample-inpaint"):
        released_model("base_inpaint")


@pytest.mark.slow
def test_upsampler_takes_base_samples_to_256_px(tiny_checkpoint, glide_placeholder, gpt2_bpe):
    base = load_checkpoint(tiny_checkpoint)
    upsampler = load_checkpoint(glide_placeholder("upsample"))
    assert upsampler.image_size == 256 and upsampler.diffusion_config.noise_schedule == "linear"
    images = generate(base, ["a large red circle"], [0], SamplingConfig(steps="2", upsample_steps="1"),
                      upsampler=upsampler)
    assert images.shape == (1, 3, 256, 256) and images.dtype == torch.uint8


def test_glide_text2im_checkpoint_is_recognised_and_samples(glide_placeholder, gpt2_bpe):
    """A released-format base.pt (placeholder weights, the real keys and shapes) loads with its GPT-2
    tokenizer, cosine process and 64 px; a guided sample runs."""
    loaded = load_checkpoint(glide_placeholder("base"))
    assert loaded.model_config == glide_config("base") and loaded.tokenizer.n_vocab == 50257
    assert loaded.diffusion_config.noise_schedule == "cosine" and "glide-text2im base" in loaded.source
    images = generate(loaded, ["a corgi"], [0], SamplingConfig(steps="1"))
    assert images.shape == (1, 3, 64, 64)


def test_every_released_file_is_recognised_and_a_kind_mismatch_is_explained(tiny_checkpoint, glide_placeholder):
    for kind, released in RELEASED_MODELS.items():
        loaded = load_checkpoint(glide_placeholder(kind))
        assert loaded.model_config == released.model and loaded.diffusion_config == released.diffusion
        assert f"glide-text2im {kind}" in loaded.source
    upsample = glide_placeholder("upsample")
    with pytest.raises(ValueError, match="checkpoint's model must be of kind 'base', got 'upsample' .*base.pt"):
        load_checkpoint(upsample, kind="base")
    with pytest.raises(ValueError, match="base model must be of kind 'base', got 'upsample'"):
        generate(load_checkpoint(upsample), ["a corgi"], [0], FAST)
    base = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"upsampler must be of kind 'upsample', got 'base' .*upsample.pt"):
        generate(base, ["a corgi"], [0], FAST, upsampler=base)


def test_unknown_checkpoint_is_explained(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="neither a glide_lightning checkpoint .* nor one of glide-text2im's released"):
        load_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match=r"'base' model \(expected base.pt\):\n  783 missing keys"):
        load_checkpoint(path, kind="base")  # the kind that is needed: how the file differs from its released model
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        load_checkpoint(tmp_path / "garbage.ckpt")


@pytest.mark.parametrize("options, rule", [
    ({"steps": "ddim50"}, "steps 'ddim50' is DDIM's stride spacing but sampler is 'ddpm'"),
    ({"eta": 0.5}, "eta 0.5 is DDIM's noise level"),
    ({"sampler": "ddim", "eta": -1.0}, "eta must be >= 0"),
    ({"steps": "fast"}, "steps: bad respacing 'fast'"),
    ({"upsample_steps": "10,x"}, "upsample_steps: bad respacing"),
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"upsample_temp": 0.0}, "upsample_temp must be > 0"),
    ({"guidance_interval": (2.0, 1.0)}, "guidance_interval (low, high] needs 0 <= low < high"),
    ({"precision": "fp16"}, "precision 'fp16' is unknown"),
    ({"memory_format": "nhwc"}, "memory_format 'nhwc' is unknown"),
    ({"dynamic_threshold": 99.5}, "dynamic_threshold is a percentile p in (0, 1]"),
])
def test_contradicting_sampling_options_fail_when_the_config_is_made(options, rule):
    with pytest.raises(ValueError, match="bad sampling options") as error:
        SamplingConfig(**options)
    assert rule in str(error.value)


def test_every_broken_rule_is_named_once():
    with pytest.raises(ValueError) as error:
        SamplingConfig(steps="ddim25", eta=0.3, batch_size=0)
    assert str(error.value).count("\n  - ") == 3
    SamplingConfig(sampler="ddim", steps="ddim25", eta=0.3)  # consistent: accepted


# ----------------------------------------------------------------------------------- the fast path
@torch.no_grad()
def _tokens_at_every_step(loaded, prompts, seeds, config, device):
    """Guided sampling written out the direct way: the caption tokens (and the empty caption's, batch 1, expanded
    by the guidance wrapper) are model inputs at every step, so the text encoder runs on both halves of the guided
    batch at every step; the network contiguous."""
    from glide_lightning.diffusion import GaussianDiffusion, classifier_free_guidance, get_sampler
    from glide_lightning.sampling import sample_generators

    size = loaded.image_size
    tokens, mask = loaded.tokenizer(prompts)
    empty_tokens, empty_mask = loaded.tokenizer.empty(1)
    model = classifier_free_guidance(loaded.model, config.guidance_scale, dict(tokens=empty_tokens, mask=empty_mask))
    diffusion = GaussianDiffusion.from_config(loaded.diffusion_config, config.steps)
    return get_sampler(config.sampler)(diffusion, model, (len(prompts), 3, size, size),
                                       model_kwargs=dict(tokens=tokens, mask=mask),
                                       generator=sample_generators(seeds), device=device)


def test_fast_path_equals_encoding_the_captions_at_every_step(tiny_checkpoint):
    """Captions encoded once, guided encodings paired once, channels-last on the CPU: the same images as
    sampling with the tokens as model inputs at every step, to 1e-6 in the same memory format (bit for bit on
    this CPU), within float rounding otherwise."""
    loaded = load_checkpoint(tiny_checkpoint)
    prompts, seeds, cpu = ["a large red circle", "a small blue square", ""], [0, 1, 2], torch.device("cpu")
    config = SamplingConfig(steps="25", batch_size=3)
    direct = _tokens_at_every_step(loaded, prompts, seeds, config, cpu)
    now = sample_batch(loaded, prompts, seeds, config, cpu)
    # the layouts differ by ~1e-6 per forward; 25 steps of the chain carry that to ~2e-5 at most, and up to
    # ~2e-4 on a pixel or two where guidance at 3 amplifies it (the "" caption, framed [sot, eot] as open_clip
    # does, is not the empty caption of the unconditional half)
    torch.testing.assert_close(now, direct, atol=5e-4, rtol=0)
    assert (now - direct).abs().mean() < 1e-5
    # one thread: with several, a GEMM's rounding depends on the batch it is given (the text encoder runs on
    # 3 + 1 captions once in sample_batch, on 6 at every step in the direct path), which is not the difference
    # under test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = _tokens_at_every_step(loaded, prompts, seeds, config, cpu)
        same_layout = sample_batch(loaded, prompts, seeds, replace(config, memory_format="contiguous"), cpu)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(same_layout, direct, atol=1e-6, rtol=0)


def test_text_encoder_runs_once_per_batch_with_the_empty_caption(tiny_checkpoint):
    """A probe on the real text transformer: one call per batch of captions, whatever the number of
    steps, holding the batch's captions and (guided) the empty caption once."""
    loaded = load_checkpoint(tiny_checkpoint)
    rows: list[int] = []
    hook = loaded.model.transformer.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        prompts = ["a large red circle", "a small blue square", "a red square", "a blue circle", "a square"]
        generate(loaded, prompts, list(range(5)), SamplingConfig(steps="6", batch_size=2))
        assert rows == [3, 3, 2]  # batches of 2, 2, 1 captions + the empty caption each
        rows.clear()
        generate(loaded, prompts, list(range(5)), SamplingConfig(steps="6", batch_size=2, guidance_scale=1.0))
        assert rows == [2, 2, 1]  # unguided: no empty caption
    finally:
        hook.remove()


def test_guidance_interval_through_generate(tiny_checkpoint):
    """An interval holding every step is plain guidance, one holding none the conditional model alone;
    a middle one saves the unconditional half's forwards outside it (counted on the real model)."""
    loaded = load_checkpoint(tiny_checkpoint)
    prompts, seeds = ["a large red circle", "a small blue square"], [3, 4]
    cpu = torch.device("cpu")
    config = SamplingConfig(steps="10", sampler="ddim", guidance_scale=4.0)
    guided = sample_batch(loaded, prompts, seeds, config, cpu)
    unguided = sample_batch(loaded, prompts, seeds, replace(config, guidance_scale=1.0), cpu)
    assert torch.equal(sample_batch(loaded, prompts, seeds, replace(config, guidance_interval=(0.0, 1e9)), cpu), guided)
    assert torch.equal(sample_batch(loaded, prompts, seeds, replace(config, guidance_interval=(1e8, 1e9)), cpu),
                       unguided)
    rows: list[int] = []
    hook = loaded.model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        middle = sample_batch(loaded, prompts, seeds, replace(config, guidance_interval=(0.5, 5.0)), cpu)
    finally:
        hook.remove()
    assert len(rows) == 10 and 0 < rows.count(4) < 10 and rows.count(4) + rows.count(2) == 10
    assert not torch.equal(middle, guided) and not torch.equal(middle, unguided)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_solvers_sample_a_learned_variance_checkpoint(tiny_checkpoint, sampler):
    loaded = load_checkpoint(tiny_checkpoint)
    assert loaded.diffusion_config.variance_type == "learned_range"
    images = generate(loaded, ["a large red circle"] * 2, [0, 1], SamplingConfig(sampler=sampler, steps="8"))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8 and not torch.equal(images[0], images[1])


@pytest.mark.parametrize("options, mean_atol", [({"memory_format": "channels_last"}, 1e-4),
                                                ({"precision": "bf16"}, 0.05)])
def test_memory_format_and_bf16_autocast_reach_the_network_and_sample_close_images(tiny_checkpoint, options,
                                                                                     mean_atol):
    """Probed on the UNet's first convolution: channels_last inputs, bf16 outputs under autocast. The
    images stay close on average (this random model's chain amplifies rounding where pixels sit at
    the clipping bound), and the model's own memory format is restored."""
    loaded = load_checkpoint(tiny_checkpoint)
    prompts, seeds, cpu = ["a large red circle", "a small blue square"], [0, 1], torch.device("cpu")
    config = SamplingConfig(steps="10", memory_format="contiguous")
    plain = sample_batch(loaded, prompts, seeds, config, cpu)
    seen = []
    conv = loaded.model.input_blocks[0][0]
    hook = conv.register_forward_hook(lambda module, args, out: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last), out.dtype)))
    try:
        other = sample_batch(loaded, prompts, seeds, replace(config, **options), cpu)
    finally:
        hook.remove()
    expected = (True, torch.float32) if "memory_format" in options else (False, torch.bfloat16)
    assert set(seen) == {expected}
    assert other.dtype == torch.float32 and 0 < (other - plain).abs().mean() < mean_atol
    assert all(p.is_contiguous() for p in loaded.model.parameters())


def test_auto_memory_format_is_channels_last_only_for_eager_cpu_sampling():
    """Eager CPU sampling measured faster in NHWC, compiled CPU sampling in NCHW (inductor's freezing lays
    out the convolutions itself); GPUs stay NCHW; an explicit choice always wins."""
    from glide_lightning.sampling import uses_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_channels_last(SamplingConfig(), cpu)
    assert not uses_channels_last(SamplingConfig(compile=True), cpu)
    assert not uses_channels_last(SamplingConfig(), cuda)
    assert uses_channels_last(SamplingConfig(compile=True, memory_format="channels_last"), cpu)
    assert not uses_channels_last(SamplingConfig(memory_format="contiguous"), cpu)


@pytest.mark.slow
def test_compiled_denoiser_samples_within_its_documented_tolerance(tiny_checkpoint):
    """torch.compile (inductor on CPU: a C++ compiler is needed; about a minute to compile the tiny
    model) compiles the denoiser once and gives the eager images within its documented tolerance:
    float rounding per forward, which this random model's chain amplifies at a few pixels."""
    from torch._dynamo.utils import counters

    loaded = load_checkpoint(tiny_checkpoint)
    prompts, seeds, cpu = ["a large red circle", "a small blue square"], [0, 1], torch.device("cpu")
    config = SamplingConfig(steps="4")
    eager = sample_batch(loaded, prompts, seeds, config, cpu)
    graphs = counters["stats"]["unique_graphs"]
    compiled = sample_batch(loaded, prompts, seeds, replace(config, compile=True), cpu)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path ran
    difference = (compiled - eager).abs()
    assert difference.mean() < 1e-4 and difference.max() < 1e-2
    assert not isinstance(loaded.model, torch._dynamo.eval_frame.OptimizedModule)  # nothing kept on the module
    # new weights in the same tensors (an EMA swap during training, a loaded state dict): the compiled
    # (on the CPU frozen) denoiser follows them, it does not keep the weights it was compiled with
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.mul_(0.9).add_(0.01)
    changed_eager = sample_batch(loaded, prompts, seeds, config, cpu)
    changed_compiled = sample_batch(loaded, prompts, seeds, replace(config, compile=True), cpu)
    assert (changed_eager - eager).abs().mean() > 1e-2  # the change shows in the images
    difference = (changed_compiled - changed_eager).abs()
    assert difference.mean() < 1e-4 and difference.max() < 1e-2


@pytest.mark.parametrize("sampler, steps", [("ddpm", "6"), ("ddim", "ddim6"), ("dpmpp_2m", "6"), ("unipc", "6")])
def test_dynamic_thresholding_reaches_every_sampler(tiny_checkpoint, monkeypatch, sampler, steps):
    """Every sampler post-processes pred_xstart with it once per step (a probe around the real function);
    off by default; at guidance 8 it changes the images, which stay finite."""
    import glide_lightning.sampling.batch as sampling_module
    from glide_lightning.diffusion import dynamic_threshold

    calls: list[float] = []

    def probe(pred_xstart, percentile):
        calls.append(percentile)
        return dynamic_threshold(pred_xstart, percentile)

    monkeypatch.setattr(sampling_module, "dynamic_threshold", probe)
    loaded = load_checkpoint(tiny_checkpoint)
    prompts, seeds, cpu = ["a large red circle", "a small blue square"], [0, 1], torch.device("cpu")
    config = SamplingConfig(sampler=sampler, steps=steps, guidance_scale=8.0)
    static = sample_batch(loaded, prompts, seeds, config, cpu)
    assert calls == []  # off by default
    dynamic = sample_batch(loaded, prompts, seeds, replace(config, dynamic_threshold=0.6), cpu)
    assert calls == [0.6] * 6
    assert torch.isfinite(dynamic).all() and not torch.equal(dynamic, static)
