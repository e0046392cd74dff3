"""CLIP guidance in sampling: a noised CLIP directory drives ``generate`` and ``sample``; guidance raises the
samples' similarity to their prompts at the same seeds; bad combinations fail at parse time."""

import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from glide_lightning.commands import main as glide_main
from glide_lightning.commands import parse
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.models.clip import GLIDE_DOWNLOAD_CLIP_FILES, NoisedCLIP, NoisedCLIPConfig, save_noised_clip
from glide_lightning.sampling import (GLIDE_CLIP_PROCESS, SamplingConfig, clip_timesteps, generate, load_checkpoint,
                                     load_guidance_clip)

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


# ------------------------------------------------------------------- empty and blank captions (issue 22 item 3)
def glide_text2im_clip_framing(text: str, text_ctx: int) -> tuple[list[int], int]:
    """glide-text2im's noised-CLIP framing of a caption that cleans to nothing (``CLIPModel.encode_prompts``:
    ``padded_tokens_and_len(encode(text), max_text_len)``), from its ``simple_tokenizer.py`` semantics:
    ``encode`` runs ``whitespace_clean(basic_clean(text))``, which strips, so ``""`` and a blank give no ids;
    the vocabulary is 256 bytes, 256 byte+``</w>``, the merges ``[1 : 49152 - 256 - 2 + 1]`` and then
    ``<|startoftext|>``, ``<|endoftext|>``; the framing is ``[sot] + ids + [eot]`` padded with 0 and its length."""
    assert not " ".join(text.split())  # whitespace_clean(...).strip() leaves nothing
    sot = 256 + 256 + (49152 - 256 - 2)
    eot = sot + 1
    return [sot, eot] + [0] * (text_ctx - 2), 2


def base_alphas(base):
    """ᾱ per step of the sampled model's original process (what ``sample_batch`` hands ``cond_fn``)."""
    return GaussianDiffusion.from_config(base.diffusion_config).base_alphas_cumprod


def guidance_gradient(guide, target, x_t, clip_t, scale):
    """``scale · ∇_x logit_scale · cos(f(x, t), target)``: CLIP guidance toward the embedding ``target``."""
    x = x_t.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(guide.clip.similarity(x, clip_t, target).sum(), x)
    return scale * grad


@pytest.mark.parametrize("prompt", ["", "   "])
def test_clip_guidance_toward_an_empty_caption_targets_the_sot_eot_embedding(tiny_checkpoint, clip_dir, prompt):
    """The guidance entry ``sample --clip_dir`` uses (``load_guidance_clip`` then ``cond_fn``) encodes ``""`` and a
    blank as glide-text2im does (``[sot, eot]``, length 2) and its gradient is CLIP guidance toward the text
    encoder's output on those tokens (was: ValueError, the caption had no eot to read)."""
    base = load_checkpoint(tiny_checkpoint)
    guide = load_guidance_clip(clip_dir, base.image_size)
    cpu, scale = torch.device("cpu"), 30.0
    cond_fn = guide.cond_fn([prompt, PROMPTS[0]], base_alphas(base), scale, cpu)
    framed, length = glide_text2im_clip_framing(prompt, TINY_CLIP.text_ctx)
    tokens, mask = guide.tokenizer([prompt])
    assert tokens[0].tolist() == framed and int(mask.sum()) == length
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            guide.clip.text_encoder(torch.tensor([framed]), torch.tensor([length])), dim=-1)
        other = guide.clip.text_embeddings(*guide.tokenizer([PROMPTS[0]]))
    torch.testing.assert_close(guide.text_targets([prompt], cpu), expected)
    torch.manual_seed(0)
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([49, 10])
    clip_t = clip_timesteps(base_alphas(base),
                            GaussianDiffusion.from_config(guide.process).base_alphas_cumprod)[t]
    got = cond_fn(x_t, t)
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    torch.testing.assert_close(got, guidance_gradient(guide, torch.cat([expected, other]), x_t, clip_t, scale))


