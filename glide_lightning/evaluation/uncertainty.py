"""How sure a figure is: bootstrap intervals over the generated images, and statistics across training seeds.

**Over the generated images** (one evaluation): the N generated images are resampled with replacement ``B`` times
(the reference set and its statistics stay fixed: the question is how much the figure moves with another draw of N
images from the same model), every metric is recomputed on each resample, and the interval is the normal bootstrap
interval around the value, ``value ± z·se`` with ``se`` the replicates' standard deviation (Efron & Tibshirani 1993,
§13.2; :func:`normal_interval` says why not the percentile interval: resamples' duplicates bias FID, KID and
recall, so their percentile interval misses the value). B = 200 estimates ``se`` well (§6.4). The resamples come from ``numpy.random.default_rng(seed)``, so a rerun gives the same interval. Each
metric's replicate is the metric's own formula on the resampled features (a test checks it against fid.py's /
torch-fidelity's path on the same resample), computed from matrices prepared once:

- FID / FD_DINOv2 (:class:`FrechetBootstrap`): ``Tr sqrt(S_g S_r) = Tr sqrt(R S_g R)`` with ``R = S_r^{1/2}``
  computed once; ``R S_g R`` is the covariance of ``Y = X R`` (also computed once), so a replicate needs the
  covariance of the resampled rows of Y and a symmetric eigendecomposition (no non-symmetric ``eig``, no
  ``sqrtm``). Cost per replicate: a ``min(N, D)² · max(N, D)`` Gram matrix and a ``min(N, D)³`` ``eigvalsh``:
  at N = 5000 Inception-sized features (D = 2048), about 4·10¹⁰ flops: measured 5.4 s per replicate (and 23 s of
  set-up) in float64 with ``OMP_NUM_THREADS=2`` on this 2-core CPU while other jobs shared it, so the default 200
  replicates per scale take ~20 minutes there (``--bootstrap 0`` skips them; a GPU: ``device`` puts the replicates
  there; not timed here, no GPU was available); at N = 64 with 1024-d random features (the smoke sweeps) all of them take about a second.
- KID (:class:`KIDBootstrap`): the cubic-kernel matrix generated×generated and, per subset, the reference
  block's sum and each generated sample's sum against the block's rows are computed once (no reference×reference
  or generated×reference matrix); the subsets are drawn exactly as torch-fidelity's
  ``kid_features_to_metric`` draws them (``np.random.RandomState(seed)``, the same sequence for every resample,
  since N does not change), so a replicate only gathers m×m blocks (100 subsets of 1000: ~10⁸ gathers; at
  N = 5000, D = 2048 on the same busy CPU: 25 s of set-up, 3.8 s per replicate; ``device`` moves them to a GPU).
- precision / recall (:class:`PrecisionRecallBootstrap`): distances are computed once (``torch.cdist``, as
  torch-fidelity does); a generated sample's membership in the reference manifold does not change with the
  resample (precision is then a mean of indicators), the generated manifold's radii do (recall: the (k+1)-th
  smallest distance within the resample, duplicates included, as the library computes it on a duplicated set).
  Memory: the ``[N, N]`` and ``[M, N]`` float64 distances (M reference images) and one block of rows at a time
  (the reference radii, the replicates); above :data:`BOOTSTRAP_MAX_BYTES` (:func:`prc_bootstrap_bytes`) the
  interval is skipped with a warning, as KID's is (:func:`kid_bootstrap_bytes`: ``[N, N]`` and ``[subsets, N]``).
- CLIP score and adherence: means of per-image values; a replicate is the mean of the resampled values.

**Across training seeds** (an ablation, :mod:`glide_lightning.evaluation.ablation`): the mean, the sample
standard deviation (ddof 1) and the t-based interval ``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)`` (Student
1908); the difference of two arms by Welch's t interval (Welch 1947, Satterthwaite's degrees of freedom) when each
arm has at least 2 seeds, else from the arms' bootstrap standard errors (independent bootstraps, normal
approximation: ``d ± z · sqrt(se_a² + se_b²)``). The t quantile is scipy's.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["BOOTSTRAP_MAX_BYTES", "LEVEL", "BootstrapOptions", "Difference", "FrechetBootstrap", "Interval",
           "KIDBootstrap", "PrecisionRecallBootstrap", "bootstrap_difference", "bootstrap_indices",
           "bootstrap_interval", "bootstrap_metrics", "difference", "kid_bootstrap_bytes", "normal_interval",
           "prc_bootstrap_bytes", "seed_summary", "t_interval", "t_quantile", "welch_difference"]

LEVEL = 0.95
BLOCK = 4096
"""Reference rows at a time where the bootstraps' set-up walks the reference set."""
BOOTSTRAP_MAX_BYTES = 8 * 2**30
"""The most memory the KID and precision/recall bootstraps' float64 matrices may take on their device (each, as
:func:`kid_bootstrap_bytes` and :func:`prc_bootstrap_bytes` count them; the features and small per-subset blocks
aside): a larger set skips that interval with a warning. At 8 GiB: KID up to about 30k generated images,
precision/recall about 21k generated against as many reference images (18k against MS-COCO's 30k)."""
BOOTSTRAP_METHOD = "normal bootstrap interval over the generated images (reference fixed): value ± z·se"


