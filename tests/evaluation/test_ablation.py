"""The ablation command end to end at toy scale: 2 arms x 2 seeds of a few steps, swept on 6 captions with random
features, then the same command again (nothing retrained, nothing re-evaluated), and its report and summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from glide_lightning.commands import main as glide_main
from glide_lightning.commands import parse
from held_out import write_held_out
from wandb_offline import offline_wandb
from glide_lightning.evaluation.ablation import STATE_FILE, AblationGroup
from glide_lightning.evaluation.results import read_results
from glide_lightning.evaluation.uncertainty import welch_difference
from glide_lightning.evaluation.wandb_runs import find_runs

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_command_line_takes_the_group_and_bare_seeds():
    command = parse(["ablation", "minig", "--seeds", "0", "1", "2", "--confidence", "0.9"])
    assert command.group == "minig" and command.seeds == [0, 1, 2] and command.confidence == 0.9
    assert parse(["ablation", "--group", "minig", "--seeds", "[3]"]).seeds == [3]
    with pytest.raises(SystemExit):
        parse(["ablation", "minig", "--seeds", "1", "1"])  # a seed twice
    group = AblationGroup.load("ablation_smoke")
    assert list(group.arms) == ["hybrid", "simple"] and group.eval == "experiments/eval/ablation_smoke.yaml"
    assert AblationGroup.load("minig").arms == {"hybrid": ["experiments/minig_hybrid.yaml"],
                                                "simple": ["experiments/minig_simple.yaml"]}


def test_two_arms_two_seeds_end_to_end_resumable_with_intervals(synthetic_shards, tmp_path, monkeypatch):
    import os

    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    # This process has used wandb before the ablation (as a notebook, or an earlier test, may have): its wandb
    # service is running and named in WANDB_SERVICE, which the runs' own commands must not attach to.
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.init(project="before", dir=str(tmp_path), reinit="create_new").finish()
    assert os.environ.get("WANDB_SERVICE")
    reference, _, _ = write_held_out(tmp_path, 6, 32)
    tiny = _write(tmp_path / "tiny.yaml", {
        "data": {"train_shards": f"{synthetic_shards}/train-*.tar", "val_shards": f"{synthetic_shards}/val-*.tar",
                 "num_workers": 0, "batch_size": 4},
        "trainer": {"max_steps": 3, "val_check_interval": 3, "log_every_n_steps": 1, "callbacks": [],
                    "enable_progress_bar": False}})
    simple = _write(tmp_path / "simple.yaml", {"model": {"diffusion": {"loss_type": "simple",
                                                                       "variance_type": "fixed_small"}}})
    evaluation = _write(tmp_path / "eval.yaml", {
        "captions": str(tmp_path / "captions.txt"), "reference": str(reference), "n": 6, "scales": [3],
        "extractor": "random-conv", "clip_model": None, "device": "cpu", "cache_dir": str(tmp_path / "cache"),
        "kid_subsets": 10, "bootstrap": 100, "sampling": {"steps": "2"}})
    smoke = str(REPO / "experiments/smoke.yaml")
    group = _write(tmp_path / "toy.yaml", {"arms": {"hybrid": [smoke, tiny], "simple": [smoke, tiny, simple]},
                                           "eval": evaluation})
    argv = ["ablation", group, "--seeds", "0", "1", "--runs_root", str(tmp_path / "runs"),
            "--out", str(tmp_path / "reports/toy.md")]
    summary = glide_main(argv)

    runs = {f"{arm}_seed{seed}": tmp_path / "runs/toy" / f"{arm}_seed{seed}" for arm in ("hybrid", "simple")
            for seed in (0, 1)}
    for name, run_dir in runs.items():
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["run"]["name"] == name and config["run"]["group"] == "toy"
        assert config["seed_everything"] == int(name[-1])
        assert config["model"]["diffusion"]["loss_type"] == name.split("_")[0]
        [result] = read_results(run_dir / "fid/res32_ddpm2_n6/results.json")
        assert result.fid_interval is not None and result.fid_interval.contains(result.fid.fid)
        assert result.adherence_interval is not None and result.kid_interval is not None
    for name, run_dir in runs.items():  # every run's wandb config says what its arm changes, the first trained too
        (train,) = [r for r in find_runs(run_dir / "wandb") if r.job_type == "train"]
        assert "model.diffusion.loss_type" in train.config["ablation"]["keys"], name
        assert len(train.config["ablation"]["siblings"]) == 3, name
    ckpts = {path: path.stat().st_mtime_ns for run_dir in runs.values() for path in run_dir.glob("checkpoints/*")}
    results = {path: path.stat().st_mtime_ns for run_dir in runs.values() for path in run_dir.glob("fid/*/*.json")}
    assert ckpts and results

    # across seeds: Welch's interval of the seeds' values, and the verdict, in the summary, JSON and report
    fid = next(row for row in summary["rows"] if row["metric"] == "fid")
    a = [read_results(runs[f"hybrid_seed{s}"] / "fid/res32_ddpm2_n6/results.json")[0].fid.fid for s in (0, 1)]
    b = [read_results(runs[f"simple_seed{s}"] / "fid/res32_ddpm2_n6/results.json")[0].fid.fid for s in (0, 1)]
    expected = welch_difference(a, b)
    d = fid["differences"]["simple"]
    assert d["estimate"] == pytest.approx(expected.estimate) and d["interval"]["lo"] == pytest.approx(
        expected.interval.lo) and d["exceeds"] == expected.exceeds
    assert fid["arms"]["hybrid"]["std"] == pytest.approx(abs(a[0] - a[1]) / math.sqrt(2))
    stored = json.loads((tmp_path / "runs/toy/ablation.json").read_text())
    assert {row["metric"] for row in stored["rows"]} >= {"fid", "kid", "precision", "recall", "adherence"}
    report = (tmp_path / "reports/toy.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| res32_ddpm2_n6 | 3 | FID |"))
    cells = row.strip("| ").split(" | ")
    assert cells[3].startswith(f"{fid['arms']['hybrid']['mean']:.4g} ± ") and "[" in cells[3] and "[" in cells[4]
    assert cells[5].startswith(f"{d['estimate']:+.3g} [") and cells[6] == ("**yes**" if d["exceeds"] else "no")
    assert "NOT a real FID" in report
    per_run = [line for line in report.splitlines() if line.startswith("| hybrid_seed0 | res32_ddpm2_n6 |")]
    assert per_run and "[" in per_run[0].split(" | ")[4]  # the per-run FID with its bootstrap interval
    compare = list((tmp_path / "runs/toy/wandb").glob("offline-run-*"))
    assert len(compare) == 1

    # a second call trains and evaluates nothing: checkpoints and results untouched, the report remade
    again = glide_main(argv)
    assert {path: path.stat().st_mtime_ns for path in ckpts} == ckpts
    assert {path: path.stat().st_mtime_ns for path in results} == results
    def plain(rows):
        return json.loads(json.dumps(rows, default=lambda v: v.to_dict()))

    assert plain(again["rows"]) == plain(summary["rows"]) == stored["rows"]
    assert all(json.loads((run_dir / STATE_FILE).read_text()).keys() == {"fit", "sweep"} for run_dir in runs.values())


def test_a_rerun_updates_the_one_compare_run(tmp_path):
    """Run again (seeds added), the ablation resumes its `<group>-compare` wandb run (an id from project and group)
    rather than adding another of the same name."""
    from types import SimpleNamespace

    from glide_lightning.evaluation.ablation import log_compare_run
    from glide_lightning.evaluation.uncertainty import Interval

    group = AblationGroup(name="toy", arms={"hybrid": ["h.yaml"], "simple": ["s.yaml"]}, eval=None)
    runs = {("hybrid", 0): SimpleNamespace(config={"run": {"project": "proj"}})}

    def summary(seeds, fid, diff):
        arm = {"n": len(seeds), "mean": fid, "std": 1.0, "interval": Interval(fid - 1, fid + 1), "bootstrap": []}
        differences = {} if diff is None else {"simple": {"estimate": diff, "exceeds": False,
                                                          "interval": {"lo": diff - 1, "hi": diff + 1}}}
        return {"baseline": "hybrid", "seeds": seeds, "confidence": 0.95, "runs": [f"hybrid_seed{s}" for s in seeds],
                "rows": [{"setting": "ddpm2", "guidance": 3.0, "metric": "fid",
                          "arms": {"hybrid": arm, "simple": {**arm, "mean": fid + (diff or -3.0)}},
                          "differences": differences}]}

    for seeds, fid, diff in (([0], 10.0, 1.0), ([0, 1], 12.0, None)):  # the rerun compares no difference
        with offline_wandb(tmp_path):  # each call a process of its own, as each ablation command is
            log_compare_run(group, summary(seeds, fid, diff), runs, "offline", tmp_path / "toy")
    assert len(list((tmp_path / "toy/wandb").glob("offline-run-*"))) == 2  # two sessions ...
    (run,) = find_runs(tmp_path / "toy")  # ... of one run
    assert (run.name, run.job_type, run.group, run.project) == ("toy-compare", "compare", "toy", "proj")
    assert run.summary["hybrid/fid@3/ddpm2"] == 12.0 and run.summary["simple/fid@3/ddpm2"] == 9.0
    assert run.config["seeds"] == [0, 1]
    # what the first call compared and the rerun no longer does is no longer a value (None), offline and online
    assert run.summary["diff/simple-hybrid/fid@3/ddpm2"] is None and run.summary["diff/simple-hybrid/fid@3/ddpm2_lo"] is None
    assert [row["mean"] for row in run.table("comparison")] == [12.0, 9.0]


def test_a_fit_that_exits_0_short_of_its_max_steps_is_not_done(tmp_path, monkeypatch):
    """A run stopped and requeued by SLURM exits 0 with its checkpoint short of max_steps: the ablation says so and
    records nothing, so that a rerun resumes the training instead of evaluating half-trained weights."""
    import sys

    import torch

    from glide_lightning.evaluation.ablation import _step

    run_dir = tmp_path / "hybrid_seed0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": 10}}))
    monkeypatch.setattr(sys, "executable", "true")  # `true -m glide_lightning fit …`: exits 0, does nothing
    for step, done in ((4, False), (10, True)):
        torch.save({"global_step": step}, run_dir / "checkpoints/last.ckpt")
        if done:
            assert _step(run_dir, "fit", ["fit"], "toy: train hybrid seed 0")
            assert json.loads((run_dir / STATE_FILE).read_text())["fit"]["step"] == 10
        else:
            with pytest.raises(ChildProcessError, match="stopped at step 4 of its max_steps 10"):
                _step(run_dir, "fit", ["fit"], "toy: train hybrid seed 0")
            assert not (run_dir / STATE_FILE).exists()
