"""The ablation dashboard drawn from offline wandb runs: each panel plots exactly what the runs logged, on the
x-axis they defined, and the samples strip groups the last Table by prompt, an arm per row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glide_lightning.evaluation.dashboard import arm_of, dashboard_data, draw_dashboard, seed_of
from glide_lightning.evaluation.wandb_runs import find_runs

PROMPTS = ["a red circle", "a blue square"]


def colour(arm: str, prompt: str) -> np.ndarray:
    return np.full((8, 8, 3), (40 if arm == "hybrid" else 200, 10 * len(prompt), 90), np.uint8)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wandb

    root = tmp_path_factory.mktemp("dash")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DATA_DIR", str(root / "data"))
        mp.setenv("WANDB_SILENT", "true")
        for arm in ("hybrid", "simple"):
            for seed in (0, 1):
                run = wandb.init(project="p", group="abl", job_type="train", name=f"{arm}_seed{seed}",
                                 dir=str(root), mode="offline", config={"seed_everything": seed}, reinit="create_new")
                run.define_metric("trainer/images_seen")
                run.define_metric("train/*", step_metric="trainer/images_seen")
                for step in range(1, 4):
                    run.log({"trainer/images_seen": 32 * step, "train/loss": 1 / step + seed + (arm == "simple")})
                table = wandb.Table(columns=["step", "prompt", "guidance_scale", "weights", "image"])
                for step in (2, 3):
                    for prompt in PROMPTS:
                        for scale in (1.0, 3.0):
                            table.add_data(step, prompt, scale, "ema", wandb.Image(colour(arm, prompt) + step + scale))
                run.log({"samples": table})
                run.finish()
                ev = wandb.init(project="p", group="abl", job_type="eval", name=f"{arm}_seed{seed}-eval", dir=str(root),
                                mode="offline", reinit="create_new")
                ev.define_metric("eval/guidance_scale")
                ev.define_metric("eval/*", step_metric="eval/guidance_scale")
                for scale in (3.0, 1.0):
                    ev.log({"eval/guidance_scale": scale, "eval/fid": 10 * scale + seed})
                ev.finish()
    return root


def test_each_panel_plots_what_the_runs_logged(runs_root: Path, tmp_path: Path) -> None:
    runs = find_runs(runs_root)
    assert len(runs) == 8
    assert sorted({arm_of(r) for r in runs}) == ["hybrid", "simple"]
    assert sorted(seed_of(r) for r in runs if r.job_type == "train") == [0, 0, 1, 1]
    data = draw_dashboard(runs, tmp_path / "dash.png", "abl")
    assert data["x_label"]["train/loss"] == "trainer/images_seen"
    curve = data["curves"]["train/loss"]["simple_seed1"]
    assert [x for x, _ in curve] == [32, 64, 96]
    assert [y for _, y in curve] == pytest.approx([1 / s + 2 for s in (1, 2, 3)])
    assert data["curves"]["eval/fid"]["hybrid_seed1-eval"] == [(1.0, 11.0), (3.0, 31.0)]  # sorted by scale
    assert "train/mse" not in data["curves"]  # not logged: no empty panel
    assert sorted(data["samples"]) == sorted(PROMPTS)
    for prompt in PROMPTS:  # each arm's first seed, the last step, the highest scale
        for arm in ("hybrid", "simple"):
            pixels = np.asarray(Image.open(data["samples"][prompt][arm]).convert("RGB"))
            assert np.array_equal(pixels, colour(arm, prompt) + 3 + 3)
    assert Image.open(tmp_path / "dash.png").size[0] > 1000


def test_nothing_to_draw_is_said(runs_root: Path, tmp_path: Path) -> None:
    evals_only = [r for r in find_runs(runs_root) if r.job_type == "eval"]
    assert dashboard_data(evals_only)["samples"] == {}
    with pytest.raises(ValueError, match="no curves to draw"):
        draw_dashboard([], tmp_path / "none.png", "none")
