"""The ablation report as a wandb Report (``wandb-workspaces``' ``wandb_workspaces.reports.v2``, the
``reports`` extra), mirroring the markdown report that ``compare`` writes.

:func:`build_report` turns the markdown into the Report's blocks: each heading a heading block, the text between
headings one markdown block (tables and quotes render as in the ``.md``; a local picture, which a Report cannot
reference, is replaced by a line saying that the panels below draw it from the runs), then a panel grid over the
ablation's wandb group: the train loss against images seen, and every eval metric against the guidance scale
(:data:`~glide_lightning.evaluation.wandb_eval.GUIDANCE_STEP`), one line per run. Building it makes no network call
when an entity is given (``""`` is one); saving it does.

:func:`publish_report` saves it when wandb is online (an API key configured) and returns its URL; offline it
publishes nothing and returns how to publish later. The markdown report stays the offline output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glide_lightning.evaluation.wandb_eval import GUIDANCE_STEP, IMAGES_SEEN, METRICS
from glide_lightning.runs import WandbMode, resolve_wandb_mode

__all__ = ["EVAL_PANELS", "TRAIN_PANELS", "build_report", "markdown_blocks", "publish_report"]

TRAIN_X = IMAGES_SEEN
"""The x axis of the training curves: the training runs' images-seen step metric."""
TRAIN_PANELS = ("train/loss",)
"""The training metrics drawn against :data:`TRAIN_X`."""
EVAL_PANELS = tuple(f"eval/{name}" for name in METRICS if name != "kid_std")
"""The eval metrics drawn against the guidance scale (those an arm's eval run logged; the others stay empty)."""
TITLE_LIMIT = 128
"""The longest title a wandb Report takes."""

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)[^)]*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _without_local_images(text: str) -> str:
    """``text`` with each markdown picture replaced by a line naming it (a Report cannot show a local file)."""
    return _IMAGE.sub(lambda m: f"*{m.group(1) or Path(m.group(2)).stem}: the picture `{Path(m.group(2)).name}` of "
                                f"the markdown report; the panels below draw it from the runs.*", text)


def markdown_blocks(markdown: str, title: str | None = None) -> list[tuple[int, str]]:
    """The markdown split into ``(level, text)`` sections: level 1-3 a heading (deeper ones count as 3), level 0
    the markdown between two headings (blank stretches dropped, pictures replaced, :func:`_without_local_images`).
    A first level-1 heading equal to ``title`` is left out: the Report shows its title itself. Lines in fenced
    code blocks are never headings."""
    sections: list[tuple[int, str]] = []
    body: list[str] = []
    fenced = False

    def flush() -> None:
        text = _without_local_images("\n".join(body)).strip("\n")
        if text.strip():
            sections.append((0, text))
        body.clear()

    for line in markdown.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading is None:
            body.append(line)
            continue
        flush()
        level, text = len(heading.group(1)), heading.group(2)
        if not sections and level == 1 and title is not None and text.strip() == title.strip():
            continue
        sections.append((min(level, 3), text))
    flush()
    return sections


def _runset(wr: Any, project: str, group: str | None, entity: str) -> Any:
    """The runs of the ablation: the project's runs in ``group`` (the whole project when None).

    Raises:
        ValueError: ``group`` holds a quote (wandb-workspaces writes the filter as an unescaped string).
    """
    from wandb_workspaces import expr

    if group and any(q in group for q in "'\"\\"):
        raise ValueError(f"wandb group {group!r}: a Report's run filter cannot hold quotes or backslashes")
    filters = expr.And(expr.Metric("Group") == group) if group else ""
    return wr.Runset(entity=entity, project=project, name=group or project, filters=filters)


