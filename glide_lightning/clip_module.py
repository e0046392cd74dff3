"""NoisedCLIPModule: the LightningModule that trains a noised CLIP (GLIDE §2.3) on image-caption shards,
selected in an experiment by ``task: noised_clip`` (see :mod:`glide_lightning.cli`).

Each training image is noised by the diffusion config's ``q_sample`` at a timestep drawn uniformly from
the process's steps, and the image encoder of (x_t, t) and the text encoder are trained with CLIP's
symmetric contrastive loss (InfoNCE; Radford et al. 2021, Fig. 3) over the batch: the logits are
``logit_scale · cos(f(x_t_i, t_i), g(c_j))`` and each image's own caption is the target class, and
vice versa. Neither GLIDE nor miniGLIDE released such training code.

The encoders are exported in glide-text2im's format (``image_enc.pt``, ``text_enc.pt``, plus
``clip_config.json``) to ``<run dir>/clip`` at every checkpoint and at the end of training, so that
``sample --clip_dir runs/<name>/clip`` loads them as it loads glide-text2im's release.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from glide_lightning.data.tokenizers import TokenizerName, build_tokenizer
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.models.clip import NoisedCLIP, NoisedCLIPConfig, load_noised_clip, save_noised_clip
from glide_lightning.optim import OptimizerConfig, build_optimizer
from glide_lightning.runs import capture_rng_state, restore_rng_state

__all__ = ["MAX_LOGIT_SCALE", "NoisedCLIPModule", "contrastive_loss"]

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0
"""CLIP clips its learned logit scale at 100 (Radford et al. 2021, §2.5); GLIDE's noised CLIP uses 100."""


def contrastive_loss(image_embeddings: Tensor, text_embeddings: Tensor, logit_scale: Tensor | float) -> dict[str, Tensor]:
    """CLIP's symmetric InfoNCE over a batch of matching pairs (row i of each is pair i).

    Args:
        image_embeddings, text_embeddings: unit-norm ``[B, D]``.
        logit_scale: the multiplier of the cosine similarities (a scalar).

    Returns:
        ``loss``: ½·(CE(logits, i) + CE(logitsᵀ, i)), a scalar; ``accuracy``: the fraction of images whose
        most similar caption in the batch is their own (``[]``). Computed in fp32 outside any autocast: at
        logit scale 100, bf16's 8-bit mantissa rounds the logits by up to 0.4.
    """
    with torch.autocast(image_embeddings.device.type, enabled=False):
        logits = logit_scale * image_embeddings.float() @ text_embeddings.float().T  # [B, B]
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return {"loss": loss, "accuracy": accuracy}


