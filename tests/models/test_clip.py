"""The noised CLIP: strict loading of glide-text2im's released encoders (the fixture's keys and shapes),
clear mismatch errors, and the forward semantics the shapes imply."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from glide_lightning.models import CheckpointMismatchError
from glide_lightning.models.clip import (
    CLIP_FILES,
    GLIDE_DOWNLOAD_CLIP_FILES,
    NoisedCLIP,
    NoisedCLIPConfig,
    clip_files,
    load_noised_clip,
    save_noised_clip,
)

FIXTURE = Path(__file__).resolve().parents[3] / "shared/fixtures/glide_text2im_state_dicts.json"  # beside the repo

TINY = NoisedCLIPConfig(image_size=16, patch_size=4, image_width=32, image_layers=2, text_width=32, text_layers=2,
                        head_channels=16, embed_dim=24, n_vocab=49408, text_ctx=16, n_timesteps=50, logit_scale=10.0)


@pytest.fixture(scope="module")
def released_shapes():
    fixture = json.loads(FIXTURE.read_text())
    return {part: fixture[f"clip/{part}-enc"]["state_dict"] for part in CLIP_FILES}


NAMINGS = {"glide_lightning": CLIP_FILES, "glide-text2im download": GLIDE_DOWNLOAD_CLIP_FILES}


def write_clip_dir(root: Path, shapes: dict[str, dict[str, list[int]]], names: dict[str, str] = CLIP_FILES) -> Path:
    """glide-text2im's two files (named ``names``), with random tensors of the given shapes (no released weights)."""
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for part, file in names.items():
        torch.save({k: torch.randn(v, generator=generator) if len(v) == 1 or k.startswith("blocks.output") else torch.zeros(v)
                    for k, v in shapes[part].items()}, root / file)
    return root


@pytest.mark.parametrize("naming", NAMINGS)
def test_released_encoders_load_strictly_with_every_fixture_key(released_shapes, tmp_path, naming):
    """Under either naming: glide-text2im's ``clip/`` names and its download's ``clip_image_enc.pt`` and
    ``clip_text_enc.pt`` (``glide_text2im/download.py``: the URL's file name in ``glide_model_cache``)."""
    names = NAMINGS[naming]
    clip, meta = load_noised_clip(write_clip_dir(tmp_path / "clip", released_shapes, names))
    assert meta == {} and clip.config == NoisedCLIPConfig()
    assert clip_files(tmp_path / "clip") == {part: tmp_path / "clip" / name for part, name in names.items()}
    for part, encoder in (("image", clip.image_encoder), ("text", clip.text_encoder)):
        ours = {k: list(v.shape) for k, v in encoder.state_dict().items()}
        assert ours == released_shapes[part]
        saved = torch.load(tmp_path / "clip" / names[part])
        assert all(torch.equal(encoder.state_dict()[k], saved[k]) for k in ("blocks.output.f.w", "blocks.block_0.f_attn.f_q.b"))


def test_wrong_shapes_and_keys_give_a_clear_error(released_shapes, tmp_path):
    shapes = {part: dict(v) for part, v in released_shapes.items()}
    shapes["image"]["blocks.input.w_t"] = [100, 768]  # a CLIP of another process length
    shapes["image"]["blocks.block_0.f_attn.f_k.b"] = [768]  # a key bias the released model lacks
    del shapes["image"]["blocks.output.ln.g"]
    with pytest.raises(CheckpointMismatchError) as error:
        load_noised_clip(write_clip_dir(tmp_path / "clip", shapes))
    message = str(error.value)
    assert "image_enc.pt" in message and "clip/image-enc" in message
    assert "blocks.input.w_t: checkpoint [100, 768] vs model [1000, 768]" in message
    assert "1 unexpected key: blocks.block_0.f_attn.f_k.b" in message
    assert "1 missing key: blocks.output.ln.g" in message


@pytest.mark.parametrize("present", [[], ["image_enc.pt"], ["clip_text_enc.pt"], ["image_enc.pt", "clip_text_enc.pt"]])
def test_a_folder_with_neither_naming_names_both(tmp_path, present):
    for name in present:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        load_noised_clip(tmp_path)
    message = str(error.value)
    assert "holds neither image_enc.pt + text_enc.pt nor clip_image_enc.pt + clip_text_enc.pt" in message
    assert f"found: {', '.join(sorted(present)) or 'none of them'}" in message


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_noised_clip(tmp_path / "nowhere")


def test_both_namings_in_one_folder_are_refused(tmp_path):
    torch.manual_seed(0)
    save_noised_clip(NoisedCLIP(TINY), tmp_path)
    for part, name in GLIDE_DOWNLOAD_CLIP_FILES.items():
        (tmp_path / name).write_bytes((tmp_path / CLIP_FILES[part]).read_bytes())
    with pytest.raises(ValueError, match="holds both namings") as error:
        load_noised_clip(tmp_path)
    assert "image_enc.pt + text_enc.pt and clip_image_enc.pt + clip_text_enc.pt" in str(error.value)
    assert "ambiguous" in str(error.value)


