"""The wandb run of an evaluation (``fid`` / ``sweep`` on a training run): comparable across arms and linked to
the training run it scored.

One eval run per ``fid`` / ``sweep`` invocation, in the training run's project and group, ``job_type="eval"``,
in ``<run dir>/wandb/`` beside the training run's own files. What it holds:

- **config**: ``train_run_id`` (the training run's wandb id, ``<run dir>/wandb_id.txt``), the checkpoint's path
  and sha256 (the upsampler's too, when one was used), sampler(s), steps, N, extractor, resolution, scales and
  ``label``: :data:`RANDOM_FEATURES_LABEL` when the features were random, else ``""``.
- **step metrics**: one step per guidance scale with :data:`GUIDANCE_STEP` as the x axis of every ``eval/<metric>``
  (:data:`METRICS`), so FID, KID, precision/recall, CLIP score, adherence and FD_DINOv2 draw against the guidance
  scale, one line per eval run (arm); a metric's bootstrap interval adds ``eval/<metric>_lo`` and ``_hi``. A sweep
  over several samplers or step counts logs one step per result in increasing NFE instead, with :data:`NFE_STEP`
  as the x axis of ``eval/<sampler>/<metric>@<scale>``, so quality against model evaluations draws one line per
  sampler and scale. Summaries keep the best value (the minimum of
  FID, KID and FD_DINOv2, the maximum of CLIP score and adherence) and, for one setting, the per-scale keys
  ``eval/fid@<s>``, ``eval/kid@<s>`` … that earlier versions wrote.
- **the** ``eval/results`` **Table**: one row per result (:func:`result_row`): the named columns
  :data:`TABLE_COLUMNS`, then every other field of :meth:`ScaleResult.to_dict` flattened (``fid.label``,
  ``kid.subset_size``, interval fields …), so a field added to ``ScaleResult`` becomes a column without a change
  here. Plots from it: FID against CLIP score (where CLIP scores exist) and FID (and adherence) against NFE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from glide_lightning.evaluation.results import ScaleResult
from glide_lightning.runs import resolve_wandb_mode

log = logging.getLogger(__name__)

__all__ = ["GUIDANCE_STEP", "IMAGES_SEEN", "metric_name", "METRICS", "NFE_STEP", "RANDOM_FEATURES_LABEL", "RESULTS_TABLE", "TABLE_COLUMNS",
           "TrainingRun", "eval_run_name", "interval_values", "log_eval_run", "metric_values", "result_row",
           "sha256_file"]

IMAGES_SEEN = "trainer/images_seen"
"""The step metric (x axis) of a training run's ``train/*``, ``val/*`` and ``sys/*`` keys: training images seen."""
GUIDANCE_STEP = "eval/guidance_scale"
"""The step metric (x axis) of a one-setting evaluation's metrics."""
NFE_STEP = "eval/nfe"
"""The step metric of a sweep over samplers or step counts: network evaluations per image."""
RESULTS_TABLE = "eval/results"
"""The key of the results Table."""
RANDOM_FEATURES_LABEL = "NOT a real FID: random features"
"""The ``label`` of figures computed from random features (``--extractor random-conv``); ``""`` otherwise."""

Best = Literal["min", "max"]
METRICS: dict[str, Best] = {"fid": "min", "kid": "min", "kid_std": "min", "precision": "max", "recall": "max",
                            "clip_score": "max", "adherence": "max", "fd_dinov2": "min"}
"""The metrics logged per step (``eval/<name>``), each with the summary that means "best" for it."""
_SUMMARISED = ("fid", "kid", "fd_dinov2", "clip_score", "adherence")
"""The metrics whose best value goes into the summary (KID's std, precision and recall alone say little)."""

TABLE_COLUMNS = ("run", "checkpoint", "checkpoint_sha256", "sampler", "steps", "nfe", "guidance_scale", "n",
                 "resolution", "extractor", "label", *METRICS)
"""The named columns of ``eval/results``, in order; the flattened remaining fields of a result follow."""
_NAMED_FIELDS = {"guidance_scale", "n", "resolution", "sampler", "steps", "checkpoint", "nfe", "adherence", "fid.fid",
                 "fid.extractor_name", "kid.mean", "kid.std", "precision_recall.precision",
                 "precision_recall.recall", "clip_score.mean", "fd_dinov2.fid"}
