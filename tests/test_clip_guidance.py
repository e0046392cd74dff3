"""CLIP guidance in sampling: a noised CLIP directory drives ``generate`` and ``sample``; guidance raises the
samples' similarity to their prompts at the same seeds; bad combinations fail at parse time."""

from dataclasses import asdict

import pytest
import torch

from glide_lightning.clip_guidance import GLIDE_CLIP_PROCESS, clip_timesteps, load_guidance_clip
from glide_lightning.commands import main as glide_main
from glide_lightning.commands import parse
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.models.clip import NoisedCLIP, NoisedCLIPConfig, save_noised_clip
from glide_lightning.cascade import generate
from glide_lightning.sampling import SamplingConfig, load_checkpoint

TINY_CLIP = NoisedCLIPConfig(image_size=32, patch_size=8, image_width=32, image_layers=1, text_width=32, text_layers=1,
                             head_channels=16, embed_dim=16, n_vocab=49408, text_ctx=16, n_timesteps=50,
                             logit_scale=10.0)
PROMPTS = ["a large red circle", "a small blue square above a large yellow triangle"]


@pytest.fixture(scope="module")
def clip_dir(tiny_checkpoint, tmp_path_factory):
    """A randomly initialised tiny noised CLIP, exported for the tiny model's 32 px, 50-step process."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("clip")
    process = asdict(load_checkpoint(tiny_checkpoint).diffusion_config)
    return save_noised_clip(NoisedCLIP(TINY_CLIP), out, process=process)


def similarity(guide, images, prompts):
    """The CLIP's scaled similarity of uint8 images to prompts, at t = 0."""
    x = images.float() / 127.5 - 1
    tokens, mask = guide.tokenizer(prompts)
    with torch.no_grad():
        return guide.clip.similarity(x, torch.zeros(len(x), dtype=torch.long), guide.clip.text_embeddings(tokens, mask))


def test_clip_guidance_raises_the_similarity_of_the_samples_to_their_prompts(tiny_checkpoint, clip_dir):
    base = load_checkpoint(tiny_checkpoint)
    guide = load_guidance_clip(clip_dir, base.image_size)
    prompts, seeds = PROMPTS * 2, [0, 1, 2, 3]
    config = SamplingConfig(steps="10", guidance_scale=1.0, batch_size=4)
    unguided = generate(base, prompts, seeds, config, clip=guide)  # scale 0: the CLIP is not used
    guided = generate(base, prompts, seeds, SamplingConfig(**{**asdict(config), "clip_guidance_scale": 30.0}),
                      clip=guide)
    assert torch.equal(unguided, generate(base, prompts, seeds, config))
    before, after = similarity(guide, unguided, prompts), similarity(guide, guided, prompts)
    assert (after > before).all(), (before, after)


def test_clip_timesteps_match_noise_levels():
    ours = GaussianDiffusion.from_config(DiffusionConfig(steps=100)).base_alphas_cumprod
    glide = GaussianDiffusion.from_config(GLIDE_CLIP_PROCESS).base_alphas_cumprod
    assert torch.equal(clip_timesteps(ours, ours), torch.arange(100))
    table = clip_timesteps(ours, glide)
    assert table.shape == (100,) and bool((table.diff() > 0).all())
    assert (glide[table] - ours).abs().max() < 2e-3


def test_a_clip_of_another_image_size_is_refused(clip_dir):
    with pytest.raises(ValueError, match="sees 32 px images but the model samples 64 px"):
        load_guidance_clip(clip_dir, 64)


@pytest.mark.parametrize("argv, expected", [
    (["--sampling.clip_guidance_scale", "5"], "needs a noised CLIP: pass --clip_dir"),
    (["--clip_dir", "d"], "sampling.clip_guidance_scale is 0"),
    (["--clip_dir", "d", "--sampling.clip_guidance_scale", "5", "--sampling.sampler", "ddim",
      "--sampling.steps", "10"], "use sampler 'ddpm' or clip_guidance_scale 0"),
    (["--clip_dir", "d", "--sampling.clip_guidance_scale", "-1"], "clip_guidance_scale must be >= 0"),
])
def test_bad_clip_guidance_options_fail_at_parse_time(argv, expected, capsys):
    with pytest.raises(SystemExit) as done:
        parse(["sample", "--ckpt", "m.ckpt", "--prompt", "a", *argv])
    assert done.value.code == 2 and expected in capsys.readouterr().err


def test_sample_command_guides_with_a_clip_dir(tiny_checkpoint, clip_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="glide_lightning")
    out = glide_main(["sample", "--ckpt", str(tiny_checkpoint), "--prompt", PROMPTS[0], "--clip_dir", str(clip_dir),
                      "--sampling.clip_guidance_scale", "30", "--sampling.guidance_scale", "1",
                      "--sampling.steps", "10", "--out", str(tmp_path / "s"), "--device", "cpu"])
    from glide_lightning.data.images import read_png_metadata

    meta = read_png_metadata(out / "0000.png")
    assert meta["clip_guidance_scale"] == "30.0" and str(clip_dir) in meta["clip"]
    assert f"at guidance 1.00 (ddpm, 10 steps), CLIP guidance 30 with {clip_dir}" in caplog.text  # said up front


def test_the_issue_spelling_of_the_options_is_accepted():
    command = parse(["sample", "--ckpt", "m.ckpt", "--prompt", "a", "--clip-dir", "d", "--clip-guidance-scale", "3",
                     "--guidance-scale=1", "--num-per-prompt", "2"])
    assert command.clip_dir == "d" and command.num_per_prompt == 2
    assert command.sampling == SamplingConfig(clip_guidance_scale=3.0, guidance_scale=1.0)
