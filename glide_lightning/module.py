"""GlideModule: the LightningModule that trains a GLIDE-style model. It orchestrates; the math lives in
:mod:`glide_lightning.diffusion` and the networks in :mod:`glide_lightning.models`."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from glide_lightning.conditioning import caption_kwargs, check_trainable, conditioning_kwargs
from glide_lightning.data.tokenizers import TokenizerName, TokenizerSpec
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.diffusion.losses import training_losses
from glide_lightning.diffusion.timesteps import TimestepSamplerName, build_timestep_sampler
from glide_lightning.models import ModelConfig, build_with_text_encoder
from glide_lightning.models.flops import example_inputs, training_step_flops
from glide_lightning.models.unet import set_gradient_checkpointing
from glide_lightning.optim import OptimizerConfig, build_optimizer, sync_lr
from glide_lightning.runs import capture_rng_state, restore_rng_state
from glide_lightning.sampling import load_checkpoint

log = logging.getLogger(__name__)

TERMS = ("loss", "mse", "vb")
QUARTILES = 4


class GlideModule(L.LightningModule):
    """Trains a text-conditional diffusion model with classifier-free guidance dropout: a base model, an
    upsampler (``model.kind: upsample``, on the batch's ``low_res``) or an inpainting model (``inpaint`` /
    ``upsample_inpaint``, on the batch's image and ``inpaint_mask``), with the same losses
    (:func:`~glide_lightning.conditioning.conditioning_kwargs` makes the inputs of each kind).

    Args:
        model: the network's architecture.
        diffusion: the diffusion process, the loss (``simple`` / ``hybrid``), the MSE's weighting (``none`` /
            ``p2`` / ``min_snr``) and the prediction target (``eps`` / ``v``).
        optimizer: AdamW settings and the LR schedule (warm-up, then constant or cosine decay).
        tokenizer: the caption tokenizer, where the text encoder reads several: GLIDE's own ``transformer`` reads
            ``clip`` (the default, None) or ``gpt2`` (glide-text2im's checkpoints, with ``model.n_vocab: 50257``). A
            frozen ``t5`` implies its own SentencePiece tokenizer (files from ``model.text_encoder_name`` and
            ``text_encoder_revision``), a frozen ``clip`` the CLIP BPE: leave it unset (an equal value is accepted,
            another one refused). The data module tokenizes with the same one (:attr:`tokenizer_spec`, which the
            training CLI links to ``data.tokenizer_spec``); the module needs it for the empty caption and for sampling.
        bpe_dir: directory with GPT-2's ``encoder.json`` and ``vocab.bpe`` (``gpt2`` only; None:
            ``$GLIDE_GPT2_BPE_DIR``, else tiktoken's download). The data module gets the same one. A
            path on this machine, so it is not part of the checkpoint's hyper-parameters.
        cond_drop_prob: probability of replacing a caption by the empty caption (classifier-free
            guidance; GLIDE: 0.2).
        timestep_sampler: ``uniform`` or Improved DDPM's ``loss_aware`` importance sampling.
        init_from: weights to start from: a glide-text2im checkpoint (``base.pt``, …; its kind must
            match ``model.kind``) or a glide_lightning checkpoint (its EMA weights). Ignored when
            resuming a run, which restores everything from the run's own checkpoint.
        val_seed: seed of the fixed timesteps and noise of validation, so that validation losses
            compare across runs and arms.
        max_nonfinite_steps: an optimizer step whose loss or gradients are not finite is skipped
            (logged as ``train/nonfinite_steps``); this many in a row stop the run with an error
            naming the steps, loss terms and timesteps, before anything non-finite is saved. 5: one
            bad batch is survivable, but skipped steps leave the weights unchanged, so a run whose
            weights make every batch non-finite (e.g. a far too high LR) stops within seconds.
        channels_last: train with weights and images in channels-last memory format (faster
            convolutions on most GPUs and on CPUs with oneDNN; the same math).
        compile: train through ``torch.compile`` of the network (the first steps compile; outputs
            equal up to float rounding). The checkpoint holds the uncompiled module's weights.
        gradient_checkpointing: recompute each UNet block's activations in the backward pass instead
            of keeping them (GLIDE's ``use_checkpoint``): much less activation memory for about a
            third more compute, for presets that do not fit otherwise.
        low_res_noise: upsamplers: Gaussian noise augmentation of the low-res input, the largest
            augmentation timestep as a fraction of the process (each sample's is uniform in
            [0, low_res_noise·(T − 1)], passed to the network as ``low_res_t``; needs
            ``model.low_res_noise_cond``; see :mod:`glide_lightning.conditioning`). 0: off (GLIDE).
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
        diffusion: DiffusionConfig = DiffusionConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        tokenizer: TokenizerName | None = None,
        bpe_dir: str | None = None,
        cond_drop_prob: float = 0.2,
        timestep_sampler: TimestepSamplerName = "uniform",
        init_from: str | None = None,
        val_seed: int = 0,
        max_nonfinite_steps: int = 5,
        channels_last: bool = False,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        low_res_noise: float = 0.0,
    ) -> None:
        super().__init__()
        # hyper-parameters as plain data, so checkpoints load with torch.load(weights_only=True)
        model, diffusion, optimizer = (_as(cls, v) for cls, v in
                                       ((ModelConfig, model), (DiffusionConfig, diffusion), (OptimizerConfig, optimizer)))
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.tokenizer_spec = TokenizerSpec.for_model(model, tokenizer, bpe_dir)  # the text encoder implies it
        self.tokenizer = check_trainable(model, diffusion, self.tokenizer_spec, low_res_noise)
        # a frozen encoder is attached to the network outside the module tree: not trained, not saved
        self.model, model = build_with_text_encoder(model)  # model.text_encoder_dim recorded: sampling builds with it
        if self.model.frozen_text_encoder:
            encoder = self.model.attached_text_encoder
            log.info("frozen text encoder: %s (%d-wide embeddings; not trained, not saved)", encoder.source,
                     encoder.dim)
        self.save_hyperparameters({"model": model.to_dict(), "diffusion": asdict(diffusion),
                                   "optimizer": asdict(optimizer), "tokenizer": self.tokenizer_spec.name,
                                   "cond_drop_prob": cond_drop_prob, "timestep_sampler": timestep_sampler,
                                   "init_from": init_from, "val_seed": val_seed,
                                   "max_nonfinite_steps": max_nonfinite_steps, "channels_last": channels_last,
                                   "compile": compile, "gradient_checkpointing": gradient_checkpointing,
                                   "low_res_noise": low_res_noise})
        self.model_config, self.diffusion_config, self.optimizer_config = model, diffusion, optimizer
        set_gradient_checkpointing(self.model, gradient_checkpointing)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        # compiled lazily, and kept out of the module tree (its state dict is self.model's)
        self._compiled: list[Any] = [] if compile else [self.model]
        self.flops_per_batch: int | None = None  # for Lightning's ThroughputMonitor (MFU); set per batch size
        # one image's zero inputs: Lightning's model summary runs them once and counts each layer's forward FLOPs
        x_t, timesteps, model_kwargs = example_inputs(model, 1)
        self.example_input_array = {"x_t": x_t, "timesteps": timesteps, **model_kwargs}
        self.diffusion = GaussianDiffusion.from_config(diffusion)
        self.timesteps = build_timestep_sampler(timestep_sampler, self.diffusion.num_timesteps)
        self.cond_drop_prob, self.low_res_noise = cond_drop_prob, low_res_noise
        self.val_seed = val_seed
        self.init_from = init_from
        self.max_nonfinite_steps = max_nonfinite_steps
        self.step_terms: dict[str, Tensor] = {}  # the last training batch's loss terms and t (for NonFiniteGuard)
        self.wall_time_s = 0.0  # training wall time over all sessions of the run (kept in checkpoints)
        self._session_start: float | None = None
        # validation means over the epoch, overall and by timestep quartile (synced across ranks)
        # (every metric is updated on every rank, even with no samples, so that syncing never hangs)
        terms = TERMS if diffusion.variance_type == "learned_range" else TERMS[:2]
        self.val_metrics = torch.nn.ModuleDict({
            f"{term}{suffix}": MeanMetric() for term in terms for suffix in ["", *(f"_q{q}" for q in range(QUARTILES))]
        })

    # ----------------------------------------------------------------------------- set-up
    def configure_callbacks(self) -> list[L.Callback]:
        # The non-finite guard is a callback (it needs the optimizer-step hooks and its own state in
        # checkpoints) added by the module itself, so that no Trainer can fit this module without it.
        from glide_lightning.callbacks.nonfinite import NonFiniteGuard  # lazy: callbacks import sampling code

        return [NonFiniteGuard(self.max_nonfinite_steps)]

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from and self.trainer.ckpt_path is None:
            self.load_initial_weights(self.init_from)

    def load_initial_weights(self, path: str) -> None:
        """Start from a checkpoint's weights: a glide_lightning ``.ckpt`` (its EMA weights when the run
        kept them) or glide-text2im's released file of this model's kind (``base.pt`` for ``base``, …),
        read by :func:`glide_lightning.sampling.load_checkpoint`. An upsampler with
        ``model.low_res_noise_cond`` may start from one without it (``upsample.pt``): its noise-level embedding
        keeps its fresh (zero-output) weights.

        Raises:
            FileNotFoundError, ValueError: no such file, not a checkpoint, or a model of another kind.
            CheckpointMismatchError: a state dict that is not glide-text2im's model of this kind.
            ValueError: a model of this kind whose architecture differs from ``model``'s.
        """
        loaded = load_checkpoint(path, kind=self.model_config.kind)
        state = loaded.model.state_dict()
        if self.model_config.low_res_noise_cond and not loaded.model_config.low_res_noise_cond:
            state.update({k: v for k, v in self.model.state_dict().items() if k.startswith("low_res_noise_embed.")})
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"init_from: {loaded.source} does not fit this model's architecture; set model: to the "
                             f"checkpoint's ({loaded.model_config.to_dict()})\n{e}") from e
        log.info("initialised the model's weights from %s", loaded.source)

    # ----------------------------------------------------------------------------- training
    def forward(self, x_t: Tensor, timesteps: Tensor, **model_kwargs: Any) -> Tensor:
        return self.model(x_t, timesteps, **model_kwargs)

    def caption_kwargs(self, batch: dict[str, Any], drop: bool) -> tuple[dict[str, Tensor], Tensor]:
        """The model's caption arguments for a batch and which captions were dropped (``drop``: with
        probability ``cond_drop_prob``), see :func:`~glide_lightning.conditioning.caption_kwargs`.

        Raises:
            ValueError: the stored embeddings are another encoder's than ``model.model.text_encoder*``.
        """
        identity = self.model_config.text_encoder_identity
        return caption_kwargs(batch, identity=identity, cond_drop_prob=self.cond_drop_prob if drop else None,
                              empty_tokens=lambda: self.tokenizer.empty(1),
                              empty_embedding=lambda: self.empty_caption_embedding(str(identity)))

    def empty_caption_embedding(self, identity: str) -> tuple[Tensor, Tensor]:
        """The empty caption's ``(text_emb [1, L, D], text_mask [1, L])`` for precomputed batches: the one the
        ``embed`` recipe stored next to the training shards, else the frozen encoder's (computed once)."""
        if getattr(self, "_empty_embedding", None) is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            stored = getattr(datamodule, "empty_caption_embedding", lambda: None)()
            if stored is not None and stored[2] == identity:
                self._empty_embedding = stored[:2]
            else:
                tokens, mask = self.tokenizer.empty(1)
                self._empty_embedding = (self.model.attached_text_encoder(tokens, mask).to(torch.float16), mask)
        return self._empty_embedding

    def image_conditioning(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The network's inputs besides the caption for this model's kind (low_res, inpainting image and mask)."""
        return conditioning_kwargs(self.model_config.kind, batch, diffusion=self.diffusion,
                                   low_res_noise=self.low_res_noise, noise_cond=self.model_config.low_res_noise_cond,
                                   generator=generator)

    def training_model(self) -> Any:
        """The network the training step calls: ``self.model``, or its ``torch.compile`` (made once)."""
        if not self._compiled:
            self._compiled.append(torch.compile(self.model))
        return self._compiled[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # (images stay contiguous: the noise drawn like them keeps its layout; channels-last weights make
        # the first convolution's output channels-last)
        images = batch["image"]
        if self.flops_per_batch is None or self._flops_batch != images.shape[0]:
            self._flops_batch = images.shape[0]
            self.flops_per_batch = training_step_flops(self.model_config, images.shape[0])
        captions, drop = self.caption_kwargs(batch, drop=True)
        t, weights = self.timesteps.sample(images.shape[0], images.device)
        model_kwargs = dict(**captions, **self.image_conditioning(batch))
        terms = training_losses(self.diffusion, self.training_model(), images, t, model_kwargs)
        self.step_terms = {**{k: v.detach() for k, v in terms.items()}, "t": t}
        if self.hparams["timestep_sampler"] != "uniform":
            # every rank updates the sampler with every rank's losses, so they sample alike
            gathered_t, gathered_loss = (self.all_gather(x).reshape(-1) for x in (t, terms["loss"].detach()))
            self.timesteps.update(gathered_t, gathered_loss)
        loss = (terms["loss"] * weights).mean()
        batch_size = images.shape[0]
        quartiles = self.quartiles(t)
        for name, value in terms.items():
            self.log(f"train/{name}", value.mean(), prog_bar=name == "loss", batch_size=batch_size)
            for q, selected in enumerate(quartiles):
                if selected.any():
                    self.log(f"train/{name}_q{q}", value[selected].mean(), batch_size=int(selected.sum()))
        self.log("train/cond_drop_rate", drop.float().mean(), batch_size=batch_size)
        self.log("train/wall_time_s", self.elapsed_wall_time(), batch_size=batch_size)
        if "skipped" in batch:
            self.log("data/skipped", float(batch["skipped"]), batch_size=batch_size, reduce_fx="max")
        return loss

    def quartiles(self, t: Tensor) -> list[Tensor]:
        """Boolean masks of the samples whose t lies in each quarter of the process."""
        q = (t * QUARTILES) // self.diffusion.num_timesteps
        return [q == i for i in range(QUARTILES)]

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Conditional loss terms at timesteps and noise fixed by ``val_seed`` and the batch index."""
        images = batch["image"]
        generator = torch.Generator().manual_seed(self.val_seed * 1_000_003 + batch_idx)
        b = images.shape[0]
        # stratified: sample j gets a t in the j-th of b equal slices of [0, T)
        t = ((torch.arange(b) + torch.rand(b, generator=generator)) * self.diffusion.num_timesteps / b).long()
        noise = torch.randn(images.shape, generator=generator).to(images)
        model_kwargs = dict(**self.caption_kwargs(batch, drop=False)[0], **self.image_conditioning(batch, generator))
        terms = training_losses(self.diffusion, self.model, images, t.to(images.device), model_kwargs, noise)
        quartiles = self.quartiles(t.to(images.device))
        for name, value in terms.items():
            self.val_metrics[name].update(value)
            for q, selected in enumerate(quartiles):
                self.val_metrics[f"{name}_q{q}"].update(value[selected])

    def on_validation_epoch_end(self) -> None:
        for key, metric in self.val_metrics.items():
            self.log(f"val/{key}", metric.compute())
            metric.reset()

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        return build_optimizer(self.model, self.optimizer_config, max_steps, self._trainer)

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model.frozen_text_encoder:  # provenance of the weights it trained with (a hub commit when known)
            checkpoint["text_encoder_source"] = self.model.attached_text_encoder.source
        checkpoint["timestep_sampler"] = self.timesteps.state_dict()
        checkpoint["rng"] = capture_rng_state()
        checkpoint["wall_time_s"] = self.elapsed_wall_time()
        from glide_lightning.input_order import record_input_order

        record_input_order(checkpoint, self.model)  # the marker: the order the first convolution's columns follow

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("timestep_sampler"):
            self.timesteps.load_state_dict(checkpoint["timestep_sampler"])
        # applied when training starts: restoring here would be undone by what runs in between
        self._pending_rng_state = checkpoint.get("rng")
        self.wall_time_s = float(checkpoint.get("wall_time_s", 0.0))
        # older checkpoint forms (one AdamW group, another network input order) brought to the current one
        from glide_lightning.migrations import migrate_training_state

        where = str(getattr(self._trainer, "ckpt_path", None) or "the checkpoint")
        migrate_training_state(checkpoint, self.model, self.model_config.kind, self.optimizer_config, where=where)

    def on_train_start(self) -> None:
        self._session_start = time.monotonic()
        for config in self.trainer.lr_scheduler_configs:  # restored: the LR of the step reached, this run's end
            sync_lr(config.scheduler)
        if getattr(self, "_pending_rng_state", None) is not None:
            restore_rng_state(self._pending_rng_state)
            self._pending_rng_state = None

    def elapsed_wall_time(self) -> float:
        """Seconds of training so far, summed over every session of this run (resumes included)."""
        session = 0.0 if self._session_start is None else time.monotonic() - self._session_start
        return self.wall_time_s + session


def _as(cls: type, value: Any) -> Any:
    """A config dataclass from itself or from its dict form (hparams of a loaded checkpoint)."""
    return cls(**value) if isinstance(value, dict) else value