"""``to_dict`` fields (flattened) already shown under a named column."""


def metric_name(key: str) -> str:
    """``key`` as ``define_metric`` must be given it: wandb reads a dot as nesting, so ``eval/fid@1.5`` unescaped
    would define ``eval/fid@1`` → ``5`` and leave the logged key without its step metric and summary."""
    return key.replace(".", "\\.")


def metric_values(r: ScaleResult) -> dict[str, float]:
    """The result's values of :data:`METRICS` that were measured (absent keys: not computed)."""
    values = {"fid": r.fid.fid, "precision": r.precision, "recall": r.recall, "adherence": r.adherence,
              "kid": r.kid.mean if r.kid is not None else None, "kid_std": r.kid.std if r.kid is not None else None,
              "clip_score": r.clip_score.mean if r.clip_score is not None else None,
              "fd_dinov2": r.fd_dinov2.fid if r.fd_dinov2 is not None else None}
    return {k: float(v) for k, v in values.items() if v is not None}


def interval_values(r: ScaleResult) -> dict[str, float]:
    """``<metric>_lo`` / ``<metric>_hi`` of every metric of :data:`METRICS` whose bootstrap interval the result
    holds (``<metric>_interval`` with ``lo`` and ``hi`` in :meth:`ScaleResult.to_dict`; none in older results)."""
    data = r.to_dict()
    bounds: dict[str, float] = {}
    for name in METRICS:
        interval = data.get(f"{name}_interval")
        if isinstance(interval, Mapping) and {"lo", "hi"} <= set(interval):
            bounds.update({f"{name}_lo": float(interval["lo"]), f"{name}_hi": float(interval["hi"])})
    return bounds


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in ``chunk_bytes`` pieces (a checkpoint of several GB never sits in memory).

    Raises:
        FileNotFoundError: no such file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingRun:
    """What an eval run takes from the training run's directory: its wandb identity and settings."""

    name: str
    project: str = "glide_lightning"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    wandb_mode: str = "auto"
    wandb_id: str | None = None
    """The training run's wandb id (``wandb_id.txt``); None when it never logged to wandb."""

    @classmethod
    def read(cls, run_dir: Path) -> TrainingRun:
        """From ``run_dir/config.yaml``'s ``run`` section and ``run_dir/wandb_id.txt`` (each optional: a run
        without them is named after its folder, in the default project, with no group and no link)."""
        config_file, id_file = run_dir / "config.yaml", run_dir / "wandb_id.txt"
        run = (yaml.safe_load(config_file.read_text()) or {}).get("run", {}) if config_file.is_file() else {}
        run = run or {}
        wandb_id = id_file.read_text().strip() if id_file.is_file() else ""
        return cls(name=run.get("name") or run_dir.name, project=run.get("project") or "glide_lightning",
                   group=run.get("group"), tags=list(run.get("tags") or []),
                   wandb_mode=run.get("wandb_mode") or "auto", wandb_id=wandb_id or None)


def _settings(results: Sequence[ScaleResult]) -> list[tuple[str, str]]:
    """The distinct (sampler, steps) settings of ``results``, in order."""
    return list(dict.fromkeys((r.sampler, r.steps) for r in results))


def eval_run_name(training: str, checkpoint: str, results: Sequence[ScaleResult]) -> str:
    """``<training run>-eval-<checkpoint stem>-<what>-n<N>-res<R>``: ``<what>`` is ``<sampler><steps>`` for one
    setting, ``nfe-<samplers>`` for a sweep over several."""
    first, settings = results[0], _settings(results)
    what = f"{first.sampler}{first.steps}" if len(settings) == 1 else \
        "nfe-" + "+".join(dict.fromkeys(s for s, _ in settings))
    return f"{training}-eval-{Path(checkpoint).stem}-{what}-n{first.n}-res{first.resolution}"


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b`` keys; a list of up to 8 numbers as ``key[i]`` (an interval reads as two numbers),
    any other list as JSON text (a Table cell holds one scalar)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            if len(value) <= 8 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                flat.update({f"{name}[{i}]": v for i, v in enumerate(value)})
            else:
                flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def result_row(r: ScaleResult, run: str, checkpoint: str, checkpoint_sha256: str | None) -> dict[str, Any]:
    """One ``eval/results`` row: :data:`TABLE_COLUMNS` (None where not measured), then every other field of
    ``r.to_dict()`` flattened (:func:`_flatten`)."""
    values = metric_values(r)
    row: dict[str, Any] = {"run": run, "checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256,
                           "sampler": r.sampler, "steps": r.steps, "nfe": r.nfe, "guidance_scale": r.guidance_scale,
                           "n": r.n, "resolution": r.resolution, "extractor": r.fid.extractor_name,
                           "label": RANDOM_FEATURES_LABEL if r.fid.random_weights else "",
                           **{name: values.get(name) for name in METRICS}}
    row.update({k: v for k, v in _flatten(r.to_dict()).items() if k not in _NAMED_FIELDS})
    return row


