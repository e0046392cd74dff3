"""One ablation's wandb dashboard, drawn from the runs' local files (no server): the panel layout we
recommend for an ablation workspace, as a PNG for the docs, made from the same offline runs a user syncs.

Panels, each one line per run, a colour per arm (seeds of an arm share its colour, one line style per seed):
the training loss and the unweighted MSE against images seen (the x-axis the training runs define with
``define_metric``); the validation MSE; FID and text adherence (or CLIP score) against the guidance scale
from the evaluation runs of one sampler setting (their step metric :data:`GUIDANCE_STEP`); and the ``samples``
Table of the last training step, grouped by prompt: a row per prompt, a column per arm, the same prompt and
noise seed in each cell. An evaluation that sweeps several samplers or step counts (an NFE sweep: keys
``eval/<sampler>/<metric>@<scale>`` against :data:`NFE_STEP`) adds its own panels, FID / adherence / CLIP score
against the NFE (network evaluations per image), one line per run, sampler and guidance scale, the run's
colour and line style and a marker per sampler and scale.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glide_lightning.evaluation.wandb_eval import GUIDANCE_STEP, NFE_STEP
from glide_lightning.evaluation.wandb_runs import WandbRun

TRAIN_PANELS = (("train/loss", "training loss (the objective)"), ("train/mse", "training MSE (unweighted)"),
                ("val/mse", "validation MSE"))
EVAL_PANELS = (("eval/fid", "FID"), ("eval/adherence", "text adherence"), ("eval/clip_score", "CLIP score"))
"""The panels against the guidance scale: an eval run's ``eval/<metric>`` at each :data:`GUIDANCE_STEP`."""
NFE_PANELS = tuple((f"{key} vs {NFE_STEP}", f"{title} vs NFE") for key, title in EVAL_PANELS)
"""The panels against the NFE, one per metric of :data:`EVAL_PANELS`: an NFE sweep's
``eval/<sampler>/<metric>@<scale>`` at each :data:`NFE_STEP`."""


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


def nfe_series(run: WandbRun, key: str) -> dict[tuple[str | None, float], list[tuple[Any, Any]]]:
    """An NFE sweep's lines of the metric ``key`` (``eval/fid`` …): ``{(sampler, guidance scale): [(nfe, value),
    ...]}``, sorted by NFE, from every logged ``eval/<sampler>/<metric>@<scale>`` (or ``eval/<metric>@<scale>``,
    sampler None) whose step metric, as the run declared it with ``define_metric``, is :data:`NFE_STEP`; ``{}``
    for a run that is no NFE sweep (its per-scale keys, if any, are summaries, not steps)."""
    prefix, metric = key.rsplit("/", 1)
    pattern = re.compile(re.escape(prefix) + r"/(?:(?P<sampler>[^/]+)/)?" + re.escape(metric) + r"@(?P<scale>[^/@]+)")
    lines: dict[tuple[str | None, float], list[tuple[Any, Any]]] = {}
    for logged in dict.fromkeys(k for step in run.history for k in step):
        match = pattern.fullmatch(logged)
        if match and x_axis(run, logged) == NFE_STEP:
            points = sorted(run.series(logged, NFE_STEP))
            if points:
                lines[(match["sampler"], float(match["scale"]))] = points
    return lines


