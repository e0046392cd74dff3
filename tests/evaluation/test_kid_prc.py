"""KID, precision/recall and FD_DINOv2 beside FID, from the same features.

Every metric is cross-checked against torch-fidelity's own top-level path: ``torch_fidelity.calculate_metrics``
run on the same feature arrays (handed to it through a registered look-up "feature extractor", so the library's
whole pipeline runs: data loading, feature collection, its KID and precision/recall code), plus an independent
closed-form / brute-force computation in numpy and sanity cases. The features here are random arrays or come from
random-weight networks: none of these numbers is a real KID, precision, recall or FD_DINOv2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from glide_lightning.commands import main as glide_main
from glide_lightning.evaluation import fid_cli
from glide_lightning.evaluation.features import DINOV2_ABSENT, Dinov2Features
from glide_lightning.evaluation.fid import FeatureStats, fd_dinov2_from_stats, feature_stats
from glide_lightning.evaluation.kid_prc import (
    MetricOptions,
    kid_features,
    kid_from_stats,
    precision_recall_features,
    precision_recall_from_stats,
)
from glide_lightning.evaluation.results import read_results
from glide_lightning.evaluation.wandb_runs import find_runs
from test_zero_shot import held_out  # noqa: F401  (the fixture: held-out captions and reference images)

# --- torch-fidelity's own path on given features ------------------------------------------------------------


class _IndexImages(Dataset):
    """uint8 "images" [3, 1, 1] that encode (set, index): the look-up extractor maps them back to feature rows."""

    def __init__(self, which: int, n: int) -> None:
        self.which, self.n = which, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([self.which, i // 256, i % 256], dtype=torch.uint8).view(3, 1, 1)


def torch_fidelity_metrics(generated: np.ndarray, reference: np.ndarray, **kwargs) -> dict[str, float]:
    """``torch_fidelity.calculate_metrics(input1=generated, input2=reference, kid=True, prc=True, ...)`` with a
    registered feature extractor that returns exactly these feature rows (float64)."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    tables = [torch.from_numpy(generated), torch.from_numpy(reference)]

    class LookUp(FeatureExtractorBase):
        def __init__(self, name, features_list, **_):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            which, index = x[:, 0, 0, 0].long(), x[:, 1, 0, 0].long() * 256 + x[:, 2, 0, 0].long()
            return (torch.stack([tables[w][i] for w, i in zip(which.tolist(), index.tolist())]),)

    FEATURE_EXTRACTORS_REGISTRY["glide-test-lookup"] = LookUp  # replaced on every call: these tables
    return torch_fidelity.calculate_metrics(
        input1=_IndexImages(0, len(generated)), input2=_IndexImages(1, len(reference)),
        feature_extractor="glide-test-lookup", kid=True, prc=True, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, batch_size=50, **kwargs)


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, size=(n, dim))


def stats_of(features: np.ndarray, name: str = "test-features", random: bool = True) -> FeatureStats:
    return FeatureStats(mu=features.mean(0), sigma=np.cov(features, rowvar=False), n=len(features),
                        extractor_name=name, weights_id="w", resolution=16, random_weights=random,
                        features=features)


# --- independent references -------------------------------------------------------------------------------


def mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a·b / D + 1)³ (Bińkowski et al. 2018, eq. for KID), written out."""
    m, dim = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / dim + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.sum() / m ** 2)


def precision_recall_brute_force(generated: np.ndarray, reference: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019, written out: a sample is in a set's manifold when it lies within the k-NN
    radius (distance to the k-th nearest other member) of some member of that set."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    radius_ref = np.sort(dist(reference, reference), axis=1)[:, k]  # column 0 is the point itself
    radius_gen = np.sort(dist(generated, generated), axis=1)[:, k]
    precision = (dist(generated, reference) <= radius_ref[None, :]).any(1).mean()
    recall = (dist(reference, generated) <= radius_gen[None, :]).any(1).mean()
    return float(precision), float(recall)


# --- cross-checks ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sets() -> tuple[np.ndarray, np.ndarray]:
    """Generated and reference features that differ in mean and spread (not real metrics: random arrays)."""
    return gaussian(120, 16, 0, shift=0.3, scale=1.2), gaussian(150, 16, 1)


def test_kid_and_precision_recall_equal_torch_fidelity_calculate_metrics_on_the_same_features(two_sets):
    generated, reference = two_sets
    theirs = torch_fidelity_metrics(generated, reference, kid_subset_size=50, kid_subsets=20, prc_neighborhood=3)
    kid = kid_from_stats(stats_of(generated), stats_of(reference), subset_size=50, subsets=20)
    prc = precision_recall_from_stats(stats_of(generated), stats_of(reference), neighborhood=3)
    assert kid.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-12, abs=1e-15)
    assert kid.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-12, abs=1e-15)
    assert (prc.precision, prc.recall) == (theirs["precision"], theirs["recall"])
    assert kid.mean > 2 * kid.std > 0 and 0 < prc.recall < 1 and 0 < prc.precision < 1
    assert (kid.subset_size, kid.subsets, kid.n_generated, kid.n_reference) == (50, 20, 120, 150)
    assert kid.label.startswith("NOT a real KID") and prc.label.startswith("NOT a real precision/recall")
    # generated first, reference second (torch-fidelity's convention): swapping them swaps precision and recall
    swapped = torch_fidelity_metrics(reference, generated, kid_subset_size=50, kid_subsets=20)
    assert (swapped["precision"], swapped["recall"]) == (prc.recall, prc.precision)


def test_kid_equals_the_written_out_unbiased_mmd_when_one_subset_is_the_whole_set():
    x, y = gaussian(64, 8, 2, shift=0.5), gaussian(64, 8, 3)
    mean, std, size = kid_features(torch.from_numpy(x), torch.from_numpy(y), subset_size=64, subsets=3)
    assert size == 64 and std == pytest.approx(0, abs=1e-12)  # every subset is the whole set
    assert mean == pytest.approx(mmd2_unbiased_poly(x, y), rel=1e-10)


def test_precision_recall_equal_a_brute_force_k_nn_computation(two_sets):
    generated, reference = two_sets
    for k in (1, 3, 5):
        ours = precision_recall_features(torch.from_numpy(generated), torch.from_numpy(reference), k)
        # torch-fidelity averages in float32: equal up to 1e-6, far below one sample's share (1/150)
        assert ours == pytest.approx(precision_recall_brute_force(generated, reference, k), abs=1e-6), k


def test_closed_form_cases_identical_sets_far_clusters_and_a_dropped_mode():
    same = gaussian(200, 8, 4)
    assert precision_recall_features(torch.from_numpy(same), torch.from_numpy(same.copy())) == (1.0, 1.0)
    far = gaussian(200, 8, 5, shift=100.0)
    assert precision_recall_features(torch.from_numpy(far), torch.from_numpy(same)) == (0.0, 0.0)
    # the reference has two far-apart modes of 100 samples, the generated set only one: the far mode changes no
    # generated sample's precision, and none of its samples is recalled: recall halves exactly
    generated, mode = torch.from_numpy(gaussian(100, 2, 8)), torch.from_numpy(gaussian(100, 2, 6))
    both = torch.cat([mode, torch.from_numpy(gaussian(100, 2, 7, shift=50.0))])
    precision, recall = precision_recall_features(generated, mode)
    assert precision > 0.9 and recall > 0.9  # one 2-d distribution, 100 samples: nearly all covered
    assert precision_recall_features(generated, both) == pytest.approx((precision, recall / 2), abs=1e-6)
    # KID: about 0 for two draws of one distribution, growing with the distance between them
    kids = [kid_features(torch.from_numpy(gaussian(300, 8, 9, shift=s)), torch.from_numpy(gaussian(300, 8, 10)),
                         subset_size=100, subsets=50)[0] for s in (0.0, 0.5, 1.0, 2.0)]
    assert abs(kids[0]) < 0.01 * kids[1] and kids[1] < kids[2] < kids[3]


def test_kid_and_precision_recall_need_the_raw_features_and_enough_samples(two_sets):
    generated, reference = two_sets
    bare = stats_of(generated)
    bare.features = None
    with pytest.raises(ValueError, match="needs the raw features of the generated set"):
        kid_from_stats(bare, stats_of(reference))
    with pytest.raises(ValueError, match="KID subset size 500 is larger"):
        kid_features(torch.from_numpy(generated), torch.from_numpy(reference), subset_size=500)
    assert kid_features(torch.from_numpy(generated[:30]), torch.from_numpy(reference))[2] == 30  # min(1000, n)
    with pytest.raises(ValueError, match="needs more than 3 samples"):
        precision_recall_features(torch.from_numpy(generated[:3]), torch.from_numpy(reference))
    with pytest.raises(ValueError, match="unknown metrics"):
        MetricOptions(metrics=("fid", "kid"))


# --- FD_DINOv2 ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer DINOv2 (hidden 32, patch 14) saved by transformers: NOT real weights."""
    from transformers import Dinov2Config, Dinov2Model

    from glide_lightning.evaluation.features import private_rng

    folder = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=28)
    with private_rng(0):
        Dinov2Model(config).save_pretrained(folder)
    return folder


def uint8_images(n: int, seed: int, offset: int = 0) -> torch.Tensor:
    base = torch.randint(0, 150, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))
    return (base + offset).clamp(0, 255).to(torch.uint8)