@dataclass(frozen=True)
class Interval:
    """A ``level`` confidence interval ``[lo, hi]`` and how it was made."""

    lo: float
    hi: float
    level: float = LEVEL
    """Coverage, e.g. 0.95."""
    method: str = ""
    """How it was computed (``normal bootstrap interval … B replicates, seed s``, ``t interval over n seeds``…)."""
    se: float | None = None
    """The standard error behind it (bootstrap: the replicates' std, ddof 1; t: s/sqrt(n)); None: not known."""

    def contains(self, value: float) -> bool:
        """``lo <= value <= hi``."""
        return self.lo <= value <= self.hi

    @property
    def excludes_zero(self) -> bool:
        """True when 0 lies outside the interval (a difference 'exceeds its interval')."""
        return not self.contains(0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Interval:
        """The record of :meth:`to_dict`. Raises ``KeyError`` when ``lo`` or ``hi`` is missing."""
        return cls(lo=float(data["lo"]), hi=float(data["hi"]), level=float(data.get("level", LEVEL)),
                   method=str(data.get("method", "")), se=data.get("se"))

    def format(self, spec: str) -> str:
        """``[lo, hi]`` with ``spec`` (e.g. ``.2f``)."""
        return f"[{self.lo:{spec}}, {self.hi:{spec}}]"


@dataclass(frozen=True)
class BootstrapOptions:
    """How the bootstrap over the generated images runs."""

    replicates: int = 200
    """B, the resamples (0: no bootstrap)."""
    seed: int = 0
    """Seed of ``numpy.random.default_rng`` that draws the resamples."""
    level: float = LEVEL
    """Coverage of the intervals."""

    def __post_init__(self) -> None:
        if self.replicates < 0 or 0 < self.replicates < 10:
            raise ValueError(f"bootstrap replicates must be 0 (off) or >= 10, got {self.replicates}")
        if not 0 < self.level < 1:
            raise ValueError(f"confidence level must be in (0, 1), got {self.level}")


# --- the bootstrap over generated images -------------------------------------------------------------------


def bootstrap_indices(n: int, replicates: int, seed: int) -> Iterator[np.ndarray]:
    """``replicates`` resamples of ``range(n)`` with replacement (each ``[n]`` int64), from
    ``numpy.random.default_rng(seed)``: the same sequence for the same (n, replicates, seed)."""
    rng = np.random.default_rng(seed)
    for _ in range(replicates):
        yield rng.integers(0, n, size=n)


def normal_interval(point: float, replicates: Sequence[float] | np.ndarray, level: float = LEVEL,
                    method: str = "") -> Interval:
    """The normal bootstrap interval ``point ± z_{(1+level)/2} · se`` (Efron & Tibshirani 1993, §13.2), ``se`` the
    std (ddof 1) of the bootstrap ``replicates``.

    Why not their percentile interval (§13.3): a resample of N images with replacement holds ~37 % duplicates,
    which add small-sample bias to FID, KID and recall (fewer distinct images: a larger FID; a duplicate's zero
    self-distance: smaller k-NN radii), so every replicate sits to one side and the percentile interval misses the
    value it is printed beside (FID at N = 200: value 5.5, percentile interval [9.9, 12.1]). The spread of the
    replicates still estimates how much the value moves with another draw of N images; the interval is that
    spread around the value, which it therefore always contains.

    Raises:
        ValueError: fewer than 2 replicates, or a non-finite one or value.
    """
    values = np.asarray(replicates, dtype=np.float64)
    if values.size < 2 or not np.all(np.isfinite(values)) or not math.isfinite(point):
        raise ValueError(f"a bootstrap interval needs a finite value and >= 2 finite replicates, got {values.size} "
                         f"({int(np.sum(~np.isfinite(values)))} non-finite), value {point}")
    se = float(values.std(ddof=1))
    half = statistics.NormalDist().inv_cdf((1 + level) / 2) * se
    return Interval(lo=point - half, hi=point + half, level=level, method=method, se=se)


class FrechetBootstrap:
    """The Fréchet distance (FID's formula, Heusel et al. 2017) of resamples of ``generated`` ``[N, D]`` against
    fixed reference statistics (``mu_r [D]``, ``sigma_r [D, D]``), with the reference's square root and the
    projected features computed once (see the module docstring for the cost). float64 on ``device``."""

    def __init__(self, generated: np.ndarray | torch.Tensor, mu_r: np.ndarray, sigma_r: np.ndarray,
                 device: str | torch.device = "cpu") -> None:
        x = torch.as_tensor(np.asarray(generated), dtype=torch.float64, device=device)
        sigma = torch.as_tensor(np.asarray(sigma_r), dtype=torch.float64, device=device)
        w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
        root = (v * w.clamp(min=0).sqrt()) @ v.T  # S_r^{1/2}, symmetric PSD
        self.x, self.y = x, x @ root
        self.mu_r = torch.as_tensor(np.asarray(mu_r), dtype=torch.float64, device=device)
        self.trace_r = float(torch.trace(sigma))

    def replicate(self, idx: np.ndarray) -> float:
        """The distance of the rows ``idx`` of the generated features (a resample: duplicates allowed)."""
        index = torch.as_tensor(idx, device=self.x.device)
        n = len(idx)
        x, y = self.x[index], self.y[index]
        xc, yc = x - x.mean(0), y - y.mean(0)
        gram = yc.T @ yc if n >= yc.shape[1] else yc @ yc.T  # same nonzero eigenvalues: R S_g R · (n-1)
        eig = torch.linalg.eigvalsh(gram / (n - 1)).clamp(min=0)
        diff = x.mean(0) - self.mu_r
        trace_g = float((xc * xc).sum()) / (n - 1)
        return float(diff @ diff) + trace_g + self.trace_r - 2 * float(eig.sqrt().sum())


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's ``kernel_poly`` defaults: ``(a·b / D + 1)³``."""
    kernel = a @ b.T
    return kernel.mul_(1.0 / a.shape[1]).add_(1).pow_(3)  # in place: one [len(a), len(b)] matrix, no temporaries


class KIDBootstrap:
    """KID (Bińkowski et al. 2018; torch-fidelity's unbiased MMD² over ``subsets`` random subsets of
    ``subset_size``, drawn by ``np.random.RandomState(seed)``) of resamples of ``generated`` against ``reference``,
    from kernel sums computed once. A replicate is the mean over the subsets, as KID's value is.

    Memory: the generated×generated kernel ``[N, N]`` (float64; a replicate gathers its subsets' blocks) and per
    subset its reference block's sum and each generated sample's kernel sum against the block's rows
    (``[subsets, N]``). No reference×reference or generated×reference matrix is built: the reference side is
    computed in ``block`` rows at a time (an MS-COCO-sized 30k reference would need 7 GB for each)."""

    def __init__(self, generated: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, subset_size: int,
                 subsets: int, seed: int, device: str | torch.device = "cpu", block: int = BLOCK) -> None:
        g = torch.as_tensor(np.asarray(generated), dtype=torch.float64, device=device)
        r = torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device)
        n, m = len(g), subset_size
        self.k_gg, self.m = _poly_kernel(g, g), m
        rng = np.random.RandomState(seed)  # the library's draws: generated positions, then reference rows
        draws, rr_sums = [], []
        chosen_rows = torch.zeros(len(r), subsets, dtype=torch.float64, device=device)  # [M, subsets] 0/1
        for s in range(subsets):
            positions = rng.choice(n, m, replace=False)
            rows = torch.as_tensor(rng.choice(len(r), m, replace=False), device=device)
            block_rr = _poly_kernel(r[rows], r[rows])  # [m, m]
            draws.append(torch.as_tensor(positions, device=device))
            rr_sums.append(block_rr.sum() - block_rr.diagonal().sum())
            chosen_rows[rows, s] = 1.0
        # Σ_{j in subset s} K(g_i, r_j) for every generated i: [subsets, N], a block of reference rows at a time
        gr_rows = torch.zeros(subsets, n, dtype=torch.float64, device=device)
        for start in range(0, len(r), block):
            gr_rows += chosen_rows[start:start + block].T @ _poly_kernel(r[start:start + block], g)
        self.draws, self.rr_sums, self.gr_rows = torch.stack(draws), torch.stack(rr_sums), gr_rows

    def replicate(self, idx: np.ndarray) -> float:
        """KID of the generated rows ``idx`` (a resample of ``range(N)``)."""
        m = self.m
        chosen = torch.as_tensor(idx, device=self.k_gg.device)[self.draws]  # [subsets, m]
        xx = torch.stack([(lambda b: b.sum() - b.diagonal().sum())(self.k_gg[c][:, c]) for c in chosen])
        xy = torch.gather(self.gr_rows, 1, chosen).sum(dim=1)
        return float(((xx + self.rr_sums) / (m * (m - 1)) - 2 * xy / (m * m)).mean())


