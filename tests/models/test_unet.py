"""The ADM UNet: attention against a hand-written reference, blocks, init and conditioning."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glide_lightning.models import AttentionBlock, ResBlock, UNetModel
from glide_lightning.models.unet import Upsample


def reference_attention(block: AttentionBlock, x: torch.Tensor, enc: torch.Tensor | None) -> torch.Tensor:
    """Attention written out head by head: q, k, v of head i are consecutive channel slices."""
    b, c, hgt, wid = x.shape
    heads = block.num_heads
    ch = c // heads
    flat = x.reshape(b, c, hgt * wid)
    normed = F.group_norm(flat, 32, block.norm.weight, block.norm.bias, block.norm.eps)
    qkv = torch.einsum("oi,bit->bot", block.qkv.weight[:, :, 0], normed) + block.qkv.bias[None, :, None]
    if enc is not None:
        ekv = torch.einsum("oi,bis->bos", block.encoder_kv.weight[:, :, 0], enc)
        ekv = ekv + block.encoder_kv.bias[None, :, None]
    outs = []
    for i in range(heads):
        q = qkv[:, i * 3 * ch : i * 3 * ch + ch]  # [B, ch, T]
        k = qkv[:, i * 3 * ch + ch : i * 3 * ch + 2 * ch]
        v = qkv[:, i * 3 * ch + 2 * ch : (i + 1) * 3 * ch]
        if enc is not None:
            k = torch.cat([ekv[:, i * 2 * ch : i * 2 * ch + ch], k], dim=2)
            v = torch.cat([ekv[:, i * 2 * ch + ch : (i + 1) * 2 * ch], v], dim=2)
        logits = torch.einsum("bct,bcs->bts", q, k) / ch**0.5
        weights = torch.softmax(logits, dim=-1)
        outs.append(torch.einsum("bts,bcs->bct", weights, v))
    a = torch.cat(outs, dim=1)  # [B, C, T]
    h = torch.einsum("oi,bit->bot", block.proj_out.weight[:, :, 0], a) + block.proj_out.bias[None, :, None]
    return x + h.reshape(b, c, hgt, wid)


@pytest.mark.parametrize("with_encoder", [False, True])
@pytest.mark.parametrize(("heads", "head_channels"), [(1, -1), (4, -1), (1, 16)])
def test_attention_block_matches_reference(
    with_encoder: bool, heads: int, head_channels: int, randomize: Callable[..., nn.Module]
) -> None:
    torch.manual_seed(0)
    block = AttentionBlock(64, heads, head_channels, encoder_channels=24 if with_encoder else None)
    randomize(block, std=0.2)
    with torch.no_grad():
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    assert block.num_heads == (heads if head_channels == -1 else 64 // head_channels)
    x = torch.randn(2, 64, 3, 5)
    enc = torch.randn(2, 24, 7) if with_encoder else None
    torch.testing.assert_close(block(x, enc), reference_attention(block, x, enc), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_matches_the_reference_in_both_memory_formats(
    memory_format: torch.memory_format, randomize: Callable[..., nn.Module]
) -> None:
    """NCHW and NHWC inputs give the reference's output, and the output keeps the input's memory format (the
    convolutions after it rely on it), so a channels-last UNet stays channels-last through its attention."""
    torch.manual_seed(0)
    block = randomize(AttentionBlock(64, 2, encoder_channels=24), std=0.2)
    x, enc = torch.randn(2, 64, 8, 8).contiguous(memory_format=memory_format), torch.randn(2, 24, 7)
    with torch.no_grad():
        out = block(x, enc)
        torch.testing.assert_close(out, reference_attention(block, x, enc), atol=1e-5, rtol=1e-4)
    assert out.is_contiguous(memory_format=memory_format)


def test_attention_takes_sdpas_fused_kernel_on_cpu(randomize: Callable[..., nn.Module]) -> None:
    """The unfused math kernel materialises softmax([T, S + T]) (``aten::_softmax``); the layout the
    block hands SDPA must avoid it (a query strided along the channels, as ``[B, C, T]`` activations give,
    sends SDPA there)."""
    from torch.profiler import profile

    block = randomize(AttentionBlock(64, 2, encoder_channels=24))
    x, enc = torch.randn(2, 64, 8, 8), torch.randn(2, 24, 7)

    def ops(fn: Callable[[], object]) -> set[str]:
        with torch.no_grad(), profile() as prof:
            fn()
        return {event.name for event in prof.events()}

    assert "aten::_softmax" not in ops(lambda: block(x, enc))
    q, k, v = torch.randn(3, 2, 2, 32, 64).transpose(-1, -2)  # [B, heads, T, c] strided along c
    assert "aten::_softmax" in ops(lambda: F.scaled_dot_product_attention(q, k, v))  # the probe sees it when it runs


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 64, 16, 16), (3, 8, 1, 1)])
def test_nearest_upsample_is_the_interpolation_bit_for_bit(shape: tuple[int, ...]) -> None:
    from glide_lightning.models.unet import nearest_upsample_2x

    x = torch.randn(*shape)
    reference = F.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.equal(nearest_upsample_2x(x), reference)
    channels_last = nearest_upsample_2x(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(channels_last, reference)
    layer = Upsample(shape[1], use_conv=False)
    assert torch.equal(layer(x), reference)


def test_attention_block_channels_last(randomize: Callable[..., nn.Module]) -> None:
    torch.manual_seed(0)
    block = randomize(AttentionBlock(64, 2, encoder_channels=8))
    x, enc = torch.randn(2, 64, 4, 4), torch.randn(2, 8, 3)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last), enc), block(x, enc))


def test_attention_block_head_errors() -> None:
    with pytest.raises(ValueError, match="num_head_channels"):
        AttentionBlock(64, num_head_channels=24)
    with pytest.raises(ValueError, match="heads"):
        AttentionBlock(64, num_heads=3)
    with pytest.raises(ValueError, match="encoder_channels"):
        AttentionBlock(32)(torch.randn(1, 32, 2, 2), torch.randn(1, 8, 3))


@pytest.mark.parametrize(("up", "down", "size"), [(False, False, 8), (True, False, 16), (False, True, 4)])
@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_shapes(up: bool, down: bool, size: int, scale_shift: bool) -> None:
    block = ResBlock(32, 128, 0.0, 64, use_scale_shift_norm=scale_shift, up=up, down=down)
    assert block.emb_layers[1].out_features == (128 if scale_shift else 64)
    assert isinstance(block.skip_connection, torch.nn.Conv2d)
    out = block(torch.randn(2, 32, 8, 8), torch.randn(2, 128))
    assert out.shape == (2, 64, size, size)


@pytest.mark.parametrize("down", [False, True])
def test_resblock_scale_shift_matches_reference(down: bool, randomize: Callable[..., nn.Module]) -> None:
    torch.manual_seed(0)
    block = randomize(ResBlock(32, 16, 0.0, 64, use_scale_shift_norm=True, down=down))
    with torch.no_grad():
        for norm in (block.in_layers[0], block.out_layers[0]):
            norm.weight.normal_()
            norm.bias.normal_()
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    conv1, lin, conv2, skip = block.in_layers[2], block.emb_layers[1], block.out_layers[3], block.skip_connection
    h = F.silu(F.group_norm(x, 32, block.in_layers[0].weight, block.in_layers[0].bias, 1e-5))
    x_skip = F.avg_pool2d(x, 2) if down else x
    h = F.conv2d(F.avg_pool2d(h, 2) if down else h, conv1.weight, conv1.bias, padding=1)
    scale_shift = F.linear(F.silu(emb), lin.weight, lin.bias)
    scale, shift = scale_shift[:, :64, None, None], scale_shift[:, 64:, None, None]
    h = F.group_norm(h, 32, block.out_layers[0].weight, block.out_layers[0].bias, 1e-5) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), conv2.weight, conv2.bias, padding=1)
    expected = F.conv2d(x_skip, skip.weight, skip.bias) + h
    torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=1e-4)


def test_resblock_fresh_is_skip_path() -> None:
    block = ResBlock(32, 16, 0.0, down=True)
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(block(x, torch.randn(1, 16)), F.avg_pool2d(x, 2))


def _unet(**kw: object) -> UNetModel:
    torch.manual_seed(0)
    args = dict(
        in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
        channel_mult=(1, 2), num_heads=2, encoder_channels=16,
    )
    return UNetModel(**{**args, **kw}).eval()  # type: ignore[arg-type]


def test_unet_structure() -> None:
    net = _unet(num_res_blocks=2, channel_mult=(1, 2, 2), attention_resolutions=(2, 4))
    n_attn = sum(isinstance(m, AttentionBlock) for m in net.modules())
    # input: 2 per attention level x 2 levels; middle: 1; output: 3 per attention level x 2 levels
    assert n_attn == 4 + 1 + 6
    assert len(net.input_blocks) == 1 + 3 * 2 + 2 and len(net.output_blocks) == 3 * 3


def test_fresh_unet_outputs_exact_zero() -> None:
    out = _unet()(torch.randn(2, 3, 8, 8), torch.tensor([1, 500]), torch.randn(2, 16, 5))
    assert out.shape == (2, 6, 8, 8)
    assert not out.any()


@pytest.mark.parametrize(("updown", "scale_shift"), [(True, True), (False, False)])
def test_unet_conditioning_reaches_output(
    updown: bool, scale_shift: bool, randomize: Callable[..., nn.Module]
) -> None:
    net = randomize(_unet(resblock_updown=updown, use_scale_shift_norm=scale_shift))
    x, t, enc = torch.randn(2, 3, 8, 8), torch.tensor([3, 400]), torch.randn(2, 16, 5)
    with torch.no_grad():
        out = net(x, t, enc)
        assert out.shape == (2, 6, 8, 8)
        assert not torch.allclose(out, net(x, t + 1, enc))
        assert not torch.allclose(out, net(x, t, enc + 1))
        assert not torch.allclose(out, net(x, t, enc, extra_emb=torch.ones(2, 128)))
        assert not torch.allclose(out, net(x, t))  # no encoder tokens
        torch.testing.assert_close(net(x, torch.tensor(7), enc), net(x, torch.tensor([7, 7]), enc))


def test_unet_channels_last_matches(randomize: Callable[..., nn.Module]) -> None:
    net = randomize(_unet())
    x, t, enc = torch.randn(2, 3, 8, 8), torch.tensor([3, 400]), torch.randn(2, 16, 5)
    with torch.no_grad():
        ref = net(x, t, enc)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, enc)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_keeps_the_gradients_and_saves_less() -> None:
    """Checkpointed blocks give the same gradients and keep fewer bytes for the backward pass."""
    from glide_lightning.models import ModelConfig, build_model
    from glide_lightning.models.unet import set_gradient_checkpointing

    from conftest import TINY

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "dropout": 0.1}))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    tokens, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.bool)

    def grads_and_saved_bytes(enabled: bool) -> tuple[list[torch.Tensor], int]:
        set_gradient_checkpointing(model, enabled)
        model.zero_grad()
        saved = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        torch.manual_seed(1)  # the same dropout masks in both runs
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(x, t, tokens=tokens, mask=mask)
        out.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()], saved[0]

    plain, plain_bytes = grads_and_saved_bytes(False)
    checkpointed, checkpointed_bytes = grads_and_saved_bytes(True)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert checkpointed_bytes < plain_bytes / 2
