"""The ablation report on two tiny real runs (CLI fits, then the fid command, then compare)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from held_out import write_held_out
from glide_lightning.commands import main as glide_main
from glide_lightning.evaluation.report import load_run
from hang_guard import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[2]


def test_report_on_two_tiny_runs(synthetic_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for arm, extra in [("simple", ["--model.diffusion.loss_type", "simple", "--model.diffusion.variance_type",
                                   "fixed_small"]), ("hybrid", [])]:
        command = [sys.executable, "-m", "glide_lightning", "fit", "--config", str(REPO / "experiments/smoke.yaml"),
                   "--data.train_shards", f"{synthetic_shards}/train-*.tar",
                   "--data.val_shards", f"{synthetic_shards}/val-*.tar", "--data.num_workers", "0",
                   "--data.batch_size", "4", "--run.root", str(tmp_path / "runs"), "--run.name", f"tiny_{arm}",
                   "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
                   "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", *extra]
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert run.returncode == 0, run.stderr[-3000:]
    reference, _, _ = write_held_out(tmp_path, 6, 32)
    for arm in ("simple", "hybrid"):
        glide_main(["fid", "--run_dir", str(tmp_path / "runs" / f"tiny_{arm}"),
                    "--captions", str(tmp_path / "captions.txt"), "--reference", str(reference), "--n", "6",
                    "--scales", "[1, 3]", "--extractor", "random-conv",
                    "--clip_model", "none", "--sampling.steps", "2", "--device", "cpu",
                    "--cache_dir", str(tmp_path / "cache")])
    out = glide_main(["compare", "--runs", f"[{tmp_path / 'runs/tiny_simple'}, {tmp_path / 'runs/tiny_hybrid'}]",
                      "--out", str(tmp_path / "reports/ablation.md")])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| tiny_") and "_n6 |" not in line]
    assert len(rows) == 2
    simple, hybrid = rows
    assert "| simple | fixed_small | v | 4 | 16 |" in simple and "| hybrid | learned_range | v | 4 | 16 |" in hybrid
    assert "NOT a real FID" in text
    run = load_run(tmp_path / "runs/tiny_hybrid")
    assert f"{run.final('val/loss'):.4g}" in hybrid and len(run.curves["val/loss"]) == 2
    assert run.final("train/wall_time_s") > 0
    # the vb term (bits/dim): the hybrid arm's, none for the simple arm
    assert f"{run.final('train/vb', 0.1):.4g}" in hybrid and simple.split(" | ")[8] == "–"
    # one evaluation row per run and guidance scale, with its FID and adherence
    evals = {(cells[0], cells[2]): cells for cells in (line.rstrip(" |").split(" | ") for line in text.splitlines()
                                                       if line.startswith("| tiny_") and "_n6 |" in line)}
    assert sorted(evals) == [("| tiny_hybrid", "1"), ("| tiny_hybrid", "3"), ("| tiny_simple", "1"),
                             ("| tiny_simple", "3")]
    result = {r.guidance_scale: r for r in next(iter(run.evals.values()))}[3.0]
    def ci(metric, spec):  # each value followed by its bootstrap interval over the generated images
        interval = result.interval(metric)
        assert interval is not None and interval.contains(result.value(metric)), metric
        return f" [{interval.lo:{spec}}, {interval.hi:{spec}}]"

    assert evals[("| tiny_hybrid", "3")][4:7] == [f"{result.fid.fid:.2f}{ci('fid', '.2f')}", "–",
                                                  f"{result.adherence:.3g}{ci('adherence', '.3g')}"]
    # KID (mean ± std over subsets), precision and recall from the same (random) features; no DINOv2 weights given
    assert "| FID | CLIP score | adherence | KID | precision | recall | FD_DINOv2 |" in text
    assert evals[("| tiny_hybrid", "3")][7:] == [f"{result.kid.mean:.4f} ± {result.kid.std:.4f}{ci('kid', '.4f')}",
                                                 f"{result.precision:.3g}{ci('precision', '.3g')}",
                                                 f"{result.recall:.3g}{ci('recall', '.3g')}", "–"]
    assert "bootstrap interval over each run's generated images (value ± z·se)" in text
    assert result.fd_dinov2 is None and result.fd_dinov2_reason.startswith("not computed")
    assert "NOT a real KID or precision/recall" in text
    for plot in ("ablation_losses.png", "ablation_fid.png"):
        assert (tmp_path / "reports" / plot).stat().st_size > 1000 and plot in text
    # --publish without an API key: the markdown report is written, the wandb Report is not, and how to is said
    monkeypatch.setenv("WANDB_MODE", "offline")
    capsys.readouterr()
    glide_main(["compare", "--runs", f"[{tmp_path / 'runs/tiny_simple'}, {tmp_path / 'runs/tiny_hybrid'}]",
                "--out", str(tmp_path / "reports/ablation.md"), "--overwrite", "true", "--publish", "true"])
    said = capsys.readouterr().out
    assert (tmp_path / "reports/ablation.md").read_text() == text and "was not published" in said
    assert f"wandb sync {tmp_path / 'runs/tiny_simple'}/wandb/offline-run-*" in said and "--publish true" in said


def test_a_run_that_logged_no_metrics_is_reported_with_the_images_its_checkpoint_counted(tmp_path, caplog):
    """A run shorter than its log_every_n_steps has no metrics.csv: still a run (its losses blank). Images seen come
    from the checkpoint's counter, right after a resume that changed the batch size (3 steps × 32, then 3 × 8: 120,
    where steps × the last batch would say 48); a checkpoint from before the counter: steps × batch."""
    import torch

    run = tmp_path / "bs"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "bs"}, "data": {"batch_size": 8},
                                                    "trainer": {"log_every_n_steps": 10}}))
    torch.save({"global_step": 6, "callbacks": {"ImagesSeen": {"count": 120}}}, run / "checkpoints/last.ckpt")
    summary = load_run(run)
    assert summary.curves == {} and summary.steps == 6 and summary.images_seen == 120
    assert "logged no training metrics" in caplog.text
    torch.save({"global_step": 6}, run / "checkpoints/last.ckpt")
    assert load_run(run).images_seen == 48
    with pytest.raises(FileNotFoundError, match="no config.yaml and no csv"):
        load_run(tmp_path / "empty")