class PrecisionRecallBootstrap:
    """Improved precision and recall (Kynkäänniemi et al. 2019, torch-fidelity's ``prc_features_to_metric``:
    k-th nearest-neighbour radii, a sample's own zero distance counted) of resamples of ``generated``, from
    distance matrices computed once with ``torch.cdist`` (float64).

    Memory: generated×generated ``[N, N]`` and reference×generated ``[M, N]`` distances (a replicate's recall needs
    both); the reference radii and each generated sample's membership are computed ``block`` reference rows at a
    time (no ``[M, M]`` matrix). :func:`prc_bootstrap_bytes` is the total."""

    def __init__(self, generated: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor,
                 neighborhood: int = 3, device: str | torch.device = "cpu", block: int = BLOCK) -> None:
        g = torch.as_tensor(np.asarray(generated), dtype=torch.float64, device=device)
        r = torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device)
        self.k, self.block = neighborhood, block
        self.d_gg = torch.cdist(g, g)
        self.d_rg = torch.cdist(r, g)  # [M, N]
        inside = torch.zeros(len(g), dtype=torch.bool, device=device)
        for start in range(0, len(r), block):
            radius_r = torch.cdist(r[start:start + block], r).kthvalue(neighborhood + 1, dim=1).values  # [block]
            inside |= (self.d_rg[start:start + block] <= radius_r[:, None]).any(dim=0)
        self.inside_real = inside.float()  # per generated sample: inside some reference sample's k-NN ball

    def replicate(self, idx: np.ndarray) -> tuple[float, float]:
        """(precision, recall) of the generated rows ``idx`` (a block of rows at a time: no [N, N] or [M, N] copy)."""
        index = torch.as_tensor(idx, device=self.d_gg.device)
        radius_g = torch.cat([self.d_gg[index[start:start + self.block, None], index].kthvalue(self.k + 1, dim=1).values
                              for start in range(0, len(index), self.block)])
        covered = torch.cat([(self.d_rg[start:start + self.block][:, index] <= radius_g).any(dim=1)
                             for start in range(0, len(self.d_rg), self.block)])
        return self.inside_real[index].mean().item(), covered.float().mean().item()  # float32, as the library


