"""The Imagen-style arm end to end: frozen T5 / open_clip text encoders (tiny random stand-ins of the real
architectures, built in the root conftest) trained with a real Trainer and through the real CLI with the
imagen_p2 experiments, checkpoints without the encoder, sampling after reloading it from the recorded path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from glide_lightning.data import GlideDataModule, TokenizerSpec
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.models import ModelConfig, build_model
from glide_lightning.module import GlideModule
from glide_lightning.sampling import SamplingConfig, generate, load_checkpoint
from hang_guard import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=[16],
            dropout=0.0, text_ctx=16, xf_width=32)


def cli_env(tmp_path: Path) -> dict[str, str]:
    from test_cli import cli_env as env  # the CLI tests' environment: offline wandb, no DDP variables

    return env(tmp_path)


class GradProbe(L.Callback):
    """After each backward: which parameters of the network and of the frozen encoder have a gradient."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.encoder = encoder
        self.encoder_grads: list[int] = []
        self.model_grads: list[int] = []

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.encoder_grads.append(sum(p.grad is not None for p in self.encoder.parameters()))
        self.model_grads.append(sum(p.grad is not None for p in pl_module.model.parameters()))


def test_a_frozen_t5_gets_no_gradient_stays_unchanged_and_is_not_optimized(synthetic_shards, tiny_t5_dir, tmp_path):
    torch.manual_seed(0)
    module = GlideModule(model=ModelConfig(**TINY, text_encoder="t5", text_encoder_name=str(tiny_t5_dir)),
                         diffusion=DiffusionConfig(steps=50, loss_type="p2", variance_type="fixed_small"))
    assert module.tokenizer_spec == TokenizerSpec("t5", 16, path=str(tiny_t5_dir))  # the encoder implies it
    encoder = module.model.attached_text_encoder
    assert module.model_config.text_encoder_dim == encoder.dim == 32  # read from the encoder, recorded
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    probe = GradProbe(encoder)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[probe])
    dm = GlideDataModule(train_shards=f"{synthetic_shards}/train-*.tar", image_size=32, batch_size=4,
                         tokenizer_spec=module.tokenizer_spec, num_workers=0)
    trainer.fit(module, datamodule=dm)
    assert probe.encoder_grads == [0, 0, 0]
    assert min(probe.model_grads) > 0
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert not any(m.training for m in encoder.modules())  # the Trainer's train() left it in eval mode
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, unet_before[k])]
    assert "encoder_proj.weight" in changed and "pooled_proj.weight" in changed  # the projection trains
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}
    assert not optimized & {id(p) for p in encoder.parameters()}
    trainer.save_checkpoint(tmp_path / "t5.ckpt")
    saved = torch.load(tmp_path / "t5.ckpt", map_location="cpu", weights_only=True)
    assert set(saved["state_dict"]) == {f"model.{k}" for k in module.model.state_dict()}
    assert saved["hyper_parameters"]["model"]["text_encoder_name"] == str(tiny_t5_dir)
    assert saved["text_encoder_source"] == f"t5 {tiny_t5_dir}"  # provenance, compared when sampling
    # sampling reloads the encoder from the recorded directory: the same images as the module in memory
    loaded = load_checkpoint(tmp_path / "t5.ckpt")
    assert "text encoder t5" in loaded.source
    config = SamplingConfig(sampler="ddim", steps="5", guidance_scale=5.0)
    prompts = ["a large red circle", "a small blue square"]
    from glide_lightning.sampling import SamplingModel

    in_memory = SamplingModel(module.model.eval(), module.diffusion_config, module.tokenizer, module.model_config, "")
    assert torch.equal(generate(loaded, prompts, [0, 1], config), generate(in_memory, prompts, [0, 1], config))


