"""The zero-shot evaluation's result record (:class:`ScaleResult`, one per guidance scale) and the one
pair of functions that write and read it (``<out>/results.json``): the FID harness writes it, the
sweep table, the wandb summary and the ablation report read it.

``results.json`` is ``{"format": ..., "results": [<ScaleResult as a dict>, ...], "sampling": {...}}``;
files written before the format was named (no ``format`` key, same fields) read the same, and so do files
written before KID, precision/recall and FD_DINOv2 were recorded (those fields then read as None), and files written
before the bootstrap intervals (``<metric>_interval``, :mod:`glide_lightning.evaluation.uncertainty`) were
recorded (no intervals then).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glide_lightning.evaluation.clip_score import CLIPScoreResult
from glide_lightning.evaluation.fid import FIDResult
from glide_lightning.evaluation.kid_prc import KIDResult, PrecisionRecallResult
from glide_lightning.evaluation.uncertainty import Interval

__all__ = ["INTERVAL_METRICS", "RESULTS_FORMAT", "ScaleResult", "read_results", "write_results"]

INTERVAL_METRICS = ("fid", "kid", "precision", "recall", "clip_score", "adherence", "fd_dinov2")
"""The metrics a :class:`ScaleResult` holds a value of (:meth:`ScaleResult.value`) and, when bootstrapped, an
interval of (``<metric>_interval``)."""

RESULTS_FORMAT = "glide_lightning.fid_results/1"


@dataclass(frozen=True)
class ScaleResult:
    """What was measured at one guidance scale, and how."""

    guidance_scale: float
    """Classifier-free guidance scale s of the generated images."""
    n: int
    """Generated images (one per held-out caption)."""
    resolution: int
    """Side in pixels at which generated and reference images were compared."""
    sampler: str
    """``ddpm``, ``ddim``, ``dpmpp_2m`` or ``unipc``."""
    steps: str
    """Sampling steps as a respacing (``"100"``, ``"ddim50"``…)."""
    checkpoint: str
    """The sampled weights (:attr:`glide_lightning.sampling.SamplingModel.source`)."""
    fid: FIDResult
    """The FID and its provenance (``fid.label`` says whether it is a real Inception FID)."""
    reference: str = ""
    """Directory of the reference images."""
    clip_score: CLIPScoreResult | None = None
    """Mean CLIP score of (image, caption) pairs (None: not measured)."""
    adherence: float | None = None
    """Fraction of caption attributes visible in the images (synthetic captions only; None otherwise)."""
    nfe: int | None = None
    """Network evaluations per image of the base model (a guided step counts two; None: results written
    before it was recorded)."""
    upsampler: str | None = None
    """The upsampler that took the base samples to ``resolution`` (its :attr:`SamplingModel.source`: path and
    weights, ours or glide-text2im's); None: the base model's own output."""
    upsample_steps: str | None = None
    """The upsampler's respacing (``fast27``…), with ``upsampler``."""
    upsample_temp: float | None = None
    """The scale of the upsampler's initial noise (GLIDE: 0.997), with ``upsampler``."""
    upsample_sampler: str | None = None
    """The upsampler stage's sampler (``ddim``: glide-text2im's text-to-image pipeline; ``ddpm``), with
    ``upsampler``; None in results written before it was recorded (those ran ``ddpm``)."""
    kid: KIDResult | None = None
    """KID (mean and std over random subsets) from the same features as ``fid`` (None: not computed)."""
    precision_recall: PrecisionRecallResult | None = None
    """Precision and recall (k-NN manifolds) from the same features as ``fid`` (None: not computed)."""
    fd_dinov2: FIDResult | None = None
    """The Fréchet distance of DINOv2 features (None: not computed, ``fd_dinov2_reason`` says why)."""
    fd_dinov2_reason: str | None = None
    """Why ``fd_dinov2`` is None (no DINOv2 weights given); None when it was computed, or in results written
    before FD_DINOv2 existed."""
    fid_interval: Interval | None = None
    """Percentile bootstrap interval of the FID over the generated images (reference fixed); None: not computed
    (``--bootstrap 0``, or results written before intervals were recorded). The same for the fields below."""
    kid_interval: Interval | None = None
    """Bootstrap interval of the KID's mean (the subsets drawn as for ``kid``)."""
    precision_interval: Interval | None = None
    """Bootstrap interval of the precision."""
    recall_interval: Interval | None = None
    """Bootstrap interval of the recall."""
    clip_score_interval: Interval | None = None
    """Bootstrap interval of the mean CLIP score."""
    adherence_interval: Interval | None = None
    """Bootstrap interval of the adherence."""
    fd_dinov2_interval: Interval | None = None
    """Bootstrap interval of FD_DINOv2."""

    def value(self, metric: str) -> float | None:
        """The point value of one of :data:`INTERVAL_METRICS` (KID: its mean over subsets; None: not computed)."""
        return {"fid": self.fid.fid, "kid": self.kid.mean if self.kid is not None else None,
                "precision": self.precision, "recall": self.recall,
                "clip_score": self.clip_score.mean if self.clip_score is not None else None,
                "adherence": self.adherence,
                "fd_dinov2": self.fd_dinov2.fid if self.fd_dinov2 is not None else None}[metric]

    def interval(self, metric: str) -> Interval | None:
        """The bootstrap interval of one of :data:`INTERVAL_METRICS` (None: not computed)."""
        return getattr(self, f"{self._check(metric)}_interval")

    def with_intervals(self, intervals: Mapping[str, Interval]) -> ScaleResult:
        """This record with the given ``{metric: interval}`` set (other intervals kept)."""
        return dataclasses.replace(self, **{f"{self._check(name)}_interval": value
                                            for name, value in intervals.items()})

    @staticmethod
    def _check(metric: str) -> str:
        """``metric`` itself. Raises ``KeyError`` unless it is one of :data:`INTERVAL_METRICS`."""
        if metric not in INTERVAL_METRICS:
            raise KeyError(f"unknown metric {metric!r}: one of {', '.join(INTERVAL_METRICS)}")
        return metric

    @property
    def precision(self) -> float | None:
        """``precision_recall.precision`` (None: not computed)."""
        return None if self.precision_recall is None else self.precision_recall.precision

    @property
    def recall(self) -> float | None:
        """``precision_recall.recall`` (None: not computed)."""
        return None if self.precision_recall is None else self.precision_recall.recall

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, nested as in ``results.json`` (``nfe``, the upsampler's fields, ``kid`` and
        ``precision_recall`` only when known: an older record written again stays the same record;
        ``fd_dinov2`` is written, null with its ``fd_dinov2_reason``, whenever either is known)."""
        data = dataclasses.asdict(self)
        for key in ("nfe", "upsampler", "upsample_steps", "upsample_temp", "upsample_sampler", "kid",
                    "precision_recall", "fd_dinov2_reason", *(f"{m}_interval" for m in INTERVAL_METRICS)):
            if data[key] is None:
                del data[key]
        if self.fd_dinov2 is None and self.fd_dinov2_reason is None:
            del data["fd_dinov2"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScaleResult:
        """The record of :meth:`to_dict` (unknown keys are ignored). Raises ``KeyError`` naming a missing field."""
        clip, kid, prc, dino = (data.get(key) for key in ("clip_score", "kid", "precision_recall", "fd_dinov2"))
        return cls(guidance_scale=float(data["guidance_scale"]), n=int(data["n"]), resolution=int(data["resolution"]),
                   sampler=data["sampler"], steps=str(data["steps"]), checkpoint=data["checkpoint"],
                   fid=_record(FIDResult, data["fid"], "fid"), reference=data.get("reference", ""),
                   clip_score=None if clip is None else _record(CLIPScoreResult, clip, "clip_score"),
                   adherence=data.get("adherence"), nfe=data.get("nfe"), upsampler=data.get("upsampler"),
                   upsample_steps=data.get("upsample_steps"), upsample_temp=data.get("upsample_temp"),
                   upsample_sampler=data.get("upsample_sampler"),
                   kid=None if kid is None else _record(KIDResult, kid, "kid"),
                   precision_recall=None if prc is None else _record(PrecisionRecallResult, prc, "precision_recall"),
                   fd_dinov2=None if dino is None else _record(FIDResult, dino, "fd_dinov2"),
                   fd_dinov2_reason=data.get("fd_dinov2_reason"),
                   **{f"{m}_interval": Interval.from_dict(data[f"{m}_interval"]) for m in INTERVAL_METRICS
                      if data.get(f"{m}_interval") is not None})

    def summary_line(self) -> str:
        """One line: the scale, FID, KID, precision/recall, FD_DINOv2, CLIP score and adherence, and the FID's
        label (which says whether the features were real; KID and precision/recall share them); the FID's bootstrap
        interval where computed."""
        parts = [f"guidance {self.guidance_scale:g}: FID {self.fid.fid:.2f}"
                 + (f" {self.fid_interval.format('.2f')}" if self.fid_interval is not None else "")]
        if self.kid is not None:
            parts.append(f"KID {self.kid.mean:.4f} ± {self.kid.std:.4f}")
        if self.precision_recall is not None:
            parts.append(f"precision {self.precision_recall.precision:.3f}, recall {self.precision_recall.recall:.3f}")
        if self.fd_dinov2 is not None:
            parts.append(f"FD_DINOv2 {self.fd_dinov2.fid:.2f}" + (" (random DINOv2 weights)"
                                                                  if self.fd_dinov2.random_weights else ""))
        if self.clip_score is not None:
            parts.append(f"CLIP score {self.clip_score.mean:.2f}"
                         + (" (random CLIP weights)" if self.clip_score.random_weights else ""))
        if self.adherence is not None:
            parts.append(f"adherence {self.adherence:.3f}")
        return ", ".join(parts) + f"  [{self.fid.label}]" + (f" {self.upsampled()}" if self.upsampler else "")

    def upsampled(self) -> str:
        """Which upsampler, steps and temperature made the images ('' for base-model images)."""
        if self.upsampler is None:
            return ""
        sampler = f"{self.upsample_sampler} " if self.upsample_sampler else ""
        return (f"upsampled by {self.upsampler}, {sampler}{self.upsample_steps} steps, temperature "
                f"{self.upsample_temp:g}")


def _record(cls: type, data: Mapping[str, Any], where: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [name for name in names if name not in data]
    if missing:
        raise KeyError(f"{where} lacks {', '.join(missing)}")
    return cls(**{name: data[name] for name in names})


def write_results(path: Path, results: Sequence[ScaleResult], sampling: Mapping[str, Any] | None = None) -> Path:
    """Write ``results`` (and the sampling settings they were made with) to ``path`` as JSON."""
    payload = {"format": RESULTS_FORMAT, "results": [r.to_dict() for r in results], "sampling": dict(sampling or {})}
    path.write_text(json.dumps(payload, indent=1))
    return path


def read_results(path: Path) -> list[ScaleResult]:
    """The records of a ``results.json`` (this format or the unnamed one before it).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, another format, or a record missing a field (named, with its index).
    """
    if not path.is_file():
        raise FileNotFoundError(f"FID results not found: {path} (python -m glide_lightning fid writes them)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise ValueError(f"{path} is not an FID results file (expected a 'results' list)")
    found = payload.get("format", RESULTS_FORMAT)
    if found != RESULTS_FORMAT:
        raise ValueError(f"{path} has format {found!r}; this version reads {RESULTS_FORMAT!r}")
    records = []
    for i, data in enumerate(payload["results"]):
        try:
            records.append(ScaleResult.from_dict(data))
        except KeyError as e:
            raise ValueError(f"{path}: result {i} lacks a field: {e.args[0]}") from e
    return records
