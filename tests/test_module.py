"""GlideModule with a real Lightning Trainer on real shards (in process, wandb off)."""

from __future__ import annotations

import io
import json
import tarfile

import lightning as L
import pytest
import torch
from PIL import Image

from glide_lightning.conditioning import drop_captions
from glide_lightning.data import GlideDataModule, TokenizerSpec
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.models import ModelConfig
from glide_lightning.module import GlideModule

TINY = ModelConfig(image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=[16],
                   dropout=0.0, text_ctx=16, xf_width=32, xf_layers=1, xf_heads=2)


class Logged(L.Callback):
    """Every value logged at every training step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module: GlideModule, shards: str, steps: int, callbacks: tuple = (), **data) -> tuple[L.Trainer, Logged]:
    logged = Logged()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[logged, *callbacks],
                        limit_val_batches=0, log_every_n_steps=1)
    dm = GlideDataModule(train_shards=shards, image_size=32, batch_size=4,
                         tokenizer_spec=TokenizerSpec("clip", 16), num_workers=0,
                         shuffle_buffer=10, **data)
    trainer.fit(module, datamodule=dm)
    return trainer, logged


@pytest.mark.parametrize("loss,variance,has_vb", [("simple", "fixed_small", False), ("hybrid", "learned_range", True),
                                                  ("p2", "fixed_small", False)])
def test_the_loss_decides_the_logged_terms(synthetic_shards, loss, variance, has_vb):
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50, loss_type=loss, variance_type=variance))
    trainer, logged = fit(module, f"{synthetic_shards}/train-*.tar", 2)
    keys = set(logged.steps[-1])
    assert {"train/loss", "train/mse"} <= keys
    assert ("train/vb" in keys) == has_vb and any(k.startswith("train/vb_q") for k in keys) == has_vb
    if loss == "simple":  # L_simple's loss is its MSE
        assert logged.steps[-1]["train/loss"] == pytest.approx(logged.steps[-1]["train/mse"])
    if loss == "p2":  # weights 1/(1 + SNR) < 1 shrink the loss below the MSE
        assert logged.steps[-1]["train/loss"] < logged.steps[-1]["train/mse"]


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_observed_caption_drop_rate_matches_the_configured_one(p):
    torch.manual_seed(0)
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=10), cond_drop_prob=p)
    n = 20000
    tokens = torch.randint(1, 1000, (n, 16))
    mask = torch.ones(n, 16, dtype=torch.bool)
    empty_tokens, empty_mask = module.tokenizer.empty(1)
    new_tokens, new_mask, drop = drop_captions(tokens, mask, empty_tokens, empty_mask, module.cond_drop_prob)
    rate = drop.float().mean().item()
    assert rate == pytest.approx(p, abs=4 * (p * (1 - p) / n) ** 0.5 + 1e-9)
    assert torch.equal(new_tokens[drop], empty_tokens.expand(int(drop.sum()), -1))
    assert not new_mask[drop].any()
    assert torch.equal(new_tokens[~drop], tokens[~drop]) and new_mask[~drop].all()


def test_logged_drop_rate_during_training(synthetic_shards):
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50), cond_drop_prob=0.5)
    trainer, logged = fit(module, f"{synthetic_shards}/train-*.tar", 12)
    rates = [step["train/cond_drop_rate"] for step in logged.steps]
    assert 0.25 < sum(rates) / len(rates) < 0.75  # 48 Bernoulli(0.5) draws


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted_while_training_completes(synthetic_shards, tmp_path):
    image = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image, "PNG")
    mixed = tmp_path / "train-000000.tar"  # 50 good samples, a corrupt JPEG and a sample without caption
    with tarfile.open(synthetic_shards / "train-000000.tar") as good, tarfile.open(mixed, "w") as tar:
        for member in good.getmembers():
            _tar_member(tar, member.name, good.extractfile(member).read())
        _tar_member(tar, "corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
        _tar_member(tar, "corrupt.txt", b"a broken picture")
        _tar_member(tar, "nocaption.png", image.getvalue())
        _tar_member(tar, "nocaption.json", json.dumps({"source": "test"}).encode())
    garbage = tmp_path / "train-000001.tar"
    garbage.write_bytes(bytes(range(256)) * 40)
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    trainer, logged = fit(module, [str(mixed), str(garbage)], 40)
    assert trainer.global_step == 40
    skipped = [step["data/skipped"] for step in logged.steps]
    assert skipped == sorted(skipped), "the count only grows"
    assert skipped[-1] >= 3  # at least one read of each bad shard: 2 bad samples + 1 garbage shard


def test_hparams_round_trip_through_a_weights_only_checkpoint(tmp_path):
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50, loss_type="p2", variance_type="fixed_small"))
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    loaded = GlideModule(**checkpoint["hyper_parameters"])
    assert loaded.model_config == TINY and loaded.diffusion_config == module.diffusion_config
    assert (loaded.diffusion_config.loss_type, loaded.diffusion_config.weighting) == ("simple", "p2")  # loss_type p2


def test_a_v_prediction_run_checkpoints_its_target_for_sampling(synthetic_shards, tmp_path):
    """Trained 2 steps with v (and min-SNR) through the real Trainer, saved, read back by the one
    checkpoint reader: the diffusion config says v, so every sampler reads the outputs as v."""
    from glide_lightning.sampling import SamplingConfig, generate, load_checkpoint

    diffusion = DiffusionConfig(steps=50, loss_type="hybrid", prediction="v", min_snr_gamma=5.0)
    trainer, _ = fit(GlideModule(model=TINY, diffusion=diffusion), f"{synthetic_shards}/train-*.tar", 2)
    assert trainer.global_step == 2
    path = tmp_path / "v.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_checkpoint(path)
    assert loaded.diffusion_config == diffusion and loaded.diffusion_config.prediction == "v"
    images = generate(loaded, ["a red circle"], [0], SamplingConfig(steps="5", guidance_scale=3.0))
    assert images.shape == (1, 3, 32, 32)


def test_inconsistent_model_and_variance_are_rejected():
    with pytest.raises(ValueError, match="learn_sigma"):
        GlideModule(model=ModelConfig(**{**TINY.to_dict(), "learn_sigma": False}), diffusion=DiffusionConfig(steps=10))
    with pytest.raises(ValueError, match="cond_drop_prob"):
        GlideModule(model=TINY, cond_drop_prob=1.5)


def test_init_from_a_checkpoint_or_a_glide_file(tmp_path):
    from glide_lightning.models import CheckpointMismatchError

    source = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    for p in source.model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=0)
    trainer.strategy.connect(source)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    target = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50), init_from=str(tmp_path / "a.ckpt"))
    target.load_initial_weights(str(tmp_path / "a.ckpt"))
    for (name, a), b in zip(source.model.state_dict().items(), target.model.state_dict().values()):
        assert torch.equal(a, b), name
    # a bare state dict is taken as glide-text2im's: this tiny model is not GLIDE's base, which is said clearly
    torch.save(source.model.state_dict(), tmp_path / "not_glide.pt")
    with pytest.raises(CheckpointMismatchError, match="shape"):
        target.load_initial_weights(str(tmp_path / "not_glide.pt"))


def test_init_from_refuses_a_released_model_of_another_kind_or_architecture(glide_placeholder, tmp_path):
    target = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    with pytest.raises(ValueError, match="checkpoint's model must be of kind 'base', got 'upsample'"):
        target.load_initial_weights(str(glide_placeholder("upsample")))
    with pytest.raises(ValueError, match="init_from: .*glide-text2im base.* does not fit this model's architecture"):
        target.load_initial_weights(str(glide_placeholder("base")))  # GLIDE's base model is not this tiny one
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        target.load_initial_weights(str(tmp_path / "missing.ckpt"))


class PoisonBatches(L.Callback):
    """Makes the images of the given optimizer steps (1-based) NaN, as a corrupt batch would be, and
    records the weights before and after each step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step + 1
        self.before[step] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        if step in self.steps:
            batch["image"][:] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def guarded_fit(shards, steps: int, poison: set[int], tmp_path=None, **module_kwargs):
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50), **module_kwargs)
    probe, logged = PoisonBatches(poison), Logged()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe, logged],
                        limit_val_batches=0, log_every_n_steps=1, gradient_clip_val=1.0)
    dm = GlideDataModule(train_shards=shards, image_size=32, batch_size=4,
                         tokenizer_spec=TokenizerSpec("clip", 16), num_workers=0)
    return module, trainer, probe, logged, lambda: trainer.fit(module, datamodule=dm)


