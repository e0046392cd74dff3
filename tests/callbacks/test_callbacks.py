"""SampleGrid and GenerationMetrics in a real fit (tiny model, synthetic shards, wandb offline)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from glide_lightning.callbacks import GenerationMetrics, SampleGrid
from glide_lightning.callbacks.samples import sampling_model
from glide_lightning.data import GlideDataModule, TokenizerSpec
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.sampling import DEFAULT_GUIDANCE_SWEEP, SamplingConfig, generate
from glide_lightning.models import ModelConfig
from glide_lightning.module import GlideModule

REPO = Path(__file__).resolve().parents[2]

TINY = ModelConfig(image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=[16],
                   dropout=0.0, text_ctx=16, xf_width=32, xf_layers=1, xf_heads=2)
PROMPTS = ["a large red circle", "a small blue square above a large yellow triangle"]


def test_grid_cells_are_prompt_by_scale_with_fixed_seeds():
    torch.manual_seed(0)
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=20))
    for p in module.model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    grid_cb = SampleGrid(prompts=PROMPTS, guidance_scales=[1.0, 5.0], seed=3, sampling=SamplingConfig(steps="3"))
    grid = grid_cb.make_grid(module)
    assert grid.shape == (3, 2 * 32, 2 * 32) and torch.equal(grid, grid_cb.make_grid(module))
    loaded = sampling_model(module)
    for col, scale in enumerate([1.0, 5.0]):
        cell = generate(loaded, PROMPTS[1:], [4], replace(grid_cb.config, guidance_scale=scale))[0]
        # row 1 = prompt 1, seed 3 + 1 (up to float differences between batch sizes)
        diff = (grid[:, 32:64, col * 32:(col + 1) * 32].int() - cell.int()).abs()
        assert diff.float().mean() < 0.5 and (diff > 8).float().mean() < 0.01


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    # (an earlier test's wandb run and setup are gone: conftest's _wandb_as_at_process_end)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var))


def test_fit_logs_grids_and_generation_metrics_and_keeps_the_best_fid_checkpoint(synthetic_shards, tmp_path,
                                                                                  offline_wandb):
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=20))
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/fid@3", mode="min", save_top_k=1)
    callbacks = [EMAWeightAveraging(decay=0.9), best,
                 SampleGrid(prompts=PROMPTS, guidance_scales=[1.0, 3.0], every_n_steps=2,
                            sampling=SamplingConfig(steps="2")),
                 GenerationMetrics(num_samples=8, guidance_scales=[1.0, 3.0], extractor="random-conv", adherence=True,
                                   sampling=SamplingConfig(steps="2"))]
    logger = WandbLogger(project="test", save_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
                        limit_val_batches=2, num_sanity_val_steps=0, logger=logger, callbacks=callbacks,
                        default_root_dir=str(tmp_path), enable_progress_bar=False, log_every_n_steps=1)
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", val_shards=f"{synthetic_shards}/val-*.tar",
                         image_size=32, tokenizer_spec=TokenizerSpec("clip", 16), batch_size=4, num_workers=0)
    trainer.fit(module, datamodule=dm)
    grids = sorted((tmp_path / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step00000002.png", "step00000004.png"]
    assert Image.open(grids[0]).size == (2 * 32, 2 * 32)
    metrics = trainer.callback_metrics
    for key in ("val/fid@1", "val/fid@3", "val/adherence@1", "val/adherence@3", "val/fid_random_weights"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/adherence@3"]) <= 1.0 and float(metrics["val/fid_random_weights"]) == 1.0
    assert best.best_model_path and float(best.best_model_score) <= float(metrics["val/fid@3"]) + 1e-9
    logger.experiment.finish()
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/samples/*.png"))
    assert len(media) == 2, "each grid is logged to wandb as an image"


def global_rng_states() -> tuple:
    import random

    import numpy as np

    numpy_state = np.random.get_state()
    return torch.get_rng_state(), numpy_state[1].tobytes(), numpy_state[2:], random.getstate()


class RNGBetweenSteps(L.Callback):
    """Compares the global RNG states from the end of a training step (before the other callbacks:
    sample grids, then validation with generation metrics, checkpointing) to the start of the next."""

    def __init__(self) -> None:
        self.after_step: tuple | None = None
        self.changed: list[int] = []
        self.checked: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.after_step = global_rng_states()

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if self.after_step is None:
            return
        now = global_rng_states()
        same = torch.equal(now[0], self.after_step[0]) and now[1:] == self.after_step[1:]
        (self.checked if same else self.changed).append(trainer.global_step)


def test_validation_grids_and_metrics_leave_the_global_rng_alone(synthetic_shards, tmp_path, offline_wandb):
    """Fixed random weights (random-conv FID features, an untrained CLIP) come from private RNGs: the
    run's own random stream (timesteps, noise, caption drops) is the same with or without them."""
    probe = RNGBetweenSteps()
    callbacks = [probe, EMAWeightAveraging(decay=0.9),
                 SampleGrid(prompts=PROMPTS, guidance_scales=[1.0, 3.0], every_n_steps=2,
                            sampling=SamplingConfig(steps="2")),
                 GenerationMetrics(num_samples=4, guidance_scales=[3.0], extractor="random-conv", adherence=True,
                                   clip_model="ViT-B-32", clip_pretrained=None, sampling=SamplingConfig(steps="2"))]
    trainer = L.Trainer(accelerator="cpu", max_steps=3, val_check_interval=2, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0, logger=False, callbacks=callbacks,
                        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_checkpointing=False)
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", val_shards=f"{synthetic_shards}/val-*.tar",
                         image_size=32, tokenizer_spec=TokenizerSpec("clip", 16), batch_size=4, num_workers=0)
    trainer.fit(GlideModule(model=TINY, diffusion=DiffusionConfig(steps=20)), datamodule=dm)
    assert "val/clip_score@3" in trainer.callback_metrics and (tmp_path / "samples/step00000002.png").exists()
    assert probe.changed == [] and probe.checked == [1, 2]  # step 2 ran a grid and a validation


