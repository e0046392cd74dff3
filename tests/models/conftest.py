"""Shared fixtures of the models tests: the glide-text2im fixture file and tiny models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from glide_lightning.models import ModelConfig, Text2ImUNet, build_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
GLIDE_FIXTURE = SHARED_FIXTURES / "glide_text2im_state_dicts.json"

TINY: dict[str, Any] = dict(
    image_size=16,
    model_channels=32,
    num_res_blocks=1,
    channel_mult=(1, 2),
    attention_resolutions=[8],
    num_head_channels=16,
    dropout=0.0,
    text_ctx=16,
    xf_width=32,
    xf_layers=2,
    xf_heads=2,
    n_vocab=100,
)
"""A ~0.5M-parameter configuration: 16 px, two levels, attention (2 heads) at 8 px."""


@pytest.fixture(scope="session")
def glide_fixture() -> dict[str, Any]:
    """glide-text2im's released state-dict shapes and options (from ../shared/fixtures)."""
    if not GLIDE_FIXTURE.is_file():
        pytest.skip(f"glide-text2im fixture not found at {GLIDE_FIXTURE} (it lives only in ../shared/fixtures)")
    return json.loads(GLIDE_FIXTURE.read_text())


def randomize_zero_params(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised parameters (ADM's residual-branch outputs) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_model() -> Callable[..., Text2ImUNet]:
    """Factory: ``tiny_model(kind="base", fresh=False, **overrides)``, in eval mode.

    Unless ``fresh``, the zero-initialised layers get random weights so every path reaches the output.
    """

    def make(kind: str = "base", fresh: bool = False, **overrides: Any) -> Text2ImUNet:
        torch.manual_seed(0)
        model = build_model(ModelConfig(kind=kind, **{**TINY, **overrides}))  # type: ignore[arg-type]
        if not fresh:
            randomize_zero_params(model)
        return model.eval()

    return make


@pytest.fixture
def tiny_inputs() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: ``tiny_inputs(batch=2)`` → x, timesteps, tokens and mask (last 6 positions padding)."""

    def make(batch: int = 2) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        size, ctx = TINY["image_size"], TINY["text_ctx"]
        mask = torch.ones(batch, ctx, dtype=torch.bool)
        mask[:, -6:] = False
        return {
            "x": torch.randn(batch, 3, size, size, generator=g),
            "timesteps": torch.randint(0, 1000, (batch,), generator=g),
            "tokens": torch.randint(0, TINY["n_vocab"], (batch, ctx), generator=g),
            "mask": mask,
        }

    return make


@pytest.fixture
def randomize() -> Callable[..., torch.nn.Module]:
    """:func:`randomize_zero_params` as a fixture (test modules do not import conftest)."""
    return randomize_zero_params
