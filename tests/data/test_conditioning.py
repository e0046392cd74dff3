"""The upsamplers' low-res input and the inpainting masks made by the data pipeline: closed forms, the
documented mix, and resumability of the masks with the stream."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import reduce

from glide_lightning.data.conditioning import downsample, random_masks
from glide_lightning.data.datamodule import GlideDataModule
from glide_lightning.data.tokenizers import TokenizerSpec
from glide_lightning.data.pipeline import StreamPosition, StreamResume


def test_downsample_is_the_block_mean_of_the_full_image():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = reduce(images, "b c (h p) (w q) -> b c h w", "mean", p=4, q=4)
    torch.testing.assert_close(downsample(images, 8), expected)
    with pytest.raises(ValueError, match="low_res_size must be between 1 and the image size 32"):
        downsample(images, 32)


def test_masks_are_binary_seeded_and_follow_the_documented_mix():
    masks = random_masks(400, 32, np.random.default_rng(0))
    assert masks.shape == (400, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks, random_masks(400, 32, np.random.default_rng(0)))
    erased = 1 - masks.mean(dim=(1, 2, 3))  # [400]
    full = erased == 1
    assert 0.01 < full.float().mean() < 0.12  # FULL_ERASE_PROB 0.05
    assert erased[~full].min() > 0.01 and 0.15 < erased.mean() < 0.35  # something, about a quarter on average
    # rectangles: the erased pixels of a mask fill their bounding boxes when it is one rectangle; strokes do not
    boxes = []
    for mask in masks[~full, 0]:
        rows, cols = torch.nonzero(mask == 0, as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        boxes.append(float((mask == 0).sum() / box))
    boxes = torch.tensor(boxes)
    assert (boxes == 1).float().mean() > 0.15 and (boxes < 0.7).float().mean() > 0.2


def make_dm(shards: Path, **kw) -> GlideDataModule:
    dm = GlideDataModule(train_shards=f"{shards}/train-*.tar", val_shards=f"{shards}/val-*.tar", image_size=32,
                         tokenizer_spec=TokenizerSpec("clip", 16), batch_size=4, num_workers=0, shuffle_buffer=20,
                         seed=1, **kw)
    dm.setup("fit")
    return dm


def test_batches_carry_the_inputs_of_the_model_kind(synthetic_shards):
    batch = next(iter(make_dm(synthetic_shards, model_kind="upsample_inpaint", low_res_size=16).train_dataloader()))
    torch.testing.assert_close(batch["low_res"], downsample(batch["image"], 16))
    assert batch["inpaint_mask"].shape == (4, 1, 32, 32)
    base = next(iter(make_dm(synthetic_shards).train_dataloader()))
    assert "low_res" not in base and "inpaint_mask" not in base
    up = next(iter(make_dm(synthetic_shards, model_kind="upsample", low_res_size=8).train_dataloader()))
    assert up["low_res"].shape == (4, 3, 8, 8) and "inpaint_mask" not in up


@pytest.mark.parametrize("kw,match", [
    ({"model_kind": "upsample"}, r"data.low_res_size is required for model.kind 'upsample'"),
    ({"model_kind": "inpaint", "low_res_size": 8}, r"model.kind 'inpaint' takes no low-resolution input"),
    ({"model_kind": "upsample", "low_res_size": 32}, r"low_res_size must be between 1 and the model's image_size 32"),
    ({"model_kind": "upscale"}, r"model_kind must be one of"),
])
def test_inconsistent_settings_fail_at_construction(synthetic_shards, kw, match):
    with pytest.raises(ValueError, match=match):
        make_dm(synthetic_shards, **kw)


def test_masks_resume_with_the_stream_and_validation_masks_are_fixed(synthetic_shards):
    """A stream resumed from batch k's position yields batch k+1 of the uninterrupted stream, masks included;
    two validation passes use the same masks; training batches differ in their masks."""
    dm = make_dm(synthetic_shards, model_kind="inpaint")
    stream = dm._stream("train")
    stream.set_epoch(0)
    batches = list(islice(iter(stream), 8))
    assert not torch.equal(batches[0]["inpaint_mask"], batches[1]["inpaint_mask"])
    for k in (2, 5):
        logical, *values = batches[k]["stream_position"]
        resumed = dm._stream("train")
        resumed.set_epoch(0)
        resumed.resume(StreamResume(0, 0, {logical: StreamPosition.from_list(values)}))
        following = next(iter(resumed))
        assert following["key"] == batches[k + 1]["key"]
        assert torch.equal(following["inpaint_mask"], batches[k + 1]["inpaint_mask"])
    first, second = (next(iter(dm.val_dataloader())) for _ in range(2))
    assert torch.equal(first["inpaint_mask"], second["inpaint_mask"])
    assert torch.equal(dm.preview_batch()["inpaint_mask"], first["inpaint_mask"])