def build_report(title: str, markdown: str, project: str, group: str | None, entity: str = "",
                 train_x: str = TRAIN_X, train_metrics: Sequence[str] = TRAIN_PANELS,
                 eval_metrics: Sequence[str] = EVAL_PANELS) -> Any:
    """The Report (not saved): ``markdown``'s sections as blocks (:func:`markdown_blocks`), then one panel grid of
    line plots over the runs of ``group``: each of ``train_metrics`` against ``train_x``, each of ``eval_metrics``
    against the guidance scale.

    Args:
        title: the Report's title (cut to :data:`TITLE_LIMIT` characters, as wandb requires).
        markdown: the markdown report ``compare`` wrote.
        project: the wandb project of the runs.
        group: the ablation's wandb group (None: every run of the project).
        entity: the wandb entity (user or team); ``""`` builds without asking the server which is the default.

    Raises:
        ImportError: ``wandb-workspaces`` is not installed (``pip install 'glide_lightning[reports]'``).
        ValueError: ``group`` holds a quote or backslash (the run filter cannot say it).
    """
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as e:
        raise ImportError("a wandb Report needs the wandb-workspaces package: pip install "
                          "'glide_lightning[reports]' (make setup installs it)") from e

    headings = {1: wr.H1, 2: wr.H2, 3: wr.H3}
    blocks: list[Any] = [wr.MarkdownBlock(text=text) if level == 0 else headings[level](text=text)
                         for level, text in markdown_blocks(markdown, title)]
    panels = [wr.LinePlot(title=f"{key} vs {train_x}", x=train_x, y=[key]) for key in train_metrics]
    panels += [wr.LinePlot(title=f"{key} vs guidance scale", x=GUIDANCE_STEP, y=[key]) for key in eval_metrics]
    blocks += [wr.H2(text="Runs"), wr.PanelGrid(runsets=[_runset(wr, project, group, entity)], panels=panels)]
    return wr.Report(project=project, entity=entity, title=title[:TITLE_LIMIT],
                     description=f"wandb group {group}" if group else f"wandb project {project}", blocks=blocks)


def offline_message(project: str, group: str | None, run_dirs: Sequence[str | Path] = (),
                    rerun: str = "rerun compare with its wandb publish option") -> str:
    """One line: why nothing was published, and how to publish later."""
    folders = " ".join(f"{Path(d)}/wandb/offline-run-*" for d in run_dirs) or "runs/<run>/wandb/offline-run-*"
    where = f"project {project}, group {group}" if group else f"project {project}"
    return (f"wandb is offline (no API key): the wandb Report ({where}) was not published; the markdown report is "
            f"the output. To publish it later: `wandb sync {folders}` to upload the runs, then {rerun} with an API "
            f"key (WANDB_API_KEY or `wandb login`).")


def publish_report(title: str, markdown: str, project: str, group: str | None, entity: str | None = None, *,
                   mode: WandbMode = "auto", run_dirs: Sequence[str | Path] = (),
                   rerun: str = "rerun compare with its wandb publish option") -> str:
    """Publish the ablation report ``markdown`` as a wandb Report (:func:`build_report`) when wandb is online.

    Args:
        title, markdown, project, group: as :func:`build_report`.
        entity: the wandb entity; None: the API key's default entity.
        mode: the wandb mode (:func:`glide_lightning.runs.resolve_wandb_mode`: ``WANDB_MODE`` wins, ``auto`` is
            online with an API key).
        run_dirs: the runs' directories, named in the offline message's ``wandb sync`` command.
        rerun: how the offline message tells the user to run the publishing again.

    Returns:
        Online: the saved Report's URL. Offline or disabled: one line saying why nothing was published and how to
        publish later (:func:`offline_message`); nothing touches the network then.

    Raises:
        ImportError: ``wandb-workspaces`` is not installed.
        ValueError: ``group`` holds a quote or backslash (online only: offline builds nothing).
        wandb.errors.CommError and the like: the server refused the Report (online only).
    """
    resolved = resolve_wandb_mode(mode)
    if resolved != "online":
        return offline_message(project, group, run_dirs, rerun) if resolved == "offline" else \
            f"wandb is {resolved}: no wandb Report was published (the markdown report is the output)"
    if entity is None:
        import wandb

        entity = wandb.Api().default_entity or ""
    report = build_report(title, markdown, project, group, entity=entity)
    report.save()
    return str(report.url)
