"""``python -m glide_lightning compare runs/a runs/b --out reports/a_vs_b.md``: an ablation report built
from the runs' own files (CSV metrics, saved config, FID results), so it needs no wandb server.

The report has one table (FID and CLIP score per guidance scale, final train and validation losses,
steps, images seen, wall time) and two plots (loss curves; FID against guidance scale). The options
are the fields of :class:`CompareCommand`, parsed by the front door, :mod:`glide_lightning.commands`.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glide_lightning.diffusion.config import modern_loss_spelling
from glide_lightning.evaluation.results import ScaleResult, read_results
from glide_lightning.outputs import OutputFolder
from glide_lightning.sampling.inputs import RUN_HINT, input_path

log = logging.getLogger(__name__)

SMOOTH = 0.1  # the final train loss is the mean over the last 10 % of its logged steps (it is noisy)
REPORT_PLOTS = ("losses", "fid", "training_metrics")
"""The plots a report ``<stem>.md`` may have beside it: ``<stem>_<plot>.png`` (:func:`plot_path`)."""


def plot_path(out: Path, plot: str) -> Path:
    """Where the report ``out`` keeps its plot ``plot`` (one of :data:`REPORT_PLOTS`)."""
    return out.with_name(f"{out.stem}_{plot}.png")


def report_output(out: Path) -> OutputFolder:
    """The files of the report ``out`` in its folder, which other reports share: the report and its plots."""
    names = [out.name] + [plot_path(out, plot).name for plot in REPORT_PLOTS]
    return OutputFolder(out.parent, "compare", tuple(re.escape(name) for name in names), shared=True,
                        label=f"the folder of --out {out}")


@dataclass
class RunSummary:
    """What a run's directory says about it."""

    name: str
    path: Path
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, list[ScaleResult]] = field(default_factory=dict)
    """FID results by evaluation setting (the name of their folder under ``fid/``)."""

    def final(self, key: str, smooth: float = 0.0) -> float | None:
        points = self.curves.get(key, [])
        if not points:
            return None
        tail = points[-max(1, math.ceil(len(points) * smooth)):] if smooth else points[-1:]
        return sum(v for _, v in tail) / len(tail)

    @functools.cached_property
    def _last_checkpoint(self) -> dict[str, Any] | None:
        """``checkpoints/last.ckpt`` memory-mapped (read once: steps and images seen both come from it)."""
        last = self.path / "checkpoints" / "last.ckpt"
        if not last.exists():
            return None
        import torch

        return torch.load(last, map_location="cpu", weights_only=True, mmap=True)

    @property
    def steps(self) -> int:
        """Optimizer steps: from the last checkpoint, else from the metrics (logged 0-based)."""
        checkpoint = self._last_checkpoint
        if checkpoint is not None:
            return int(checkpoint["global_step"])
        return 1 + max((s for points in self.curves.values() for s, _ in points), default=-1)

    @property
    def images_seen(self) -> int | None:
        """Training images seen: the last checkpoint's counter (``ImagesSeen``, right across a resume that changed
        the batch size), else optimizer steps × batch size × devices × nodes × gradient accumulation of the saved
        config (a checkpoint from before the counter)."""
        checkpoint = self._last_checkpoint
        counter = (checkpoint or {}).get("callbacks", {}).get("ImagesSeen")
        if counter is not None:
            return int(counter["count"])
        data, trainer = self.config.get("data", {}), self.config.get("trainer", {})
        devices = trainer.get("devices")
        devices = devices if isinstance(devices, int) and devices > 0 else 1
        batch = data.get("batch_size")
        if batch is None:
            return None
        return self.steps * batch * devices * (trainer.get("num_nodes") or 1) * (trainer.get("accumulate_grad_batches") or 1)


