"""Plain progress lines for logs (nohup, SLURM): steps of max_steps, loss, images/s, ETA, and a closing line."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest

from glide_lightning.callbacks.progress import ProgressLog, evaluate_command, progress_line
from glide_lightning.data import GlideDataModule, TokenizerSpec
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.module import GlideModule

from tiny_model_config import TINY


def test_progress_line_reads_as_a_sentence_and_leaves_out_what_is_unknown():
    assert progress_line(120, 2000, 0.03124, 14.23, 130.0, 1.0) == \
        "step 120/2000 (6.0%) · loss 0.03124 · 14.2 img/s · elapsed 0:02:10 · ETA 0:31:20"
    assert progress_line(5, None, None, None, 3.0, None) == "step 5 · elapsed 0:00:03"
    with pytest.raises(ValueError, match="every_s must be > 0"):
        ProgressLog(every_s=0)


def test_a_fit_logs_progress_and_ends_naming_the_checkpoint_and_the_commands(synthetic_shards, tmp_path, caplog,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ of the working directory, where make looks
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    progress = ProgressLog(every_s=1e-6, only_without_terminal=False, run_dir=str(tmp_path / "runs/myrun"),
                           experiment="smoke")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accumulate_grad_batches=2, callbacks=[progress], log_every_n_steps=1)
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=TINY.image_size,
                         batch_size=2, tokenizer_spec=TokenizerSpec("clip", TINY.text_ctx), num_workers=0)
    with caplog.at_level(logging.INFO, logger="glide_lightning"):
        trainer.fit(module, datamodule=dm)
    lines = [r.getMessage() for r in caplog.records if r.name == "glide_lightning"]
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in steps] == ["step 1/3 (33.3%)", "step 2/3 (66.7%)", "step 3/3 (100.0%)",
                                                         "step 3/3 (100.0%)"]  # once per optimizer step, + the end
    assert all("loss " in line and "img/s" in line and "ETA " in line for line in steps[1:])
    closing = lines[-1]
    assert "training stopped at step 3" in closing and str(tmp_path / "runs/myrun/checkpoints") in closing
    assert "make sample ARGS='--ckpt" in closing and closing.endswith("evaluate it: make fid EXP=smoke RUN=myrun")


def test_the_closing_line_evaluates_a_run_where_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert evaluate_command(Path("runs/smoke"), "smoke") == "make fid EXP=smoke"
    # an ablation's run sits one folder deeper: make's RUN= is its path under runs/ (Makefile: RUN_DIR = runs/$(RUN))
    assert evaluate_command(tmp_path / "runs/ablation_smoke/hybrid_seed0", "smoke") == \
        "make fid EXP=smoke RUN=ablation_smoke/hybrid_seed0"
    assert evaluate_command(tmp_path / "elsewhere/x", "smoke") == \
        f"python -m glide_lightning fid --run_dir {tmp_path / 'elsewhere/x'}"


class _BarProbe(L.Callback):
    """What the bar shows after each batch: (steps done, steps in all) and its metrics."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float | None]] = []
        self.metrics: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = trainer.progress_bar_callback
        self.seen.append((bar.train_progress_bar.completed, bar.train_progress_bar.total))
        self.metrics = bar.get_metrics(trainer, pl_module)


def test_the_bar_counts_optimizer_steps_of_max_steps_across_epochs(synthetic_shards):
    from glide_lightning.callbacks.progress import StepProgressBar

    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    probe = _BarProbe()
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, limit_train_batches=2,
                        callbacks=[StepProgressBar(), probe], log_every_n_steps=1)
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=TINY.image_size,
                         batch_size=2, tokenizer_spec=TokenizerSpec("clip", TINY.text_ctx), num_workers=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.current_epoch >= 2  # 2 batches an epoch: the 5 steps span 3 epochs
    assert probe.seen == [(step, 5) for step in range(1, 6)]  # one bar, never reset per epoch (Lightning's is)
    assert "train/loss" in probe.metrics and float(probe.metrics["img/s"]) > 0 and "v_num" not in probe.metrics


def test_the_model_summary_counts_one_images_forward_flops(synthetic_shards, capsys):
    import torch
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
    from torch.utils.flop_counter import FlopCounterMode

    from glide_lightning.callbacks.progress import ModelSummary
    from glide_lightning.models.config import build_model
    from glide_lightning.models.flops import example_inputs

    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ModelSummary()])
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=TINY.image_size,
                         batch_size=2, tokenizer_spec=TokenizerSpec("clip", TINY.text_ctx), num_workers=0)
    capsys.readouterr()
    trainer.fit(module, datamodule=dm)
    printed = capsys.readouterr().out
    with torch.device("meta"):  # the same forward counted on the meta device, outside Lightning
        network = build_model(TINY)
        x_t, timesteps, kwargs = example_inputs(TINY, 1)
        with FlopCounterMode(display=False) as counter:
            network(x_t, timesteps, **kwargs)
    assert counter.get_total_flops() > 0
    assert f"Total FLOPs: {get_human_readable_count(counter.get_total_flops())}" in printed
    assert "In sizes" not in printed