def kid_bootstrap_bytes(n: int, subsets: int) -> int:
    """Bytes of :class:`KIDBootstrap`'s float64 matrices for ``n`` generated images: the ``[N, N]`` and
    ``[subsets, N]`` it keeps and the ``[BLOCK, N]`` block of its set-up (the features and small blocks aside)."""
    return 8 * n * (n + subsets + BLOCK)


def prc_bootstrap_bytes(n: int, m: int) -> int:
    """Bytes of :class:`PrecisionRecallBootstrap`'s float64 matrices for ``n`` generated and ``m`` reference images:
    the ``[N, N]`` and ``[M, N]`` distances it keeps and a ``[BLOCK, M + N]`` block of its set-up or replicates."""
    return 8 * n * (n + m) + 8 * BLOCK * (m + n)


def _fits(what: str, needed: int, n: int) -> bool:
    if needed <= BOOTSTRAP_MAX_BYTES:
        return True
    log.warning("no %s interval: its bootstrap over %d generated images would need %.1f GB (more than "
                "uncertainty.BOOTSTRAP_MAX_BYTES, %.1f GB); the value itself is unaffected", what, n, needed / 1e9,
                BOOTSTRAP_MAX_BYTES / 1e9)
    return False


def _method(what: str, n: int, options: BootstrapOptions) -> str:
    return f"{what}: {BOOTSTRAP_METHOD}, {options.replicates} replicates of {n} images, seed {options.seed}"


