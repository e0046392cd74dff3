from pathlib import Path

import lightning as L
import pytest
import torch

from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.models import ModelConfig
from glide_lightning.module import GlideModule

TINY = ModelConfig(image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=[16],
                   dropout=0.0, text_ctx=16, xf_width=32, xf_layers=1, xf_heads=2)


def tiny_module(seed: int = 0) -> GlideModule:
    """A tiny GlideModule whose output layers are not zero (a fresh ADM model outputs exactly 0)."""
    torch.manual_seed(seed)
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    for p in module.model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return module


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A glide_lightning checkpoint of the tiny model (saved by a real Trainer, no training)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
    trainer.strategy.connect(tiny_module())
    trainer.save_checkpoint(path)
    return path
