"""CLIP score of images against their captions, with open_clip.

Definition (torchmetrics' ``CLIPScore``, after Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning"): ``CLIPScore(I, C) = max(100 · cos(E_I, E_C), 0)`` for each image/caption
pair, with ``E_I``, ``E_C`` CLIP's image and text embeddings. :meth:`CLIPScorer.score` returns it per pair;
note that torchmetrics' own ``compute`` clamps the *mean* at 0 rather than each pair (identical unless some
pairs have negative cosine, which pretrained CLIP models practically never give).

Images are preprocessed the way CLIP's own validation transform does (open_clip ``image_transform_v2``):
resize the shortest side to the model's image size (bicubic unless the model says otherwise), center crop,
normalise with the model's mean/std (OpenAI CLIP's by default). Here the resize runs on float tensors
(antialiased), not on PIL images, so scores can differ from a PIL pipeline in the last decimals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glide_lightning.evaluation.features import private_rng


@dataclasses.dataclass(frozen=True)
class CLIPScoreResult:
    """Mean CLIP score over a set of pairs, and the model that gave it."""

    mean: float
    n: int
    model_name: str
    pretrained: str | None
    random_weights: bool
    label: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


class CLIPScorer:
    """Scores images against captions with an open_clip model.

    Args:
        model_name: open_clip architecture (``open_clip.list_models()``), also picks the tokenizer.
        pretrained: open_clip pretrained tag (``"openai"``), or a path to a local checkpoint file; None: random
            weights (tests only: scores are then flagged ``random_weights``). With ``model`` given it only says
            what the model's weights are (None = random).
        device: where the model runs; scores come back on the CPU.
        model: an already built open_clip ``CLIP`` model (e.g. the tiny random one the tests use).
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "openai",
                 device: str | torch.device = "cpu", model: nn.Module | None = None) -> None:
        import open_clip  # lazy: ~9 s cold import

        self.model_name = model_name
        self.pretrained = pretrained
        self.random_weights = pretrained is None
        self.device = torch.device(device)
        if model is None:
            model = self._create(open_clip, model_name, pretrained)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.context_length = int(getattr(self.model, "context_length", 77))
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.context_length)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", getattr(getattr(self.model, "visual", None), "image_size", 224))
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mean = torch.tensor(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std") or open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        self.interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        self.resize_mode = cfg.get("resize_mode") or "shortest"
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode {self.resize_mode!r} of {model_name} is not supported here "
                             f"(supported: 'shortest', 'squash').")

    @staticmethod
    def _create(open_clip: Any, model_name: str, pretrained: str | None) -> nn.Module:
        try:
            with private_rng(0):  # the initialisation (kept when pretrained is None) leaves the global RNG alone
                model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        except Exception as e:
            if pretrained is None:
                raise
            raise RuntimeError(
                f"Could not load open_clip {model_name!r} with pretrained={pretrained!r} ({type(e).__name__}: {e}). "
                f"Offline, pass a local checkpoint file as pretrained='/path/to/open_clip_pytorch_model.bin' "
                f"(open_clip accepts a file path), or pre-fill the Hugging Face cache on a machine with internet "
                f"and run with HF_HUB_OFFLINE=1 (which also fails at once instead of retrying for about a minute)."
            ) from e
        return model

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (0..255) or float ([0, 1]) ``[B, 3, H, W]`` → CLIP's normalised input at its image size."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"Expected RGB images [B, 3, H, W], got {shape}.")
        if images.dtype == torch.uint8:
            x = images.to(self.device, torch.float32) / 255.0
        elif images.is_floating_point():
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"Float images must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]: map model "
                                 f"outputs in [-1, 1] with (x + 1) / 2, or pass uint8 images.")
            x = images.to(self.device, torch.float32).clamp(0, 1)
        else:
            raise TypeError(f"Images must be uint8 or float, got {images.dtype}.")
        th, tw = self.image_size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            size = (th, tw)
        else:  # shortest side to the target, then center crop (CLIP's Resize(size) + CenterCrop(size))
            scale = max(th / h, tw / w)
            size = (max(th, round(h * scale)), max(tw, round(w * scale)))
        if (h, w) != size:
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
        x = x[..., top:top + th, left:left + tw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def embed(self, images: Tensor, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """L2-normalised image and text embeddings ``[B, E]`` each."""
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings (one per image), not a single string.")
        if len(captions) != images.shape[0]:
            raise ValueError(f"Got {images.shape[0]} images but {len(captions)} captions: give one caption per image.")
        with torch.no_grad():
            dtype = next(self.model.parameters()).dtype  # fp16/bf16 models get inputs in their dtype
            pixels = self.preprocess(images).to(dtype)
            tokens = self.tokenizer(list(captions)).to(self.device)
            image_emb = self.model.encode_image(pixels, normalize=True)
            text_emb = self.model.encode_text(tokens, normalize=True)
        return image_emb.float(), text_emb.float()

    def score(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Per-pair CLIP score ``100 · max(cos(E_I, E_C), 0)``, float32 CPU ``[B]`` in [0, 100]."""
        image_emb, text_emb = self.embed(images, captions)
        cos = (image_emb * text_emb).sum(dim=-1)
        return (100 * cos.clamp(min=0)).cpu()

    def label(self) -> str:
        """What the numbers are; says so when the weights are random."""
        what = f"open_clip {self.model_name} ({self.pretrained or 'random weights'})"
        if self.random_weights:
            return f"NOT a real CLIP score (random CLIP weights): {what}"
        return f"CLIP score, 100·max(cos, 0), {what}"

    def evaluate(self, pairs: Iterable[tuple[Tensor, Sequence[str]]]) -> CLIPScoreResult:
        """Mean per-pair score over ``(images, captions)`` batches."""
        return self.summarize([self.score(images, captions) for images, captions in pairs])

    def summarize(self, scores: Sequence[Tensor]) -> CLIPScoreResult:
        """The mean of per-pair scores (from :meth:`score`, in batches) and what they are."""
        if not scores or sum(s.shape[0] for s in scores) == 0:
            raise ValueError("No image/caption pairs to score.")
        flat = torch.cat(list(scores)).double()
        return CLIPScoreResult(mean=float(flat.mean()), n=flat.shape[0], model_name=self.model_name,
                               pretrained=self.pretrained, random_weights=self.random_weights, label=self.label())
