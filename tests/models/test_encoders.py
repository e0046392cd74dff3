"""Frozen text encoders (T5, open_clip) and the UNet's masked conditioning, on tiny randomly initialised
stand-ins of the real architectures (built by the root conftest: nothing downloads)."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import pytest
import torch
from einops import rearrange

from glide_lightning.data.tokenizers import CLIPTokenizer, T5Tokenizer
from glide_lightning.models import ModelConfig, build_model
from glide_lightning.models.encoders import OpenCLIPTextEncoder, T5TextEncoder, load_text_encoder
from glide_lightning.models.unet import AttentionBlock

from conftest import TINY, randomize_zero_params  # tests/models/conftest.py

CAPTIONS = ["a large red circle", "a small green triangle"]


def frozen_setup(kind: str, tiny_t5_dir: Any, tiny_clip_name: str) -> tuple[Any, Any, Any]:
    """(encoder, tokenizer, model) of a tiny text-to-image model conditioned on the frozen encoder ``kind``."""
    name = str(tiny_t5_dir) if kind == "t5" else tiny_clip_name
    encoder = load_text_encoder(kind, name)
    tokenizer = T5Tokenizer(16, path=name) if kind == "t5" else CLIPTokenizer(16)
    config = ModelConfig(**TINY, text_encoder=kind, text_encoder_name=name, text_encoder_dim=encoder.dim)
    torch.manual_seed(0)
    model = randomize_zero_params(build_model(config)).eval()
    model.attach_text_encoder(encoder)
    return encoder, tokenizer, model


@pytest.fixture(params=["t5", "clip"])
def frozen(request: Any, tiny_t5_dir: Any, tiny_clip_name: str) -> tuple[Any, Any, Any]:
    return frozen_setup(request.param, tiny_t5_dir, tiny_clip_name)


def test_encoders_load_frozen_in_eval_mode(frozen: Any) -> None:
    encoder, tokenizer, _ = frozen
    assert isinstance(encoder, (T5TextEncoder, OpenCLIPTextEncoder))
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()  # a Trainer switching modes must not turn dropout on
    assert not any(m.training for m in encoder.modules())
    tokens, mask = tokenizer(CAPTIONS)
    emb = encoder(tokens, mask)
    assert emb.shape == (2, 16, encoder.dim) and emb.dtype == torch.float32 and not emb.requires_grad
    assert torch.equal(emb, encoder(tokens, mask))  # deterministic: no dropout


def test_frozen_encoder_is_in_no_state_dict_and_no_parameters(frozen: Any) -> None:
    encoder, _, model = frozen
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in encoder.parameters())
    assert set(model.state_dict()) == set(build_model(ModelConfig(**TINY, text_encoder=model.text_encoder,
                                                                  text_encoder_name="x",
                                                                  text_encoder_dim=encoder.dim)).state_dict())
    assert {"encoder_ln.weight", "encoder_proj.weight", "pooled_proj.weight"} <= set(model.state_dict())
    assert not any(k.startswith(("transformer.", "token_embedding")) for k in model.state_dict())


def test_masked_positions_do_not_change_the_output(frozen: Any) -> None:
    """Tokens at padding positions (mask False) are ignored exactly; a real token is not."""
    _, tokenizer, model = frozen
    tokens, mask = tokenizer(CAPTIONS)
    assert (~mask).any(dim=1).all(), "every caption needs padding for this test"
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40])
    scrambled = torch.where(mask, tokens, torch.randint(3, 30, tokens.shape, generator=torch.Generator().manual_seed(2)))
    assert not torch.equal(scrambled, tokens)
    with torch.no_grad():
        out = model(x, t, tokens=tokens, mask=mask)
        assert torch.equal(model(x, t, tokens=scrambled, mask=mask), out)
        changed = tokens.clone()
        changed[:, 1] = tokens[:, 1] + 1  # a real token
        assert (model(x, t, tokens=changed, mask=mask) - out).abs().max() > 1e-4


def test_pooled_embedding_and_projection_closed_form(frozen: Any) -> None:
    """xf_proj = pooled_proj(mean over real tokens of encoder_proj(LayerNorm(emb))); xf_out the projected tokens."""
    encoder, tokenizer, model = frozen
    tokens, mask = tokenizer(CAPTIONS)
    emb = encoder(tokens, mask)
    with torch.no_grad():
        xf_proj, xf_out = model.encode_embeddings(emb, mask)
        for i in range(2):
            real = emb[i, mask[i]]  # [n_i, D]
            h = model.encoder_proj(torch.nn.functional.layer_norm(real, (encoder.dim,), model.encoder_ln.weight,
                                                                  model.encoder_ln.bias, eps=1e-5))
            torch.testing.assert_close(xf_proj[i], model.pooled_proj(h.mean(0)), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(xf_out[i, :, mask[i]], h.T, rtol=1e-5, atol=1e-6)
        # an all-masked caption pools to zero: only pooled_proj's bias is left
        none = torch.zeros_like(mask)
        assert torch.equal(model.encode_embeddings(emb, none)[0], model.pooled_proj.bias.expand(2, -1))


def test_precomputed_embeddings_and_encodings_stand_in_for_tokens(frozen: Any) -> None:
    encoder, tokenizer, model = frozen
    tokens, mask = tokenizer(CAPTIONS)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 60])
    with torch.no_grad():
        from_tokens = model(x, t, tokens=tokens, mask=mask)
        from_emb = model(x, t, text_emb=encoder(tokens, mask).half(), text_mask=mask)  # fp16 as stored in shards
        from_encoding = model(x, t, **model.encode_caption(tokens, mask))
    assert torch.equal(from_encoding, from_tokens)
    torch.testing.assert_close(from_emb, from_tokens, rtol=0, atol=5e-3)
    with pytest.raises(ValueError, match="xf_mask"):
        enc = model.encode_caption(tokens, mask)
        model(x, t, xf_proj=enc["xf_proj"], xf_out=enc["xf_out"])


def test_key_padding_mask_equals_attention_without_the_masked_tokens() -> None:
    """Masking the last k encoder tokens is attention over the first S - k alone (closed form)."""
    torch.manual_seed(0)
    block = AttentionBlock(32, num_head_channels=16, encoder_channels=24)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x, enc = torch.randn(3, 32, 4, 4), torch.randn(3, 24, 7)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 5:] = False
    with torch.no_grad():
        masked = block(x, enc, mask)
        torch.testing.assert_close(masked, block(x, enc[:, :, :5]), rtol=1e-5, atol=1e-6)
        # an all-False mask: the image attends to itself only (no NaN)
        nothing = block(x, enc, torch.zeros_like(mask))
        assert torch.isfinite(nothing).all()
        torch.testing.assert_close(nothing, block(x), rtol=1e-5, atol=1e-6)


def test_encoder_dim_mismatch_and_missing_encoder_are_clear_errors(tiny_t5_dir: Any) -> None:
    encoder = load_text_encoder("t5", str(tiny_t5_dir))
    config = ModelConfig(**TINY, text_encoder="t5", text_encoder_name=str(tiny_t5_dir), text_encoder_dim=48)
    model = build_model(config)
    with pytest.raises(ValueError, match="text_encoder_dim"):
        model.attach_text_encoder(encoder)
    tokens, mask = T5Tokenizer(16, path=str(tiny_t5_dir))(CAPTIONS)
    with pytest.raises(RuntimeError, match="load_checkpoint"):
        model.encode_text(tokens, mask)
    with pytest.raises(ValueError, match="text_encoder_dim"):
        build_model(replace(config, text_encoder_dim=None))


@pytest.mark.parametrize("fields, match", [
    (dict(text_encoder="t5"), "needs text_encoder_name"),
    (dict(text_encoder="bert", text_encoder_name="x"), "choose one of transformer, t5, clip"),
    (dict(text_encoder_name="google/t5-v1_1-base"), "text_encoder is 'transformer'"),
    (dict(text_encoder="t5", text_encoder_name="x", text_encoder_pretrained="openai"), "open_clip"),
    (dict(text_encoder="t5", text_encoder_name="x", xf_width=0), "xf_width > 0"),
])
def test_text_encoder_config_errors(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, **fields})


def test_missing_text_extra_names_it(monkeypatch: pytest.MonkeyPatch, tiny_t5_dir: Any) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'glide_lightning\[text\]'"):
        load_text_encoder("t5", str(tiny_t5_dir))
    with pytest.raises(ImportError, match=r"glide_lightning\[text\]"):
        T5Tokenizer(16, path=str(tiny_t5_dir))


def test_t5_tokenizer_empty_caption_is_eos_alone(tiny_t5_dir: Any) -> None:
    tokenizer = T5Tokenizer(8, path=str(tiny_t5_dir))
    tokens, mask = tokenizer.empty(2)
    eos, pad = tokenizer.tokenizer.eos_token_id, tokenizer.tokenizer.pad_token_id
    assert tokens.tolist() == [[eos] + [pad] * 7] * 2 and mask.sum(1).tolist() == [1, 1]
    long_tokens, long_mask = tokenizer([" ".join(["a red circle"] * 10)])
    assert long_mask.all() and long_tokens[0, -1] == eos  # truncated with </s> kept last


def test_clip_tower_embeddings_are_open_clips_own(tiny_clip_name: str) -> None:
    """The tower's pooled eot feature, projected, is open_clip's encode_text: the same network."""
    import open_clip

    encoder = load_text_encoder("clip", tiny_clip_name)
    clip = open_clip.create_model(tiny_clip_name)
    tokens, mask = CLIPTokenizer(77)(CAPTIONS)
    emb = encoder(tokens, mask)  # [B, 77, D]
    eot = rearrange(mask.sum(1) - 1, "b -> b")
    pooled = emb[torch.arange(2), eot] @ clip.text_projection
    with torch.no_grad():
        torch.testing.assert_close(pooled, clip.encode_text(tokens), rtol=1e-5, atol=1e-5)