def test_a_nonfinite_step_is_skipped_and_training_goes_on(synthetic_shards):
    module, trainer, probe, logged, run = guarded_fit(f"{synthetic_shards}/train-*.tar", 5, poison={3})
    run()
    assert trainer.global_step == 5
    for name, value in probe.before[3].items():  # step 3 left every weight as it was
        assert torch.equal(probe.after[3][name], value), name
    changed = [n for n, v in probe.before[4].items() if not torch.equal(probe.after[4][n], v)]
    assert changed, "the next (finite) step trains again"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    counts = [step["train/nonfinite_steps"] for step in logged.steps]
    assert counts == [0.0, 0.0, 1.0, 1.0, 1.0]


class SeedPerBatch(L.Callback):
    """Seeds the global RNG from each batch's identity, so that a batch draws the same timesteps, noise and
    caption dropout whichever step it lands at."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(1000 + self.ids[batch_idx])


def fixed_batches(shards: str, n: int) -> list[dict]:
    dm = GlideDataModule(train_shards=shards, image_size=32, batch_size=4, tokenizer_spec=TokenizerSpec("clip", 16),
                         num_workers=0)
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        if len(batches) == n:
            return batches
    raise AssertionError("not enough batches")


def fit_on(batches: list[dict], ids: list[int], plugins=None, implementation: str = "auto",
           gradient_clip_val: float | None = 1.0):
    from glide_lightning.callbacks import WarmupEMA

    L.seed_everything(0)
    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50),
                         optimizer={"lr": 1e-3, "warmup_steps": 10, "weight_decay": 0.01,
                                    "implementation": implementation})
    ema, logged = WarmupEMA(decay=0.9, warmup="tf"), Logged()
    trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[SeedPerBatch(ids), ema, logged], log_every_n_steps=1,
                        gradient_clip_val=gradient_clip_val, plugins=plugins)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module, trainer, ema, logged


def test_a_skipped_step_is_skipped_everywhere_as_if_the_bad_batch_never_came(synthetic_shards):
    """The weights, AdamW's state, the LR schedule, the EMA weights and the EMA's warm-up count after a NaN
    batch and 3 more steps equal those of a run that never saw the batch; only global_step counts it."""
    batches = fixed_batches(f"{synthetic_shards}/train-*.tar", 6)
    bad = [{**b, "image": torch.full_like(b["image"], float("nan"))} if i == 2 else b for i, b in enumerate(batches)]
    skipped, s_trainer, s_ema, s_logged = fit_on(bad, list(range(6)))
    clean, c_trainer, c_ema, _ = fit_on([b for i, b in enumerate(batches) if i != 2], [0, 1, 3, 4, 5])
    assert [step["train/nonfinite_steps"] for step in s_logged.steps] == [0, 0, 1, 1, 1, 1]
    assert (s_trainer.global_step, c_trainer.global_step) == (6, 5)
    for (name, a), b in zip(skipped.model.state_dict().items(), clean.model.state_dict().values()):
        assert torch.equal(a, b), name
    s_opt, c_opt = s_trainer.optimizers[0].state_dict(), c_trainer.optimizers[0].state_dict()
    assert [g["lr"] for g in s_opt["param_groups"]] == [g["lr"] for g in c_opt["param_groups"]] == [6e-4, 6e-4]  # the 6th update's: (5 + 1)/10 of 1e-3
    for key, state in c_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(s_opt["state"][key][name], value), (key, name)
    assert s_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 5
    assert int(s_ema._average_model.n_averaged) == int(c_ema._average_model.n_averaged) == 5
    for (name, a), b in zip(s_ema._average_model.module.state_dict().items(),
                            c_ema._average_model.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_steps_the_fp16_grad_scaler_skips_are_skipped_everywhere_and_do_not_stop_the_run(synthetic_shards):
    """16-mixed: a scale far too large makes every scaled gradient overflow; the GradScaler skips those steps,
    and so do the LR schedule and the EMA. They are the scaler's calibration, not a failing run: more of them
    in a row than max_nonfinite_steps (5) do not stop it. (Lightning on a CPU turns precision 16-mixed into
    bf16-mixed: the GPU's plugin is given explicitly.)"""
    from lightning.pytorch.plugins.precision import MixedPrecision

    batches = fixed_batches(f"{synthetic_shards}/train-*.tar", 6)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 126))
    L.seed_everything(0)  # as fit_on builds its module
    before = {k: v.clone() for k, v in GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50)).state_dict().items()}
    module, trainer, ema, logged = fit_on(batches, list(range(6)), plugins=[plugin])
    assert trainer.global_step == 6 and trainer.precision_plugin.scaler.get_scale() < 2.0 ** 126
    assert [step["train/overflow_steps"] for step in logged.steps] == [1, 2, 3, 4, 5, 6]
    assert [step["train/nonfinite_steps"] for step in logged.steps] == [0] * 6
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 0
    assert int(ema._average_model.n_averaged) == 0


