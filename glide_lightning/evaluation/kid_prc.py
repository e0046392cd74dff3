"""KID (Bińkowski et al. 2018) and improved precision/recall (Kynkäänniemi et al. 2019) from the same features FID
uses (:attr:`~glide_lightning.evaluation.fid.FeatureStats.features`, kept when asked for), computed by
torch-fidelity's own ``kid_features_to_metric`` and ``prc_features_to_metric`` and labelled as FID is (NOT real
with a random-weights extractor).

- :class:`MetricOptions`: which of them an evaluation computes, and their settings.
- :func:`kid_from_stats` → :class:`KIDResult`, :func:`precision_recall_from_stats` → :class:`PrecisionRecallResult`.
- Their bootstrap intervals over the generated images: :mod:`glide_lightning.evaluation.uncertainty`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from glide_lightning.evaluation.fid import FeatureStats, check_same_extractor

KID_METHOD = "torch_fidelity.metric_kid.kid_features_to_metric"
PRC_METHOD = "torch_fidelity.metric_prc.prc_features_to_metric"
KID_SEED = 2020
"""torch-fidelity's default ``rng_seed``: which random subsets KID draws (fixed, so a rerun gives the same KID)."""
EXTRA_METRICS = ("kid", "prc")
"""The metrics computed beside FID from the same features: ``kid`` and ``prc`` (precision and recall)."""


@dataclasses.dataclass(frozen=True)
class MetricOptions:
    """Which metrics to compute beside FID (always computed) from the same features, and their settings."""

    metrics: tuple[str, ...] = EXTRA_METRICS
    """Any of :data:`EXTRA_METRICS`; empty: FID alone (the reference features are then not needed)."""
    kid_subset_size: int | None = None
    """Samples per KID subset; None: min(1000, n generated, n reference) (torch-fidelity's default is 1000)."""
    kid_subsets: int = 100
    """Random subsets KID averages over (torch-fidelity's default; the std is over them)."""
    prc_neighborhood: int = 3
    """k of the k-NN radii of precision/recall (k = 3 in Kynkäänniemi et al. 2019 and torch-fidelity)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        unknown = sorted(set(self.metrics) - set(EXTRA_METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}: choose from {list(EXTRA_METRICS)} (FID is always computed)")
        if self.kid_subset_size is not None and self.kid_subset_size < 2:
            raise ValueError(f"kid_subset_size must be >= 2 (KID's unbiased MMD needs 2 samples), got "
                             f"{self.kid_subset_size}")
        if self.kid_subsets < 1:
            raise ValueError(f"kid_subsets must be >= 1, got {self.kid_subsets}")
        if self.prc_neighborhood < 1:
            raise ValueError(f"prc_neighborhood must be >= 1, got {self.prc_neighborhood}")

    @property
    def needs_features(self) -> bool:
        """True when a metric needs the raw features, not just their mean and covariance."""
        return bool(self.metrics)


@dataclasses.dataclass(frozen=True)
class FeatureMetric:
    """What every metric computed from FID's features records of where it came from: the sample counts, the
    extractor and its weights, whether they were random (then ``label`` says NOT a real value), the method."""

    n_generated: int
    n_reference: int
    extractor_name: str
    weights_id: str
    random_weights: bool
    method: str
    label: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KIDResult(FeatureMetric):
    """Kernel Inception Distance: mean and std over random subsets of the unbiased MMD² with the cubic polynomial
    kernel ``k(x, y) = (x·y / D + 1)³`` (Bińkowski et al. 2018), on the features FID uses."""

    mean: float
    std: float
    subset_size: int
    subsets: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionRecallResult(FeatureMetric):
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the fraction of generated samples
    inside the real manifold (the union of balls around each reference feature reaching its k-th nearest
    reference neighbour), recall the fraction of reference samples inside the generated manifold."""

    precision: float
    recall: float
    neighborhood: int


def _metric_label(metric: str, value: str, generated: FeatureStats, reference: FeatureStats) -> str:
    """The label of a metric computed from the same features as FID: says when they are not real."""
    random = generated.random_weights or reference.random_weights
    setup = (f"{generated.n} generated vs {reference.n} reference images at {generated.resolution} px, "
             f"{generated.extractor_name} features, computed with torch-fidelity")
    if random:
        return f"NOT a real {metric} (random feature extractor): {value} ({setup})"
    if not (generated.standard and reference.standard):
        return f"{metric} {value} on non-Inception features, not comparable to published {metric}s ({setup})"
    return f"{metric} {value} (Inception-v3 pool3 2048-d, weights sha256 {generated.weights_id[:12]}; {setup})"