def _table_rows(results: Sequence[ScaleResult], run: str, checkpoint: str,
                sha: str | None) -> tuple[list[str], list[list[Any]]]:
    rows = [result_row(r, run, checkpoint, sha) for r in results]
    columns = list(dict.fromkeys(key for row in rows for key in row))  # named first, then the union of the rest
    return columns, [[row.get(c) for c in columns] for row in rows]


def _scale_key(scale: float) -> str:
    return f"{scale:g}"


def _per_scale_summary(results: Sequence[ScaleResult]) -> dict[str, Any]:
    """The keys earlier versions put in the summary: ``eval/<metric>@<s>`` and the setting's description."""
    summary: dict[str, Any] = {}
    for r in results:
        s = _scale_key(r.guidance_scale)
        for name, value in metric_values(r).items():
            summary[f"eval/{name}@{s}"] = value
    first = results[0]
    summary.update({"eval/n": first.n, "eval/resolution": first.resolution, "eval/sampler": first.sampler,
                    "eval/steps": first.steps, "eval/extractor": first.fid.extractor_name,
                    "eval/upsampler": first.upsampled() or "none", "eval/fid_label": first.fid.label,
                    "eval/fd_dinov2_label": first.fd_dinov2.label if first.fd_dinov2 is not None
                    else first.fd_dinov2_reason or "not computed"})
    return summary


def _guidance_steps(results: Sequence[ScaleResult]) -> tuple[dict[str, Best | None], list[dict[str, float]]]:
    """One setting: ``eval/<metric>`` per guidance scale (scales in increasing order)."""
    metrics: dict[str, Best | None] = {}
    steps = []
    for r in sorted(results, key=lambda r: r.guidance_scale):
        values = {**metric_values(r), **interval_values(r)}
        for name in values:
            metrics[f"eval/{name}"] = METRICS[name] if name in _SUMMARISED else None
        steps.append({GUIDANCE_STEP: r.guidance_scale, **{f"eval/{k}": v for k, v in values.items()}})
    return metrics, steps


def _nfe_steps(results: Sequence[ScaleResult]) -> tuple[dict[str, Best | None], list[dict[str, float]]]:
    """Several samplers or step counts: ``eval/<sampler>/<metric>@<s>`` per result, in increasing NFE."""
    metrics: dict[str, Best | None] = {}
    steps = []
    for r in sorted(results, key=lambda r: (r.nfe or 0, r.sampler, r.guidance_scale)):
        prefix, s = f"eval/{r.sampler}/", _scale_key(r.guidance_scale)
        values = {**metric_values(r), **interval_values(r)}
        for name in values:
            metrics[f"{prefix}{name}@{s}"] = METRICS[name] if name in _SUMMARISED else None
        steps.append({NFE_STEP: r.nfe or 0, **{f"{prefix}{k}@{s}": v for k, v in values.items()}})
    return metrics, steps