class NoisedCLIPModule(L.LightningModule):
    """Trains a noised CLIP with a contrastive loss on noised images at uniformly drawn t.

    Args:
        model: the encoders' architecture; ``model.n_timesteps`` must equal ``diffusion.steps`` and
            ``model.image_size`` the size of the diffusion model it will guide; ``model.logit_scale`` is the
            initial value of the learned logit scale (CLIP: 1/0.07 ≈ 14.3).
        diffusion: the process whose ``q_sample`` noises the images: the one of the models it will guide
            (the noise schedule and the number of steps matter; the loss settings are not used).
        optimizer: AdamW settings and the LR schedule.
        tokenizer: the caption tokenizer (``clip``: GLIDE's noised CLIP reads CLIP's BPE); the data module
            uses the same one.
        bpe_dir: GPT-2's BPE files for ``tokenizer: gpt2`` (see :class:`~glide_lightning.module.GlideModule`).
        learn_logit_scale: learn the logit scale (clipped at 100), as CLIP does; false keeps ``model.logit_scale``.
        init_from: a noised CLIP directory (glide-text2im's ``clip/`` or an export) to start from; its
            architecture must equal ``model``'s. Ignored when resuming.
        val_seed: seed of validation's fixed timesteps and noise.
    """

    def __init__(
        self,
        model: NoisedCLIPConfig = NoisedCLIPConfig(),
        diffusion: DiffusionConfig = DiffusionConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        tokenizer: TokenizerName = "clip",
        bpe_dir: str | None = None,
        learn_logit_scale: bool = True,
        init_from: str | None = None,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        model, diffusion, optimizer = (cls(**v) if isinstance(v, dict) else v for cls, v in
                                       ((NoisedCLIPConfig, model), (DiffusionConfig, diffusion),
                                        (OptimizerConfig, optimizer)))
        self.tokenizer = check_clip_trainable(model, diffusion, tokenizer, bpe_dir)
        self.save_hyperparameters({"model": asdict(model), "diffusion": asdict(diffusion),
                                   "optimizer": asdict(optimizer), "tokenizer": tokenizer,
                                   "learn_logit_scale": learn_logit_scale, "init_from": init_from,
                                   "val_seed": val_seed})
        self.model_config, self.diffusion_config, self.optimizer_config = model, diffusion, optimizer
        self.clip = NoisedCLIP(model)
        self.log_logit_scale = torch.nn.Parameter(torch.tensor(math.log(model.logit_scale)),
                                                  requires_grad=learn_logit_scale)
        self.diffusion = GaussianDiffusion.from_config(diffusion)
        self.init_from, self.val_seed = init_from, val_seed
        self.val_metrics = torch.nn.ModuleDict({"loss": MeanMetric(), "accuracy": MeanMetric()})
        self.flops_per_batch: int | None = None  # for Lightning's ThroughputMonitor: not counted for this module

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from and self.trainer.ckpt_path is None:
            loaded, _ = load_noised_clip(self.init_from)
            if loaded.config != replace(self.model_config, logit_scale=loaded.config.logit_scale):
                raise ValueError(f"init_from: the noised CLIP in {self.init_from} has the architecture "
                                 f"{asdict(loaded.config)}; set model.model to it")
            self.clip.load_state_dict(loaded.state_dict(), strict=True)
            log.info("initialised the noised CLIP from %s", self.init_from)

    def logit_scale(self) -> Tensor:
        """The current logit scale, clipped at :data:`MAX_LOGIT_SCALE` (a scalar)."""
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def terms(self, batch: dict[str, Any], t: Tensor, noise: Tensor | None = None) -> dict[str, Tensor]:
        """The contrastive loss and retrieval accuracy of a batch whose images are noised at ``t`` ``[B]``."""
        x_t = self.diffusion.q_sample(batch["image"], t, noise)
        image = self.clip.image_embeddings(x_t, t)  # [B, D]; t indexes this process, as w_t's rows
        text = self.clip.text_embeddings(batch["tokens"], batch["mask"])  # [B, D]
        return contrastive_loss(image, text, self.logit_scale())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        t = torch.randint(0, self.diffusion.num_timesteps, (images.shape[0],), device=images.device)
        terms = self.terms(batch, t)
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=images.shape[0])
        self.log("train/logit_scale", self.logit_scale(), batch_size=images.shape[0])
        return terms["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss and accuracy at timesteps and noise fixed by ``val_seed`` and the batch index (stratified t)."""
        images = batch["image"]
        generator = torch.Generator().manual_seed(self.val_seed * 1_000_003 + batch_idx)
        b = images.shape[0]
        t = ((torch.arange(b) + torch.rand(b, generator=generator)) * self.diffusion.num_timesteps / b).long()
        noise = torch.randn(images.shape, generator=generator).to(images)
        for name, value in self.terms(batch, t.to(images.device), noise).items():
            self.val_metrics[name].update(value, weight=b)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric.compute())
            metric.reset()

    def configure_callbacks(self) -> list[L.Callback]:
        # as GlideModule: no Trainer fits it without the guard (non-finite steps, and the steps the 16-mixed
        # GradScaler skips, are skipped by the LR schedule and the EMA too)
        from glide_lightning.callbacks.nonfinite import NonFiniteGuard

        return [NonFiniteGuard()]

    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        return build_optimizer(self, self.optimizer_config, max_steps, self._trainer)

    # ----------------------------------------------------------------------------- export
    def export(self, directory: str | Path) -> Path:
        """Write the encoders as glide-text2im's ``image_enc.pt`` / ``text_enc.pt`` with ``clip_config.json``
        (the learned logit scale, this process and tokenizer) to ``directory``; returns it."""
        return save_noised_clip(self.clip, directory, process=asdict(self.diffusion_config),
                                tokenizer=self.hparams["tokenizer"], logit_scale=float(self.logit_scale().detach()))

    def export_dir(self) -> Path:
        """``<run dir>/clip`` (the trainer's ``default_root_dir`` is the run directory under the CLI)."""
        return Path(self.trainer.default_root_dir) / "clip"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = capture_rng_state()  # a resumed run draws the timesteps and noise it would have
        if self.trainer.is_global_zero:
            self.export(self.export_dir())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng_state = checkpoint.get("rng")  # applied when training starts, as GlideModule does

    def on_train_start(self) -> None:
        if getattr(self, "_pending_rng_state", None) is not None:
            restore_rng_state(self._pending_rng_state)
            self._pending_rng_state = None

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            log.info("exported the noised CLIP to %s (sample --clip_dir)", self.export(self.export_dir()))


def check_clip_trainable(model: NoisedCLIPConfig, diffusion: DiffusionConfig, tokenizer: TokenizerName,
                         bpe_dir: str | None = None) -> Any:
    """The tokenizer, once the settings are known to train together (errors name the field and the fix)."""
    if model.n_timesteps != diffusion.steps:
        raise ValueError(f"model.model.n_timesteps {model.n_timesteps} must equal model.diffusion.steps "
                         f"{diffusion.steps}: the image encoder embeds each step of the process it sees")
    try:
        built = build_tokenizer(tokenizer, text_ctx=model.text_ctx, **({"bpe_dir": bpe_dir} if tokenizer == "gpt2" else {}))
    except ValueError as error:
        raise ValueError(f"model.model.text_ctx {model.text_ctx} does not suit tokenizer {tokenizer!r}: {error}") from None
    if built.n_vocab > model.n_vocab:
        raise ValueError(f"model.model.n_vocab {model.n_vocab} is smaller than tokenizer {tokenizer!r}'s "
                         f"{built.n_vocab} tokens: set model.model.n_vocab: {built.n_vocab} (GLIDE: 65536)")
    return built
