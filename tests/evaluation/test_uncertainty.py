"""Bootstrap intervals over generated images and statistics across training seeds (evaluation/uncertainty.py).

Each bootstrap replicate is checked against the metric's own path (fid.py / torch-fidelity) on the same
resampled features; the t interval against scipy.stats, Welch's against its textbook formula and scipy's
ttest_ind. Features are random arrays: none of these numbers is a real FID.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from glide_lightning.evaluation.fid import FIDResult, FeatureStats, fid_from_stats
from glide_lightning.evaluation.kid_prc import kid_features, precision_recall_features
from glide_lightning.evaluation.results import ScaleResult, read_results, write_results
from glide_lightning.evaluation import uncertainty
from glide_lightning.evaluation.uncertainty import (
    BootstrapOptions,
    FrechetBootstrap,
    Interval,
    KIDBootstrap,
    PrecisionRecallBootstrap,
    bootstrap_indices,
    bootstrap_metrics,
    difference,
    kid_bootstrap_bytes,
    prc_bootstrap_bytes,
    seed_summary,
    t_interval,
    t_quantile,
    welch_difference,
)


def _stats(features: np.ndarray) -> FeatureStats:
    return FeatureStats(mu=features.mean(0), sigma=np.cov(features, rowvar=False), n=len(features),
                        extractor_name="x", weights_id="w", resolution=8, features=features)


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 6)) + 0.3, rng.normal(size=(50, 6))


@pytest.mark.parametrize("block", [4096, 7])  # the reference set in one block, and in 8 (the last one short)
def test_each_bootstrap_replicate_is_the_plain_metric_on_the_resampled_features(features, block):
    generated, reference = features
    ref = _stats(reference)
    fid = FrechetBootstrap(generated, ref.mu, ref.sigma)
    kid = KIDBootstrap(generated, reference, 10, 5, 2020, block=block)
    prc = PrecisionRecallBootstrap(generated, reference, 3, block=block)
    for idx in bootstrap_indices(len(generated), 3, seed=1):
        resampled = generated[idx]
        assert fid.replicate(idx) == pytest.approx(fid_from_stats(_stats(resampled), ref).fid, rel=1e-9, abs=1e-9)
        plain_kid, _, _ = kid_features(torch.from_numpy(resampled), torch.from_numpy(reference), 10, 5, seed=2020)
        assert kid.replicate(idx) == pytest.approx(plain_kid, rel=1e-9, abs=1e-12)
        assert prc.replicate(idx) == precision_recall_features(torch.from_numpy(resampled),
                                                               torch.from_numpy(reference), 3)


def test_kid_and_precision_recall_bootstraps_build_no_reference_by_reference_matrix():
    """A large reference set (MS-COCO's 30k: 7 GB per float64 [M, M] matrix) costs memory linear in M: here 6000
    reference rows, whose [M, M] matrix alone would be 288 MB, set both bootstraps up within a fraction of that."""
    script = """
import resource, numpy as np
from glide_lightning.evaluation.uncertainty import KIDBootstrap, PrecisionRecallBootstrap
rng = np.random.default_rng(0)
generated, reference = rng.normal(size=(40, 8)), rng.normal(size=(6000, 8))
KIDBootstrap(generated, reference, 10, 5, 0, block=256).replicate(np.arange(40))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
KIDBootstrap(generated, reference, 10, 5, 0, block=256)
PrecisionRecallBootstrap(generated, reference, 3, block=256)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 60e6  # bytes of peak growth; [M, M] float64 would be 288e6


def test_a_bootstrap_whose_matrices_exceed_the_memory_budget_is_skipped_with_a_warning(features, monkeypatch,
                                                                                          caplog):
    generated, reference = features
    ref = _stats(reference)
    options = BootstrapOptions(replicates=10, seed=0)
    kwargs = dict(reference_features=reference, kid=(10, 5, 0), prc_neighborhood=3)
    assert {"fid", "kid", "precision", "recall"} <= bootstrap_metrics(generated, ref.mu, ref.sigma, options,
                                                                      **kwargs).keys()
    monkeypatch.setattr(uncertainty, "BOOTSTRAP_MAX_BYTES", kid_bootstrap_bytes(40, 5))  # KID fits, exactly
    assert prc_bootstrap_bytes(40, 50) > uncertainty.BOOTSTRAP_MAX_BYTES
    intervals = bootstrap_metrics(generated, ref.mu, ref.sigma, options, **kwargs)
    assert {"fid", "kid"} <= intervals.keys() and not {"precision", "recall"} & intervals.keys()
    assert "no precision/recall interval" in caplog.text and "the value itself is unaffected" in caplog.text


def test_fid_replicate_with_fewer_images_than_dimensions_uses_the_gram_side():
    rng = np.random.default_rng(3)
    generated, reference = rng.normal(size=(12, 20)), rng.normal(size=(60, 20))
    ref = _stats(reference)
    idx = next(bootstrap_indices(12, 1, 0))
    assert FrechetBootstrap(generated, ref.mu, ref.sigma).replicate(idx) == pytest.approx(
        fid_from_stats(_stats(generated[idx]), ref).fid, rel=1e-8)


def test_interval_contains_the_estimate_narrows_with_n_and_is_reproducible():
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(400, 4))
    ref = _stats(reference)
    options = BootstrapOptions(replicates=200, seed=0)
    widths = []
    for n in (50, 800):
        generated = rng.normal(size=(n, 4)) + 0.5
        adherence = rng.uniform(size=n)
        intervals = bootstrap_metrics(generated, ref.mu, ref.sigma, options, adherence=adherence)
        point = fid_from_stats(_stats(generated), ref).fid
        assert intervals["fid"].contains(point)
        assert intervals["adherence"].contains(float(adherence.mean()))
        widths.append(intervals["fid"].hi - intervals["fid"].lo)
        again = bootstrap_metrics(generated, ref.mu, ref.sigma, options, adherence=adherence)
        assert again == intervals
    assert widths[1] < widths[0] / 2  # ~1/sqrt(N): 16x the images, ~1/4 the width


