"""One ablation's wandb dashboard, drawn from the runs' local files (no server): the panel layout we
recommend for an ablation workspace, as a PNG for the docs, made from the same offline runs a user syncs.

Panels, each one line per run, a colour per arm (seeds of an arm share its colour, one line style per seed):
the training loss and the unweighted MSE against images seen (the x-axis the training runs define with
``define_metric``); the validation MSE; FID and text adherence (or CLIP score) against the guidance scale
from the evaluation runs (their step metric); and the ``samples`` Table of the last training step, grouped
by prompt: a row per prompt, a column per arm, the same prompt and noise seed in each cell.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glide_lightning.evaluation.wandb_runs import WandbRun

EVAL_STEP = "eval/guidance_scale"
TRAIN_PANELS = (("train/loss", "training loss (the objective)"), ("train/mse", "training MSE (unweighted)"),
                ("val/mse", "validation MSE"))
EVAL_PANELS = (("eval/fid", "FID"), ("eval/adherence", "text adherence"), ("eval/clip_score", "CLIP score"))


def arm_of(run: WandbRun) -> str:
    """The arm a run belongs to: its name without a ``_seed<k>`` suffix (and an eval run's ``-eval…`` part)."""
    name = run.name.split("-eval")[0]
    return re.sub(r"_seed\d+$", "", name)


def seed_of(run: WandbRun) -> int:
    """The run's training seed (``seed_everything`` in its config, else its name's ``_seed<k>``, else 0)."""
    seed = run.config.get("seed_everything")
    if isinstance(seed, int):
        return seed
    match = re.search(r"_seed(\d+)", run.name)
    return int(match.group(1)) if match else 0


def x_axis(run: WandbRun, key: str) -> str:
    """The step metric ``define_metric`` gave ``key`` (exactly or by a glob such as ``train/*``), else ``_step``."""
    if key in run.metrics and run.metrics[key]["step_metric"]:
        return run.metrics[key]["step_metric"]
    for name, metric in run.metrics.items():
        if "*" in name and re.fullmatch(re.escape(name).replace(r"\*", ".*"), key) and metric["step_metric"]:
            return metric["step_metric"]
    return "_step"


def dashboard_data(runs: Sequence[WandbRun]) -> dict[str, Any]:
    """What the dashboard draws: ``{panel key: {run name: [(x, y), ...]}}`` for the curves (with ``x_label``),
    and ``samples``: ``{prompt: {arm: image path}}`` from each arm's first seed's last ``samples`` Table."""
    train = [r for r in runs if r.job_type == "train"]
    evals = [r for r in runs if r.job_type == "eval"]
    data: dict[str, Any] = {"curves": {}, "x_label": {}, "samples": {}}
    for key, _ in TRAIN_PANELS:
        series = {r.name: r.series(key, x_axis(r, key)) for r in train}
        if any(series.values()):
            data["curves"][key] = {name: points for name, points in series.items() if points}
            data["x_label"][key] = next(x_axis(r, key) for r in train if series[r.name])
    for key, _ in EVAL_PANELS:
        series = {r.name: sorted(r.series(key, EVAL_STEP)) for r in evals}
        if any(series.values()):
            data["curves"][key] = {name: points for name, points in series.items() if points}
            data["x_label"][key] = EVAL_STEP
    for run in sorted(train, key=seed_of):
        arm = arm_of(run)
        try:
            rows = run.table("samples")
        except (KeyError, FileNotFoundError):
            continue
        if any(arm in cells for cells in data["samples"].values()):
            continue  # an arm's first seed only
        last = max(row["step"] for row in rows)
        top = max(row["guidance_scale"] for row in rows if row["step"] == last)
        for row in rows:
            if row["step"] == last and row["guidance_scale"] == top and row.get("weights", "ema") != "raw":
                data["samples"].setdefault(row["prompt"], {})[arm] = row["image"]["local_path"]
    return data


def draw_dashboard(runs: Sequence[WandbRun], out: str | Path, title: str) -> dict[str, Any]:
    """Draw :func:`dashboard_data`'s panels into ``out`` (PNG) and return that data.

    Raises:
        ValueError: ``runs`` holds no training run with a logged curve (nothing to draw).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    data = dashboard_data(runs)
    if not data["curves"]:
        raise ValueError("no curves to draw: none of the runs logged " +
                         ", ".join(k for k, _ in TRAIN_PANELS + EVAL_PANELS))
    arms = sorted({arm_of(r) for r in runs})
    colours = {arm: plt.get_cmap("tab10")(i) for i, arm in enumerate(arms)}
    styles = ["-", "--", ":", "-."]
    by_name = {r.name: r for r in runs}
    titles = dict(TRAIN_PANELS + EVAL_PANELS)
    panels = list(data["curves"])
    prompts = sorted(data["samples"])
    columns = 3
    rows = -(-len(panels) // columns) + (1 if prompts else 0)
    fig = plt.figure(figsize=(5 * columns, 3.6 * rows))
    grid = fig.add_gridspec(rows, columns)
    for i, key in enumerate(panels):
        ax = fig.add_subplot(grid[i // columns, i % columns])
        for name, points in sorted(data["curves"][key].items()):
            run = by_name[name]
            x, y = np.array(points, dtype=float).T
            ax.plot(x, y, styles[seed_of(run) % len(styles)], color=colours[arm_of(run)], marker="o" if len(x) < 8
                    else None, label=f"{arm_of(run)} seed {seed_of(run)}")
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel(data["x_label"][key].split("/")[-1].replace("_", " "))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    if prompts:
        strip = fig.add_subplot(grid[rows - 1, :])
        tiles = [[np.asarray(Image.open(data["samples"][p][arm]).convert("RGB")) if arm in data["samples"][p]
                  else None for arm in arms] for p in prompts]
        size = next(t for row in tiles for t in row if t is not None).shape
        blank = np.full(size, 255, np.uint8)
        # rows of the picture: arms; columns: prompts (the Table grouped by prompt, one cell per arm)
        picture = np.concatenate([np.concatenate([tiles[p][a] if tiles[p][a] is not None else blank
                                                  for p in range(len(prompts))], axis=1) for a in range(len(arms))])
        strip.imshow(picture)
        strip.set_yticks([size[0] * (a + 0.5) for a in range(len(arms))], arms)
        strip.set_xticks([size[1] * (p + 0.5) for p in range(len(prompts))],
                         [p if len(p) < 28 else p[:25] + "…" for p in prompts], fontsize=7)
        strip.set_title("samples Table, last step, grouped by prompt (same noise seed per prompt)", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return data