def load_run(path: str | Path) -> RunSummary:
    """Read ``csv/version_*/metrics.csv`` (all sessions of a resumed run), ``config.yaml`` and
    ``fid/*/results.json`` of a run directory."""
    run_dir = Path(path)
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files and not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml and no csv/version_*/metrics.csv: is it a "
                                f"glide_lightning run directory?")
    if not files:  # a run shorter than its trainer.log_every_n_steps logged nothing: its losses are left blank
        log.warning("%s logged no training metrics (fewer steps than trainer.log_every_n_steps?): its losses are "
                    "left blank in the report", run_dir)
    summary = RunSummary(run_dir.name, run_dir)
    for file in files:
        with file.open() as f:
            for row in csv.DictReader(f):
                step = int(row.get("step") or 0)
                for key, value in row.items():
                    if value not in (None, "") and key not in ("step", "epoch"):
                        summary.curves.setdefault(key, []).append((step, float(value)))
    for points in summary.curves.values():  # a resumed run repeats steps after its checkpoint: keep the later
        deduped = dict(points)
        points[:] = sorted(deduped.items())
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        summary.config = yaml.safe_load(config_file.read_text()) or {}
        summary.name = summary.config.get("run", {}).get("name", summary.name)
    for results in sorted(run_dir.glob("fid/*/results.json")):
        summary.evals[results.parent.name] = read_results(results)
    return summary


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _plot_curves(runs: list[RunSummary], keys: tuple[str, ...], out: Path) -> Path | None:
    """One panel per key with a curve per run (log scale for losses); None when no run logged any key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = tuple(k for k in keys if any(run.curves.get(k) for run in runs))
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run in runs:
            points = run.curves.get(key, [])
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=run.name,
                        marker="o" if len(points) < 20 else None)
        ax.set_title(key), ax.set_xlabel("step"), ax.legend()
        if "loss" in key or "vb" in key or "mse" in key:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_evals(runs: list[RunSummary], out: Path) -> Path | None:
    """FID (and adherence where scored) against the guidance scale, a line per run and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [(run.name, setting, r) for run in runs for setting, rs in run.evals.items() for r in rs]
    if not results:
        return None
    panels = [("FID", lambda r: r.fid.fid)]
    if any(r.adherence is not None for _, _, r in results):
        panels.append(("adherence", lambda r: r.adherence))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, value) in zip(axes[0], panels):
        for name, setting in sorted({(n, s) for n, s, _ in results}):
            points = sorted((r.guidance_scale, value(r)) for n, s, r in results
                            if (n, s) == (name, setting) and value(r) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{name} · {setting}")
        ax.set_xlabel("guidance scale"), ax.set_ylabel(title), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _loss(diffusion: dict[str, Any]) -> str:
    """The loss trained, from a run's ``model.diffusion`` settings in either spelling: ``hybrid``, ``simple + p2``…"""
    if "loss_type" not in diffusion:
        return "?"
    spelled = modern_loss_spelling(diffusion)
    return spelled["loss_type"] + ("" if spelled["weighting"] == "none" else f" + {spelled['weighting']}")


def write_report(runs: list[RunSummary], out: Path, preamble: Sequence[str] = ()) -> Path:
    """The markdown report and its plots beside it (``<out stem>_losses.png``: train/val loss and the
    vb term; ``<out stem>_fid.png``: FID and adherence against the guidance scale; ``<out
    stem>_training_metrics.png``: metrics logged during training by ``GenerationMetrics``, if any).

    Tables: one row per run (loss, variance, steps, images seen, wall time, final losses and vb term,
    in bits per dimension), then one row per run, evaluation setting (sampler and steps, the folder
    name under ``fid/``) and guidance scale (FID with its label, CLIP score, adherence, then KID as mean ± std,
    precision, recall and FD_DINOv2, '–' where not computed), each value followed by its bootstrap interval over the
    generated images ``[lo, hi]`` where ``results.json`` has one. ``preamble``: lines after the title (the
    ablation command's comparison across seeds, :func:`ablation_lines`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Ablation: {' vs '.join(run.name for run in runs)}", "", *preamble,
             "Built from each run's `csv/`, `config.yaml` and `fid/*/results.json`. Final train terms: mean of the "
             f"last {SMOOTH:.0%} of logged steps; validation terms: the last validation (fixed timesteps and "
             "noise). loss: the objective trained (the MSE term with its weighting, e.g. min-SNR, plus λ·vb for "
             "hybrid); mse: the unweighted MSE term, comparable across arms; vb: the variational bound term in bits "
             "per dimension (learned-variance runs only).",
             "", "| run | loss | variance | prediction | steps | images seen | wall time | train loss | train vb | "
             "val loss | val mse | val vb |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        diffusion = run.config.get("model", {}).get("diffusion", {})
        cells = [run.name, _loss(diffusion), diffusion.get("variance_type", "?"),
                 diffusion.get("prediction", "eps"), str(run.steps), _fmt(run.images_seen, 12),
                 _duration(run.final("train/wall_time_s")), _fmt(run.final("train/loss", SMOOTH)),
                 _fmt(run.final("train/vb", SMOOTH)), _fmt(run.final("val/loss")), _fmt(run.final("val/mse")),
                 _fmt(run.final("val/vb"))]
        lines.append("| " + " | ".join(cells) + " |")
    labels = set()
    evals = [(run.name, setting, r) for run in runs for setting, results in sorted(run.evals.items())
             for r in sorted(results, key=lambda r: r.guidance_scale)]
    if evals:
        lines += ["", "| run | setting | guidance | NFE | FID | CLIP score | adherence | KID | precision | recall | "
                  "FD_DINOv2 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, setting, r in evals:
            labels.add(r.fid.label.split(":")[0])
            if r.kid is not None and r.kid.random_weights:
                labels.add("NOT a real KID or precision/recall (random feature extractor)")
            if r.fd_dinov2 is not None:
                labels.add(r.fd_dinov2.label.split(":")[0] if r.fd_dinov2.random_weights
                           else f"FD_DINOv2: {r.fd_dinov2.extractor_name} features")
            setting = f"{setting} ({r.upsampled()})" if r.upsampler else setting
            kid = "–" if r.kid is None else f"{r.kid.mean:.4f} ± {r.kid.std:.4f}{_ci(r, 'kid', '.4f')}"
            lines.append(f"| {name} | {setting} | {r.guidance_scale:g} | {r.nfe if r.nfe is not None else '–'} | "
                         f"{r.fid.fid:.2f}{_ci(r, 'fid', '.2f')} | {_cell(r, 'clip_score', 3)} | "
                         f"{_cell(r, 'adherence', 3)} | {kid} | {_cell(r, 'precision', 3)} | {_cell(r, 'recall', 3)} | "
                         f"{_cell(r, 'fd_dinov2', 4)} |")
        if any(r.fid_interval is not None for _, _, r in evals):
            level = next(r.fid_interval.level for _, _, r in evals if r.fid_interval is not None)
            lines += ["", f"[lo, hi]: {level:.0%} bootstrap interval over each run's generated images (value ± z·se) "
                          "(reference fixed; `results.json` says how many replicates and the seed)."]
        lines += ["", f"Images per setting and scale: {', '.join(sorted({str(r.n) for _, _, r in evals}))}."]
        lines += [f"> {label}" for label in sorted(labels)]
    plots = [("losses", _plot_curves(runs, ("train/loss", "val/loss", "train/vb"), plot_path(out, "losses"))),
             ("FID and adherence vs guidance", _plot_evals(runs, plot_path(out, "fid")))]
    during = tuple(sorted({k for run in runs for k in run.curves if k.startswith(("val/adherence@", "val/fid@"))}))
    plots.append(("during training", _plot_curves(runs, during, plot_path(out, "training_metrics"))))
    lines += [f"\n![{title}]({path.name})" for title, path in plots if path is not None]
    out.write_text("\n".join(lines) + "\n")
    return out


def _ci(r: ScaleResult, metric: str, spec: str) -> str:
    """`` [lo, hi]`` of a result's bootstrap interval for ``metric`` ('' when not computed)."""
    interval = r.interval(metric)
    return "" if interval is None else f" [{interval.lo:{spec}}, {interval.hi:{spec}}]"


def _cell(r: ScaleResult, metric: str, digits: int) -> str:
    """A metric's value (``digits`` significant digits) and its bootstrap interval; '–' when not computed."""
    value = r.value(metric)
    return "–" if value is None else _fmt(value, digits) + _ci(r, metric, f".{digits}g")


METRIC_NAMES = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall", "clip_score": "CLIP score",
                "adherence": "adherence", "fd_dinov2": "FD_DINOv2"}


