"""``python -m glide_lightning compare runs/a runs/b --out reports/a_vs_b.md``: an ablation report built
from the runs' own files (CSV metrics, saved config, FID results), so it needs no wandb server.

The report has one table (FID and CLIP score per guidance scale, final train and validation losses,
steps, images seen, wall time) and two plots (loss curves; FID against guidance scale). The options
are the fields of :class:`CompareCommand`, parsed by the front door, :mod:`glide_lightning.commands`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glide_lightning.evaluation.results import ScaleResult, read_results

SMOOTH = 0.1  # the final train loss is the mean over the last 10 % of its logged steps (it is noisy)


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

    @property
    def steps(self) -> int:
        """Optimizer steps: from the last checkpoint, else from the metrics (logged 0-based)."""
        last = self.path / "checkpoints" / "last.ckpt"
        if last.exists():
            import torch

            return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        return 1 + max((s for points in self.curves.values() for s, _ in points), default=-1)

    @property
    def images_seen(self) -> int | None:
        """Optimizer steps × batch size × devices × nodes × gradient accumulation, from the saved config."""
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
    if not files:
        raise FileNotFoundError(f"{run_dir} has no csv/version_*/metrics.csv: is it a glide_lightning run directory?")
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


def write_report(runs: list[RunSummary], out: Path) -> Path:
    """The markdown report and its plots (``<out stem>_losses.png``, ``<out stem>_fid.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    settings = sorted({(setting, r.guidance_scale) for run in runs for setting, results in run.evals.items()
                       for r in results})
    lines = [f"# Ablation: {' vs '.join(run.name for run in runs)}", "",
             "Built from each run's `csv/`, `config.yaml` and `fid/*/results.json`. Final train loss: mean of the "
             f"last {SMOOTH:.0%} of logged steps; validation loss: the last validation (fixed timesteps and noise).",
             "", "| run | loss | variance | steps | images seen | wall time | train loss | val loss | "
             + " | ".join(f"FID@{s:g} | CLIP@{s:g}" for _, s in settings) + " |",
             "|---|---|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(settings)]
    labels = set()
    for run in runs:
        diffusion = run.config.get("model", {}).get("diffusion", {})
        cells = [run.name, diffusion.get("loss_type", "?"), diffusion.get("variance_type", "?"), str(run.steps),
                 _fmt(run.images_seen, 12), _duration(run.final("train/wall_time_s")),
                 _fmt(run.final("train/loss", SMOOTH)), _fmt(run.final("val/loss"))]
        for setting, scale in settings:
            match = [r for r in run.evals.get(setting, []) if r.guidance_scale == scale]
            if match:
                labels.add(match[0].fid.label.split(":")[0])
                clip = match[0].clip_score
                cells += [f"{match[0].fid.fid:.2f}", f"{clip.mean:.2f}" if clip is not None else "–"]
            else:
                cells += ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if settings:
        lines += ["", "Evaluation settings: " + ", ".join(sorted({s for s, _ in settings})) + "."]
        lines += [f"> {label}" for label in sorted(labels)]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        for ax, key in zip(axes, ("train/loss", "val/loss")):
            points = run.curves.get(key, [])
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=run.name, marker="o" if key == "val/loss" else None)
    for ax, title in zip(axes, ("train/loss", "val/loss")):
        ax.set_title(title), ax.set_xlabel("step"), ax.set_yscale("log"), ax.legend()
    fig.tight_layout()
    losses = out.with_name(f"{out.stem}_losses.png")
    fig.savefig(losses, dpi=110)
    plt.close(fig)
    lines += ["", f"![losses]({losses.name})"]
    if settings:
        fig, ax = plt.subplots(figsize=(5, 4))
        for run in runs:
            points = sorted((r.guidance_scale, r.fid.fid) for results in run.evals.values() for r in results)
            if points:
                ax.plot(*zip(*points), marker="o", label=run.name)
        ax.set_xlabel("guidance scale"), ax.set_ylabel("FID"), ax.legend()
        fig.tight_layout()
        fid = out.with_name(f"{out.stem}_fid.png")
        fig.savefig(fid, dpi=110)
        plt.close(fig)
        lines += ["", f"![FID vs guidance]({fid.name})"]
    out.write_text("\n".join(lines) + "\n")
    return out


@dataclass
class CompareCommand:
    """An ablation report from the runs' own files: one table (FID and CLIP score per guidance scale,
    final losses, steps, images seen, wall time) and two plots."""

    runs: list[str]
    """Run directories (``runs/<name>``), e.g. ``--runs '[runs/minig_simple, runs/minig_hybrid]'``."""
    out: str = "reports/report.md"
    """The markdown file to write (plots beside it)."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("runs is empty: pass --runs '[runs/<name>, ...]'")

    def run(self) -> Path:
        out = write_report([load_run(r) for r in self.runs], Path(self.out))
        print(f"wrote {out}")
        return out
