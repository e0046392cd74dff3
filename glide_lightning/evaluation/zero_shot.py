"""Zero-shot FID (and CLIP score, and text adherence on synthetic captions) over guidance scales.

Generation is batched and resumable: image i of scale s is
``<out>/images-<key>/scale_<s>/<i>.png`` (seed ``seed + i``, the same for every scale), written
atomically, and a rerun only generates the missing ones. ``<key>`` is a hash of everything that
determines the images (:func:`generation_identity`: the weights themselves, architecture, process,
tokenizer, caption list, seed, sampler and its options, batch size, upsampler, device type), which
``generation.json`` beside them spells out: a new checkpoint, seed or caption file never reuses
another's images. Images are made in fixed blocks of ``batch_size`` consecutive indices, so a
resumed or sharded run draws every image in the batch an uninterrupted one would (byte-identical
images). Under torchrun (``RANK`` / ``WORLD_SIZE`` set) rank r generates the blocks b ≡ r mod world
size; rank 0 waits for all of them, then computes the metrics. Reference statistics are cached under
a key made of the reference set, resolution, sample count and extractor weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from glide_lightning.data.images import save_png
from glide_lightning.data.synthetic import parse_caption
from glide_lightning.evaluation.adherence import score_batch
from glide_lightning.evaluation.features import (
    DINOV2_ABSENT,
    FeatureExtractor,
    InceptionFeatures,
    ModuleFeatures,
    private_rng,
    sha256_state_dict,
)
from glide_lightning.evaluation.fid import ReferenceStatsCache, fd_dinov2_from_stats, feature_stats, fid_from_stats
from glide_lightning.evaluation.kid_prc import KID_SEED, MetricOptions, kid_from_stats, precision_recall_from_stats
from glide_lightning.evaluation.results import ScaleResult, write_results
from glide_lightning.evaluation.uncertainty import (BootstrapOptions, FrechetBootstrap, bootstrap_interval,
                                                    bootstrap_metrics)
from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.models import ModelConfig
from glide_lightning.sampling import SamplingConfig, SamplingModel, generate, model_evaluations

log = logging.getLogger(__name__)


@dataclass
class FIDJob:
    """One zero-shot evaluation: a model, held-out captions, reference images and scales."""

    captions: list[str]
    """Held-out captions; image i is generated from captions[i]."""
    reference: str
    """Directory of reference images (the mscoco recipe's ``fid_reference/``), at ``resolution``."""
    out_dir: Path
    scales: list[float] = field(default_factory=lambda: [SamplingConfig().guidance_scale])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    clip_model: str | None = "ViT-B-32"
    """open_clip model for the CLIP score (None: no CLIP score)."""
    clip_pretrained: str | None = "openai"
    """open_clip pretrained tag or local file (None: random weights, labelled as such)."""


_LATER_SAMPLING_DEFAULTS: dict[str, Any] = {"guidance_interval": None, "compile": False, "precision": "fp32",
                                            "memory_format": "auto", "dynamic_threshold": None,
                                            "upsample_noise": 0.0,
                                            "upsample_sampler": "ddpm"}  # the only upsampler sampler before
"""Sampling fields added after image caches existed, with their defaults: left out of the identity at
these values, so the folders of images made before them are found again."""


_LATER_MODEL_DEFAULTS: dict[str, Any] = {"text_encoder": "transformer", "text_encoder_name": None,
                                         "text_encoder_pretrained": None, "text_encoder_revision": None,
                                         "text_encoder_dim": None, "low_res_noise_cond": False,
                                         "text_encoder_precision": "fp32"}
"""Model fields added after image caches existed (the frozen text encoders, which the identity names
instead of hashing their weights, and their arithmetic; the upsampler's ``low_res_noise_cond``), left out at
these values like ``_LATER_SAMPLING_DEFAULTS`` (but see :func:`_model_identity` for ``text_encoder_precision``)."""


_HASHED_BEFORE_CLASSIFIED: dict[type, frozenset[str]] = {
    ModelConfig: frozenset({"dropout"}),
    DiffusionConfig: frozenset({"loss_type", "vlb_weight", "p2_gamma", "p2_k", "min_snr_gamma"}),
}
"""Fields that leave a checkpoint's images as they are (their class's ``KEEPS_IMAGES``) but were hashed, with the
whole config, before each field said whether it changes the images: still hashed, as they were then
(``loss_type`` in its old spelling, ``p2`` for ``weighting: p2``), so the folders of images made then are found
again. Fields that keep the images added since (``weighting``, …) are never hashed."""


def _hashed_fields(cls: type, values: dict[str, Any], later: dict[str, Any], kept: frozenset[str] = frozenset()
                   ) -> dict[str, Any]:
    """The fields of a config (``values``: its dict form) that the image key hashes: those that change the images
    (``cls.CHANGES_IMAGES``) and those of :data:`_HASHED_BEFORE_CLASSIFIED`; a field added after image caches
    existed (``later``) is left out at the value that reproduces the images made before it (unless ``kept``)."""
    hashed = cls.CHANGES_IMAGES | _HASHED_BEFORE_CLASSIFIED.get(cls, frozenset())
    return {k: v for k, v in values.items() if k in hashed and not (k in later and v == later[k] and k not in kept)}


def _model_identity(loaded: SamplingModel, sampling: SamplingConfig) -> dict[str, Any]:
    config = loaded.model_config
    # Before text_encoder_precision existed a frozen encoder ran under the sampler's bf16 autocast: images made
    # then with a bf16 ``sampling.precision`` are not the fp32 encoder's, so their key must not be found again.
    encoder_autocast_before = config.frozen_text_encoder and sampling.precision != "fp32"
    model = _hashed_fields(ModelConfig, config.to_dict(), _LATER_MODEL_DEFAULTS,
                           frozenset({"text_encoder_precision"}) if encoder_autocast_before else frozenset())
    process = loaded.diffusion_config
    diffusion = _hashed_fields(DiffusionConfig, {**asdict(process), "loss_type": _loss_type_hashed(process)}, {})
    return {"weights_sha256": sha256_state_dict(loaded.model), "model": model,
            "diffusion": diffusion, "tokenizer": type(loaded.tokenizer).__name__,
            "text_ctx": loaded.model_config.text_ctx}


def _loss_type_hashed(config: DiffusionConfig) -> str:
    """``loss_type`` as keys spelled it before ``weighting`` existed: ``p2`` for the P2 weighting."""
    return "p2" if config.weighting == "p2" else config.loss_type


def generation_identity(job: FIDJob, base: SamplingModel, upsampler: SamplingModel | None = None) -> dict[str, Any]:
    """Everything that determines the generated images, but the guidance scale (a folder of its own)."""
    ran = {**asdict(job.sampling), "upsample_sampler": job.sampling.upsample_sampler_for("text2im")}  # auto resolved
    sampling = _hashed_fields(SamplingConfig, ran, _LATER_SAMPLING_DEFAULTS)  # absent at those: earlier keys hold
    del sampling["guidance_scale"]  # a folder of its own
    if upsampler is None:
        del sampling["upsample_steps"], sampling["upsample_temp"]
        sampling.pop("upsample_sampler", None)
    return {"base": _model_identity(base, job.sampling),
            "upsampler": None if upsampler is None else _model_identity(upsampler, job.sampling),
            "sampling": sampling, "seed": job.seed, "n": len(job.captions),
            "captions_sha256": hashlib.sha256("\n".join(job.captions).encode()).hexdigest(),
            "device": next(base.model.parameters()).device.type}


def images_key(identity: dict[str, Any]) -> str:
    """The folder key of a :func:`generation_identity`: 12 hex digits of the sha256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def images_dir(job: FIDJob, base: SamplingModel, upsampler: SamplingModel | None = None) -> Path:
    """``<out>/images-<key>``: the images of this model and these settings (see the module docstring),
    with ``generation.json`` spelling out the identity and where the weights came from."""
    identity = generation_identity(job, base, upsampler)
    key = images_key(identity)
    root = job.out_dir / f"images-{key}"
    if not (root / "generation.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        sources = {"base": base.source, "upsampler": upsampler.source if upsampler is not None else None}
        (root / "generation.json").write_text(json.dumps({**identity, "sources": sources}, indent=1, sort_keys=True))
    return root


def scale_dir(root: Path, scale: float) -> Path:
    return root / f"scale_{scale:g}"


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_blocks(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """The blocks of ``batch_size`` consecutive image indices that rank ``rank`` of ``world`` makes."""
    return [range(start, min(start + batch_size, n)) for start in range(rank * batch_size, n, world * batch_size)]


def missing_blocks(folder: Path, blocks: list[range]) -> list[range]:
    """The blocks with an image not on disk yet (such a block is generated whole)."""
    return [block for block in blocks if any(not (folder / f"{i:06d}.png").exists() for i in block)]


class GenerationETA:
    """Says up front how many images a run will generate, and after each block how long the rest will
    take (extrapolated from the seconds per image measured so far, the first block included)."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.done, self.what = total, 0, what
        self.start = time.monotonic()
        log.info("%s: %d images to generate", what, total)

    def update(self, images: int) -> float:
        """Count ``images`` more as made; log and return the estimated seconds left."""
        self.done += images
        per_image = (time.monotonic() - self.start) / max(self.done, 1)
        left = per_image * (self.total - self.done)
        log.info("%d / %d images in %s (%.2f s per image): about %s left", self.done, self.total,
                 _clock(time.monotonic() - self.start), per_image, _clock(left))
        return left


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def generate_missing(base: SamplingModel, job: FIDJob, scale: float, upsampler: SamplingModel | None = None,
                     rank: int = 0, world: int = 1, images: Path | None = None,
                     eta: GenerationETA | None = None) -> int:
    """Generate this rank's images of ``scale`` that are not on disk yet; returns how many it wrote.

    Work goes in blocks of ``batch_size`` consecutive images (rank r takes blocks b ≡ r mod world):
    a block with a missing image is generated whole, so every image comes from the same batch as in
    an uninterrupted single-process run, whatever was killed or how many ranks share the work.
    ``images``: :func:`images_dir` when the caller has it (it hashes the weights); ``eta`` counts the
    images made (the whole run's estimate)."""
    folder = scale_dir(images or images_dir(job, base, upsampler), scale)
    config = replace(job.sampling, guidance_scale=scale)
    blocks = rank_blocks(len(job.captions), config.batch_size, rank, world)
    written = 0
    for done, block in enumerate(blocks, 1):
        missing = [i for i in block if not (folder / f"{i:06d}.png").exists()]
        if not missing:
            continue
        images = generate(base, [job.captions[i] for i in block], [job.seed + i for i in block], config,
                          upsampler=upsampler)
        for i, image in zip(block, images):
            if i in missing:
                save_png(image, folder / f"{i:06d}.png", {"prompt": job.captions[i], "seed": job.seed + i,
                                                          "guidance_scale": scale, "sampler": config.sampler,
                                                          "steps": config.steps, "checkpoint": base.source})
        written += len(missing)
        log.info("scale %g: block %d / %d of rank %d (%d images written)", scale, done, len(blocks), rank, written)
        if eta is not None:
            eta.update(len(block))
    return written


def wait_for_images(folder: Path, n: int, timeout_s: float = 24 * 3600) -> None:
    """Rank 0 waits until the other ranks have written their share."""
    deadline = time.time() + timeout_s
    while sum(1 for i in range(n) if (folder / f"{i:06d}.png").exists()) < n:
        if time.time() > deadline:
            raise TimeoutError(f"{folder}: fewer than {n} images after {timeout_s:.0f} s (did a rank die?)")
        time.sleep(5)


def load_images(folder: Path, indices: range, batch_size: int = 50) -> Iterator[Tensor]:
    """uint8 batches of the images ``indices`` of ``folder``, in order."""
    for start in range(indices.start, indices.stop, batch_size):
        batch = [torch.from_numpy(np.array(Image.open(folder / f"{i:06d}.png").convert("RGB")))
                 for i in range(start, min(start + batch_size, indices.stop))]
        yield torch.stack(batch).permute(0, 3, 1, 2).contiguous()


def random_conv_features(seed: int = 0) -> FeatureExtractor:
    """A small randomly initialised conv net as feature extractor: for machines without the Inception
    weights and for tests. Its FIDs are NOT real FIDs and are labelled so."""
    with private_rng(seed):
        net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(4), nn.Flatten())
    return ModuleFeatures(net, f"random-conv-seed{seed}", pretrained=False)