def test_fixed_random_weights_are_reproducible_and_private():
    from glide_lightning.evaluation.clip_score import CLIPScorer
    from glide_lightning.evaluation.zero_shot import build_extractor

    torch.manual_seed(123)
    before = global_rng_states()
    first, second = build_extractor("random-conv"), build_extractor("random-conv")
    clips = [CLIPScorer("ViT-B-32", pretrained=None) for _ in range(2)]
    after = global_rng_states()
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    for a, b in ((first.module, second.module), (clips[0].model, clips[1].model)):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)


class MicroBatches(L.Callback):
    """Records global_step after every micro-batch and when each validation starts."""

    def __init__(self, signal_at_micro_batch: int | None = None) -> None:
        self.steps: list[int] = []
        self.validations: list[int] = []
        self.signal_at = signal_at_micro_batch

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append(trainer.global_step)
        if len(self.steps) == self.signal_at:
            import signal

            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, half-way through an accumulation

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validations.append(trainer.global_step)


def accumulating_fit(tmp_path, synthetic_shards, callbacks, max_steps: int, **trainer_kwargs) -> L.Trainer:
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=20))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                        callbacks=callbacks, default_root_dir=str(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs)
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", val_shards=f"{synthetic_shards}/val-*.tar",
                         image_size=32, batch_size=2, num_workers=0,
                         tokenizer_spec=TokenizerSpec("clip", 16), shuffle_buffer=10)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_step_callbacks_fire_once_per_optimizer_step_under_accumulation(synthetic_shards, tmp_path, caplog):
    from glide_lightning.callbacks import OptimizerStepCallback

    class Steps(OptimizerStepCallback):
        def __init__(self) -> None:
            self.calls: list[int] = []

        def on_optimizer_step_end(self, trainer, pl_module) -> None:
            self.calls.append(trainer.global_step)

    micro, steps = MicroBatches(), Steps()
    grid = SampleGrid(prompts=PROMPTS[:1], guidance_scales=[1.0], every_n_steps=2,
                      sampling=SamplingConfig(steps="2"))
    caplog.set_level("INFO", logger="glide_lightning.callbacks.samples")
    accumulating_fit(tmp_path, synthetic_shards, [micro, steps, grid], max_steps=4, limit_val_batches=0)
    assert micro.steps == [0, 1, 1, 2, 2, 3, 3, 4]  # 8 micro-batches, 4 optimizer steps
    assert steps.calls == [1, 2, 3, 4]
    fired = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sample grid at step")]
    assert [m.split()[4] for m in fired] == ["2", "4"]  # not at step 0 (first micro-batch), not twice at 2


def test_a_run_ending_at_max_steps_between_two_grids_ends_with_one(synthetic_shards, tmp_path):
    grid = SampleGrid(prompts=PROMPTS[:1], guidance_scales=[1.0], every_n_steps=3, sampling=SamplingConfig(steps="2"))
    accumulating_fit(tmp_path, synthetic_shards, [grid], max_steps=4, limit_val_batches=0)
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step00000003.png", "step00000004.png"]


