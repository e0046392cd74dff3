"""The zero-shot FID image cache key (``evaluation/zero_shot.py``): derived from what each config field declares
(``CHANGES_IMAGES`` / ``KEEPS_IMAGES``), and stable for the configs that image folders were written under."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.evaluation.zero_shot import FIDJob, generation_identity, images_key
from glide_lightning.models import ModelConfig
from glide_lightning.sampling import SamplingConfig, SamplingModel

CONFIGS = (DiffusionConfig, ModelConfig, SamplingConfig)


class CLIPTokenizer:
    """Stands in for the tokenizer: only its class name enters the key."""


def _model(model: ModelConfig, diffusion: DiffusionConfig) -> SamplingModel:
    """A model with fixed weights (the key hashes them), so the keys below do not depend on random init."""
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.arange(4.0).reshape(2, 2))
        net.bias.fill_(0.5)
    return SamplingModel(net, diffusion, CLIPTokenizer(), model, "fixed")


JOB = FIDJob(captions=["a red square", "a blue circle"], reference="ref", out_dir=Path("out"))


def _key(sampling: SamplingConfig, base: SamplingModel, upsampler: SamplingModel | None = None) -> str:
    return images_key(generation_identity(replace(JOB, sampling=sampling), base, upsampler))


# The keys that image caches were written under, computed by the code before the fields were classified (which
# hashed every DiffusionConfig field and every ModelConfig / SamplingConfig field but those exempted as added
# later). Folders of these configs must keep being found: do not update these values to make the test pass.
PINNED = {
    "hybrid": ((ModelConfig(), DiffusionConfig()), None, SamplingConfig(), "c64c327d6b58"),
    "p2": ((ModelConfig(dropout=0.0), DiffusionConfig(variance_type="fixed_small", loss_type="p2", p2_gamma=0.5,
                                                      p2_k=2.0)),
           None, SamplingConfig(sampler="ddim", steps="ddim50"), "4e921b5403b9"),
    "min_snr_v": ((ModelConfig(), DiffusionConfig(variance_type="fixed_small", loss_type="simple", prediction="v",
                                                  min_snr_gamma=5.0, vlb_weight=0.01)),
                  None, SamplingConfig(steps="25", batch_size=4), "0c64b76c9834"),
    "cascade_t5_bf16": ((ModelConfig(text_encoder="t5", text_encoder_name="google/t5-v1_1-base", xf_width=64),
                         DiffusionConfig(steps=100, min_snr_gamma=5.0)),
                        (ModelConfig(kind="upsample", image_size=256, low_res_noise_cond=True),
                         DiffusionConfig(noise_schedule="linear")),
                        SamplingConfig(precision="bf16", upsample_noise=0.1), "b08b677b37d0"),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_the_keys_of_existing_image_folders_do_not_change(name):
    base, upsampler, sampling, key = PINNED[name]
    assert _key(sampling, _model(*base), None if upsampler is None else _model(*upsampler)) == key


def test_the_new_spelling_of_a_weighting_finds_the_old_spellings_folder():
    new = DiffusionConfig(variance_type="fixed_small", loss_type="simple", weighting="p2", p2_gamma=0.5, p2_k=2.0)
    (model, _), _, sampling, key = PINNED["p2"]
    assert _key(sampling, _model(model, new)) == key


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_says_whether_it_changes_the_images(config):
    """A field added to one of these configs must be put in its CHANGES_IMAGES (the image cache key hashes it: add
    it to zero_shot's _LATER_*_DEFAULTS at the value that reproduces older images, so their folders are found) or
    in its KEEPS_IMAGES (training only: it never enters the key)."""
    names = {f.name for f in fields(config)}
    assert not config.CHANGES_IMAGES & config.KEEPS_IMAGES
    assert names - (config.CHANGES_IMAGES | config.KEEPS_IMAGES) == set(), "unclassified fields"
    assert (config.CHANGES_IMAGES | config.KEEPS_IMAGES) - names == set(), "classified names that are not fields"


def test_the_key_hashes_exactly_the_image_fields_and_those_hashed_before():
    from glide_lightning.evaluation.zero_shot import _HASHED_BEFORE_CLASSIFIED

    identity = generation_identity(JOB, _model(ModelConfig(), DiffusionConfig()))["base"]
    assert set(identity["diffusion"]) == DiffusionConfig.CHANGES_IMAGES | _HASHED_BEFORE_CLASSIFIED[DiffusionConfig]
    assert "weighting" not in identity["diffusion"] and "dropout" in identity["model"]
    assert set(identity["model"]) <= ModelConfig.CHANGES_IMAGES | _HASHED_BEFORE_CLASSIFIED[ModelConfig]
    for config, hashed in _HASHED_BEFORE_CLASSIFIED.items():  # only training-only fields need keeping for old keys
        assert hashed <= config.KEEPS_IMAGES


def test_what_changes_the_images_changes_the_key():
    model, diffusion = ModelConfig(), DiffusionConfig(variance_type="fixed_small", loss_type="simple")
    key = _key(SamplingConfig(), _model(model, diffusion))
    for changed in (replace(diffusion, prediction="v"), replace(diffusion, steps=100),
                    replace(diffusion, variance_type="fixed_large"), replace(diffusion, noise_schedule="linear")):
        assert _key(SamplingConfig(), _model(model, changed)) != key, changed
    assert _key(SamplingConfig(), _model(replace(model, num_res_blocks=2), diffusion)) != key
    assert _key(SamplingConfig(sampler="ddim", eta=0.5), _model(model, diffusion)) != key