def build_extractor(name: str, inception_weights: str | None = None, device: str = "cpu") -> FeatureExtractor:
    """``inception`` (the standard FID features; weights downloaded when online, or a local file) or
    ``random-conv`` (no weights needed; not a real FID)."""
    if name == "inception":
        return InceptionFeatures(inception_weights, device=device)
    if name == "random-conv":
        return random_conv_features()
    raise ValueError(f"unknown feature extractor {name!r}; choose one of inception, random-conv")


def evaluate_scale(job: FIDJob, scale: float, extractor: FeatureExtractor, cache: ReferenceStatsCache,
                   checkpoint: str, images: Path, clip: Any = None, nfe: int | None = None,
                   upsampler: str | None = None, *, metrics: MetricOptions | None = None,
                   dinov2: FeatureExtractor | None = None, bootstrap: BootstrapOptions | None = None) -> ScaleResult:
    """FID, KID and precision/recall (``metrics``: which, and their settings; by default both, from the FID
    features), FD_DINOv2 (with a ``dinov2`` extractor; else None and the reason), CLIP score and (synthetic
    captions) adherence of the images of one scale in ``images`` (``nfe``: the model evaluations per image that
    made them, and ``upsampler``: the source of the upsampler that took them to their size, with its steps and
    temperature from ``job.sampling``, recorded beside). With ``bootstrap`` replicates, every metric also gets its
    bootstrap interval over the generated images, from the same features and per-image scores
    (:func:`~glide_lightning.evaluation.uncertainty.bootstrap_metrics`)."""
    metrics = MetricOptions() if metrics is None else metrics
    resampled = bootstrap is not None and bootstrap.replicates > 0
    folder = scale_dir(images, scale)
    n = len(job.captions)
    resolution = Image.open(folder / "000000.png").size[0]
    dataset_id, n_reference = str(Path(job.reference).resolve()), len(_image_files(job.reference))
    reference = cache.get_or_compute(dataset_id, resolution, n_reference, extractor,
                                     lambda: reference_batches(job.reference, resolution),
                                     need_features=metrics.needs_features)
    # the offline adherence score exists for captions of the synthetic shapes dataset only
    synthetic = all(is_synthetic_caption(c) for c in job.captions)
    clip_scores: list[Tensor] = []
    adherence: list[float] = []

    def batches(batch_size: int = 50) -> Iterator[Tensor]:
        """One pass over the images: CLIP score and adherence on the side of the FID features."""
        for i, batch in enumerate(load_images(folder, range(n), batch_size)):
            captions = job.captions[i * batch_size:(i + 1) * batch_size]
            if clip is not None:
                clip_scores.append(clip.score(batch, captions))
            if synthetic:
                adherence.extend(r.fraction for r in score_batch(batch, captions))
            yield batch

    generated = feature_stats(extractor, batches(), keep_features=metrics.needs_features or resampled)
    kid = prc = fd_dinov2 = dino = None
    if "kid" in metrics.metrics:
        kid = kid_from_stats(generated, reference, metrics.kid_subset_size, metrics.kid_subsets)
    if "prc" in metrics.metrics:
        prc = precision_recall_from_stats(generated, reference, metrics.prc_neighborhood,
                                          device=getattr(extractor, "device", None))
    if dinov2 is not None:  # a second pass over the images: DINOv2 resizes them itself
        dino_reference = cache.get_or_compute(dataset_id, resolution, n_reference, dinov2,
                                              lambda: reference_batches(job.reference, resolution))
        dino = feature_stats(dinov2, load_images(folder, range(n)), keep_features=resampled)
        fd_dinov2 = fd_dinov2_from_stats(dino, dino_reference)
    result = ScaleResult(guidance_scale=scale, n=n, resolution=resolution, sampler=job.sampling.sampler, nfe=nfe,
                       steps=job.sampling.steps, checkpoint=checkpoint, reference=str(job.reference),
                       fid=fid_from_stats(generated, reference),
                       clip_score=clip.summarize(clip_scores) if clip is not None else None,
                       adherence=sum(adherence) / len(adherence) if synthetic else None, upsampler=upsampler,
                       upsample_steps=job.sampling.upsample_steps if upsampler else None,
                       upsample_temp=job.sampling.upsample_temp if upsampler else None,
                       upsample_sampler=job.sampling.upsample_sampler_for("text2im") if upsampler else None,
                       kid=kid, precision_recall=prc, fd_dinov2=fd_dinov2,
                       fd_dinov2_reason=None if dinov2 is not None else DINOV2_ABSENT)
    if not resampled:
        return result
    device = getattr(extractor, "device", "cpu")
    intervals = bootstrap_metrics(
        generated.features, reference.mu, reference.sigma, bootstrap, reference_features=reference.features,
        kid=(kid.subset_size, kid.subsets, KID_SEED) if kid is not None else None,
        prc_neighborhood=prc.neighborhood if prc is not None else None,
        clip_scores=torch.cat(clip_scores).double().numpy() if clip is not None else None,
        adherence=np.asarray(adherence) if synthetic else None, device=device)
    if dino is not None:
        frechet = FrechetBootstrap(dino.features, dino_reference.mu, dino_reference.sigma, device)
        intervals["fd_dinov2"] = bootstrap_interval(frechet.replicate, n, bootstrap, "FD_DINOv2")
    return result.with_intervals(intervals)


