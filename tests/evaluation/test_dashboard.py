"""The ablation dashboard drawn from offline wandb runs: each panel plots exactly what the runs logged, on the
x-axis they defined, and the samples strip groups the last Table by prompt, an arm per row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glide_lightning.evaluation.clip_score import CLIPScoreResult
from glide_lightning.evaluation.dashboard import arm_of, dashboard_data, draw_dashboard, seed_of
from glide_lightning.evaluation.fid import FIDResult
from glide_lightning.evaluation.results import ScaleResult
from glide_lightning.evaluation.wandb_eval import GUIDANCE_STEP, NFE_STEP, RANDOM_FEATURES_LABEL, log_eval_run
from glide_lightning.evaluation.wandb_runs import find_runs
from wandb_offline import offline_wandb

PROMPTS = ["a red circle", "a blue square"]


def colour(arm: str, prompt: str) -> np.ndarray:
    return np.full((8, 8, 3), (40 if arm == "hybrid" else 200, 10 * len(prompt), 90), np.uint8)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wandb

    root = tmp_path_factory.mktemp("dash")
    with offline_wandb(root):
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


SWEEP = {("ddim", 1.5): (10, 25, 50), ("ddim", 3.0): (10, 25, 50), ("dpmpp_2m", 3.0): (20, 40)}
"""An NFE sweep's settings: (sampler, guidance scale) -> its NFEs (a dot in a scale: the escaped metric name)."""


def sweep_result(sampler: str, scale: float, nfe: int) -> ScaleResult:
    """A result of the sweep whose FID, adherence and CLIP score say which (sampler, scale, nfe) made them."""
    fid = 100 / nfe + scale + (sampler == "dpmpp_2m")
    return ScaleResult(guidance_scale=scale, n=4, resolution=32, sampler=sampler, steps=str(nfe), checkpoint="ema",
                       nfe=nfe, adherence=nfe / 100 + scale / 10,
                       fid=FIDResult(fid=fid, n_generated=4, n_reference=4, resolution=32, extractor_name="random-conv",
                                     weights_id="w", random_weights=True, standard_extractor=False, method="m",
                                     label="NOT a real FID"),
                       clip_score=CLIPScoreResult(mean=nfe + scale, n=4, model_name="m", pretrained=None,
                                                  random_weights=True, label="random"))


@pytest.fixture(scope="module")
def nfe_sweep_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run's directory and the eval run ``log_eval_run`` writes there for an NFE sweep (two samplers,
    several step counts, two guidance scales), as ``sweep`` logs it."""
    root = tmp_path_factory.mktemp("nfe")
    run_dir = root / "hybrid_seed0"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run:\n  name: hybrid_seed0\n  project: p\n  group: abl\n")
    results = [sweep_result(sampler, scale, nfe) for (sampler, scale), nfes in SWEEP.items() for nfe in reversed(nfes)]
    with offline_wandb(root):
        log_eval_run(run_dir, results, str(run_dir / "last.ckpt"), command="sweep")
    return root


def test_an_nfe_sweep_draws_its_metrics_against_nfe_a_line_per_scale(runs_root: Path, nfe_sweep_root: Path,
                                                                     tmp_path: Path) -> None:
    [sweep] = find_runs(nfe_sweep_root)
    assert sweep.job_type == "eval" and arm_of(sweep) == "hybrid" and seed_of(sweep) == 0
    assert sweep.metrics["eval/ddim/fid@1.5"]["step_metric"] == NFE_STEP  # what the run itself declared
    runs = find_runs(runs_root) + [sweep]
    data = draw_dashboard(runs, tmp_path / "dash.png", "abl")
    fid, adherence, clip = (f"eval/{metric} vs {NFE_STEP}" for metric in ("fid", "adherence", "clip_score"))
    for panel in (fid, adherence, clip):
        assert data["x_label"][panel] == NFE_STEP
        assert sorted(data["curves"][panel]) == sorted((sweep.name, sampler, scale) for sampler, scale in SWEEP)
    for (sampler, scale), nfes in SWEEP.items():  # a line per (run, sampler, scale), sorted by NFE
        line = (sweep.name, sampler, scale)
        assert [x for x, _ in data["curves"][fid][line]] == list(nfes)
        assert [y for _, y in data["curves"][fid][line]] == pytest.approx(
            [100 / nfe + scale + (sampler == "dpmpp_2m") for nfe in nfes])
        for panel, value in ((adherence, lambda nfe: nfe / 100 + scale / 10), (clip, lambda nfe: nfe + scale)):
            assert [x for x, _ in data["curves"][panel][line]] == list(nfes)
            assert [y for _, y in data["curves"][panel][line]] == pytest.approx([value(nfe) for nfe in nfes])
    # the ordinary eval runs keep their panels against the guidance scale; the sweep adds nothing there
    assert data["x_label"]["eval/fid"] == GUIDANCE_STEP
    assert sorted(data["curves"]["eval/fid"]) == sorted(r.name for r in runs if r.job_type == "eval" and r is not sweep)
    assert "eval/adherence" not in data["curves"]
    assert Image.open(tmp_path / "dash.png").size[0] > 1000
    assert data["label"] == ""  # the eval runs' features differ (the others record none): no one label for all
    alone = draw_dashboard([sweep], tmp_path / "sweep.png", "sweep")  # an NFE sweep alone is something to draw
    assert sorted(alone["curves"]) == sorted((fid, adherence, clip)) and (tmp_path / "sweep.png").stat().st_size > 0
    assert alone["label"] == RANDOM_FEATURES_LABEL  # the sweep's FID is from random features: its panels say so


def test_the_script_draws_from_a_group_folder_and_says_what_is_wrong_in_one_line(runs_root: Path, tmp_path: Path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts/wandb_dashboard.py"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)

    drawn = run("--runs", str(runs_root), "--group", "abl", "--out", str(tmp_path / "dash.png"))
    assert drawn.returncode == 0 and "from 8 wandb runs" in drawn.stdout, drawn.stderr[-2000:]
    assert Image.open(tmp_path / "dash.png").size[0] > 1000
    missing = run("--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "--runs: " in missing.stderr and "is not a folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run("--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png"))
    assert empty.returncode == 2 and "no wandb runs under" in empty.stderr and "Traceback" not in empty.stderr