def _interval_text(interval: Any, digits: int = 4) -> str:
    """``[lo, hi]`` of an :class:`~glide_lightning.evaluation.uncertainty.Interval` or its dict; '' for None."""
    if interval is None:
        return ""
    lo, hi = (interval["lo"], interval["hi"]) if isinstance(interval, dict) else (interval.lo, interval.hi)
    return f" [{lo:.{digits}g}, {hi:.{digits}g}]"


def ablation_lines(summary: dict[str, Any]) -> list[str]:
    """The comparison across seeds of :func:`glide_lightning.evaluation.ablation.summarize` as markdown: per
    evaluation setting, guidance scale and metric, each arm's mean ± std over seeds with its t interval (one seed:
    the value with its bootstrap interval over generated images) and each arm's difference from the baseline with
    its interval, and whether the difference exceeds it (the interval excludes 0)."""
    arms, baseline = list(summary["arms"]), summary["baseline"]
    others = arms[1:]
    level = f"{summary['confidence']:.0%}"
    lines = [f"## Across training seeds: {', '.join(arms)} × seeds {', '.join(map(str, summary['seeds']))}", "",
             f"Group `{summary['group']}` (experiments: "
             + "; ".join(f"{arm}: {', '.join(configs)}" for arm, configs in summary["arms"].items())
             + f"), evaluated with {summary['eval'] or 'the sweep defaults'} on {', '.join(map(str, summary['n']))} "
             f"generated images per scale. Per arm: mean ± std over seeds [{level} t interval over seeds]; with one "
             f"seed, the value [{level} bootstrap interval over its generated images, value ± z·se]. Difference: arm − "
             f"{baseline} [{level} interval: Welch over seeds when both arms have ≥ 2 seeds, else from the runs' "
             "bootstrap standard errors]; **yes** when the interval excludes 0 (the arms differ beyond the spread: with one "
             "seed per arm, beyond the spread of the generated images only, not that of training seeds).",
             "", "| setting | guidance | metric | " + " | ".join(arms) + " | "
             + " | ".join(f"{arm} − {baseline} | exceeds?" for arm in others) + " |",
             "|---|---:|---|" + "---:|" * len(arms) + "---:|---|" * len(others)]
    for row in summary["rows"]:
        cells = []
        for arm in arms:
            s = row["arms"][arm]
            if s["n"] >= 2:
                cells.append(f"{s['mean']:.4g} ± {s['std']:.2g}{_interval_text(s['interval'])}")
            else:
                cells.append(f"{s['mean']:.4g}{_interval_text((s.get('bootstrap') or [None])[0])}")
        for arm in others:
            d = row["differences"].get(arm)
            cells += ["–", "–"] if d is None else [f"{d['estimate']:+.3g}{_interval_text(d['interval'], 3)}",
                                                  "**yes**" if d["exceeds"] else "no"]
        lines.append(f"| {row['setting']} | {row['guidance']:g} | {METRIC_NAMES[row['metric']]} | "
                     + " | ".join(cells) + " |")
    lines += [f"> {label}" for label in summary.get("labels", [])]
    return lines + [""]