def is_synthetic_caption(caption: str) -> bool:
    try:
        parse_caption(caption)
    except ValueError:
        return False
    return True


def _image_files(folder: str) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"reference image directory not found: {path} (the mscoco recipe writes "
                                f"fid_reference/; any directory of images works)")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def check_reference(folder: str) -> int:
    """The number of reference images in ``folder`` (PNG / JPEG), checked before anything is generated.

    Raises:
        FileNotFoundError: no such directory.
        ValueError: fewer than 2 images (FID's covariance needs at least 2; a few thousand for a usable figure)."""
    count = len(_image_files(folder))
    if count < 2:
        raise ValueError(f"reference directory {folder} holds {count} image(s) (.png, .jpg): FID needs at least 2 "
                         f"(thousands for a usable figure); point --reference at a folder of images, e.g. the "
                         f"mscoco recipe's fid_reference/")
    return count


def reference_batches(folder: str, resolution: int, batch_size: int = 50) -> Iterator[Tensor]:
    """uint8 batches of the reference images, centre-cropped to squares and resized to ``resolution``
    with PIL's bicubic filter (anti-aliased) where their size differs."""
    files = _image_files(folder)
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            image = Image.open(path).convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            if side != resolution:
                image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
            batch.append(torch.from_numpy(np.array(image)))
        yield torch.stack(batch).permute(0, 3, 1, 2).contiguous()