def test_intervals_hold_their_value_where_resampling_biases_the_metric():
    """Same distribution, N = 200 in 32 dimensions: a resample's duplicates raise FID and KID and shrink recall's
    radii, so the replicates sit to one side of the value (checked: the percentile interval would miss it); the
    interval is the replicates' spread around the value."""
    rng = np.random.default_rng(7)
    reference, generated = rng.normal(size=(1000, 32)), rng.normal(size=(200, 32))
    ref = _stats(reference)
    options = BootstrapOptions(replicates=50, seed=0)
    intervals = bootstrap_metrics(generated, ref.mu, ref.sigma, options, reference_features=reference,
                                  kid=(100, 10, 2020), prc_neighborhood=3)
    fid = FrechetBootstrap(generated, ref.mu, ref.sigma)
    point = fid_from_stats(_stats(generated), ref).fid
    replicates = [fid.replicate(idx) for idx in bootstrap_indices(200, 50, 0)]
    assert min(replicates) > point  # every resample is further away: a percentile interval excludes the value
    assert intervals["fid"].contains(point) and (intervals["fid"].lo + intervals["fid"].hi) / 2 == pytest.approx(point)
    assert intervals["fid"].se == pytest.approx(np.std(replicates, ddof=1))
    plain_kid, _, _ = kid_features(torch.from_numpy(generated), torch.from_numpy(reference), 100, 10, seed=2020)
    precision, recall = precision_recall_features(torch.from_numpy(generated), torch.from_numpy(reference), 3)
    for name, value in (("kid", plain_kid), ("precision", precision), ("recall", recall)):
        assert intervals[name].contains(value), (name, value, intervals[name])


