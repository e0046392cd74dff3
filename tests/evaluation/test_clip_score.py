"""CLIP score wiring with a tiny randomly initialised open_clip CLIP (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glide_lightning.evaluation.clip_score import CLIPScorer

CAPTIONS = ["a red square", "a photo of a dog on the grass", "two cats", "a blue car parked outside"]


@pytest.fixture(scope="module")
def scorer() -> CLIPScorer:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=64, patch_size=16, width=128, layers=2, head_width=32),
        text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=2),
    )
    return CLIPScorer("ViT-B-32", pretrained=None, model=model)


def make_images(n: int = 4, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, 256, (n, 3, size, size), generator=g).float()
    return F.avg_pool2d(noise, 5, 1, 2).round().to(torch.uint8)  # smoother than raw noise, like images


def manual_score_matrix(scorer: CLIPScorer, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """M[i, j] = 100·max(cos(image i, caption j), 0), with open_clip's own (PIL) validation transform."""
    import open_clip
    from PIL import Image

    transform = open_clip.image_transform(64, is_train=False)  # resize shortest side, center crop, CLIP mean/std
    pixels = torch.stack([transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=32)(captions)
    with torch.no_grad():
        img, txt = scorer.model.encode_image(pixels), scorer.model.encode_text(tokens)
    cos = F.cosine_similarity(img[:, None, :], txt[None, :, :], dim=-1)
    return 100 * cos.clamp(min=0)


def test_score_shape_range_and_determinism(scorer):
    images = make_images()
    s = scorer.score(images, CAPTIONS)
    assert s.shape == (4,) and s.dtype == torch.float32
    assert bool(((s >= 0) & (s <= 100)).all())
    torch.testing.assert_close(scorer.score(images, CAPTIONS), s, rtol=0, atol=0)
    torch.testing.assert_close(scorer.score(images.float() / 255, CAPTIONS), s, rtol=1e-4, atol=1e-4)


def test_scores_are_per_pair_for_matching_and_shuffled_captions(scorer):
    images = make_images()
    matrix = manual_score_matrix(scorer, images, CAPTIONS)
    assert (matrix > 0).any() and (matrix == 0).any()  # the random model gives both signs: clamping is exercised
    results = []
    for perm in ((0, 1, 2, 3), (2, 0, 3, 1)):
        got = scorer.score(images, [CAPTIONS[j] for j in perm])
        expected = torch.stack([matrix[i, j] for i, j in enumerate(perm)])
        # float-tensor vs PIL uint8 resize: a few hundredths of a point apart
        torch.testing.assert_close(got, expected, rtol=0, atol=0.15)
        results.append(got)
    assert not torch.allclose(*results)
    single = torch.cat([scorer.score(images[i:i + 1], [CAPTIONS[i]]) for i in (1, 3)])
    torch.testing.assert_close(single, results[0][[1, 3]], rtol=1e-4, atol=1e-4)


def test_preprocessing_resizes_shortest_side_and_center_crops(scorer):
    x = scorer.preprocess(make_images(2, size=32).repeat(1, 1, 1, 2))  # 32 x 64 → 64 x 128 → crop 64 x 64
    assert x.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.preprocess(torch.full((1, 3, 8, 8), -1.0))


def test_results_are_flagged_random_weights(scorer):
    result = scorer.evaluate([(make_images(), CAPTIONS), (make_images(2), CAPTIONS[:2])])
    assert result.n == 6 and 0 <= result.mean <= 100
    assert result.random_weights and result.pretrained is None
    assert result.label.startswith("NOT a real CLIP score (random CLIP weights)")


def test_caption_count_must_match(scorer):
    with pytest.raises(ValueError, match="one caption per image"):
        scorer.score(make_images(), CAPTIONS[:3])
    with pytest.raises(TypeError, match="sequence of strings"):
        scorer.score(make_images(1), "a dog")  # type: ignore[arg-type]


def test_unavailable_pretrained_weights_give_a_clear_error(monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': offline")

    monkeypatch.setattr(open_clip.factory, "create_model_and_transforms", offline)
    monkeypatch.setattr("open_clip.create_model_and_transforms", offline)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE") as e:
        CLIPScorer("ViT-B-32", pretrained="openai")
    assert "local checkpoint" in str(e.value)