def test_clip_guided_sampling_of_empty_and_blank_captions_is_finite(tiny_checkpoint, clip_dir, monkeypatch):
    """``generate`` with CLIP guidance (what ``sample --clip_dir`` calls) on ``""`` and ``"   "``: every guidance
    gradient is finite and nonzero, and the images are not constant."""
    base = load_checkpoint(tiny_checkpoint)
    guide = load_guidance_clip(clip_dir, base.image_size)
    gradients, make = [], guide.cond_fn

    def recording_cond_fn(*args):
        inner = make(*args)

        def cond_fn(x_t, t):
            gradients.append(inner(x_t, t))
            return gradients[-1]
        return cond_fn

    monkeypatch.setattr(guide, "cond_fn", recording_cond_fn)
    config = SamplingConfig(steps="6", guidance_scale=3.0, batch_size=2, clip_guidance_scale=30.0)
    images = generate(base, ["", "   "], [0, 1], config, clip=guide)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert len(gradients) == 6 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in gradients)
    assert all(image.float().std() > 0 for image in images)


def test_sample_command_guides_an_empty_caption_with_a_glide_text2im_download_folder(tiny_checkpoint, clip_dir,
                                                                                       tmp_path, caplog):
    """``sample --prompt "" --clip_dir`` with the file names glide-text2im's download gives the CLIP
    (``clip_image_enc.pt``, ``clip_text_enc.pt``, issue 22 item 4) writes its image."""
    caplog.set_level("INFO", logger="glide_lightning")
    cache = tmp_path / "glide_model_cache"
    cache.mkdir()
    for part, ours in (("image", "image_enc.pt"), ("text", "text_enc.pt")):
        shutil.copy(Path(clip_dir) / ours, cache / GLIDE_DOWNLOAD_CLIP_FILES[part])
    shutil.copy(Path(clip_dir) / "clip_config.json", cache)
    out = glide_main(["sample", "--ckpt", str(tiny_checkpoint), "--prompt", "", "--clip_dir", str(cache),
                      "--sampling.clip_guidance_scale", "30", "--sampling.steps", "4", "--out", str(tmp_path / "s"),
                      "--device", "cpu"])
    from glide_lightning.data.images import read_png_metadata

    meta = read_png_metadata(out / "0000.png")
    assert meta["prompt"] == "" and "clip_image_enc.pt" in meta["clip"]


def test_a_gpt2_noised_clip_guides_an_empty_caption_from_its_first_padding_token(tiny_checkpoint, tmp_path,
                                                                                   monkeypatch):
    """A noised CLIP trained with the ``gpt2`` tokenizer frames ``""`` as GLIDE's base model does (all padding, no
    real token): the text embedding is read at position 0, its first padding token (GPT-2's end of text)."""
    bpe_dir = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gpt2_bpe"
    if not (bpe_dir / "encoder.json.gz").is_file():
        pytest.skip(f"GPT-2 BPE fixture files not found in {bpe_dir}")
    monkeypatch.setenv("GLIDE_GPT2_BPE_DIR", str(bpe_dir))
    base = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(0)
    config = NoisedCLIPConfig(**{**asdict(TINY_CLIP), "n_vocab": 50257})
    save_noised_clip(NoisedCLIP(config), tmp_path, process=asdict(base.diffusion_config), tokenizer="gpt2")
    guide = load_guidance_clip(tmp_path, base.image_size)
    cond_fn = guide.cond_fn([""], base_alphas(base), 30.0, torch.device("cpu"))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            guide.clip.text_encoder(torch.full((1, 16), 50256), torch.tensor([1])), dim=-1)
    torch.testing.assert_close(guide.text_targets([""], torch.device("cpu")), expected)
    assert torch.isfinite(cond_fn(torch.randn(1, 3, 32, 32), torch.tensor([20]))).all()
