"""The text-conditional UNet and its variants, on tiny models."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glide_lightning.models import Text2ImUNet

KINDS = ["base", "upsample", "inpaint", "upsample_inpaint"]


def cond_inputs(kind: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The extra conditioning inputs a kind needs (8 px low-res image, half-known inpaint mask)."""
    g = torch.Generator().manual_seed(2)
    b, _, h, w = x.shape
    extra = {}
    if kind in ("upsample", "upsample_inpaint"):
        extra["low_res"] = torch.randn(b, 3, h // 2, w // 2, generator=g)
    if kind in ("inpaint", "upsample_inpaint"):
        extra["inpaint_image"] = torch.randn(b, 3, h, w, generator=g)
        inpaint_mask = torch.zeros(b, 1, h, w)
        inpaint_mask[..., : w // 2] = 1
        extra["inpaint_mask"] = inpaint_mask
    return extra


def capture_unet_input(model: nn.Module) -> list[torch.Tensor]:
    """Record what the UNet's first convolution receives."""
    seen: list[torch.Tensor] = []
    model.input_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_model_outputs_exact_zero(kind: str, tiny_model: Callable[..., Text2ImUNet], tiny_inputs: Any) -> None:
    model = tiny_model(kind, fresh=True)
    inp = tiny_inputs()
    out = model(**inp, **cond_inputs(kind, inp["x"]))
    assert out.shape == (2, 6, 16, 16)
    assert not out.any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape(kind: str, learn_sigma: bool, tiny_model: Any, tiny_inputs: Any) -> None:
    model = tiny_model(kind, learn_sigma=learn_sigma)
    inp = tiny_inputs(batch=3)
    with torch.no_grad():
        out = model(**inp, **cond_inputs(kind, inp["x"]))
    assert out.shape == (3, 6 if learn_sigma else 3, 16, 16)
    assert out.abs().sum() > 0 and torch.isfinite(out).all()


def test_text_reaches_output(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model(), tiny_inputs()
    with torch.no_grad():
        out = model(**inp)
        tokens = inp["tokens"].clone()
        tokens[:, 0] = (tokens[:, 0] + 1) % 100  # a real (mask True) token
        assert not torch.allclose(out, model(**{**inp, "tokens": tokens}))
        assert not torch.allclose(out, model(inp["x"], inp["timesteps"]))  # text path skipped


def test_text_reaches_output_through_attention_alone(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model(), tiny_inputs()
    with torch.no_grad():
        model.transformer_proj.weight.zero_()
        model.transformer_proj.bias.zero_()
        tokens = inp["tokens"].clone()
        tokens[:, 3] = (tokens[:, 3] + 1) % 100
        assert not torch.allclose(model(**inp), model(**{**inp, "tokens": tokens}))


def test_padding_positions_use_padding_embedding(tiny_model: Any, tiny_inputs: Any) -> None:
    inp = tiny_inputs()
    tokens = inp["tokens"].clone()
    tokens[:, -6:] = (tokens[:, -6:] + 17) % 100  # only mask False positions change
    with torch.no_grad():
        model = tiny_model(xf_padding=True)
        assert torch.equal(model(**inp), model(**{**inp, "tokens": tokens}))
        model = tiny_model(xf_padding=False)  # mask ignored: the ids there matter
        assert "padding_embedding" not in model.state_dict()
        assert not torch.allclose(model(**inp), model(**{**inp, "tokens": tokens}))


def test_empty_caption_ignores_token_ids(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model(), tiny_inputs()
    mask = torch.zeros_like(inp["mask"])
    with torch.no_grad():
        a = model(**{**inp, "mask": mask})
        b = model(**{**inp, "mask": mask, "tokens": torch.randint(0, 100, inp["tokens"].shape)})
    assert torch.equal(a, b)


def reference_encode_text(model: Text2ImUNet, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GLIDE's text encoder written out: per-head (q, k, v) slices of c_qkv, pre-norm blocks."""
    x = model.token_embedding.weight[tokens] + model.positional_embedding[None]
    x = torch.where(mask[..., None], x, model.padding_embedding[None])
    width = x.shape[-1]
    for block in model.transformer.resblocks:
        heads = block.attn.heads
        ch = width // heads
        h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        qkv = h @ block.attn.c_qkv.weight.T + block.attn.c_qkv.bias
        outs = []
        for i in range(heads):
            q, k, v = (qkv[..., i * 3 * ch + j * ch : i * 3 * ch + (j + 1) * ch] for j in range(3))
            w = torch.softmax(q @ k.transpose(1, 2) / ch**0.5, dim=-1)
            outs.append(w @ v)
        x = x + torch.cat(outs, dim=-1) @ block.attn.c_proj.weight.T + block.attn.c_proj.bias
        h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        h = F.gelu(h @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias)
        x = x + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    x = F.layer_norm(x, (width,), model.final_ln.weight, model.final_ln.bias, model.final_ln.eps)
    proj = x[:, -1] @ model.transformer_proj.weight.T + model.transformer_proj.bias
    return proj, x.transpose(1, 2)


def test_text_encoder_matches_reference(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model(), tiny_inputs()
    with torch.no_grad():
        for p in model.parameters():  # break LayerNorm's symmetry too
            p.add_(torch.randn_like(p) * 0.05)
        proj, out = model.encode_text(inp["tokens"], inp["mask"])
        ref_proj, ref_out = reference_encode_text(model, inp["tokens"], inp["mask"])
    assert proj.shape == (2, 128) and out.shape == (2, 32, 16)
    torch.testing.assert_close(proj, ref_proj, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_precomputed_caption_encoding_equals_tokens(kind: str, tiny_model: Any, tiny_inputs: Any) -> None:
    """``xf_proj``/``xf_out`` from :meth:`encode_text` stand in for ``tokens``/``mask`` exactly."""
    model = tiny_model(kind)
    inp = tiny_inputs()
    extra = cond_inputs(kind, inp["x"])
    with torch.no_grad():
        xf_proj, xf_out = model.encode_text(inp["tokens"], inp["mask"])
        from_tokens = model(**inp, **extra)
        from_encoding = model(inp["x"], inp["timesteps"], xf_proj=xf_proj, xf_out=xf_out, **extra)
    assert torch.equal(from_tokens, from_encoding)
    with pytest.raises(ValueError, match="not both"):
        model(**inp, xf_proj=xf_proj, xf_out=xf_out, **extra)
    with pytest.raises(ValueError, match="both xf_proj and xf_out"):
        model(inp["x"], inp["timesteps"], xf_proj=xf_proj, **extra)


def test_super_res_input_and_sensitivity(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model("upsample"), tiny_inputs()
    low_res = cond_inputs("upsample", inp["x"])["low_res"]
    seen = capture_unet_input(model)
    with torch.no_grad():
        out = model(**inp, low_res=low_res)
        assert not torch.allclose(out, model(**inp, low_res=low_res.flip(-1)))
    up = F.interpolate(low_res, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(seen[0], torch.cat([inp["x"], up], dim=1))
    with pytest.raises(ValueError, match="low_res"):
        model(**inp)


def test_inpaint_input_and_gradient_only_through_known_pixels(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model("inpaint"), tiny_inputs()
    cond = cond_inputs("inpaint", inp["x"])
    image = cond["inpaint_image"].requires_grad_(True)
    seen = capture_unet_input(model)
    model(**inp, inpaint_image=image, inpaint_mask=cond["inpaint_mask"]).square().sum().backward()
    known = cond["inpaint_mask"].expand_as(image).bool()
    assert image.grad is not None
    assert not image.grad[~known].any()
    assert image.grad[known].abs().min() > 0
    expected = torch.cat([inp["x"], image.detach() * cond["inpaint_mask"], cond["inpaint_mask"]], dim=1)
    assert torch.equal(seen[0], expected)
    with torch.no_grad():  # missing inpaint inputs are zeros
        model(**inp)
        assert seen[-1].shape == (2, 7, 16, 16) and not seen[-1][:, 3:].any()


def test_super_res_inpaint_input_order(tiny_model: Any, tiny_inputs: Any) -> None:
    """glide-text2im's SuperResInpaintText2ImUnet.forward: ``[x, inpaint_image * inpaint_mask, inpaint_mask,
    upsampled]``."""
    model, inp = tiny_model("upsample_inpaint"), tiny_inputs()
    cond = cond_inputs("upsample_inpaint", inp["x"])
    seen = capture_unet_input(model)
    with torch.no_grad():
        model(**inp, **cond)
    up = F.interpolate(cond["low_res"], size=(16, 16), mode="bilinear", align_corners=False)
    m = cond["inpaint_mask"]
    assert torch.equal(seen[0], torch.cat([inp["x"], cond["inpaint_image"] * m, m, up], dim=1))


def reference_glide_forward(model: Text2ImUNet, h: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """glide-text2im's ``Text2ImUNet.forward`` written out over ``model``'s own layers, from the UNet's full input
    ``h`` ``[B, unet_in_channels, H, W]``: the sinusoid (cosines first) through ``time_embed``, plus ``xf_proj``
    of the written-out text encoder; input blocks (each output kept), middle block, output blocks (each on its
    input concatenated with the last kept output), ``out``."""
    half = model.model_channels // 2
    args = timesteps[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    xf_proj, xf_out = reference_encode_text(model, tokens, mask)
    emb = model.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)) + xf_proj
    hs = []
    for block in model.input_blocks:
        h = block(h, emb, xf_out)
        hs.append(h)
    h = model.middle_block(h, emb, xf_out)
    for block in model.output_blocks:
        h = block(torch.cat([h, hs.pop()], dim=1), emb, xf_out)
    return model.out(h)


def test_upsample_inpaint_loads_a_glide_text2im_state_dict_and_runs_its_forward(tiny_model: Any,
                                                                                tiny_inputs: Any) -> None:
    """A state dict laid out as glide-text2im's upsample-inpaint model (the tiny configuration; the released one's
    keys and shapes are checked in test_glide_text2im.py), random weights, loads strictly, and the forward is
    glide-text2im's: ``SuperResInpaintText2ImUnet.forward`` concatenates ``[x, inpaint_image * inpaint_mask,
    inpaint_mask, bilinear(low_res)]`` (3 + 3 + 1 + 3 channels), then runs ``Text2ImUNet.forward``."""
    g = torch.Generator().manual_seed(5)
    layout = tiny_model("upsample_inpaint").state_dict()
    assert layout["input_blocks.0.0.weight"].shape == (32, 10, 3, 3)
    state_dict = {k: torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() else v
                  for k, v in layout.items()}
    model = tiny_model("upsample_inpaint", fresh=True)
    model.load_state_dict(state_dict, strict=True)
    inp, cond = tiny_inputs(), cond_inputs("upsample_inpaint", tiny_inputs()["x"])
    m = cond["inpaint_mask"]
    up = F.interpolate(cond["low_res"], size=(16, 16), mode="bilinear", align_corners=False)
    h = torch.cat([inp["x"], cond["inpaint_image"] * m, m, up], dim=1)  # glide-text2im's order
    with torch.no_grad():
        expected = reference_glide_forward(model, h, inp["timesteps"], inp["tokens"], inp["mask"])
        got = model(**inp, **cond)
    relative = float((got - expected).norm() / expected.norm())
    print(f"upsample_inpaint vs glide-text2im's forward written out: relative difference {relative:.3g}")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_input_errors(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model(), tiny_inputs()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(2, 4, 16, 16), inp["timesteps"])
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        model(inp["x"], inp["timesteps"], tokens=inp["tokens"][:, :8])


def test_unconditional_model(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model(xf_width=0), tiny_inputs()
    assert not any(k.startswith(("transformer", "token_embedding")) for k in model.state_dict())
    assert model(inp["x"], inp["timesteps"]).shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="xf_width=0"):
        model(**inp)


def test_bfloat16_forward(tiny_model: Any, tiny_inputs: Any) -> None:
    model, inp = tiny_model().to(torch.bfloat16), tiny_inputs()
    with torch.no_grad():
        out = model(**{**inp, "x": inp["x"].bfloat16()})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