def test_ctrl_c_mid_accumulation_stops_after_the_step_without_validation_or_grid(synthetic_shards, tmp_path, caplog):
    from glide_lightning.callbacks import GracefulInterrupt, RunCheckpoint

    micro = MicroBatches(signal_at_micro_batch=5)  # the first micro-batch of step 3
    grid = SampleGrid(prompts=PROMPTS[:1], guidance_scales=[1.0], every_n_steps=3,
                      sampling=SamplingConfig(steps="2"))
    checkpoints = RunCheckpoint(tmp_path / "checkpoints", every_n_train_steps=100)
    caplog.set_level("INFO")
    trainer = accumulating_fit(tmp_path, synthetic_shards, [GracefulInterrupt(), micro, grid, checkpoints],
                               max_steps=50, val_check_interval=100, check_val_every_n_epoch=None,
                               limit_val_batches=2)
    assert micro.steps == [0, 1, 1, 2, 2, 3]  # the signal came mid-step 3: step 3 was completed, then stop
    assert trainer.global_step == 3
    assert micro.validations == [], "an interrupted run does not validate"
    assert not list((tmp_path / "samples").glob("*.png")), "nor draw a grid at the stopping step"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    assert sum("received SIGINT" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("callback", [SampleGrid(prompts=PROMPTS[:1], sampling=SamplingConfig(steps="25")),
                                      GenerationMetrics(num_samples=2, extractor="random-conv",
                                                        sampling=SamplingConfig(sampler="ddim", steps="ddim30"))])
def test_sampling_steps_that_do_not_fit_the_process_fail_before_training(synthetic_shards, tmp_path, callback):
    micro = MicroBatches()
    with pytest.raises(ValueError, match=r"steps '(25|ddim30)' does not fit the model's process of "
                                         r"model.diffusion.steps=20.*init_args.sampling.steps"):
        accumulating_fit(tmp_path, synthetic_shards, [micro, callback], max_steps=2, limit_val_batches=0)
    assert micro.steps == [], "no training step ran"


class WeightsSeenByMetrics(GenerationMetrics):
    """GenerationMetrics at its real hook, recording the weights it would sample instead of sampling."""

    def __init__(self) -> None:
        super().__init__(num_samples=2, extractor="random-conv", sampling=SamplingConfig(steps="2"))
        self.seen: list[tuple[int, dict[str, torch.Tensor], str]] = []

    def compute(self, pl_module):
        loaded = sampling_model(pl_module, self)
        self.seen.append((pl_module.global_step, {k: v.clone() for k, v in loaded.model.state_dict().items()},
                          loaded.source))
        return {}


class WeightsSeenByGrid(SampleGrid):
    def __init__(self) -> None:
        super().__init__(prompts=PROMPTS[:1], guidance_scales=[1.0], every_n_steps=2,
                         sampling=SamplingConfig(steps="2"))
        self.seen: list[tuple[int, dict[str, torch.Tensor], str]] = []

    def log_grid(self, trainer, pl_module):
        loaded = sampling_model(pl_module, self)
        self.seen.append((trainer.global_step, {k: v.clone() for k, v in loaded.model.state_dict().items()},
                          loaded.source))


class LiveWeights(L.Callback):
    """The optimizer's weights after every step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


@pytest.mark.parametrize("ema_first", [True, False])
@pytest.mark.parametrize("ema_start", [None, 10])
def test_generation_during_training_uses_the_ema_once_updated_whatever_the_order(synthetic_shards, ema_first,
                                                                                  ema_start):
    """decay 1.0 keeps the average at its first update (the weights after step 1), so it differs from
    the live weights at step 2, when the grid and the validation sample; with the EMA starting at
    step 10 there is no average yet and the live weights of step 2 must be used."""
    metrics, grid, live = WeightsSeenByMetrics(), WeightsSeenByGrid(), LiveWeights()
    ema = EMAWeightAveraging(decay=1.0, update_starting_at_step=ema_start)
    callbacks = [live, ema, metrics, grid] if ema_first else [live, metrics, grid, ema]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0, logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", val_shards=f"{synthetic_shards}/val-*.tar",
                         image_size=32, tokenizer_spec=TokenizerSpec("clip", 16), batch_size=4, num_workers=0)
    trainer.fit(GlideModule(model=TINY, diffusion=DiffusionConfig(steps=20), optimizer={"lr": 1e-2}), datamodule=dm)
    expected, kind = (live.after[2], "live weights") if ema_start else (live.after[1], "EMA weights")
    assert any(not torch.equal(live.after[1][k], live.after[2][k]) for k in expected)  # the two candidates differ
    for seen in (metrics.seen, grid.seen):
        assert [step for step, _, _ in seen] == [2]
        _, weights, source = seen[0]
        assert kind in source
        for name, value in expected.items():
            assert torch.equal(weights[name], value), name


def test_callback_sampling_options_are_typed_and_checked_when_the_yaml_is_parsed():
    """The callbacks of experiments/smoke.yaml parse into a SamplingConfig; a contradiction in one fails
    when the config is instantiated (before any trainer exists), naming the rule."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    specs = yaml.safe_load((REPO / "experiments/smoke.yaml").read_text())["trainer"]["callbacks"]
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    made = parser.instantiate(parser.parse_object({"callbacks": specs})).callbacks
    grid, metrics = (next(c for c in made if isinstance(c, kind)) for kind in (SampleGrid, GenerationMetrics))
    assert grid.config == metrics.config == SamplingConfig(steps="25")
    assert grid.scales == list(DEFAULT_GUIDANCE_SWEEP)  # the one sweep default
    for spec in specs:
        if spec["class_path"].endswith(("SampleGrid", "GenerationMetrics")):
            spec["init_args"]["sampling"]["steps"] = "ddim25"  # DDIM spacing with the default ddpm sampler
    with pytest.raises(ValueError, match="steps 'ddim25' is DDIM's stride spacing but sampler is 'ddpm'"):
        parser.instantiate(parser.parse_object({"callbacks": specs}))
