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
        assert "fp16 is not offered" in " ".join(parser.format_help().split())
    finally:
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=before)
    args = ["--model.attention_resolutions=[32, 16]", "--model.kind=upsample", "--model.channel_mult=[1, 2, 2]"]
    model_cfg = parser.instantiate(parser.parse_args(args)).model
    assert model_cfg.attention_resolutions == [32, 16] and model_cfg.kind == "upsample"
    assert model_cfg.channel_mult == (1, 2, 2)
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--model.kind=upsampler"])
    with pytest.raises(jsonargparse.ArgumentError):  # a Literal: fp16 refused at parse time, with the choices
        parser.parse_args(["--model.text_encoder_precision=fp16"])


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


# ----------------------------------------------------------------------------- text_encoder_precision (issue 21)
T5_FIELDS: dict[str, Any] = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                 attention_resolutions=[8], xf_width=32, text_ctx=8, text_encoder="t5",
                                 text_encoder_name="t5-dir", text_encoder_dim=32)


def test_a_checkpoint_without_text_encoder_precision_loads_and_resumes_as_fp32(tmp_path: Any) -> None:
    """Checkpoints store ``ModelConfig.to_dict()``; one written before the field existed means fp32, and a
    resume with today's config (the field at its default) is no config drift."""
    from glide_lightning.runs import ConfigDriftError, RunConfig, check_resume

    now = ModelConfig(**T5_FIELDS).to_dict()
    old = {k: v for k, v in now.items() if k != "text_encoder_precision"}
    assert now["text_encoder_precision"] == "fp32" and ModelConfig(**old) == ModelConfig(**T5_FIELDS)
    run = RunConfig(name="r", root=str(tmp_path))
    run.dir.mkdir()
    ckpt = run.dir / "last.ckpt"
    hparams = {"model": old, "diffusion": {"steps": 100}, "tokenizer": "t5"}
    torch.save({"global_step": 3, "hyper_parameters": hparams, "datamodule_hyper_parameters": {}}, ckpt)
    assert check_resume(run, ckpt, {**hparams, "model": now}, {}, {}) == []
    hparams["model"] = now  # a checkpoint that records the field: changing it is drift, refused
    torch.save({"global_step": 3, "hyper_parameters": hparams, "datamodule_hyper_parameters": {}}, ckpt)
    with pytest.raises(ConfigDriftError, match="text_encoder_precision: 'fp32' → 'bf16'"):
        check_resume(run, ckpt, {**hparams, "model": {**now, "text_encoder_precision": "bf16"}}, {}, {})


def test_the_fid_image_key_names_text_encoder_precision_only_where_it_changes_images(tmp_path: Any) -> None:
    """fp32 (and every GLIDE-transformer model) keeps the keys of images made before the field; bf16 embeddings
    get a key of their own; so do fp32 ones under a bf16 sampling precision, since before the field the
    encoder ran under the sampler's bf16 autocast (those old images are not the fp32 encoder's)."""
    from glide_lightning.diffusion import DiffusionConfig
    from glide_lightning.evaluation.zero_shot import FIDJob, generation_identity
    from glide_lightning.sampling import SamplingConfig, SamplingModel

    def model_key(precision: str = "fp32", sampling: str = "fp32", **fields: Any) -> dict[str, Any]:
        config = ModelConfig(**{**T5_FIELDS, "text_encoder_precision": precision, **fields})
        loaded = SamplingModel(torch.nn.Linear(2, 2), DiffusionConfig(), None, config, "test")  # type: ignore[arg-type]
        job = FIDJob(["a caption"], str(tmp_path), tmp_path, sampling=SamplingConfig(precision=sampling))
        return generation_identity(job, loaded)["base"]["model"]

    assert "text_encoder_precision" not in model_key()  # the key images made before the field were stored under
    assert model_key("bf16")["text_encoder_precision"] == "bf16"
    assert model_key("fp32", sampling="bf16")["text_encoder_precision"] == "fp32"
    glide = dict(text_encoder="transformer", text_encoder_name=None, text_encoder_dim=None)
    assert "text_encoder_precision" not in model_key(sampling="bf16", **glide)
