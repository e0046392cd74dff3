"""ModelConfig validation, defaults, build_model, and a miniGLIDE-sized build."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from glide_lightning.models import (
    InpaintText2ImUNet,
    ModelConfig,
    SuperResInpaintText2ImUNet,
    SuperResText2ImUNet,
    Text2ImUNet,
    build_model,
)


@pytest.mark.parametrize(
    ("size", "mult"), [(256, (1, 1, 2, 2, 4, 4)), (128, (1, 1, 2, 3, 4)), (64, (1, 2, 3, 4)), (32, (1, 2, 2, 2))]
)
def test_default_channel_mult(size: int, mult: tuple[int, ...]) -> None:
    cfg = ModelConfig(image_size=size, attention_resolutions=[size // 2])
    assert cfg.channel_mult is None and cfg.resolved_channel_mult == mult


def test_attention_resolutions_become_downsample_rates() -> None:
    cfg = ModelConfig(image_size=64, attention_resolutions=[32, 16, 8])
    assert cfg.attention_ds == (2, 4, 8)
    assert ModelConfig(image_size=256, num_res_blocks=2, attention_resolutions=[32, 16, 8]).attention_ds == (8, 16, 32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "superres"}, "choose one of base, upsample, inpaint, upsample_inpaint"),
        ({"image_size": 48}, "no default channel_mult for image_size 48"),
        ({"image_size": 36, "channel_mult": (1, 2, 4, 8)}, "36 is not divisible by 2\\*\\*3"),
        ({"attention_resolutions": [32, 12]}, r"\[12\] are not feature-map sizes"),
        ({"attention_resolutions": "32,16,8"}, "list of ints"),
        ({"channel_mult": (1, 0, 2)}, "positive ints"),
        ({"model_channels": 48}, "multiple of 32"),
        ({"num_head_channels": 40}, "num_head_channels 40 does not divide"),
        ({"num_head_channels": -1, "num_heads": 5}, "num_heads 5 does not divide"),
        ({"num_head_channels": -1, "num_heads_upsample": 7}, "num_heads_upsample 7"),
        ({"xf_width": 100, "xf_heads": 8}, "xf_width 100 is not divisible by xf_heads 8"),
        ({"xf_width": -1}, "xf_width must be >= 0"),
        ({"text_ctx": 0}, "text_ctx must be a positive integer"),
        ({"num_res_blocks": 0}, "num_res_blocks must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"groupnorm_min_channels": 3}, "groupnorm_min_channels must divide 32"),
    ],
)
def test_invalid_configs(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_lists_normalised() -> None:
    cfg = ModelConfig(channel_mult=[1, 2, 3, 4], attention_resolutions=(16, 8))  # type: ignore[arg-type]
    assert cfg.channel_mult == (1, 2, 3, 4) and cfg.attention_resolutions == [16, 8]
    assert cfg.to_dict()["channel_mult"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kind", "cls", "in_ch"),
    [
        ("base", Text2ImUNet, 3),
        ("upsample", SuperResText2ImUNet, 6),
        ("inpaint", InpaintText2ImUNet, 7),
        ("upsample_inpaint", SuperResInpaintText2ImUNet, 10),
    ],
)
def test_build_model_kinds(kind: str, cls: type, in_ch: int) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(kind=kind, learn_sigma=False))  # type: ignore[arg-type]
    assert type(model) is cls
    assert model.input_blocks[0][0].in_channels == in_ch
    assert model.out[-1].out_channels == 3


def test_mini_glide_builds() -> None:
    cfg = ModelConfig(
        image_size=64, model_channels=96, num_res_blocks=3, attention_resolutions=[32, 16, 8],
        num_heads=1, num_head_channels=32, xf_width=512, xf_layers=16, xf_heads=8,
    )  # miniGLIDE (the defaults, spelled out)
    assert cfg == ModelConfig()
    with torch.device("meta"):
        model = build_model(cfg)
    n_unet = sum(p.numel() for n, p in model.named_parameters() if not _is_text(n))
    n_text = sum(p.numel() for n, p in model.named_parameters() if _is_text(n))
    print(f"miniGLIDE: {n_unet / 1e6:.1f}M UNet + {n_text / 1e6:.1f}M text = {(n_unet + n_text) / 1e6:.1f}M")
    # GLIDE's base UNet (192 channels) has ~308M parameters: half the width is about a quarter.
    assert 70e6 < n_unet < 85e6
    assert 75e6 < n_text < 80e6
    assert model.middle_block[1].num_heads == 4 * 96 // 32


def _is_text(name: str) -> bool:
    return name.startswith(("transformer", "token_embedding", "positional_embedding", "padding_embedding", "final_ln"))


def test_config_in_jsonargparse() -> None:
    """LightningCLI's parser shows the field docstrings and parses YAML lists and typos."""
    jsonargparse = pytest.importorskip("jsonargparse")
    from jsonargparse._optionals import get_docstring_parse_options

    before = get_docstring_parse_options()["attribute_docstrings"]
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        parser = jsonargparse.ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(ModelConfig, "model")
        assert "Feature-map sizes (in pixels)" in parser.format_help()
    finally:
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=before)
    args = ["--model.attention_resolutions=[32, 16]", "--model.kind=upsample", "--model.channel_mult=[1, 2, 2]"]
    model_cfg = parser.instantiate(parser.parse_args(args)).model
    assert model_cfg.attention_resolutions == [32, 16] and model_cfg.kind == "upsample"
    assert model_cfg.channel_mult == (1, 2, 2)
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--model.kind=upsampler"])


@pytest.mark.parametrize(("min_channels", "expected"), [(1, 32), (4, None)])
def test_groupnorm_min_channels_sets_every_groupnorms_groups(min_channels: int, expected: int | None) -> None:
    """1 keeps ADM / GLIDE's 32 groups at every width; 4 (EDM) gives each group >= 4 channels."""
    cfg = ModelConfig(image_size=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                      attention_resolutions=[16, 8], xf_width=32, xf_layers=1, xf_heads=1, text_ctx=8,
                      groupnorm_min_channels=min_channels)
    norms = [m for m in build_model(cfg).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {m.num_channels for m in norms} == {32, 64, 96, 128}  # every width of the UNet is covered
    for m in norms:
        assert m.num_groups == (expected or min(32, m.num_channels // 4))
