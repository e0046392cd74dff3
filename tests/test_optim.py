"""The LR schedule (linear warm-up, then constant or cosine decay) against its closed form, through a
real AdamW and through a real Lightning Trainer, across a resume from a checkpoint."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from glide_lightning.data import GlideDataModule, TokenizerSpec
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.module import GlideModule
from glide_lightning.optim import OptimizerConfig, build_optimizer


def closed_form(step: int, lr: float, warmup: int, schedule: str, decay: int | None = None, m: float = 0.0) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if step >= decay:
        return lr * m
    return lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))))


def lrs_through_adamw(config: OptimizerConfig, steps: int, max_steps: int | None = None) -> list[float]:
    holder = torch.nn.Linear(2, 1, bias=False)
    param = holder.weight
    built = build_optimizer(holder, config, max_steps)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("config,max_steps", [
    (OptimizerConfig(lr=1e-3, warmup_steps=5, lr_schedule="cosine", decay_steps=25, min_lr_ratio=0.1), None),
    (OptimizerConfig(lr=2e-3, warmup_steps=4, lr_schedule="cosine"), 20),  # D from the trainer's max_steps
    (OptimizerConfig(lr=3e-4, warmup_steps=0, lr_schedule="cosine", min_lr_ratio=0.5), 10),
    (OptimizerConfig(lr=1e-4, warmup_steps=6), None),  # constant after the warm-up (GLIDE, miniGLIDE)
    (OptimizerConfig(lr=1e-4), None),
])
def test_lr_at_every_step_equals_the_closed_form(config, max_steps):
    decay = config.decay_steps or max_steps
    seen = lrs_through_adamw(config, 30, max_steps)
    expected = [closed_form(s, config.lr, config.warmup_steps, config.lr_schedule, decay, config.min_lr_ratio)
                for s in range(30)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
    if config.lr_schedule == "cosine":
        assert max(seen) == pytest.approx(config.lr) and seen[-1] == pytest.approx(config.lr * config.min_lr_ratio)
        midpoint = config.warmup_steps + (decay - config.warmup_steps) // 2
        if (decay - config.warmup_steps) % 2 == 0:  # half-way through the decay: the mean of lr and its floor
            assert seen[midpoint] == pytest.approx(config.lr * (1 + config.min_lr_ratio) / 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr_schedule="linear"), "unknown lr_schedule 'linear'; choose one of constant, cosine"),
    (dict(lr_schedule="cosine", warmup_steps=10, decay_steps=10), "must be > warmup_steps"),
    (dict(lr_schedule="cosine", min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(decay_steps=100), "set lr_schedule 'cosine'"),
])
def test_bad_schedules_fail_when_the_config_is_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)


@pytest.mark.parametrize("max_steps", [None, -1])
def test_cosine_without_an_end_is_refused(max_steps):
    with pytest.raises(ValueError, match="needs optimizer.decay_steps or trainer.max_steps"):
        build_optimizer(torch.nn.Linear(1, 1), OptimizerConfig(lr_schedule="cosine", warmup_steps=5),
                        max_steps)


def test_a_run_shorter_than_the_warmup_warms_up_and_says_so(caplog):
    config = OptimizerConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=5, min_lr_ratio=0.1)
    with caplog.at_level("WARNING"):
        seen = lrs_through_adamw(config, 7, max_steps=3)
    assert "ends within the LR warm-up" in caplog.text
    assert seen == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-4, 1e-4])


def test_weight_decay_skips_biases_norms_and_embeddings_of_the_glide_model():
    from glide_lightning.models import ModelConfig, build_model

    model = build_model(ModelConfig(**TINY))
    decayed, kept = (group["params"] for group in
                     build_optimizer(model, OptimizerConfig(weight_decay=0.05))["optimizer"].param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    kept_names = {names[id(p)] for p in kept}
    assert {"token_embedding.weight", "positional_embedding", "padding_embedding", "final_ln.weight",
            "final_ln.bias", "out.0.weight", "input_blocks.0.0.bias"} <= kept_names
    assert all(p.ndim >= 2 for p in decayed) and "input_blocks.0.0.weight" in {names[id(p)] for p in decayed}
    assert "time_embed.0.weight" in {names[id(p)] for p in decayed}  # a Linear layer, not an embedding table
    assert len(decayed) + len(kept) == len(list(model.parameters()))  # every parameter once


@pytest.mark.parametrize("implementation", ["foreach", "for_loop", "fused"])
def test_adamw_kernels_and_groups_give_the_closed_form_update(implementation):
    """One AdamW step from zero moments moves each parameter by lr·sign(g) (m̂/√v̂ = g/|g|), plus the
    decoupled decay lr·wd·p for the decayed group only (Loshchilov & Hutter 2019, Algorithm 2)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    lr, wd = 1e-2, 0.1
    optimizer = build_optimizer(layer, OptimizerConfig(lr=lr, weight_decay=wd, implementation=implementation))
    optimizer = optimizer["optimizer"]
    assert optimizer.defaults["foreach" if implementation != "fused" else "fused"] is (implementation != "for_loop")
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    optimizer.step()
    for name, p in layer.named_parameters():
        decay = wd if name == "weight" else 0.0
        expected = before[name] * (1 - lr * decay) - lr * grads[name].sign()
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