def run(job: FIDJob, base: SamplingModel, extractor: FeatureExtractor, cache: ReferenceStatsCache, *,
        upsampler: SamplingModel | None = None, metrics: MetricOptions | None = None,
        dinov2: FeatureExtractor | None = None, bootstrap: BootstrapOptions | None = None) -> list[ScaleResult] | None:
    """Generate (resumably, this rank's share) and, on rank 0, score every scale (:func:`evaluate_scale`:
    ``metrics`` and ``dinov2`` choose what beside FID, ``bootstrap`` the intervals); results are written to ``<out>/results.json``
    (:func:`~glide_lightning.evaluation.results.write_results`) and returned (None on other ranks)."""
    rank, world = rank_and_world()
    images = images_dir(job, base, upsampler)
    log.info("images of this model and these settings: %s", images)
    blocks = rank_blocks(len(job.captions), job.sampling.batch_size, rank, world)
    todo = sum(len(b) for scale in job.scales for b in missing_blocks(scale_dir(images, scale), blocks))
    eta = GenerationETA(todo, f"rank {rank}: {len(job.scales)} scale(s) x {len(job.captions)} captions, "
                              f"{job.sampling.sampler} {job.sampling.steps} steps")
    for scale in job.scales:
        made = generate_missing(base, job, scale, upsampler, rank, world, images, eta)
        log.info("scale %g: generated %d new images (the rest were already on disk)", scale, made)
    if rank != 0:
        return None
    clip = None
    if job.clip_model:
        from glide_lightning.evaluation.clip_score import CLIPScorer

        clip = CLIPScorer(job.clip_model, job.clip_pretrained, device=next(base.model.parameters()).device)
    results = []
    for scale in job.scales:
        wait_for_images(scale_dir(images, scale), len(job.captions))
        nfe = model_evaluations(replace(job.sampling, guidance_scale=scale), base.diffusion_config)
        results.append(evaluate_scale(job, scale, extractor, cache, base.source, images, clip, nfe,
                                      upsampler.source if upsampler is not None else None, metrics=metrics,
                                      dinov2=dinov2, bootstrap=bootstrap))
        log.info("guidance %g: %s", scale, results[-1].fid.label)
    path = write_results(job.out_dir / "results.json", results,
                         {**asdict(job.sampling), "seed": job.seed, "images": str(images)})
    log.info("wrote %s", path)
    return results