def _features_of(generated: FeatureStats, reference: FeatureStats, metric: str) -> tuple[Tensor, Tensor]:
    check_same_extractor(generated, reference)
    if generated.resolution != reference.resolution:
        raise ValueError(f"Generated images are {generated.resolution} px but reference images are "
                         f"{reference.resolution} px: {metric} compares both sets at one resolution.")
    for name, s in (("generated", generated), ("reference", reference)):
        if s.features is None:
            raise ValueError(f"{metric} needs the raw features of the {name} set, not just their statistics: compute "
                             f"them with feature_stats(..., keep_features=True) (the reference cache keeps them).")
    assert generated.features is not None and reference.features is not None
    return torch.from_numpy(generated.features), torch.from_numpy(reference.features)


def kid_features(generated: Tensor, reference: Tensor, subset_size: int | None = None, subsets: int = 100,
                 seed: int = KID_SEED) -> tuple[float, float, int]:
    """KID's (mean, std, subset size) of two feature arrays ``[N, D]`` by torch-fidelity's ``kid_features_to_metric``
    (polynomial kernel of degree 3, gamma 1/D, coef0 1; ``subsets`` subsets of ``subset_size`` drawn without
    replacement by ``np.random.RandomState(seed)``). ``subset_size`` None: min(1000, N generated, N reference)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(1000, len(generated), len(reference)) if subset_size is None else int(subset_size)
    if size > min(len(generated), len(reference)):
        raise ValueError(f"KID subset size {size} is larger than the {len(generated)} generated or "
                         f"{len(reference)} reference samples: pass a smaller kid_subset_size.")
    if size < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples, got {size}.")
    out = kid_features_to_metric(generated, reference, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed,
                                 verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD]), size


def precision_recall_features(generated: Tensor, reference: Tensor, neighborhood: int = 3,
                              batch_size: int = 10000, device: str | torch.device | None = None) -> tuple[float, float]:
    """(precision, recall) of generated against reference features ``[N, D]`` by torch-fidelity's
    ``prc_features_to_metric`` (generated first: its convention). Distances are computed on ``device`` (default:
    where the features are) in blocks of ``batch_size`` rows, and the whole pairwise matrix is built only when
    both sets fit in one block (torch-fidelity's ``save_cpu_ram`` path otherwise; both give the same numbers)."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    smallest = min(len(generated), len(reference))
    if smallest <= neighborhood:
        raise ValueError(f"precision/recall with k={neighborhood} needs more than {neighborhood} samples in each set, "
                         f"got {len(generated)} generated and {len(reference)} reference: lower prc_neighborhood "
                         f"or use more images.")
    if device is not None:
        generated, reference = generated.to(device), reference.to(device)
    out = prc_features_to_metric(generated, reference, prc_neighborhood=neighborhood, prc_batch_size=batch_size,
                                 save_cpu_ram=max(len(generated), len(reference)) > batch_size, verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def kid_from_stats(generated: FeatureStats, reference: FeatureStats, subset_size: int | None = None,
                   subsets: int = 100, seed: int = KID_SEED) -> KIDResult:
    """:func:`kid_features` of the raw features two :class:`FeatureStats` kept, plus provenance."""
    mean, std, size = kid_features(*_features_of(generated, reference, "KID"), subset_size, subsets, seed)
    method = (f"{KID_METHOD} (polynomial kernel degree 3, gamma 1/D, coef0 1; unbiased MMD² over {subsets} subsets "
              f"of {size}, rng_seed {seed})")
    return KIDResult(mean=mean, std=std, subset_size=size, subsets=subsets, n_generated=generated.n,
                     n_reference=reference.n, extractor_name=generated.extractor_name,
                     weights_id=generated.weights_id, random_weights=generated.random_weights
                     or reference.random_weights, method=method,
                     label=_metric_label("KID", f"{mean:.5f} ± {std:.5f} ({subsets} subsets of {size})", generated,
                                         reference))


def precision_recall_from_stats(generated: FeatureStats, reference: FeatureStats, neighborhood: int = 3,
                                device: str | torch.device | None = None) -> PrecisionRecallResult:
    """:func:`precision_recall_features` of the raw features two :class:`FeatureStats` kept, plus provenance."""
    precision, recall = precision_recall_features(*_features_of(generated, reference, "precision/recall"),
                                                  neighborhood, device=device)
    return PrecisionRecallResult(
        precision=precision, recall=recall, neighborhood=neighborhood, n_generated=generated.n,
        n_reference=reference.n, extractor_name=generated.extractor_name, weights_id=generated.weights_id,
        random_weights=generated.random_weights or reference.random_weights,
        method=f"{PRC_METHOD} (k={neighborhood} nearest-neighbour radii, float64 Euclidean distances)",
        label=_metric_label("precision/recall", f"{precision:.3f} / {recall:.3f} (k={neighborhood})", generated,
                            reference))