TINY = {"image_size": 32, "model_channels": 32, "num_res_blocks": 1, "channel_mult": (1, 2),
        "attention_resolutions": [16], "dropout": 0.0, "text_ctx": 16, "xf_width": 32, "xf_layers": 1, "xf_heads": 2}


class RecordLR(L.Callback):
    """The LR each optimizer step uses, by global step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_the_schedule_runs_in_lightning_and_resumes_from_the_checkpoint(synthetic_shards, tmp_path):
    """Warm-up 2, cosine to the trainer's max_steps: 3 steps (decaying to 3), a checkpoint (the scheduler's
    step in it), then a new Trainer and module resumed from it with max_steps 6: steps 3-5 use the
    closed form's LR for an end at 6 (the step comes from the checkpoint, the end from this run)."""
    from glide_lightning.models import ModelConfig

    config = OptimizerConfig(lr=1e-3, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)

    def trainer_fit(max_steps: int, ckpt_path=None) -> tuple[L.Trainer, RecordLR]:
        torch.manual_seed(0)
        record = RecordLR()
        module = GlideModule(model=ModelConfig(**TINY), optimizer=config,
                             diffusion=DiffusionConfig(steps=50, loss_type="simple", variance_type="fixed_small"))
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                            limit_val_batches=0)
        dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=32,
                             batch_size=2, tokenizer_spec=TokenizerSpec("clip", 16), num_workers=0, shuffle_buffer=10)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, record

    first, before = trainer_fit(3)
    path = tmp_path / "at3.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["lr_schedulers"][0]["last_epoch"] == 3
    # the decay's end comes from the trainer's max_steps: the resumed run ends at 6, from its first step
    _, after = trainer_fit(6, ckpt_path=str(path))
    expected = {s: closed_form(s, 1e-3, 2, "cosine", 6, 0.1) for s in range(6)}
    assert set(after.lr) == {3, 4, 5}
    assert {s: after.lr[s] for s in (3, 4, 5)} == pytest.approx({s: expected[s] for s in (3, 4, 5)}, rel=1e-9)
    # the first session decayed towards its own max_steps (3)
    assert before.lr == pytest.approx({s: closed_form(s, 1e-3, 2, "cosine", 3, 0.1) for s in range(3)}, rel=1e-9)


def test_the_adamw_kernel_follows_the_precision_and_clipping():
    """auto: fused unless gradients are clipped under mixed precision (Lightning's MixedPrecision plugin refuses
    to clip a fused optimizer's gradients at the first step); an explicit fused there is refused, naming both."""
    from glide_lightning.optim import KernelPrecisionError, adamw_kernel

    params = list(torch.nn.Linear(2, 2).parameters())
    assert adamw_kernel(OptimizerConfig(), params) == {"fused": True}
    assert adamw_kernel(OptimizerConfig(), params, amp_clipping=True) == {"foreach": True}
    assert adamw_kernel(OptimizerConfig(implementation="foreach"), params, amp_clipping=True) == {"foreach": True}
    with pytest.raises(KernelPrecisionError, match="model.optimizer.implementation 'fused'.*trainer.precision"):
        adamw_kernel(OptimizerConfig(implementation="fused"), params, amp_clipping=True)