def test_t_quantile_is_checked_and_reaches_the_normal_at_infinite_df():
    assert t_quantile(0.975, float("inf")) == pytest.approx(1.959964, abs=1e-6)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.975, 5) == pytest.approx(2.570582, abs=1e-6)  # a t table's value
    for p, df in ((1.0, 3), (0.0, 3), (0.5, 0)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_t_interval_and_welch_match_their_formulas():
    a, b = [3.1, 2.7, 3.6, 3.0], [4.2, 3.9, 5.1]
    ti = t_interval(a)
    half = t_quantile(0.975, 3) * statistics.stdev(a) / 2
    assert (ti.lo, ti.hi) == pytest.approx((statistics.fmean(a) - half, statistics.fmean(a) + half))
    assert t_interval([1.0]) is None
    d = welch_difference(a, b)
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert d.df == pytest.approx(df) and d.estimate == pytest.approx(statistics.fmean(b) - statistics.fmean(a))
    assert d.exceeds  # b is clearly larger
    equal = welch_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert equal.df == pytest.approx(4.0) and not equal.exceeds  # equal n, equal variance: df = 2(n - 1)


def test_t_interval_and_welch_agree_with_scipy():
    from scipy import stats

    a, b = [3.1, 2.7, 3.6, 3.0], [4.2, 3.9, 5.1]
    ti, d = t_interval(a), welch_difference(a, b)
    assert ti.lo == pytest.approx(stats.t.interval(0.95, 3, loc=statistics.fmean(a), scale=stats.sem(a))[0])
    test = stats.ttest_ind(b, a, equal_var=False)
    assert d.estimate / d.interval.se == pytest.approx(test.statistic)
    assert t_quantile(0.975, 7.5) == pytest.approx(stats.t.ppf(0.975, 7.5), abs=1e-9)


def test_difference_uses_welch_with_seeds_else_the_bootstrap():
    one = seed_summary([1.0], [0.1])
    other = seed_summary([1.5], [0.1])
    d = difference(one, other)
    assert d.df is None and d.interval.se == pytest.approx(math.hypot(0.1, 0.1)) and d.exceeds
    many = difference(seed_summary([1.0, 1.2], [None, None]), seed_summary([1.1, 1.3], [None, None]))
    assert many.df is not None and not many.exceeds
    assert difference(seed_summary([1.0], [None]), other) is None


def test_interval_round_trips_and_options_are_checked():
    interval = Interval(0.1, 0.5, 0.95, "m", 0.1)
    assert Interval.from_dict(interval.to_dict()) == interval
    assert Interval.from_dict({"lo": 1, "hi": 2}).level == 0.95
    with pytest.raises(ValueError):
        BootstrapOptions(replicates=5)
    with pytest.raises(ValueError):
        BootstrapOptions(level=1.0)


def test_results_without_intervals_still_read_and_intervals_round_trip(tmp_path):
    fid = FIDResult(fid=1.5, n_generated=8, n_reference=8, resolution=32, extractor_name="x", weights_id="w",
                    random_weights=True, standard_extractor=False, method="m", label="NOT a real FID")
    old = ScaleResult(guidance_scale=3.0, n=8, resolution=32, sampler="ddpm", steps="25", checkpoint="c", fid=fid,
                      adherence=0.5)
    record = old.to_dict()
    assert not any(key.endswith("_interval") for key in record)  # an old record written again stays the same
    path = write_results(tmp_path / "results.json", [old])
    [read] = read_results(path)
    assert read == old and read.interval("fid") is None and read.value("adherence") == 0.5
    new = old.with_intervals({"fid": Interval(1.2, 1.9, method="b", se=0.2), "adherence": Interval(0.4, 0.6)})
    [again] = read_results(write_results(tmp_path / "new.json", [new]))
    assert again == new and again.fid_interval.lo == 1.2 and "FID 1.50 [1.20, 1.90]" in again.summary_line()
    with pytest.raises(KeyError):
        old.interval("fidd")
