"""Plain progress lines for logs (nohup, SLURM): steps of max_steps, loss, images/s, ETA, and a closing line."""

from __future__ import annotations

import logging

import lightning as L
import pytest

from glide_lightning.callbacks.progress import ProgressLog, progress_line
from glide_lightning.data import GlideDataModule
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.module import GlideModule

from tiny_model_config import TINY


def test_progress_line_reads_as_a_sentence_and_leaves_out_what_is_unknown():
    assert progress_line(120, 2000, 0.03124, 14.23, 130.0, 1.0) == \
        "step 120/2000 (6.0%) · loss 0.03124 · 14.2 img/s · elapsed 0:02:10 · ETA 0:31:20"
    assert progress_line(5, None, None, None, 3.0, None) == "step 5 · elapsed 0:00:03"
    with pytest.raises(ValueError, match="every_s must be > 0"):
        ProgressLog(every_s=0)


def test_a_fit_logs_progress_and_ends_naming_the_checkpoint_and_the_commands(synthetic_shards, tmp_path, caplog):
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    progress = ProgressLog(every_s=1e-6, only_without_terminal=False, run_dir=str(tmp_path / "myrun"),
                           experiment="smoke")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accumulate_grad_batches=2, callbacks=[progress], log_every_n_steps=1)
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=TINY.image_size,
                         text_ctx=TINY.text_ctx, batch_size=2, tokenizer="clip", bpe_dir=None, num_workers=0)
    with caplog.at_level(logging.INFO, logger="glide_lightning"):
        trainer.fit(module, datamodule=dm)
    lines = [r.getMessage() for r in caplog.records if r.name == "glide_lightning"]
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" · ")[0] for line in steps] == ["step 1/3 (33.3%)", "step 2/3 (66.7%)", "step 3/3 (100.0%)",
                                                         "step 3/3 (100.0%)"]  # once per optimizer step, + the end
    assert all("loss " in line and "img/s" in line and "ETA " in line for line in steps[1:])
    closing = lines[-1]
    assert "training stopped at step 3" in closing and str(tmp_path / "myrun/checkpoints") in closing
    assert "make sample ARGS='--ckpt" in closing and "make fid EXP=smoke RUN=myrun" in closing
