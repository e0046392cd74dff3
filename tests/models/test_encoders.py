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
    (dict(text_encoder="t5", text_encoder_name="x", text_encoder_precision="fp16"), "fp32 or bf16.*fp16"),
    (dict(text_encoder="clip", text_encoder_name="x", text_encoder_precision="float32"), "fp32 or bf16"),
    (dict(text_encoder_precision="bf16"), "text_encoder is 'transformer'"),
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


# ----------------------------------------------------------------------------- precision (issue 21)
FP16_MAX = torch.finfo(torch.float16).max  # 65504


def overflowing_t5(precision: str = "fp32") -> tuple[T5TextEncoder, list[float], list[torch.dtype]]:
    """A tiny random T5 v1.1 (gated-GELU feed-forward) whose first feed-forward's activations, the input of its
    ``wo``, exceed fp16's range: its ``wi_0`` / ``wi_1`` scaled by 300 (gelu(a)·b grows as the square).
    Returns the encoder and the lists a hook fills per call: that activation's max |value| (as float32) and
    the dtype ``wo`` computes in."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    t5 = T5EncoderModel(config)
    ff = t5.encoder.block[0].layer[-1].DenseReluDense
    with torch.no_grad():
        ff.wi_0.weight.mul_(300.0)
        ff.wi_1.weight.mul_(300.0)
    peaks: list[float] = []
    dtypes: list[torch.dtype] = []
    ff.wo.register_forward_pre_hook(lambda _, args: peaks.append(args[0].detach().float().abs().max().item()))
    ff.wo.register_forward_hook(lambda _, args, out: dtypes.append(out.dtype))
    return T5TextEncoder(t5, "overflowing tiny t5", precision=precision), peaks, dtypes


def overflow_batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[:, 9:] = False
    return tokens, mask


def test_t5_stays_finite_and_fp32_under_a_callers_fp16_autocast() -> None:
    """``trainer.precision: 16-mixed`` runs the training step under fp16 autocast: the frozen T5 must not. Its
    activations here exceed 65504 (asserted: the test is not vacuous), which fp16 turns into inf, then NaN.
    Outside autocast the encoder runs exactly its fp32 kernels on the same inputs, so the output is
    bit-identical to the fp32 one (torch.equal, no tolerance)."""
    encoder, peaks, dtypes = overflowing_t5()
    tokens, mask = overflow_batch()
    reference = encoder(tokens, mask)
    assert peaks[-1] > FP16_MAX, f"the test needs activations beyond fp16's range, got {peaks[-1]:.0f}"
    assert dtypes[-1] == torch.float32 and torch.isfinite(reference).all()
    with torch.autocast("cpu", dtype=torch.float16):
        under_fp16 = encoder(tokens, mask)
    assert dtypes[-1] == torch.float32, "the caller's fp16 autocast reached the encoder"
    assert torch.isfinite(under_fp16).all(), f"{(~torch.isfinite(under_fp16)).sum().item()} non-finite values"
    assert under_fp16.dtype == torch.float32 and torch.equal(under_fp16, reference)


def test_t5_computes_in_bf16_only_when_asked() -> None:
    """``text_encoder_precision: bf16``: the matmuls run in bf16 (the hook sees it), also under a caller's fp16
    autocast, and the float32 output is finite (bf16 has fp32's range) and off the fp32 one by a bf16-sized
    amount: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.002 per operation), so over two layers
    the error is well above fp32's (~1e-6) yet a few percent of the output's scale (max |out| ≈ 3) at most."""
    fp32, _, _ = overflowing_t5()
    encoder, peaks, dtypes = overflowing_t5("bf16")
    tokens, mask = overflow_batch()
    reference = fp32(tokens, mask)
    out = encoder(tokens, mask)
    assert peaks[-1] > FP16_MAX and dtypes[-1] == torch.bfloat16
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    error = (out - reference).abs().max().item()
    assert 1e-4 < error < 0.05 * reference.abs().max().item(), error
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(encoder(tokens, mask), out) and dtypes[-1] == torch.bfloat16


def test_frozen_encoders_ignore_a_callers_autocast(frozen: Any) -> None:
    """T5 and the open_clip tower alike: the embeddings under fp16 or bf16 autocast are the fp32 ones, exactly."""
    encoder, tokenizer, _ = frozen
    tokens, mask = tokenizer(CAPTIONS)
    reference = encoder(tokens, mask)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            assert torch.equal(encoder(tokens, mask), reference), dtype


def test_text_encoder_precision_reaches_the_loaded_encoder(tiny_t5_dir: Any) -> None:
    from glide_lightning.models import load_frozen_text_encoder

    config = ModelConfig(**TINY, text_encoder="t5", text_encoder_name=str(tiny_t5_dir), text_encoder_precision="bf16")
    encoder, config = load_frozen_text_encoder(config)
    assert encoder is not None and encoder.precision == "bf16" and config.text_encoder_dim == encoder.dim
    assert load_text_encoder("t5", str(tiny_t5_dir)).precision == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        load_text_encoder("t5", str(tiny_t5_dir), precision="fp16")