def _plots(wandb: Any, table: Any, results: Sequence[ScaleResult]) -> dict[str, Any]:
    """Charts from the results Table, where its data exist: FID against CLIP score, and for several settings
    FID (and adherence) against NFE, one line per sampler and scale."""
    plots: dict[str, Any] = {}
    fake = " (NOT real FIDs: random features)" if results[0].fid.random_weights else ""
    if all(r.clip_score is not None for r in results):
        plots["eval/fid_vs_clip_score"] = wandb.plot.scatter(table, "clip_score", "fid",
                                                             title=f"FID vs CLIP score{fake}")
    if len(_settings(results)) > 1 and all(r.nfe is not None for r in results):
        lines = wandb.Table(columns=["series", "nfe", "fid", "adherence"],
                            data=[[f"{r.sampler}, s={_scale_key(r.guidance_scale)}", r.nfe, r.fid.fid, r.adherence]
                                  for r in sorted(results, key=lambda r: (r.sampler, r.guidance_scale, r.nfe))])
        plots["eval/fid_vs_nfe"] = wandb.plot.line(lines, "nfe", "fid", stroke="series", title=f"FID vs NFE{fake}")
        if all(r.adherence is not None for r in results):
            plots["eval/adherence_vs_nfe"] = wandb.plot.line(lines, "nfe", "adherence", stroke="series",
                                                             title="adherence vs NFE")
    return plots


def log_eval_run(run_dir: Path, results: Sequence[ScaleResult], checkpoint: str, *, command: str = "fid",
                 upsampler: str | None = None) -> str:
    """Log ``results`` (one ``fid`` / ``sweep`` invocation on the training run ``run_dir``) to a new wandb run
    with ``job_type="eval"`` in the training run's project and group (see the module docstring for what it holds).

    Args:
        run_dir: the training run's directory (``config.yaml``, ``wandb_id.txt``); the eval run's files go to
            ``run_dir/wandb/``.
        results: every result of the invocation, non-empty (several samplers or step counts: an NFE sweep).
        checkpoint: the evaluated checkpoint file (its sha256 is streamed from it; a name that is not a file
            gets ``None``).
        command: ``fid`` or ``sweep``, recorded in the config.
        upsampler: the upsampler checkpoint file, when the cascade was evaluated (hashed the same way).

    Returns:
        The eval run's wandb id.

    Raises:
        ValueError: ``results`` is empty.
    """
    import wandb

    if not results:
        raise ValueError("log_eval_run needs at least one result")
    def hash_file(path: str) -> str | None:
        return sha256_file(path) if Path(path).is_file() else None

    training = TrainingRun.read(run_dir)
    first, settings = results[0], _settings(results)
    sha = hash_file(checkpoint)
    config = {"train_run_id": training.wandb_id, "train_run": training.name, "command": command,
              "checkpoint": str(checkpoint), "checkpoint_sha256": sha, "weights": first.checkpoint,
              "sampler": first.sampler if len(settings) == 1 else [s for s, _ in settings],
              "steps": first.steps if len(settings) == 1 else [steps for _, steps in settings],
              "samplers": sorted({s for s, _ in settings}), "settings": [f"{s}{steps}" for s, steps in settings],
              "n": first.n, "resolution": first.resolution, "extractor": first.fid.extractor_name,
              "random_features": first.fid.random_weights,
              "label": RANDOM_FEATURES_LABEL if first.fid.random_weights else "", "fid_label": first.fid.label,
              "guidance_scales": sorted({r.guidance_scale for r in results}), "reference": first.reference,
              "upsampler": str(upsampler) if upsampler else None,
              "upsampler_sha256": hash_file(upsampler) if upsampler else None}
    nfe_sweep = len(settings) > 1
    step_metric = NFE_STEP if nfe_sweep else GUIDANCE_STEP
    metrics, steps = (_nfe_steps if nfe_sweep else _guidance_steps)(results)
    run = wandb.init(project=training.project, group=training.group, job_type="eval",
                     name=eval_run_name(training.name, checkpoint, results), dir=str(run_dir),
                     tags=training.tags or None, mode=resolve_wandb_mode(training.wandb_mode),
                     config=config, reinit="create_new")
    try:
        run.define_metric(step_metric, hidden=False)
        for key, best in metrics.items():
            run.define_metric(metric_name(key), step_metric=step_metric, **({"summary": best} if best else {}))
        for step in steps:
            run.log(step)
        columns, data = _table_rows(results, training.name, str(checkpoint), sha)
        table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
        run.log({RESULTS_TABLE: table, **_plots(wandb, table, results)})
        if not nfe_sweep:
            run.summary.update(_per_scale_summary(results))
        run_id = run.id
    finally:
        run.finish()
    log.info("eval run %s logged to wandb (training run %s)", run_id, training.wandb_id or "unknown")
    return run_id

