"""Timestep embedding, float32 normalisation layers, zero_module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glide_lightning.models import GroupNorm32, LayerNorm, timestep_embedding, zero_module
from glide_lightning.models.nn import normalization


def test_timestep_embedding_at_zero_is_cosines_then_sines() -> None:
    emb = timestep_embedding(torch.tensor([0]), 8)
    assert emb.tolist() == [[1.0] * 4 + [0.0] * 4]


def test_timestep_embedding_values() -> None:
    t = [1, 5, 999]
    dim, half = 6, 3
    emb = timestep_embedding(torch.tensor(t), dim)
    expected = []
    for ti in t:
        freqs = [10000 ** (-i / half) for i in range(half)]
        expected.append([math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs])
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_timestep_embedding_odd_dim_and_max_period() -> None:
    emb = timestep_embedding(torch.tensor([3, 7]), 5, max_period=100)
    assert emb.shape == (2, 5)
    assert emb[:, -1].eq(0).all()
    # second frequency is max_period ** (-1/2) = 0.1
    torch.testing.assert_close(emb[:, 1], torch.cos(torch.tensor([0.3, 0.7])))


def test_timestep_embedding_rejects_non_vector() -> None:
    with pytest.raises(ValueError, match=r"\[B\]"):
        timestep_embedding(torch.zeros(2, 1), 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_groupnorm_computes_in_float32(dtype: torch.dtype) -> None:
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 4, 4) * 30 + 100).to(dtype)
    y = norm(x)
    assert y.dtype == dtype
    expected = F.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps).to(dtype)
    assert torch.equal(y, expected)
    # also with low-precision parameters (model.to(dtype)): still float32 statistics
    assert norm.to(dtype)(x).dtype == dtype


def test_layernorm_computes_in_float32() -> None:
    ln = LayerNorm(16)
    x = (torch.randn(3, 5, 16) * 10 + 50).to(torch.bfloat16)
    y = ln(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.layer_norm(x.float(), (16,)).to(torch.bfloat16))
    assert ln.to(torch.bfloat16)(x).dtype == torch.bfloat16


def test_normalization_needs_multiple_of_32_channels() -> None:
    assert normalization(96).num_groups == 32
    with pytest.raises(ValueError, match="multiple of 32"):
        normalization(48)


def test_normalization_min_channels_per_group() -> None:
    assert normalization(32, 4).num_groups == 8 and normalization(192, 4).num_groups == 32
    assert normalization(32).num_groups == 32  # ADM: one channel per group at 32 channels
    with pytest.raises(ValueError, match="divisor of 32"):
        normalization(64, 3)


def test_groups_of_one_channel_hide_a_channels_per_image_mean() -> None:
    """Why ``min_channels_per_group`` exists: with a group per channel (InstanceNorm) an offset added
    to one channel of one image leaves the output unchanged (the image's mean colour is lost); with
    4 channels per group it changes the output."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    shifted = x.clone()
    shifted[0, 0] += 0.5  # image 0, channel 0: a constant offset
    per_channel, grouped = normalization(32, 1), normalization(32, 4)
    torch.testing.assert_close(per_channel(shifted), per_channel(x), rtol=0, atol=1e-5)
    assert (grouped(shifted)[0, :4] - grouped(x)[0, :4]).abs().mean() > 0.1


def test_zero_module() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    assert zero_module(conv) is conv
    assert not conv.weight.any() and not conv.bias.any()
