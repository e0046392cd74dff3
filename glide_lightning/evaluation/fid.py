"""Fréchet Inception Distance, computed the standard way and labelled with how it was computed.

The number: features of uint8 images from torch-fidelity's TF-ported Inception-v3 (pool3, 2048-d; see
:class:`~glide_lightning.evaluation.features.InceptionFeatures`), reduced to a mean and covariance by
``torch_fidelity.metric_fid.fid_features_to_statistics`` (``np.mean``, ``np.cov(rowvar=False)``, i.e. the
unbiased N-1 covariance) and compared by ``torch_fidelity.metric_fid.fid_statistics_to_metric``:
``||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Σ sqrt(eig(S1 S2))`` (the TTUR formula). Features are float64.

- :func:`feature_stats` / :class:`FeatureStats`: statistics of a set of images, saved as ``.npz`` + JSON sidecar.
- :func:`frechet_distance`, :func:`fid_from_stats` → :class:`FIDResult` (value + provenance + a label that
  says "NOT a real FID" when the extractor has random weights).
- :class:`ReferenceStatsCache`: reference statistics keyed by dataset, resolution, count and extractor weights
  (torch-fidelity's own cache key ignores the weights and the data).
- :func:`fid_torchmetrics`: the same distance through torchmetrics, to cross-check the two libraries.
- KID and precision/recall from the same features: :mod:`glide_lightning.evaluation.kid_prc`.
- :func:`fd_dinov2_from_stats`: the Fréchet distance on DINOv2 features (Stein et al. 2023), labelled as such.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from glide_lightning.evaluation.features import FeatureExtractor, check_uint8_images

log = logging.getLogger(__name__)

ImageSource = Union[Tensor, str, os.PathLike, Iterable[Tensor]]
"""uint8 images: a tensor ``[N, 3, H, W]``, a folder of PNG/JPG files, or an iterable of ``[B, 3, H, W]`` batches."""

IMAGE_EXTENSIONS = "png,jpg,jpeg"
STATS_METHOD = "torch_fidelity.metric_fid.fid_features_to_statistics (float64 features; mean, np.cov rowvar=False)"
DISTANCE_METHOD = "torch_fidelity.metric_fid.fid_statistics_to_metric"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write via a temp file in the same folder, then ``os.replace``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclasses.dataclass
class FeatureStats:
    """Mean and covariance of the features of ``n`` images, and the extractor they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor_name: str
    weights_id: str
    resolution: int
    random_weights: bool = False
    standard: bool = False
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    features: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    """The raw features ``[n, D]`` (float64) the statistics were reduced from, when kept
    (``feature_stats(keep_features=True)``): KID and precision/recall need them, not just mu and sigma."""

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(f"FeatureStats needs mu [D] and sigma [D, D], got {self.mu.shape} and {self.sigma.shape}.")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float64)
            if self.features.shape != (self.n, d):
                raise ValueError(f"FeatureStats features must be [n={self.n}, D={d}], got {self.features.shape}.")

    def describe(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-ready."""
        return {"n": self.n, "feature_dim": int(self.mu.shape[0]), "extractor_name": self.extractor_name,
                "weights_id": self.weights_id, "resolution": self.resolution, "random_weights": self.random_weights,
                "standard": self.standard, "method": STATS_METHOD, "meta": self.meta}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (``.npz``: mu, sigma, metadata, and the raw features when kept) and a ``.json`` sidecar
        next to it, atomically. Features are stored as float32 when that is exact (extractors compute in float32:
        half the disk, the same numbers), else as float64."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"FeatureStats files end in .npz, got {path}.")
        info = self.describe()
        arrays: dict[str, np.ndarray] = {"mu": self.mu, "sigma": self.sigma, "info": np.array(json.dumps(info))}
        if self.features is not None:
            f32 = self.features.astype(np.float32)
            arrays["features"] = f32 if np.array_equal(f32, self.features) else self.features
        _atomic_write(path, lambda f: np.savez(f, **arrays))
        _atomic_write(path.with_suffix(".json"), lambda f: json.dump(info, f, indent=2), mode="w")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        """Read a file written by :meth:`save` (the metadata inside the ``.npz`` is authoritative)."""
        with np.load(path) as data:
            missing = {"mu", "sigma", "info"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a FeatureStats file (missing {sorted(missing)}); write it with "
                                 f"FeatureStats.save.")
            info = json.loads(str(data["info"]))
            return cls(mu=data["mu"], sigma=data["sigma"], n=int(info["n"]), extractor_name=info["extractor_name"],
                       weights_id=info["weights_id"], resolution=int(info["resolution"]),
                       random_weights=bool(info["random_weights"]), standard=bool(info["standard"]),
                       meta=dict(info.get("meta", {})),
                       features=data["features"] if "features" in data.files else None)


def iter_image_batches(images: ImageSource, batch_size: int = 50) -> Iterator[Tensor]:
    """uint8 batches ``[B, 3, H, W]`` from a tensor, a folder of PNG/JPG files (torch-fidelity's loader: RGB,
    sorted, not recursive) or an iterable of batches (passed through as they come)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(images, Tensor):
        check_uint8_images(images)
        yield from images.split(batch_size)
    elif isinstance(images, (str, os.PathLike)):
        from torch_fidelity.datasets import ImagesPathDataset
        from torch_fidelity.utils import glob_samples_paths

        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"Image folder not found: {folder}.")
        files = glob_samples_paths(str(folder), False, IMAGE_EXTENSIONS, verbose=False)
        if not files:
            raise ValueError(f"No {IMAGE_EXTENSIONS} files in {folder} (subfolders are not searched).")
        dataset = ImagesPathDataset(files)
        for start in range(0, len(files), batch_size):
            batch = [dataset[i] for i in range(start, min(start + batch_size, len(files)))]
            sizes = {tuple(t.shape) for t in batch}
            if len(sizes) > 1:
                raise ValueError(f"Images in {folder} have different sizes {sorted(sizes)}: resize/crop them to one "
                                 f"square resolution first.")
            yield torch.stack(batch)
    else:
        for batch in images:
            check_uint8_images(batch)
            yield batch