def test_fd_dinov2_from_user_supplied_transformers_weights(tiny_dinov2):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    dino = Dinov2Features(tiny_dinov2, pretrained=False, resolution=28)
    assert dino.name == "dinov2-d32-l2-p14-28px-cls" and dino.feature_dim == 32 and dino.random_weights
    assert dino.describe()["source"] == str(tiny_dinov2)
    images = uint8_images(8, 0)
    # the normed CLS token of torch-fidelity's preprocessing (TF1 bilinear resize, ImageNet mean/std)
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(28, 28), align_corners=False)
    x = (x / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        hidden = dino.model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(dino(images), hidden[:, 0].double(), rtol=1e-5, atol=1e-5)
    reference = feature_stats(dino, uint8_images(64, 1))
    same = fd_dinov2_from_stats(feature_stats(dino, uint8_images(64, 2)), reference)
    shifted = fd_dinov2_from_stats(feature_stats(dino, uint8_images(64, 2, offset=80)), reference)
    assert 0 < same.fid < shifted.fid
    assert shifted.label.startswith("NOT a real FD_DINOv2 (random DINOv2 weights)")
    assert shifted.extractor_name == dino.name and shifted.weights_id == dino.weights_id
    with pytest.raises(RuntimeError, match="Could not load DINOv2 weights"):
        Dinov2Features(tiny_dinov2 / "missing")


# --- results.json, the sweep table and the wandb summary ------------------------------------------------------


def test_the_commands_write_kid_precision_recall_and_fd_dinov2(tiny_checkpoint, held_out, tiny_dinov2, tmp_path,
                                                               monkeypatch):
    root, _ = held_out
    monkeypatch.setenv("WANDB_MODE", "offline")  # the eval run's summary, read back from its offline files
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var))
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(tiny_checkpoint.read_bytes())
    common = ["--captions", str(root / "captions.txt"), "--reference", str(root / "reference"), "--n", "6",
              "--extractor", "random-conv", "--clip_model", "none", "--sampling.steps", "2", "--device", "cpu",
              "--cache_dir", str(tmp_path / "cache")]
    results = glide_main(["sweep", "--run_dir", str(run_dir), *common, "--scales", "[1, 3]", "--kid_subsets", "10",
                          "--dinov2", str(tiny_dinov2), "--dinov2_pretrained", "false"])
    out = run_dir / "fid" / "res32_ddpm2_n6"
    records = json.loads((out / "results.json").read_text())["results"]
    (logged,) = [run.summary for run in find_runs(run_dir) if run.job_type == "eval"]
    for r, record in zip(results, records):
        assert record["kid"]["subset_size"] == 6 and record["kid"]["subsets"] == 10  # min(1000, n)
        assert record["precision_recall"]["neighborhood"] == 3
        assert record["fd_dinov2"]["label"].startswith("NOT a real FD_DINOv2") and "fd_dinov2_reason" not in record
        assert r.kid.random_weights and r.kid.label.startswith("NOT a real KID")
        s = f"{r.guidance_scale:g}"
        assert logged[f"eval/kid@{s}"] == r.kid.mean and logged[f"eval/kid_std@{s}"] == r.kid.std
        assert (logged[f"eval/precision@{s}"], logged[f"eval/recall@{s}"]) == (r.precision, r.recall)
        assert logged[f"eval/fd_dinov2@{s}"] == r.fd_dinov2.fid
    assert read_results(out / "results.json") == results
    table = (out / "sweep.md").read_text().splitlines()
    assert "| guidance | FID | CLIP score | adherence | KID | precision | recall | FD_DINOv2 |" in table
    row = next(line for line in table if line.startswith("| 3 |")).strip("| ").split(" | ")
    three = results[1]
    ci = three.interval  # each cell: the value, then its bootstrap interval over the generated images
    assert row[4:] == [f"{three.kid.mean:.4f} ± {three.kid.std:.4f} {ci('kid').format('.4f')}",
                       f"{three.precision:.3f} {ci('precision').format('.3f')}",
                       f"{three.recall:.3f} {ci('recall').format('.3f')}",
                       f"{three.fd_dinov2.fid:.2f} {ci('fd_dinov2').format('.2f')}"]
    assert any(line.startswith("> KID: torch_fidelity.metric_kid") and "NOT a real KID" in line for line in table)
    # without DINOv2 weights: fd_dinov2 null and the reason; --metrics '[]': FID alone
    again = glide_main(["fid", "--ckpt", str(tiny_checkpoint), *common, "--scales", "[3]", "--metrics", "[]",
                        "--out", str(tmp_path / "plain")])
    record = json.loads((tmp_path / "plain" / "res32_ddpm2_n6" / "results.json").read_text())["results"][0]
    assert record["fd_dinov2"] is None and record["fd_dinov2_reason"] == DINOV2_ABSENT
    assert "kid" not in record and "precision_recall" not in record and again[0].precision is None
    assert again[0].fid.fid == pytest.approx(three.fid.fid)  # the same images and reference: the same FID
    with pytest.raises(SystemExit):  # checked when parsed
        glide_main(["fid", "--ckpt", str(tiny_checkpoint), *common, "--metrics", "[fd]"])
    assert fid_cli.SCORE_COLUMNS[-4:] == ["KID", "precision", "recall", "FD_DINOv2"]


def test_precision_recall_is_left_out_by_default_where_n_is_too_small_and_refused_where_asked_for():
    from glide_lightning.commands import parse

    small = parse(["fid", "--run_dir", "runs/x", "--n", "3"])
    assert small.metric_options().metrics == ("kid",)  # k = 3 nearest neighbours need more than 3 images
    assert parse(["fid", "--run_dir", "runs/x", "--n", "4"]).metric_options().metrics == ("kid", "prc")
    with pytest.raises(SystemExit):
        parse(["fid", "--run_dir", "runs/x", "--n", "3", "--metrics", "[kid, prc]"])