def dashboard_data(runs: Sequence[WandbRun]) -> dict[str, Any]:
    """What the dashboard draws: ``curves``, ``{panel key: {series: [(x, y), ...]}}``, with ``x_label``, the step
    metric of each panel's x-axis, ``samples``: ``{prompt: {arm: image path}}`` from each arm's first seed's
    last ``samples`` Table, and ``label``: the eval runs' config ``label`` where they all have the same
    (:data:`RANDOM_FEATURES_LABEL` when their features were random, which the FID panels' titles then carry), else
    ``""``.

    A series is a run's name in the panels of :data:`TRAIN_PANELS` (x: the run's step metric) and of
    :data:`EVAL_PANELS` (x: the guidance scale, sorted), and ``(run name, sampler, guidance scale)`` in those of
    :data:`NFE_PANELS` (x: the NFE, sorted; sampler None when the keys name none; see :func:`nfe_series`). A panel
    no run logged is left out."""
    train = [r for r in runs if r.job_type == "train"]
    evals = [r for r in runs if r.job_type == "eval"]
    labels = {r.config.get("label") or "" for r in evals}
    data: dict[str, Any] = {"curves": {}, "x_label": {}, "samples": {},
                            "label": labels.pop() if len(labels) == 1 else ""}
    for key, _ in TRAIN_PANELS:
        series = {r.name: r.series(key, x_axis(r, key)) for r in train}
        if any(series.values()):
            data["curves"][key] = {name: points for name, points in series.items() if points}
            data["x_label"][key] = next(x_axis(r, key) for r in train if series[r.name])
    for key, _ in EVAL_PANELS:
        series = {r.name: sorted(r.series(key, GUIDANCE_STEP)) for r in evals}
        if any(series.values()):
            data["curves"][key] = {name: points for name, points in series.items() if points}
            data["x_label"][key] = GUIDANCE_STEP
    for (key, _), (panel, _) in zip(EVAL_PANELS, NFE_PANELS):
        lines = {(r.name, sampler, scale): points for r in evals
                 for (sampler, scale), points in nfe_series(r, key).items()}
        if lines:
            data["curves"][panel] = lines
            data["x_label"][panel] = NFE_STEP
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
    """Draw :func:`dashboard_data`'s panels into ``out`` (PNG, three panels a row, the samples strip below) and
    return that data. The first panel's legend names the runs; each NFE panel has its own, a line per run, sampler
    (where a run swept several) and guidance scale ``w``.

    Raises:
        ValueError: none of ``runs`` logged a curve of any panel (nothing to draw).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    data = dashboard_data(runs)
    if not data["curves"]:
        raise ValueError("no curves to draw: none of the runs logged " +
                         ", ".join(k for k, _ in TRAIN_PANELS + EVAL_PANELS) +
                         f" or eval/<sampler>/<metric>@<scale> against {NFE_STEP}")
    arms = sorted({arm_of(r) for r in runs})
    colours = {arm: plt.get_cmap("tab10")(i) for i, arm in enumerate(arms)}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    by_name = {r.name: r for r in runs}
    titles = dict(TRAIN_PANELS + EVAL_PANELS + NFE_PANELS)
    if data["label"]:  # FID from random features (an eval run's label): said on its panels, as in the reports
        titles = {k: f"{t} ({data['label']})" if k.startswith("eval/fid") else t for k, t in titles.items()}
    nfe_panels = {panel for panel, _ in NFE_PANELS}
    panels = list(data["curves"])
    prompts = sorted(data["samples"])
    columns = 3
    rows = -(-len(panels) // columns) + (1 if prompts else 0)
    fig = plt.figure(figsize=(5 * columns, 3.6 * rows))
    grid = fig.add_gridspec(rows, columns)
    for i, key in enumerate(panels):
        ax = fig.add_subplot(grid[i // columns, i % columns])
        if key in nfe_panels:  # a line per (run, sampler, scale): the run's colour and style, a marker per line
            curves = sorted(data["curves"][key].items(), key=lambda item: (item[0][0], str(item[0][1]), item[0][2]))
            for name, points in curves:
                run_name, sampler, scale = name
                run = by_name[run_name]
                own = [line for line, _ in curves if line[0] == run_name]
                several = len({s for _, s, _ in own}) > 1
                x, y = np.array(points, dtype=float).T
                ax.plot(x, y, styles[seed_of(run) % len(styles)], color=colours[arm_of(run)],
                        marker=markers[own.index(name) % len(markers)],
                        label=f"{arm_of(run)} seed {seed_of(run)}{f', {sampler}' if several else ''}, w={scale:g}")
        else:
            for name, points in sorted(data["curves"][key].items()):
                run = by_name[name]
                x, y = np.array(points, dtype=float).T
                ax.plot(x, y, styles[seed_of(run) % len(styles)], color=colours[arm_of(run)],
                        marker="o" if len(x) < 8 else None, label=f"{arm_of(run)} seed {seed_of(run)}")
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel(data["x_label"][key].split("/")[-1].replace("_", " "))
        ax.grid(alpha=0.3)
        if i == 0 or key in nfe_panels:
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