def test_a_nonfinite_step_of_a_fused_adamw_under_the_fp16_grad_scaler_changes_nothing(synthetic_shards):
    """16-mixed without clipping keeps the fused kernel, which unscales inside its step: a NaN batch is skipped
    there too (weights, AdamW state, EMA), and counted as non-finite, not as an overflow."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    batches = fixed_batches(f"{synthetic_shards}/train-*.tar", 3)
    bad = [{**b, "image": torch.full_like(b["image"], float("nan"))} if i == 2 else b for i, b in enumerate(batches)]
    module, trainer, ema, logged = fit_on(bad, [0, 1, 2], plugins=[MixedPrecision("16-mixed", "cpu")],
                                          implementation="fused", gradient_clip_val=None)
    assert trainer.optimizers[0].defaults["fused"]
    assert [step["train/nonfinite_steps"] for step in logged.steps][-1] == 1
    assert logged.steps[-1]["train/overflow_steps"] == logged.steps[1]["train/overflow_steps"]
    clean, c_trainer, c_ema, _ = fit_on(batches[:2], [0, 1], plugins=[MixedPrecision("16-mixed", "cpu")],
                                        implementation="fused", gradient_clip_val=None)
    for (name, a), b in zip(module.model.state_dict().items(), clean.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert int(ema._average_model.n_averaged) == int(c_ema._average_model.n_averaged)


def test_nonfinite_steps_in_a_row_stop_the_run_naming_steps_terms_and_timesteps(synthetic_shards):
    from glide_lightning.callbacks import NonFiniteLossError

    module, trainer, probe, _, run = guarded_fit(f"{synthetic_shards}/train-*.tar", 20, poison={3, 4, 5, 6},
                                                      max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError) as error:
        run()
    message = str(error.value)
    assert "optimizer steps 3-5" in message and "max_nonfinite_steps=3" in message
    assert "loss: [nan" in message and "mse: [nan" in message and "t: [" in message
    assert trainer.global_step == 4  # stopped during step 5: 6 never ran
    for name, value in probe.before[3].items():
        assert torch.equal(module.model.state_dict()[name], value), name  # the weights of step 2


def test_a_checkpoint_with_nonfinite_weights_is_refused(synthetic_shards, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from glide_lightning.callbacks import NonFiniteLossError

    class Corrupt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("inf"))

    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Corrupt(), saver], limit_val_batches=0)
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=32,
                         tokenizer_spec=TokenizerSpec("clip", 16), batch_size=4,
                         num_workers=0)
    with pytest.raises(NonFiniteLossError, match="non-finite weights"):
        trainer.fit(module, datamodule=dm)
    assert not list(tmp_path.glob("*.ckpt"))


@pytest.mark.parametrize("kwargs,match", [
    ({"model": ModelConfig(**{**TINY.to_dict(), "kind": "upsample"}), "low_res_noise": 0.1},
     r"set model.model.low_res_noise_cond: true"),
    ({"low_res_noise": 1.5}, r"model.low_res_noise must be in \[0, 1\]"),
    ({"tokenizer": "gpt2"},
     "model.model.n_vocab is 49408 but tokenizer 'gpt2' has 50257 tokens: set model.model.n_vocab: 50257"),
    ({"model": ModelConfig(**{**TINY.to_dict(), "text_ctx": 1})}, r"model.model.text_ctx 1 does not suit tokenizer"),
    ({"max_nonfinite_steps": 0}, r"max_nonfinite_steps must be >= 1"),
])
def test_configs_that_cannot_train_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlideModule(**{"diffusion": DiffusionConfig(steps=10), **kwargs})


def test_gpt2_with_its_vocabulary_constructs():
    module = GlideModule(model=ModelConfig(**{**TINY.to_dict(), "n_vocab": 50257}), diffusion=DiffusionConfig(steps=10),
                         tokenizer="gpt2")
    assert module.tokenizer.n_vocab == module.model_config.n_vocab == 50257


@pytest.mark.parametrize("speed", [{"channels_last": True}, {"gradient_checkpointing": True}])
def test_speed_options_train_alike(synthetic_shards, speed):
    """channels_last and gradient checkpointing change memory, not the math: the first step's gradients
    equal the default run's and 3 steps log the same losses (up to float rounding; the weights after
    AdamW are not compared element-wise: its g/sqrt(v) turns rounding in near-zero gradients into
    full-size updates)."""
    runs, grads = [], []
    for kwargs in ({}, speed):
        L.seed_everything(0)
        module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50), **kwargs)
        first = FirstGradients()
        trainer, logged = fit(module, f"{synthetic_shards}/train-*.tar", 3, callbacks=[first])
        runs.append([step["train/loss"] for step in logged.steps])
        grads.append(first.grads)
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)
    for key, value in grads[0].items():
        torch.testing.assert_close(grads[1][key], value, rtol=1e-3, atol=1e-6, msg=key)


class FirstGradients(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.grads = {k: p.grad.detach().clone() for k, p in pl_module.model.named_parameters()
                          if p.grad is not None}


def test_compile_trains_through_a_compiled_network_and_saves_the_plain_one():
    module = GlideModule(model=TINY, compile=True)
    compiled = module.training_model()
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is module.model
    assert module.training_model() is compiled  # compiled once
    assert all(not k.startswith("_compiled") and "_orig_mod" not in k for k in module.state_dict())
    assert GlideModule(model=TINY).training_model() is not None
    assert module.hparams["compile"] is True


def test_flops_per_batch_follows_the_batch_size(synthetic_shards):
    from glide_lightning.models.flops import training_step_flops

    module = GlideModule(model=TINY, diffusion=DiffusionConfig(steps=50))
    fit(module, f"{synthetic_shards}/train-*.tar", 1)
    assert module.flops_per_batch == training_step_flops(TINY, 4) > 0
