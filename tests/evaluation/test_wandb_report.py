"""The ablation report as a wandb Report, built offline and never saved: its blocks mirror the markdown report,
its panels draw the metric keys the training and eval runs log, its run set is the ablation's group; offline,
publishing says how to publish later. No test here reaches the network: wandb-workspaces' API entry points raise."""

from __future__ import annotations

import json

import pytest

from glide_lightning.evaluation.wandb_eval import GUIDANCE_STEP, METRICS
from glide_lightning.evaluation.wandb_report import (
    EVAL_PANELS,
    TRAIN_PANELS,
    TRAIN_X,
    build_report,
    markdown_blocks,
    publish_report,
)

MARKDOWN = """# Ablation: hybrid vs simple

Built from each run's `csv/`, `config.yaml` and `fid/*/results.json`.

| run | loss | FID |
|---|---|---:|
| hybrid | hybrid | 0.16 |
| simple | simple | 0.17 |

> NOT a real FID (random feature extractor)

## Seeds and intervals

FID 0.16 [0.14, 0.18] (bootstrap over images).

```bash
# not a heading: inside a code block
make compare RUNS="hybrid simple"
```

### Plots

![losses](hybrid_vs_simple_losses.png)
"""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call that would reach the wandb server fails the test."""
    import wandb
    import wandb_workspaces.reports.v2.interface as interface

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a network call")

    monkeypatch.setattr(interface, "_get_api", refuse)
    monkeypatch.setattr(interface, "execute_graphql", refuse)
    monkeypatch.setattr(interface.Report, "save", refuse)
    monkeypatch.setattr(wandb, "Api", refuse)


def test_the_markdown_splits_into_headings_and_text() -> None:
    sections = markdown_blocks(MARKDOWN, title="Ablation: hybrid vs simple")
    assert [(level, text.splitlines()[0]) for level, text in sections] == [
        (0, "Built from each run's `csv/`, `config.yaml` and `fid/*/results.json`."),
        (2, "Seeds and intervals"),
        (0, "FID 0.16 [0.14, 0.18] (bootstrap over images)."),
        (3, "Plots"),
        (0, "*losses: the picture `hybrid_vs_simple_losses.png` of the markdown report; the panels below draw it "
            "from the runs.*")]
    assert "| simple | simple | 0.17 |" in sections[0][1] and "> NOT a real FID" in sections[0][1]
    assert "# not a heading: inside a code block" in sections[2][1]
    assert markdown_blocks(MARKDOWN)[0] == (1, "Ablation: hybrid vs simple")  # another title: the heading stays


def test_the_report_mirrors_the_markdown_and_draws_the_logged_keys() -> None:
    import wandb_workspaces.reports.v2 as wr

    report = build_report("Ablation: hybrid vs simple", MARKDOWN, project="proj", group="abl", entity="me")
    assert (report.title, report.project, report.entity) == ("Ablation: hybrid vs simple", "proj", "me")
    *text, runs_heading, grid = report.blocks
    kinds = [(type(b).__name__, b.text if isinstance(b, (wr.H1, wr.H2, wr.H3)) else b.text.splitlines()[0])
             for b in text]
    assert kinds == [("MarkdownBlock", "Built from each run's `csv/`, `config.yaml` and `fid/*/results.json`."),
                     ("H2", "Seeds and intervals"), ("MarkdownBlock", "FID 0.16 [0.14, 0.18] (bootstrap over images)."),
                     ("H3", "Plots"), ("MarkdownBlock", text[-1].text.splitlines()[0])]
    assert "`hybrid_vs_simple_losses.png`" in text[-1].text
    body = "\n".join(b.text for b in text if isinstance(b, wr.MarkdownBlock))
    for line in MARKDOWN.splitlines():  # every line but headings and pictures reaches a block verbatim
        if line and not line.startswith(("# Ablation", "## ", "### ", "![")):
            assert line in body, line
    assert isinstance(runs_heading, wr.H2) and isinstance(grid, wr.PanelGrid)
    (runset,) = grid.runsets
    assert (runset.project, runset.entity, runset.name) == ("proj", "me", "abl")
    assert runset.filters == "Metric(\"Group\") == 'abl'"
    plots = [(p.x, tuple(p.y)) for p in grid.panels]
    assert plots[:len(TRAIN_PANELS)] == [(TRAIN_X, (key,)) for key in TRAIN_PANELS] == \
        [("trainer/images_seen", ("train/loss",))]
    assert plots[len(TRAIN_PANELS):] == [(GUIDANCE_STEP, (key,)) for key in EVAL_PANELS]
    assert set(EVAL_PANELS) == {f"eval/{name}" for name in METRICS} - {"eval/kid_std"}  # what an eval run logs
    assert all(isinstance(p, wr.LinePlot) for p in grid.panels)


def test_the_report_serialises_offline_and_a_group_less_report_shows_the_project() -> None:
    report = build_report("t" * 200, MARKDOWN, project="proj", group=None, entity="")
    assert len(report.title) == 128
    with pytest.raises(ValueError, match="cannot hold quotes"):
        build_report("t", MARKDOWN, project="proj", group="it's", entity="")
    assert report.blocks[-1].runsets[0].filters == "" and report.blocks[-1].runsets[0].name == "proj"
    spec = json.loads(report._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))  # no network
    kinds = [block["type"] for block in spec["blocks"]]
    assert kinds.count("markdown-block") == 3 and "panel-grid" in kinds


def test_offline_publishing_publishes_nothing_and_says_how_to_publish_later(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    line = publish_report("A vs B", MARKDOWN, "proj", "abl", run_dirs=[tmp_path / "a", tmp_path / "b"],
                          rerun="rerun `make compare RUNS=\"a b\" ARGS=\"--wandb_report true\"`")
    assert "\n" not in line and "not published" in line and "project proj, group abl" in line
    assert f"`wandb sync {tmp_path}/a/wandb/offline-run-* {tmp_path}/b/wandb/offline-run-*`" in line
    assert "--wandb_report true" in line and "WANDB_API_KEY" in line
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: auto resolves to offline
    assert "`wandb sync runs/<run>/wandb/offline-run-*`" in publish_report("A vs B", MARKDOWN, "proj", None)
    assert "no wandb Report was published" in publish_report("A vs B", MARKDOWN, "proj", None, mode="disabled")
