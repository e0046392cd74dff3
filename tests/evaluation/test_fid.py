"""FID core: torch-fidelity statistics/distance, torchmetrics cross-check, reference cache, extractors.

Pretrained Inception weights cannot be downloaded here and a random Inception gives ~1e-8 features, so the
distribution tests use a small random conv net as the extractor (ModuleFeatures).
"""

from __future__ import annotations

import json
import logging
import math
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from glide_lightning.evaluation.features import (
    STANDARD_INCEPTION_SHA256,
    InceptionFeatures,
    ModuleFeatures,
    inception_weights_default_path,
    write_random_inception_weights,
    sha256_file,
)
from glide_lightning.evaluation.fid import (
    FeatureStats,
    ReferenceStatsCache,
    feature_stats,
    fid_from_stats,
    fid_torchmetrics,
    frechet_distance,
)


def small_net(seed: int = 0, dim: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, dim, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.fixture()
def extractor() -> ModuleFeatures:
    return ModuleFeatures(small_net(), "test-convnet")


def images(n: int, seed: int, offset: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 150, (n, 3, size, size), generator=g)
    return (base + offset).clamp(0, 255).to(torch.uint8)


def stats(mu: list[float], sigma: np.ndarray, name: str = "x") -> FeatureStats:
    return FeatureStats(mu=np.array(mu), sigma=sigma, n=10, extractor_name=name, weights_id="w", resolution=8)


def test_fid_of_a_set_against_itself_is_zero(extractor):
    s = feature_stats(extractor, images(256, 0), batch_size=64)
    assert s.n == 256 and s.mu.shape == (16,) and s.resolution == 16
    assert abs(frechet_distance(s, s)) < 1e-6 * np.trace(s.sigma)


def test_fid_grows_monotonically_with_brightness_shift(extractor):
    ref = feature_stats(extractor, images(256, 0))
    fids = [fid_from_stats(feature_stats(extractor, images(256, 1, offset)), ref).fid for offset in (0, 20, 40, 80)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert fids[0] > 0


def test_torch_fidelity_and_torchmetrics_agree(extractor):
    real, fake = images(200, 0), images(180, 1, offset=30)
    ours = fid_from_stats(feature_stats(extractor, fake, 64), feature_stats(extractor, real, 64)).fid
    theirs = fid_torchmetrics(extractor, real, fake.split(50))
    assert ours > 1e-3
    assert theirs == pytest.approx(ours, rel=1e-3)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    g = np.random.default_rng(0)
    mu1, mu2 = g.normal(size=6), g.normal(size=6)
    v1, v2 = g.uniform(0.1, 3, size=6), g.uniform(0.1, 3, size=6)
    expected = sum((a - b) ** 2 for a, b in zip(mu1, mu2)) + sum(a + b - 2 * math.sqrt(a * b) for a, b in zip(v1, v2))
    got = frechet_distance(stats(list(mu1), np.diag(v1)), stats(list(mu2), np.diag(v2)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_closed_form_for_scaled_full_covariance():
    # S2 = c·S1 commutes with S1: Tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 + c - 2 sqrt(c)) Tr(S1).
    a = np.random.default_rng(1).normal(size=(5, 5))
    s1, c = a @ a.T + 0.5 * np.eye(5), 2.7
    mu1, mu2 = [0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 0.0, 3.0, 5.0]
    trace1 = sum(s1[i, i] for i in range(5))
    expected = sum((x - y) ** 2 for x, y in zip(mu1, mu2)) + (1 + c - 2 * math.sqrt(c)) * trace1
    assert frechet_distance(stats(mu1, s1), stats(mu2, c * s1)) == pytest.approx(expected, rel=1e-8)


def test_statistics_from_other_extractors_or_resolutions_are_refused(extractor):
    a = stats([0.0, 0.0], np.eye(2), name="a")
    with pytest.raises(ValueError, match="different feature extractors"):
        frechet_distance(a, stats([0.0, 0.0], np.eye(2), name="b"))
    s16 = feature_stats(extractor, images(8, 0, size=16))
    s24 = feature_stats(extractor, images(8, 0, size=24))
    with pytest.raises(ValueError, match="one resolution"):
        fid_from_stats(s16, s24)


def test_fid_result_says_how_it_was_computed_and_flags_random_weights(extractor):
    r = fid_from_stats(feature_stats(extractor, images(40, 1)), feature_stats(extractor, images(50, 0)))
    assert (r.n_generated, r.n_reference, r.resolution, r.extractor_name) == (40, 50, 16, "test-convnet")
    assert r.weights_id == extractor.weights_id and r.random_weights and not r.standard_extractor
    assert r.label.startswith("NOT a real FID (random feature extractor)")
    assert "fid_statistics_to_metric" in r.method and "fid_features_to_statistics" in r.method
    json.dumps(r.to_dict())
    pretrained = ModuleFeatures(small_net(), "my-net", pretrained=True)
    r2 = fid_from_stats(feature_stats(pretrained, images(20, 1)), feature_stats(pretrained, images(20, 0)))
    assert not r2.random_weights and "not comparable to Inception FIDs" in r2.label


def test_image_sources_tensor_folder_and_batches_agree(extractor, tmp_path):
    x = images(30, 3)
    for i, img in enumerate(x):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    a = feature_stats(extractor, x, batch_size=7)
    b = feature_stats(extractor, tmp_path, batch_size=8)
    c = feature_stats(extractor, iter(x.split(11)))
    for s in (b, c):
        assert s.n == 30
        np.testing.assert_allclose(s.mu, a.mu, rtol=1e-12)
        np.testing.assert_allclose(s.sigma, a.sigma, rtol=1e-10, atol=1e-14)
    assert feature_stats(extractor, x, batch_size=4, max_images=10).n == 10


def test_non_uint8_images_give_a_clear_error(extractor):
    with pytest.raises(TypeError, match="uint8"):
        feature_stats(extractor, torch.rand(4, 3, 16, 16))


def test_module_features_input_range_and_resolution():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["dtype"], seen["shape"], seen["min"] = x.dtype, tuple(x.shape), float(x.min())
            return x.float().mean(dim=(2, 3))

    blank = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    ModuleFeatures(Probe(), "probe", input_range="symmetric", resolution=8)(blank)
    assert seen == {"dtype": torch.float32, "shape": (2, 3, 8, 8), "min": -1.0}
    ModuleFeatures(Probe(), "probe", input_range="uint8")(blank)
    assert seen["dtype"] == torch.uint8
    with pytest.raises(ValueError, match="'uint8', 'unit', 'symmetric'"):
        ModuleFeatures(Probe(), "probe", input_range="0-1")  # type: ignore[arg-type]


def test_feature_stats_save_load_round_trip(extractor, tmp_path):
    s = feature_stats(extractor, images(20, 0), meta={"dataset_id": "toy"})
    path = s.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(path)
    np.testing.assert_array_equal(loaded.mu, s.mu)
    np.testing.assert_array_equal(loaded.sigma, s.sigma)
    assert loaded.describe() == s.describe()
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["n"] == 20 and sidecar["weights_id"] == extractor.weights_id
    assert sidecar["meta"]["dataset_id"] == "toy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json", "stats.npz"]  # no temp files left


def test_reference_cache_reuses_same_key_and_recomputes_when_any_part_changes(extractor, tmp_path, caplog):
    calls: list[tuple[str, int]] = []

    def images_fn(dataset: str, resolution: int):
        def fn():
            calls.append((dataset, resolution))
            return images(40, 0 if dataset == "a" else 1, size=resolution)
        return fn

    cache = ReferenceStatsCache(tmp_path)
    with caplog.at_level(logging.INFO, logger="glide_lightning.evaluation.fid"):
        first = cache.get_or_compute("a", 16, 32, extractor, images_fn("a", 16))
        assert "cache miss" in caplog.text
        caplog.clear()
        again = ReferenceStatsCache(tmp_path).get_or_compute("a", 16, 32, extractor, images_fn("a", 16))
        assert "cache hit" in caplog.text
    assert len(calls) == 1 and first.n == 32
    np.testing.assert_array_equal(again.sigma, first.sigma)

    cache.get_or_compute("b", 16, 32, extractor, images_fn("b", 16))  # dataset id
    cache.get_or_compute("a", 24, 32, extractor, images_fn("a", 24))  # resolution
    cache.get_or_compute("a", 16, 30, extractor, images_fn("a", 16))  # sample count
    assert len(calls) == 4
    with torch.no_grad():
        extractor.module[0].weight[0, 0, 0, 0] += 0.5  # new weights → new weights_id
    changed = cache.get_or_compute("a", 16, 32, extractor, images_fn("a", 16))
    assert len(calls) == 5 and changed.weights_id != first.weights_id
    assert not np.allclose(changed.mu, first.mu)
    cache.get_or_compute("a", 16, 32, extractor, images_fn("a", 16))
    assert len(calls) == 5
    assert len(list(tmp_path.glob("ref-*.npz"))) == 5 and not list(tmp_path.glob(".*tmp"))


def test_reference_cache_refuses_too_few_images(extractor, tmp_path):
    with pytest.raises(ValueError, match="fewer than n=50"):
        ReferenceStatsCache(tmp_path).get_or_compute("a", 16, 50, extractor, lambda: images(40, 0))
    assert not list(tmp_path.iterdir())


def test_inception_missing_weights_file_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path") as e:
        InceptionFeatures(weights_path=tmp_path / "missing.pth")
    assert "weights-inception-2015-12-05-6726825d.pth" in str(e.value)


def test_inception_without_file_or_network_says_where_to_put_it(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)  # never download in tests
    with pytest.raises(RuntimeError, match="downloading them failed") as e:
        InceptionFeatures()
    assert str(inception_weights_default_path()) in str(e.value) and "weights_path" in str(e.value)


def test_inception_features_run_torch_fidelity_with_a_weights_file(tmp_path, monkeypatch, caplog):
    """The user code path (a weights file → torch-fidelity's Inception) with random weights."""
    path = write_random_inception_weights(tmp_path / "random-inception.pth")
    with caplog.at_level(logging.WARNING):
        inception = InceptionFeatures(weights_path=path)
    assert "NOT real FIDs" in caplog.text
    assert inception.weights_id == sha256_file(path) != STANDARD_INCEPTION_SHA256
    assert inception.random_weights and not inception.standard and inception.feature_dim == 2048
    # Random Inception activations are denormal floats (~1e-8 features), 10x slower on a CPU unless flushed to
    # zero; the flush only covers the calling thread, hence one thread for this call.
    threads = torch.get_num_threads()
    flush = torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    try:
        out = inception(images(2, 0, size=32))  # resized to 299 inside torch-fidelity
    finally:
        torch.set_num_threads(threads)
        if flush:
            torch.set_flush_denormal(False)
    assert out.shape == (2, 2048) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="not the standard"):
        InceptionFeatures(weights_path=path, require_standard_weights=True)


def test_reference_cache_keeps_the_raw_features_for_kid_and_precision_recall(extractor, tmp_path, caplog):
    """KID and precision/recall need the reference features themselves: the cache keeps them with the statistics
    (same key, same file; stored as float32, which is exact for float32 extractors), and an entry written before
    they were kept is recomputed when they are needed."""
    cache = ReferenceStatsCache(tmp_path)
    calls = []

    def images_fn():
        calls.append(1)
        return images(40, 0)

    first = cache.get_or_compute("a", 16, 32, extractor, images_fn, need_features=True)
    direct = feature_stats(extractor, images(40, 0), max_images=32, keep_features=True)
    assert first.features.shape == (32, 16) and first.features.dtype == np.float64
    np.testing.assert_array_equal(first.features, direct.features)
    path = cache.path_for(cache.key("a", 16, 32, extractor))
    with np.load(path) as data:
        assert data["features"].dtype == np.float32  # exact: the conv net computes in float32
    again = ReferenceStatsCache(tmp_path).get_or_compute("a", 16, 32, extractor, images_fn, need_features=True)
    np.testing.assert_array_equal(again.features, first.features)
    assert len(calls) == 1
    # an entry from before features were kept: fine for FID alone, recomputed for KID / precision-recall
    old = FeatureStats.load(path)
    old.features = None
    old.save(path)
    assert cache.get_or_compute("a", 16, 32, extractor, images_fn).features is None and len(calls) == 1
    with caplog.at_level(logging.INFO, logger="glide_lightning.evaluation.fid"):
        refreshed = cache.get_or_compute("a", 16, 32, extractor, images_fn, need_features=True)
    assert "has no raw features" in caplog.text and len(calls) == 2
    np.testing.assert_array_equal(refreshed.features, first.features)
    with pytest.raises(ValueError, match="features must be"):
        FeatureStats(mu=first.mu, sigma=first.sigma, n=5, extractor_name="x", weights_id="w", resolution=16,
                     features=first.features)
