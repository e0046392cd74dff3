"""Every precision Lightning offers trains every model kind: ``32-true``, ``bf16-mixed`` and ``16-mixed`` (with its
GradScaler) through the real training CLI (in-process), with the experiments' gradient clipping
(``gradient_clip_val: 1.0``) and gradient accumulation, for the base model, the upsampler, the inpainting model,
a frozen-T5 model (the Imagen-style arm) and the noised CLIP. The AdamW kernel follows the precision (foreach where
mixed precision clips gradients, fused otherwise), and ``implementation: fused`` with mixed precision and clipping
is refused when the command line is parsed, before anything trains.

Lightning on a CPU turns ``precision: 16-mixed`` into ``bf16-mixed`` (its accelerator connector), so the 16-mixed
runs pass the plugin a GPU run gets, ``MixedPrecision("16-mixed", device="cpu")``, in ``trainer.plugins``: fp16
autocast and a ``torch.amp.GradScaler``, which the probe below checks the network really ran under."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision

from glide_lightning.cli import GlideCLI
from glide_lightning.models.clip import Affine

# the layers whose output dtype shows what a network computed in (autocast runs them in its dtype)
LINEAR_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, Affine)  # Affine: the noised CLIP's linear layer

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
PROBE = {"class_path": "test_precision.PrecisionProbe"}
FP16_PLUGIN = json.dumps({"class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
                          "init_args": {"precision": "16-mixed", "device": "cpu"}})
# the command-line flags of each precision; 16-mixed as its plugin (the CLI's trainer.precision default, 32-true on
# a CPU, would conflict with a precision plugin: Lightning takes one or the other)
PRECISIONS = {
    "32-true": ["--trainer.precision", "32-true"],
    "bf16-mixed": ["--trainer.precision", "bf16-mixed"],
    "16-mixed": ["--trainer.precision", "null", "--trainer.plugins", FP16_PLUGIN],
}
DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
KINDS = ["base", "upsample", "inpaint", "t5", "noised_clip"]
MAX_STEPS, ACCUMULATE = 2, 2


class PrecisionProbe(L.Callback):
    """What the training steps ran under: the output dtypes of the trainable network's linear and convolution
    layers (forward hooks, training steps only) and of a frozen text encoder's, the autocast state the trainable
    layers saw, the dtype of the network outputs the diffusion math gets (``GaussianDiffusion.call_model``), each
    micro-batch's loss, and the optimized parameters before training (to compare with after)."""

    def __init__(self) -> None:
        self.layer_dtypes: set[torch.dtype] = set()
        self.frozen_dtypes: set[torch.dtype] = set()
        self.output_dtypes: set[torch.dtype] = set()
        self.autocast: set[tuple[bool, torch.dtype]] = set()
        self.losses: list[float] = []
        self.loss_dtypes: set[torch.dtype] = set()
        self.initial: list[torch.Tensor] = []
        self._hooks: list[Any] = []
        self._in_step = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = [p.detach().clone() for group in trainer.optimizers[0].param_groups for p in group["params"]]
        # (a frozen text encoder is attached to the network outside the module tree: not trained, not saved)
        network = getattr(pl_module, "model", None)
        frozen = network.attached_text_encoder if getattr(network, "frozen_text_encoder", False) else None
        for module in [*pl_module.modules(), *(frozen.modules() if frozen is not None else ())]:
            if isinstance(module, LINEAR_LAYERS):
                trainable = any(p.requires_grad for p in module.parameters())
                self._hooks.append(module.register_forward_hook(self._record if trainable else self._record_frozen))
        assert self._hooks, "no linear or convolution layer to probe"
        diffusion = pl_module.diffusion
        call_model = diffusion.call_model  # the training loss reads the network through it

        def recorded(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = call_model(*args, **kwargs)
            self.output_dtypes.add(out.dtype)
            return out

        diffusion.call_model = recorded  # on this instance only
        self._hooks.append(_Unpatch(diffusion, "call_model"))

    def _record(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._in_step:
            self.layer_dtypes.add(output.dtype)
            self.autocast.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    def _record_frozen(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._in_step:
            self.frozen_dtypes.add(output.dtype)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._in_step = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._in_step = False
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.loss_dtypes.add(loss.dtype)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()


class _Unpatch:
    """``remove()`` deletes an instance attribute that shadows a method (a hook handle's interface)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


# the experiments' UNet at test scale (same kinds, losses and parameterisations; fewer and narrower layers)
TINY_UNET = dict(model_channels=32, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[16],
                 xf_width=32, xf_layers=1, xf_heads=2)


def kind_args(kind: str, tmp_path: Path, shards: Path, tiny_t5_dir: Path | None) -> list[str]:
    """The experiment of ``kind`` at test scale, its callbacks replaced by the probe (a later --config replaces
    lists: no EMA, sample grids or generation metrics, whose costs have nothing to do with the precision)."""
    probe_only: dict[str, Any] = {"trainer": {"callbacks": [PROBE]}}
    if kind == "noised_clip":
        experiment = ["--config", str(EXPERIMENTS / "noised_clip.yaml"),
                      "--model.model", str(EXPERIMENTS / "parts/tiny_clip_model.yaml")]
    elif kind == "t5":  # the Imagen-style arm: imagen_p2 with a tiny UNet and the tiny T5 built in conftest
        tiny = dict(TINY_UNET, image_size=32, dropout=0.0, text_ctx=16, text_encoder="t5",
                    text_encoder_name=str(tiny_t5_dir), text_encoder_pretrained=None)
        experiment = ["--config", str(EXPERIMENTS / "imagen_p2.yaml")]
        probe_only["model"] = {"model": tiny, "diffusion": {"steps": 50}}
    else:
        experiment = ["--config", str(EXPERIMENTS / {"base": "smoke", "upsample": "smoke_upsample",
                                                      "inpaint": "smoke_inpaint"}[kind]) + ".yaml"]
        probe_only["model"] = {"model": TINY_UNET}
    return [*experiment, "--config", write_config(tmp_path / "probe.yaml", probe_only)]


def fit_args(kind: str, tmp_path: Path, shards: Path, tiny_t5_dir: Path | None, *extra: str) -> list[str]:
    return ["fit", *kind_args(kind, tmp_path, shards, tiny_t5_dir),
            "--data.train_shards", f"{shards}/train-*.tar", "--data.val_shards", f"{shards}/val-*.tar",
            "--data.num_workers", "0", "--data.batch_size", "2", "--data.shuffle_buffer", "4",
            "--run.root", str(tmp_path / "runs"), "--trainer.accelerator", "cpu",
            "--trainer.max_steps", str(MAX_STEPS), "--trainer.accumulate_grad_batches", str(ACCUMULATE),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1",
            # no LR warm-up: both steps move the weights (the experiments' warm-up starts from LR 0)
            "--model.optimizer.warmup_steps", "0", *extra]


def run_cli(args: list[str]) -> GlideCLI:
    cli = GlideCLI(args=args)
    if cli.lock is not None:  # the run directory's lock, held until the process ends otherwise
        cli.lock.release()
    return cli


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No wandb (the CLI writes its resolved mode into os.environ: restored afterwards) and runs under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # the CLI reads its args only (not pytest's)


@pytest.fixture
def t5_dir(request):
    """The tiny T5 (built once per session) for the frozen-encoder kind only."""
    return request.getfixturevalue("tiny_t5_dir") if request.node.callspec.params["kind"] == "t5" else None


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_precision_trains_every_model_kind_with_clipping_and_accumulation(kind, precision, synthetic_shards,
                                                                                t5_dir, offline, tmp_path):
    cli = run_cli(fit_args(kind, tmp_path, synthetic_shards, t5_dir, *PRECISIONS[precision]))
    trainer = cli.trainer
    probe = next(c for c in trainer.callbacks if isinstance(c, PrecisionProbe))
    assert trainer.gradient_clip_val == 1.0 and trainer.accumulate_grad_batches == ACCUMULATE

    # the precision Lightning trained with, and what the network really computed in
    plugin = trainer.precision_plugin
    if precision == "32-true":
        assert not isinstance(plugin, MixedPrecision) and plugin.precision == "32-true"
        assert probe.autocast == {(False, torch.get_autocast_dtype("cpu"))}
    else:
        assert isinstance(plugin, MixedPrecision) and plugin.precision == precision and plugin.device == "cpu"
        assert probe.autocast == {(True, DTYPES[precision])}
        if precision == "16-mixed":
            assert isinstance(plugin.scaler, torch.amp.GradScaler) and plugin.scaler.is_enabled()
            assert plugin.scaler._scale is not None, "the GradScaler scaled the loss"
        else:
            assert plugin.scaler is None
    assert probe.layer_dtypes == {DTYPES[precision]}, probe.layer_dtypes
    # a frozen text encoder runs outside the training step's autocast, in its own fp32 (text_encoder_precision)
    assert probe.frozen_dtypes == ({torch.float32} if kind == "t5" else set()), probe.frozen_dtypes

    # the run reached max_steps: 2 optimizer steps of 2 micro-batches each, every one with a finite loss
    assert trainer.global_step == MAX_STEPS and not trainer.interrupted
    assert len(probe.losses) == MAX_STEPS * ACCUMULATE and all(math.isfinite(x) for x in probe.losses), probe.losses
    logged = trainer.logged_metrics["train/loss"]
    assert torch.isfinite(logged).all(), logged
    # the diffusion math gets fp32 network outputs whatever the network computed in (the noised CLIP's loss: in
    # fp32 outside autocast); the loss is fp32
    if kind != "noised_clip":
        assert probe.output_dtypes == {torch.float32}, probe.output_dtypes
    assert probe.loss_dtypes == {torch.float32}, probe.loss_dtypes

    # the AdamW kernel: foreach where mixed precision clips gradients (Lightning refuses to clip a fused one's)
    defaults = trainer.optimizers[0].defaults
    if precision == "32-true":
        assert defaults["fused"] is True, defaults
    else:
        assert defaults["foreach"] is True and not defaults["fused"], defaults

    # every optimizer step updated every optimized parameter, but for the steps the fp16 GradScaler skipped (its
    # scale halves at each; a step the non-finite guard drops would leave the step counts behind too), and the
    # weights changed and stayed finite
    skipped = 0
    if precision == "16-mixed":
        skipped = round(math.log2(plugin.scaler._init_scale / plugin.scaler.get_scale()))
        assert 0 <= skipped < MAX_STEPS, f"the GradScaler skipped {skipped} of {MAX_STEPS} steps"
    # the modules' NonFiniteGuard counts both kinds of skipped step
    assert float(trainer.logged_metrics["train/nonfinite_steps"]) == 0
    if precision == "16-mixed":
        assert float(trainer.logged_metrics["train/overflow_steps"]) == skipped
    # and holds the LR schedule at a skipped step
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == MAX_STEPS - skipped
    optimizer = trainer.optimizers[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == len(probe.initial)
    steps = {int(optimizer.state[p]["step"]) if p in optimizer.state else 0 for p in params}
    assert steps == {MAX_STEPS - skipped}, (steps, skipped)
    for p in params:
        assert torch.isfinite(p).all()
    moved = [torch.count_nonzero(optimizer.state[p]["exp_avg"]) > 0 for p in params]
    changed = [not torch.equal(p.detach(), before) for p, before in zip(params, probe.initial)]
    # (ADM zero-initialises its output layers, so in 2 steps the gradient reaches only the layers next to them)
    assert sum(moved) >= 0.1 * len(params), f"{sum(moved)} of {len(params)} parameters had a gradient"
    assert all(c for c, m in zip(changed, moved) if m), "a parameter with a gradient did not change"


def test_fused_adamw_with_mixed_precision_and_clipping_is_refused_at_parse_time(synthetic_shards, offline,
                                                                               tmp_path):
    fused = ["--model.optimizer.implementation", "fused"]
    for precision in ("bf16-mixed", "16-mixed"):
        with pytest.raises(SystemExit) as refused:
            run_cli(fit_args("base", tmp_path, synthetic_shards, None, *fused, *PRECISIONS[precision]))
        message = str(refused.value.code)
        assert "model.optimizer.implementation" in message and "trainer.precision" in message, message
        assert "gradient_clip_val" in message, message
        assert not (tmp_path / "runs").exists(), "refused before the run directory (or any training) existed"
    # without clipping the fused kernel trains under mixed precision
    cli = run_cli(fit_args("base", tmp_path, synthetic_shards, None, *fused, *PRECISIONS["bf16-mixed"],
                           "--trainer.gradient_clip_val", "0"))
    assert cli.trainer.global_step == MAX_STEPS
    assert cli.trainer.optimizers[0].defaults["fused"] is True
    assert isinstance(cli.trainer.precision_plugin, MixedPrecision)
    assert torch.isfinite(cli.trainer.logged_metrics["train/loss"]).all()