def bootstrap_interval(replicate: Any, n: int, options: BootstrapOptions, what: str) -> Interval:
    """The :func:`normal_interval` of ``replicate`` around its value on all ``n`` images (``replicate(arange(n))``,
    the metric itself), over :func:`bootstrap_indices` ``(n, options.replicates, options.seed)``; ``what`` names
    the metric in the method string."""
    values = [replicate(idx) for idx in bootstrap_indices(n, options.replicates, options.seed)]
    return normal_interval(replicate(np.arange(n)), values, options.level, _method(what, n, options))


def bootstrap_metrics(generated: np.ndarray, reference_mu: np.ndarray, reference_sigma: np.ndarray,
                      options: BootstrapOptions, *, reference_features: np.ndarray | None = None,
                      kid: tuple[int, int, int] | None = None, prc_neighborhood: int | None = None,
                      clip_scores: np.ndarray | None = None, adherence: np.ndarray | None = None,
                      device: str | torch.device = "cpu") -> dict[str, Interval]:
    """Intervals of every metric of one evaluation, from the same resamples of its N generated images.

    ``generated`` ``[N, D]``: their features; ``reference_mu`` / ``reference_sigma``: the reference statistics
    (FID); ``reference_features``: the reference features (KID and precision/recall need them); ``kid``:
    (subset_size, subsets, seed) as the KID was computed; ``prc_neighborhood``: k of precision/recall;
    ``clip_scores`` / ``adherence``: per-image values ``[N]``. Returns intervals keyed ``fid``, ``kid``,
    ``precision``, ``recall``, ``clip_score``, ``adherence`` (those asked for; KID and precision/recall only
    where their matrices fit :data:`BOOTSTRAP_MAX_BYTES`, with a warning otherwise). Empty when ``options.replicates`` is 0."""
    if not options.replicates:
        return {}
    n = len(generated)
    fid = FrechetBootstrap(generated, reference_mu, reference_sigma, device)
    out = {"fid": bootstrap_interval(fid.replicate, n, options, "FID")}
    if kid is not None and reference_features is not None and _fits("KID", kid_bootstrap_bytes(n, kid[1]), n):
        out["kid"] = bootstrap_interval(KIDBootstrap(generated, reference_features, *kid, device=device).replicate,
                                        n, options, "KID")
    if prc_neighborhood is not None and reference_features is not None and _fits(
            "precision/recall", prc_bootstrap_bytes(n, len(reference_features)), n):
        prc = PrecisionRecallBootstrap(generated, reference_features, prc_neighborhood, device)
        pairs = [prc.replicate(idx) for idx in bootstrap_indices(n, options.replicates, options.seed)]
        point = prc.replicate(np.arange(n))
        for i, name in enumerate(("precision", "recall")):
            out[name] = normal_interval(point[i], [p[i] for p in pairs], options.level, _method(name, n, options))
    for name, values in (("clip_score", clip_scores), ("adherence", adherence)):
        if values is not None:
            per_image = np.asarray(values, dtype=np.float64)
            out[name] = bootstrap_interval(lambda idx, v=per_image: float(v[idx].mean()), n, options, name)
    return out