def test_the_text_encoder_implies_its_tokenizer_and_refuses_another(tiny_t5_dir):
    """One knob: a frozen encoder's tokenizer is its own (an explicit equal value, as older configs wrote it, is
    accepted); the trained transformer reads clip by default or gpt2 when asked; a contradiction names both."""
    t5 = ModelConfig(**TINY, text_encoder="t5", text_encoder_name=str(tiny_t5_dir))
    assert GlideModule(model=t5, tokenizer="t5").tokenizer_spec == GlideModule(model=t5).tokenizer_spec
    assert GlideModule(model=ModelConfig(**TINY)).tokenizer_spec == TokenizerSpec("clip", 16)
    with pytest.raises(ValueError, match="model.tokenizer 'clip' contradicts model.model.text_encoder 't5', which "
                                         "reads 't5' ids: drop model.tokenizer"):
        GlideModule(model=t5, tokenizer="clip")
    with pytest.raises(ValueError, match="'t5' contradicts .* 'transformer'.*or set model.model.text_encoder: t5"):
        GlideModule(model=ModelConfig(**TINY), tokenizer="t5")
    with pytest.raises(ValueError, match="set it to 32"):
        GlideModule(model=ModelConfig(**TINY, text_encoder="t5", text_encoder_name=str(tiny_t5_dir),
                                      text_encoder_dim=64))


def test_the_cli_gives_the_data_module_the_t5_tokenizer_and_refuses_a_contradiction_when_parsing(
        tiny_t5_dir, tmp_path, monkeypatch):
    """imagen_p2 names no tokenizer: the data module tokenizes with the frozen T5's own (its files from
    text_encoder_name); an older config's explicit ``tokenizer: t5`` still loads; ``tokenizer: clip`` is refused
    while parsing, in one line naming both options, before anything is built."""
    from glide_lightning.cli import GlideCLI
    from glide_lightning.data.tokenizers import T5Tokenizer

    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = ["--config", str(REPO / "experiments/imagen_p2.yaml"), "--config", stand_in_config(tmp_path, "t5",
            str(tiny_t5_dir)), "--run.root", str(tmp_path), "--trainer.callbacks", "[]", "--trainer.logger", "false"]
    for explicit in ([], ["--model.tokenizer", "t5"]):
        cli = GlideCLI(args=base + explicit, run=False)
        assert cli.datamodule.tokenizer_spec == cli.model.tokenizer_spec == TokenizerSpec("t5", 16, path=str(tiny_t5_dir))
        assert isinstance(cli.datamodule.tokenizer, T5Tokenizer) and cli.model.hparams["tokenizer"] == "t5"
        assert cli.datamodule.tokenizer(["a red circle"])[0].tolist() == cli.model.tokenizer(["a red circle"])[0].tolist()
    built = []
    monkeypatch.setattr(GlideCLI, "instantiate_classes", lambda self: built.append(1))
    with pytest.raises(ValueError) as refused:
        GlideCLI(args=base + ["--model.tokenizer", "clip"], run=False)
    message = str(refused.value)
    assert message.startswith("model.tokenizer 'clip' contradicts model.model.text_encoder 't5'") and "\n" not in message
    assert "drop model.tokenizer" in message and "Namespace" not in message and not built


def stand_in_config(tmp_path: Path, kind: str, name: str) -> str:
    """An extra --config for the imagen experiments: the tiny UNet and encoder, and the experiment's callbacks
    at test scale (a later --config replaces lists): grids and FID (random features) with DDIM at guidance
    5 and 8 and dynamic thresholding, the best checkpoint by the validation P2 loss."""
    sampling = {"sampler": "ddim", "steps": "ddim5", "dynamic_threshold": 0.995}
    path = tmp_path / "stand_in.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"model": {**TINY, "channel_mult": [1, 2], "text_encoder": kind, "text_encoder_name": name,
                            "text_encoder_pretrained": None, "text_ctx": 16},
                  "diffusion": {"steps": 50}},
        "trainer": {"callbacks": [
            {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
            {"class_path": "glide_lightning.callbacks.BestCheckpoint", "init_args": {"monitor": "val/loss"}},
            {"class_path": "glide_lightning.callbacks.SampleGrid",
             "init_args": {"prompts": ["a large red circle"], "guidance_scales": [5.0, 8.0], "every_n_steps": 3,
                           "sampling": sampling}},
            {"class_path": "glide_lightning.callbacks.GenerationMetrics",
             "init_args": {"num_samples": 4, "guidance_scales": [5.0, 8.0], "extractor": "random-conv",
                           "sampling": sampling}}]}}))
    return str(path)


