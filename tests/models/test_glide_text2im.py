"""glide-text2im compatibility: released architectures and strict checkpoint import."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from glide_lightning.models import (
    GLIDE_KINDS,
    GLIDE_OPTIONS,
    CheckpointMismatchError,
    build_model,
    from_glide_text2im,
)

FIXTURE_KIND = {"base": "base", "upsample": "upsample", "base-inpaint": "inpaint", "upsample-inpaint": "upsample_inpaint"}


def shared_storage_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes, as views into one small buffer at random offsets.

    Cheap to make (GLIDE has ~400M parameters) yet distinct per key, so a mix-up would show.
    """
    largest = max(torch.Size(s).numel() for s in shapes.values())
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(2 * largest, generator=g) * 0.02
    offsets = torch.randint(0, largest, (len(shapes),), generator=g).tolist()
    return {k: buffer[o : o + torch.Size(s).numel()].view(s) for (k, s), o in zip(shapes.items(), offsets)}


def meta_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("kind", GLIDE_KINDS)
def test_options_match_glide_text2im(kind: str, glide_fixture: dict[str, Any]) -> None:
    opts, cfg = glide_fixture[kind]["options"], GLIDE_OPTIONS[kind]
    assert cfg.kind == FIXTURE_KIND[kind]
    assert (cfg.kind in ("upsample", "upsample_inpaint")) == opts["super_res"]
    assert (cfg.kind in ("inpaint", "upsample_inpaint")) == opts["inpaint"]
    assert opts["channel_mult"] == "" and cfg.channel_mult is None
    assert cfg.attention_resolutions == [int(r) for r in opts["attention_resolutions"].split(",")]
    assert cfg.model_channels == opts["num_channels"]
    for name in (
        "image_size", "num_res_blocks", "num_heads", "num_head_channels", "num_heads_upsample", "dropout",
        "text_ctx", "xf_width", "xf_layers", "xf_heads", "xf_final_ln", "xf_padding",
        "use_scale_shift_norm", "resblock_updown",
    ):
        assert getattr(cfg, name) == opts[name], name
    assert cfg.learn_sigma and cfg.n_vocab == 50257


@pytest.mark.parametrize("kind", GLIDE_KINDS)
def test_state_dict_keys_shapes_and_param_count(kind: str, glide_fixture: dict[str, Any]) -> None:
    with torch.device("meta"):
        model = build_model(GLIDE_OPTIONS[kind])
    expected = glide_fixture[kind]["state_dict"]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == [], "missing keys"
    assert sorted(set(got) - set(expected)) == [], "unexpected keys"
    assert {k: v for k, v in got.items() if v != expected[k]} == {}, "shape mismatches"
    assert list(got) == list(expected)  # even the order
    assert sum(p.numel() for p in model.parameters()) == glide_fixture[kind]["params"]


@pytest.mark.parametrize("kind", GLIDE_KINDS)
def test_strict_load(kind: str, glide_fixture: dict[str, Any]) -> None:
    state_dict = shared_storage_state_dict(glide_fixture[kind]["state_dict"])
    model = from_glide_text2im(kind, state_dict)
    loaded = model.state_dict()
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for key in ("out.2.weight", "input_blocks.0.0.weight", "padding_embedding", "transformer.resblocks.3.mlp.c_fc.bias"):
        assert torch.equal(loaded[key], state_dict[key]), key
    if kind != "base":
        return  # 256 px forwards of 400M-parameter models are too slow for CPU tests
    start = time.perf_counter()
    with torch.no_grad():
        tokens = torch.randint(0, 50257, (1, 128))
        mask = torch.arange(128)[None] < 10
        out = model.eval()(torch.randn(1, 3, 64, 64), torch.tensor([999]), tokens=tokens, mask=mask)
    assert out.shape == (1, 6, 64, 64) and torch.isfinite(out).all() and out.abs().sum() > 0
    print(f"GLIDE base forward (1 x 64 px, CPU): {time.perf_counter() - start:.1f} s")


def test_mismatch_names_missing_unexpected_and_wrong_shape(glide_fixture: dict[str, Any]) -> None:
    state_dict = meta_state_dict(glide_fixture["base"]["state_dict"])
    del state_dict["middle_block.1.qkv.bias"]
    state_dict["clip_proj.weight"] = torch.empty(3, device="meta")
    state_dict["out.2.weight"] = torch.empty(3, 192, 3, 3, device="meta")
    with pytest.raises(CheckpointMismatchError) as info:
        from_glide_text2im("base", state_dict)
    err = info.value
    message = str(err)
    assert isinstance(err, ValueError) and err.kind == "base"
    assert "'base' model (expected base.pt)" in message
    assert "1 missing key: middle_block.1.qkv.bias" in message
    assert "1 unexpected key: clip_proj.weight" in message
    assert "1 shape mismatch: out.2.weight: checkpoint [3, 192, 3, 3] vs model [6, 192, 3, 3]" in message
    assert err.mismatched == [("out.2.weight", (3, 192, 3, 3), (6, 192, 3, 3))]


def test_mismatch_recognises_another_kind(glide_fixture: dict[str, Any]) -> None:
    with pytest.raises(CheckpointMismatchError, match="looks like glide-text2im's 'upsample' checkpoint"):
        from_glide_text2im("base", meta_state_dict(glide_fixture["upsample"]["state_dict"]))


def test_mismatch_from_a_file_truncates_long_lists(tmp_path: Any) -> None:
    path = tmp_path / "tiny.pt"
    torch.save({"time_embed.0.weight": torch.zeros(2, 2), "bogus": torch.zeros(1)}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        from_glide_text2im("upsample-inpaint", path)
    message = str(info.value)
    assert "'upsample-inpaint' model (expected upsample_inpaint.pt)" in message
    assert "796 missing keys: " in message and "... and 786 more" in message
    assert "1 unexpected key: bogus" in message
    assert "time_embed.0.weight: checkpoint [2, 2] vs model [768, 192]" in message
    assert "looks like" not in message


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="choose one of base, upsample, base-inpaint, upsample-inpaint"):
        from_glide_text2im("inpaint")


def test_bad_checkpoint_type() -> None:
    with pytest.raises(TypeError, match="path or a state dict"):
        from_glide_text2im("base", [1, 2])  # type: ignore[arg-type]
