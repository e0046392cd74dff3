"""The noised CLIP: strict loading of glide-text2im's released encoders (the fixture's keys and shapes),
clear mismatch errors, and the forward semantics the shapes imply."""

import json
from pathlib import Path

import pytest
import torch

from glide_lightning.models import CheckpointMismatchError
from glide_lightning.models.clip import (
    CLIP_FILES,
    NoisedCLIP,
    NoisedCLIPConfig,
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


def write_clip_dir(root: Path, shapes: dict[str, dict[str, list[int]]]) -> Path:
    """glide-text2im's two files, with random tensors of the given shapes (no released weights here)."""
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for part, file in CLIP_FILES.items():
        torch.save({k: torch.randn(v, generator=generator) if len(v) == 1 or k.startswith("blocks.output") else torch.zeros(v)
                    for k, v in shapes[part].items()}, root / file)
    return root


def test_released_encoders_load_strictly_with_every_fixture_key(released_shapes, tmp_path):
    clip, meta = load_noised_clip(write_clip_dir(tmp_path / "clip", released_shapes))
    assert meta == {} and clip.config == NoisedCLIPConfig()
    for part, encoder in (("image", clip.image_encoder), ("text", clip.text_encoder)):
        ours = {k: list(v.shape) for k, v in encoder.state_dict().items()}
        assert ours == released_shapes[part]
        saved = torch.load(tmp_path / "clip" / CLIP_FILES[part])
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


def test_a_missing_file_names_both_files(tmp_path):
    (tmp_path / "image_enc.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks text_enc.pt"):
        load_noised_clip(tmp_path)


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