def write_ablation_report(summary: dict[str, Any], runs: list[RunSummary], out: Path) -> Path:
    """The ablation command's report: :func:`ablation_lines`, then :func:`write_report`'s per-run tables and plots."""
    return write_report(runs, out, preamble=ablation_lines(summary))


@dataclass
class CompareCommand:
    """An ablation report from the runs' own files: one table (FID and CLIP score per guidance scale,
    final losses, steps, images seen, wall time) and two plots."""

    runs: list[str] = field(metadata=input_path(RUN_HINT, run_folders=True))
    """Run directories (``runs/<name>``), e.g. ``--runs '[runs/minig_simple, runs/minig_hybrid]'``."""
    out: str = "reports/report.md"
    """The markdown file to write, its plots beside it (``<stem>_losses.png``, ``<stem>_fid.png``,
    ``<stem>_training_metrics.png``). When any of these exists already, the report is refused (an earlier
    report's plot would sit beside this one): pass ``--overwrite true`` or another ``--out``. Other files in
    its folder (other reports) are never touched."""
    overwrite: bool = False
    """Replace an earlier report at ``--out``: the report and all its plots are deleted first."""
    publish: bool = False
    """Also publish the report as a wandb Report (the ``reports`` extra, ``wandb-workspaces``) in the runs' wandb
    project, its panels over their wandb group, when wandb is online (an API key configured); offline, say how to
    publish it later. The markdown report is written either way."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("runs is empty: pass --runs '[runs/<name>, ...]'")

    def check_outputs(self) -> None:
        """Refuse an earlier report at ``--out`` unless ``overwrite`` (:class:`~glide_lightning.outputs.OutputNotEmpty`)."""
        report_output(Path(self.out)).check(self.overwrite)

    def run(self) -> Path:
        """Write the report (an earlier one at ``--out`` is refused first unless ``overwrite``), then publish it
        with ``publish``."""
        output = report_output(Path(self.out))
        self.check_outputs()
        runs = [load_run(r) for r in self.runs]
        output.claim(self.overwrite)
        out = write_report(runs, Path(self.out))
        print(f"wrote {out}")
        if self.publish:
            print(publish(out, self.runs, f"python -m glide_lightning compare --runs '[{', '.join(self.runs)}]' "
                                          f"--out {self.out} --overwrite true --publish true"))
        return out


def publish(report: Path, run_dirs: list[str], rerun: str) -> str:
    """Publish the markdown ``report`` of the runs ``run_dirs`` as a wandb Report in the first run's wandb project,
    over its wandb group (:func:`~glide_lightning.evaluation.wandb_report.publish_report`, which also names the mode
    rules); returns its URL, or offline the line saying how to publish it later (``rerun``: the command to run then)."""
    from glide_lightning.evaluation.wandb_report import publish_report

    config_file = Path(run_dirs[0]) / "config.yaml"
    run = (yaml.safe_load(config_file.read_text()) or {}).get("run") or {} if config_file.is_file() else {}
    markdown = report.read_text()
    title = next((line[2:].strip() for line in markdown.splitlines() if line.startswith("# ")), report.stem)
    return publish_report(title, markdown, run.get("project") or "glide_lightning",
                          run.get("group"), mode=run.get("wandb_mode") or "auto", run_dirs=run_dirs, rerun=rerun)