@pytest.mark.parametrize("experiment, kind", [("imagen_p2", "t5"), ("imagen_p2_clip", "clip")])
def test_imagen_experiments_fit_through_the_cli_and_sample_after_reload(experiment, kind, synthetic_shards,
                                                                         tiny_t5_dir, tiny_clip_name, tmp_path):
    name = str(tiny_t5_dir) if kind == "t5" else tiny_clip_name
    fit = [sys.executable, "-m", "glide_lightning", "fit", "--config", str(REPO / f"experiments/{experiment}.yaml"),
           "--config", stand_in_config(tmp_path, kind, name),
           "--data.train_shards", f"{synthetic_shards}/train-*.tar", "--data.val_shards",
           f"{synthetic_shards}/val-*.tar", "--data.num_workers", "0", "--data.batch_size", "4",
           "--data.max_val_samples", "8", "--run.root", str(tmp_path), "--trainer.max_steps", "3",
           "--trainer.val_check_interval", "3", "--trainer.num_sanity_val_steps", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
           "--trainer.log_every_n_steps", "1"]
    run = subprocess.run(fit, env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / experiment
    last = run_dir / "checkpoints/last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    config = ModelConfig(**saved["hyper_parameters"]["model"])
    assert (config.text_encoder, config.text_encoder_name, config.text_encoder_dim) == (kind, name, 32 if kind == "t5"
                                                                                       else 64)
    own = {f"model.{k}" for k in build_model(config).state_dict()}
    assert set(saved["state_dict"]) == own and set(saved["current_model_state"]) == own  # no encoder weights
    assert [p.name for p in (run_dir / "checkpoints/best").glob("*.ckpt")] == ["best_val_loss-step00000003.ckpt"]
    assert list((run_dir / "samples").rglob("*.png")), "the DDIM 5 / 8 grid of step 3"
    metrics = (run_dir / "csv").rglob("metrics.csv")
    logged = {k for path in metrics for k in path.read_text().splitlines()[0].split(",")}
    assert {"val/loss", "val/fid@5", "val/fid@8", "train/loss"} <= logged
    if kind == "t5":  # the run resumes: the recorded encoder settings (text_encoder_dim filled in) are no drift
        more = [a if a != "3" or fit[i - 1] != "--trainer.max_steps" else "4" for i, a in enumerate(fit)]
        resumed = subprocess.run(more, env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                                 timeout=HANG_GUARD_S)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming imagen_p2" in resumed.stderr
        assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    # the sample command reloads the encoder from the path the checkpoint records
    out = tmp_path / "samples_cli"
    sample = subprocess.run([sys.executable, "-m", "glide_lightning", "sample", "--ckpt", str(last), "--prompt",
                             "a large red circle", "--num_per_prompt", "2", "--sampling.sampler", "ddim",
                             "--sampling.steps", "ddim5", "--sampling.guidance_scale", "8",
                             "--sampling.dynamic_threshold", "0.995", "--out", str(out)],
                            env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert f"text encoder {kind}" in json.loads((out / "metadata.json").read_text())["images"][0]["checkpoint"]
    expected = generate(load_checkpoint(last), ["a large red circle"] * 2, [0, 1],
                        SamplingConfig(sampler="ddim", steps="ddim5", guidance_scale=8.0, dynamic_threshold=0.995))
    for i in range(2):
        written = torch.from_numpy(np.array(Image.open(out / f"{i:04d}.png").convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(written, expected[i])


# ----------------------------------------------------------------------------- precomputed embeddings
@pytest.fixture(scope="module")
def embedded_shards(synthetic_shards, tiny_t5_dir, tmp_path_factory) -> Path:
    """The synthetic shards with the tiny T5's embeddings added by the ``embed`` recipe (through the front door,
    ``python -m glide_lightning data embed``)."""
    from glide_lightning.commands import main

    out = tmp_path_factory.mktemp("embedded")
    manifest = main(["data", "embed", "--shards", str(synthetic_shards), "--out", str(out), "--text_encoder", "t5",
                     "--text_encoder_name", str(tiny_t5_dir), "--text_ctx", "16", "--batch_size", "32"])
    assert manifest["text_encoder"]["identity"] == f"t5:{tiny_t5_dir}"
    return out


def test_the_embed_recipe_stores_fp16_embeddings_masks_and_the_empty_caption(embedded_shards, tiny_t5_dir):
    from glide_lightning.data.embeddings import load_empty_caption, read_embedding
    from glide_lightning.data.pipeline import iter_shard
    from glide_lightning.data.tokenizers import T5Tokenizer
    from glide_lightning.models.encoders import load_text_encoder

    identity = f"t5:{tiny_t5_dir}"
    manifest = json.loads((embedded_shards / "manifest.json").read_text())
    assert manifest["text_encoder"]["identity"] == identity and manifest["text_encoder"]["dim"] == 32
    assert sum(s["num_samples"] for s in manifest["splits"]["train"]["shards"]) == 200
    encoder, tokenizer = load_text_encoder("t5", str(tiny_t5_dir)), T5Tokenizer(16, path=str(tiny_t5_dir))
    samples = [s for s in iter_shard(str(embedded_shards / "train-000001.tar"))][:5]
    stored = [read_embedding(s) for s in samples]
    tokens, mask = tokenizer([s["txt"].decode() for s in samples])
    live = encoder(tokens, mask)
    for (emb, emb_mask, who), m, e in zip(stored, mask, live):
        assert who == identity and emb.dtype == torch.float16 and torch.equal(emb_mask, m)
        torch.testing.assert_close(emb[m].float(), e[m], rtol=1e-3, atol=1e-3)  # fp16 rounding
        assert not emb[~m].any()  # padding stored as nothing, read back as zeros
    empty_emb, empty_mask, who = load_empty_caption(embedded_shards)
    tokens, mask = tokenizer.empty(1)
    assert who == identity and torch.equal(empty_mask, mask)
    torch.testing.assert_close(empty_emb.float(), encoder(tokens, mask), rtol=1e-3, atol=1e-3)


class EncoderCalls(L.Callback):
    """Counts the frozen encoder's forward calls during training steps, and the batches with embeddings."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.calls, self.precomputed = 0, 0
        encoder.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.precomputed += "text_emb" in batch


def test_training_on_embedded_shards_never_runs_the_encoder(embedded_shards, tiny_t5_dir):
    torch.manual_seed(0)
    module = GlideModule(model=ModelConfig(**TINY, text_encoder="t5", text_encoder_name=str(tiny_t5_dir)),
                         diffusion=DiffusionConfig(steps=50, loss_type="p2", variance_type="fixed_small"),
                         tokenizer="t5", cond_drop_prob=0.5)
    probe = EncoderCalls(module.model.attached_text_encoder)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[probe])
    dm = GlideDataModule(train_shards=f"{embedded_shards}/train-*.tar", image_size=32, batch_size=8,
                         tokenizer_spec=TokenizerSpec("t5", 16, path=str(tiny_t5_dir)), num_workers=0)
    trainer.fit(module, datamodule=dm)
    assert probe.precomputed == 3 and probe.calls == 0  # dropped captions took the stored empty embedding
    stored_empty = dm.empty_caption_embedding()
    assert torch.equal(module._empty_embedding[0], stored_empty[0])
    # the embeddings of another encoder are refused, naming both
    batch = {"text_emb": torch.zeros(1, 16, 32), "text_mask": torch.ones(1, 16, dtype=torch.bool),
             "text_encoder": ["clip:ViT-B-32+openai"]}
    with pytest.raises(ValueError, match="ViT-B-32.*embed the shards again"):
        module.caption_kwargs(batch, drop=False)