def feature_stats(extractor: FeatureExtractor, images: ImageSource, batch_size: int = 50, *,
                  max_images: int | None = None, meta: dict[str, Any] | None = None,
                  keep_features: bool = False) -> FeatureStats:
    """Features of ``images`` (at most ``max_images``) reduced by torch-fidelity's ``fid_features_to_statistics``.

    All images must be square and share one resolution (it is recorded: FID compares sets at one resolution).
    Features are kept in memory as float64 (N x D x 8 bytes: 30k Inception features ≈ 0.5 GB) and, with
    ``keep_features``, returned in :attr:`FeatureStats.features` (KID and precision/recall need them).
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics

    chunks: list[Tensor] = []
    count = 0
    hw: tuple[int, int] | None = None
    for batch in iter_image_batches(images, batch_size):
        if max_images is not None:
            batch = batch[: max_images - count]
        if batch.shape[0] == 0:
            break
        size = (int(batch.shape[-2]), int(batch.shape[-1]))
        if hw is None:
            if size[0] != size[1]:
                raise ValueError(f"Images are {size[0]}x{size[1]}: FID here compares square images; center-crop them.")
            hw = size
        elif size != hw:
            raise ValueError(f"Image sizes differ within one set ({hw} then {size}): resize them to one resolution.")
        chunks.append(extractor(batch))
        count += batch.shape[0]
        if max_images is not None and count >= max_images:
            break
    if count < 2:
        raise ValueError(f"Feature statistics need at least 2 images, got {count}.")
    features = torch.cat(chunks)
    del chunks
    stats = fid_features_to_statistics(features)
    assert hw is not None
    return FeatureStats(mu=stats["mu"], sigma=stats["sigma"], n=count, extractor_name=extractor.name,
                        weights_id=extractor.weights_id, resolution=hw[0], random_weights=extractor.random_weights,
                        standard=extractor.standard, meta=dict(meta or {}),
                        features=features.numpy() if keep_features else None)


def check_same_extractor(a: FeatureStats, b: FeatureStats) -> None:
    if (a.extractor_name, a.weights_id) != (b.extractor_name, b.weights_id):
        raise ValueError(
            f"Statistics from different feature extractors cannot be compared: {a.extractor_name} "
            f"(weights {a.weights_id[:12]}) vs {b.extractor_name} (weights {b.weights_id[:12]}). Recompute one set "
            f"with the other's extractor."
        )
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"Feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}.")


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians, by torch-fidelity's ``fid_statistics_to_metric``."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    check_same_extractor(a, b)
    out = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    return float(out[KEY_METRIC_FID])


@dataclasses.dataclass(frozen=True)
class FIDResult:
    """An FID value with everything needed to tell whether it can be compared with published numbers."""

    fid: float
    n_generated: int
    n_reference: int
    resolution: int
    extractor_name: str
    weights_id: str
    random_weights: bool
    standard_extractor: bool
    method: str
    label: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


def _label(value: float, generated: FeatureStats, reference: FeatureStats, extractor: str, random: bool,
           standard: bool, via: str) -> str:
    setup = (f"{generated.n} generated vs {reference.n} reference images at {generated.resolution} px, "
             f"{extractor} features, computed with {via}")
    if random:
        return f"NOT a real FID (random feature extractor): {value:.4f} ({setup})"
    if not standard:
        return f"Fréchet distance {value:.4f}, not comparable to Inception FIDs ({setup})"
    return f"FID {value:.4f} (Inception-v3 pool3 2048-d, TF-ported weights sha256 {generated.weights_id[:12]}; {setup})"


def fid_from_stats(generated: FeatureStats, reference: FeatureStats) -> FIDResult:
    """:func:`frechet_distance` plus provenance; both sets must come from one extractor at one resolution."""
    check_same_extractor(generated, reference)
    if generated.resolution != reference.resolution:
        raise ValueError(
            f"Generated images are {generated.resolution} px but reference images are {reference.resolution} px: "
            f"FID compares both sets at one resolution; resize one set (e.g. reference center-crops) to match."
        )
    value = frechet_distance(generated, reference)
    random = generated.random_weights or reference.random_weights
    standard = generated.standard and reference.standard
    return FIDResult(fid=value, n_generated=generated.n, n_reference=reference.n, resolution=generated.resolution,
                     extractor_name=generated.extractor_name, weights_id=generated.weights_id, random_weights=random,
                     standard_extractor=standard, method=f"{STATS_METHOD}; {DISTANCE_METHOD}",
                     label=_label(value, generated, reference, generated.extractor_name, random, standard,
                                  "torch-fidelity"))


def fd_dinov2_from_stats(generated: FeatureStats, reference: FeatureStats) -> FIDResult:
    """The Fréchet distance of DINOv2 features (FD_DINOv2, Stein et al. 2023), computed as FID is
    (:func:`fid_from_stats`) and labelled as FD_DINOv2: NOT real when the DINOv2 weights are random."""
    result = fid_from_stats(generated, reference)
    setup = (f"{generated.n} generated vs {reference.n} reference images at {generated.resolution} px, "
             f"{generated.extractor_name} CLS features, weights sha256 {generated.weights_id[:12]}, computed with "
             f"torch-fidelity")
    if result.random_weights:
        label = f"NOT a real FD_DINOv2 (random DINOv2 weights): {result.fid:.4f} ({setup})"
    else:
        label = (f"FD_DINOv2 {result.fid:.4f} ({setup}; comparable to published FD_DINOv2 only with the ViT-L/14 "
                 f"weights at 224 px)")
    return dataclasses.replace(result, label=label)


class ReferenceStatsCache:
    """Reference statistics on disk, keyed by dataset id, resolution, sample count, extractor name and weights.

    One file per key: ``<root>/ref-<sha256 of the key>.npz`` (+ ``.json`` sidecar), written atomically; a file
    whose stored key differs from the requested one (or that cannot be read) is recomputed.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @staticmethod
    def key(dataset_id: str, resolution: int, n: int, extractor: FeatureExtractor) -> dict[str, Any]:
        """The cache key: everything that changes the statistics."""
        return {"dataset_id": dataset_id, "resolution": int(resolution), "n": int(n),
                "extractor_name": extractor.name, "weights_id": extractor.weights_id}

    def path_for(self, key: dict[str, Any]) -> Path:
        """File holding the statistics for ``key``."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / f"ref-{digest[:24]}.npz"

    def get_or_compute(self, dataset_id: str, resolution: int, n: int, extractor: FeatureExtractor,
                       images_fn: Callable[[], ImageSource], batch_size: int = 50, *,
                       need_features: bool = False) -> FeatureStats:
        """Cached statistics for the key, else statistics of the first ``n`` images of ``images_fn()``.

        ``images_fn`` is only called on a miss; its images must be ``resolution`` px squares and there must be
        at least ``n`` of them. The raw features are always stored with the statistics (same file, same key);
        with ``need_features`` (KID, precision/recall) an entry written without them (before they were kept)
        counts as a miss and is recomputed.
        """
        if not dataset_id:
            raise ValueError("dataset_id must name the reference data (e.g. 'coco2014-val-30k-center256').")
        if n < 2:
            raise ValueError(f"n must be >= 2, got {n}.")
        key = self.key(dataset_id, resolution, n, extractor)
        path = self.path_for(key)
        if path.is_file():
            try:
                stats = FeatureStats.load(path)
                if stats.meta.get("cache_key") == key and (stats.features is not None or not need_features):
                    log.info("reference stats cache hit: %s (%s)", path, key)
                    return stats
                if stats.meta.get("cache_key") == key:
                    log.info("reference stats file %s has no raw features (written before they were kept; KID and "
                             "precision/recall need them); recomputing", path)
                else:
                    log.warning("reference stats file %s holds another key (%s); recomputing", path,
                                stats.meta.get("cache_key"))
            except Exception as e:  # unreadable: recompute and overwrite
                log.warning("reference stats file %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        log.info("reference stats cache miss: computing %s", key)
        stats = feature_stats(extractor, images_fn(), batch_size, max_images=n, meta={"cache_key": key},
                              keep_features=True)
        if stats.n != n:
            raise ValueError(f"Reference dataset {dataset_id!r} gave {stats.n} images, fewer than n={n}.")
        if stats.resolution != resolution:
            raise ValueError(f"Reference dataset {dataset_id!r} gave {stats.resolution} px images but the key says "
                             f"resolution={resolution}: resize them in images_fn or fix resolution.")
        stats.save(path)
        log.info("reference stats written: %s", path)
        return stats


class _TorchmetricsFeatures(nn.Module):
    """Hands a :class:`FeatureExtractor` to torchmetrics as ``feature=`` (it reads ``num_features``)."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.feature_dim

    def forward(self, imgs: Tensor) -> Tensor:
        return self.extractor(imgs)


def fid_torchmetrics(extractor: FeatureExtractor, real_batches: ImageSource, fake_batches: ImageSource,
                     batch_size: int = 50) -> float:
    """The same distance through ``torchmetrics.image.fid.FrechetInceptionDistance(feature=<module>)``.

    torchmetrics accumulates float64 sums and computes ``Tr(sqrt(S1 S2))`` from ``torch.linalg.eigvals``, so on
    the same features it must agree with :func:`frechet_distance` (a cross-check of both libraries). The module
    gets the uint8 batches unchanged (``normalize=False``; torchmetrics applies no conversion to custom modules).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_TorchmetricsFeatures(extractor), normalize=False)
    for batch in iter_image_batches(real_batches, batch_size):
        metric.update(batch, real=True)
    for batch in iter_image_batches(fake_batches, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())