def test_a_complete_naming_beside_a_stray_file_of_the_other_is_used(tmp_path):
    torch.manual_seed(0)
    clip = NoisedCLIP(TINY)
    save_noised_clip(clip, tmp_path)
    for part, name in GLIDE_DOWNLOAD_CLIP_FILES.items():
        (tmp_path / CLIP_FILES[part]).rename(tmp_path / name)
    (tmp_path / "text_enc.pt").write_bytes(b"")  # a leftover of the other naming: not a complete pair
    loaded, meta = load_noised_clip(tmp_path)
    assert loaded.config == TINY and meta["tokenizer"] == "clip"
    assert clip_files(tmp_path)["text"].name == "clip_text_enc.pt"
    tokens, lengths = torch.randint(0, 1000, (2, 16)), torch.tensor([2, 7])
    torch.testing.assert_close(loaded.text_encoder(tokens, lengths), clip.text_encoder(tokens, lengths))


def test_bad_config_is_refused_naming_the_fields():
    with pytest.raises(ValueError, match="image_size 18 is not a multiple of patch_size 4"):
        NoisedCLIPConfig(image_size=18)


def test_image_embedding_reads_the_timestep_token_alone_when_the_blocks_are_identities():
    """With every residual branch zeroed, the first token is w_t[t] + w_pos[0] after the input
    LayerNorm, whatever the image: the output is ln_out(ln_in(w_t[t] + w_pos[0])) @ f.wᵀ."""
    torch.manual_seed(0)
    encoder = NoisedCLIP(TINY).image_encoder
    for name, p in encoder.named_parameters():
        if name.endswith(("f_c.w", "f_c.b", "f_2.w", "f_2.b")):
            torch.nn.init.zeros_(p)
    blocks = encoder.blocks
    t = torch.tensor([0, 7, 49])
    x_t = torch.randn(3, 3, 16, 16)

    def norm(h, ln):
        return torch.nn.functional.layer_norm(h, h.shape[-1:], ln.g, ln.b, 1e-5)

    token = norm(blocks["input"].w_t[t] + blocks["input"].w_pos[0], blocks["input"].ln)
    expected = norm(token, blocks["output"].ln) @ blocks["output"].f.w.T
    torch.testing.assert_close(encoder(x_t, t), expected)
    torch.testing.assert_close(encoder(torch.randn(3, 3, 16, 16), t), expected)


def test_text_encoder_is_causal_and_reads_the_last_real_token():
    """The embedding at length L depends on tokens[:L] only (causal attention, read at L - 1)."""
    torch.manual_seed(0)
    clip = NoisedCLIP(TINY)
    tokens = torch.randint(1, 1000, (2, 16))
    lengths = torch.tensor([5, 9])
    changed = tokens.clone()
    changed[0, 5:], changed[1, 9:] = 0, 7
    torch.testing.assert_close(clip.text_encoder(tokens, lengths), clip.text_encoder(changed, lengths))
    changed[0, 4] = tokens[0, 4] + 1
    assert not torch.allclose(clip.text_encoder(tokens, lengths)[0], clip.text_encoder(changed, lengths)[0])
    with pytest.raises(ValueError, match="caption lengths must lie in"):
        clip.text_encoder(tokens, torch.tensor([0, 3]))


def test_text_embeddings_of_a_caption_without_real_tokens_read_its_first_position():
    """A mask with no real token (the ``gpt2`` tokenizer's ``""``: all padding) is read at position 0, the first
    padding token; framed captions (the ``clip`` tokenizer's ``[sot, eot]``) are read at their eot."""
    torch.manual_seed(0)
    clip = NoisedCLIP(replace(TINY, n_vocab=50257))  # GPT-2's vocabulary fits
    tokens = torch.tensor([[50256] * 16, [49406, 49407] + [0] * 14])
    mask = torch.tensor([[False] * 16, [True, True] + [False] * 14])
    got = clip.text_embeddings(tokens, mask)
    expected = torch.nn.functional.normalize(clip.text_encoder(tokens, torch.tensor([1, 2])), dim=-1)
    torch.testing.assert_close(got, expected)


def test_image_encoder_refuses_other_sizes_and_steps():
    clip = NoisedCLIP(TINY)
    with pytest.raises(ValueError, match=r"takes \[B, 3, 16, 16\] images"):
        clip.image_encoder(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 50\)"):
        clip.image_encoder(torch.zeros(1, 3, 16, 16), torch.tensor([50]))


def test_similarity_gradient_reaches_x_t_and_matches_finite_differences():
    torch.manual_seed(0)
    clip = NoisedCLIP(TINY).double()
    text = torch.nn.functional.normalize(torch.randn(2, 24, dtype=torch.float64), dim=-1)
    x_t = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3, 40])
    clip.image_encoder.blocks["input"].mean = clip.image_encoder.blocks["input"].mean.double()
    clip.image_encoder.blocks["input"].std = clip.image_encoder.blocks["input"].std.double()
    (grad,) = torch.autograd.grad(clip.similarity(x_t, t, text).sum(), x_t)
    assert grad.abs().sum() > 0
    direction = torch.randn_like(x_t)
    h = 1e-6
    with torch.no_grad():
        numeric = (clip.similarity(x_t + h * direction, t, text) - clip.similarity(x_t - h * direction, t, text)) / (2 * h)
    torch.testing.assert_close(numeric, (grad * direction).sum((1, 2, 3)), rtol=1e-5, atol=1e-7)


def test_save_and_load_round_trip_our_exports(tmp_path):
    torch.manual_seed(0)
    clip = NoisedCLIP(TINY)
    save_noised_clip(clip, tmp_path, process={"steps": 50, "noise_schedule": "cosine"})
    loaded, meta = load_noised_clip(tmp_path)
    assert loaded.config == TINY and meta["process"]["steps"] == 50 and meta["tokenizer"] == "clip"
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    torch.testing.assert_close(loaded.image_encoder(x_t, t), clip.image_encoder(x_t, t))