# --- across training seeds ---------------------------------------------------------------------------------


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` (> 0, may be fractional: Welch's) degrees of freedom
    (``scipy.stats.t``; ``df`` = inf: the normal quantile).

    Raises:
        ValueError: ``p`` outside (0, 1) or ``df`` <= 0.
    """
    from scipy import stats

    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(stats.norm.ppf(p) if math.isinf(df) else stats.t.ppf(p, df))


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval | None:
    """``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)`` over ``values`` (one per training seed; s with ddof 1), or
    None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean, s = statistics.fmean(values), statistics.stdev(values)
    se = s / math.sqrt(n)
    half = t_quantile((1 + level) / 2, n - 1) * se
    return Interval(mean - half, mean + half, level, f"t interval over {n} training seeds (df {n - 1})", se)


@dataclass(frozen=True)
class Difference:
    """``b - a`` of one metric between two arms, with its interval."""

    estimate: float
    interval: Interval
    df: float | None = None
    """Welch–Satterthwaite degrees of freedom (None: the bootstrap's normal approximation)."""

    @property
    def exceeds(self) -> bool:
        """True when the interval excludes 0: the arms differ beyond the spread of seeds / images."""
        return self.interval.excludes_zero

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``exceeds``."""
        return {"estimate": self.estimate, "interval": self.interval.to_dict(), "df": self.df,
                "exceeds": self.exceeds}


def welch_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(b) - mean(a) with Welch's t interval (unequal variances; Satterthwaite's degrees of freedom
    ``(va/na + vb/nb)² / ((va/na)²/(na-1) + (vb/nb)²/(nb-1))``), as ``scipy.stats.ttest_ind(b, a,
    equal_var=False)``. Two sets without spread give a zero-width interval.

    Raises:
        ValueError: an arm with fewer than 2 values.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's interval needs >= 2 values per arm, got {len(a)} and {len(b)}")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    d = statistics.fmean(b) - statistics.fmean(a)
    se = math.sqrt(va + vb)
    method = f"Welch t interval over training seeds ({len(a)} and {len(b)})"
    if se == 0:
        return Difference(d, Interval(d, d, level, method + ", no spread", 0.0), None)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * se
    return Difference(d, Interval(d - half, d + half, level, f"{method}, df {df:.2f}", se), df)


def bootstrap_difference(a: float, se_a: float, b: float, se_b: float, level: float = LEVEL) -> Difference:
    """``b - a`` of two independent estimates with bootstrap standard errors: ``d ± z · sqrt(se_a² + se_b²)``
    (normal approximation of the difference of two independent bootstrap distributions)."""
    se = math.hypot(se_a, se_b)
    half = statistics.NormalDist().inv_cdf((1 + level) / 2) * se
    d = b - a
    return Difference(d, Interval(d - half, d + half, level, "bootstrap over generated images (normal "
                                                             "approximation, independent arms)", se))


def seed_summary(values: Sequence[float], ses: Sequence[float | None], level: float = LEVEL) -> dict[str, Any]:
    """One arm's metric over its seeds: ``n``, ``mean``, ``std`` (ddof 1; None for one seed), ``interval`` (t over
    seeds; None for one seed) and ``bootstrap_se`` (the standard error of the mean from the runs' bootstrap
    standard errors, ``sqrt(Σ se²) / n``; None when a run has none)."""
    n = len(values)
    known = [s for s in ses if s is not None]
    return {"n": n, "values": list(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if n > 1 else None, "interval": t_interval(values, level),
            "bootstrap_se": math.sqrt(sum(s * s for s in known)) / n if known and len(known) == n else None}


def difference(a: Mapping[str, Any], b: Mapping[str, Any], level: float = LEVEL) -> Difference | None:
    """``b - a`` of two :func:`seed_summary` records: Welch across seeds when each arm has >= 2 seeds, else from
    the bootstrap standard errors; None when neither is available."""
    if a["n"] >= 2 and b["n"] >= 2:
        return welch_difference(a["values"], b["values"], level)
    if a["bootstrap_se"] is not None and b["bootstrap_se"] is not None:
        return bootstrap_difference(a["mean"], a["bootstrap_se"], b["mean"], b["bootstrap_se"], level)
    return None
