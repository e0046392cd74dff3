"""Feature extractors for Fréchet distances (FID) and friends.

Every extractor maps uint8 images ``[B, 3, H, W]`` (values 0..255, RGB) to float64 features ``[B, D]`` on
the CPU and says what it is: ``name``, ``weights_id`` (sha256 of its weights, used to key cached reference
statistics), ``resolution`` (the input size it runs at), ``feature_dim``, ``random_weights`` (True when its
weights are not the pretrained ones it is meant to have: random init in tests, or an Inception file other than
the standard one) and ``standard`` (True only for the standard FID extractor: torch-fidelity's TF-ported
Inception-v3, pool3 2048-d, with the standard weights file).

- :class:`InceptionFeatures`: the standard FID features. torch-fidelity's ``FeatureExtractorInceptionV3``
  with feature ``"2048"``: the Inception graph of the original TTUR FID code with its weights ported from
  TensorFlow; it resizes every input to 299 x 299 itself with TF1-compatible bilinear interpolation (no
  antialiasing) and maps 0..255 to [-1, 1]. Give it uint8 images at the evaluation resolution.
- :class:`Dinov2Features`: DINOv2 CLS features through transformers' ``Dinov2Model`` from user-supplied
  weights, for FD_DINOv2.
- :class:`ModuleFeatures`: any ``nn.Module`` (tests use a small random conv net; users may plug in other
  extractors, whose distances are then not "FID").
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glide_lightning.data.shards import sha256_file

log = logging.getLogger(__name__)

InputRange = Literal["uint8", "unit", "symmetric"]
"""How :class:`ModuleFeatures` hands images to its module: uint8 0..255, float [0, 1] or float [-1, 1]."""

INCEPTION_FEATURE = "2048"
"""torch-fidelity's name of the pool3 features of the FID Inception (the layer FID uses by definition)."""

STANDARD_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
"""sha256 of ``weights-inception-2015-12-05-6726825d.pth`` (95,628,359 bytes; torch hub's ``name-<sha256 prefix>``
convention; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is the same file). Not verifiable offline
here: taken from several public projects that pin it."""


class FeatureExtractor(ABC):
    """uint8 images ``[B, 3, H, W]`` → float64 CPU features ``[B, D]``, plus what identifies the extractor."""

    name: str
    """Short identifier, recorded with every statistic and result (e.g. ``"inception-v3-compat-2048"``)."""
    resolution: int | None
    """Side length the extractor runs at (299 for Inception, which resizes itself); None: inputs as given."""
    random_weights: bool
    """True when the weights are not the intended pretrained ones (tests, offline machines): not a real FID."""
    standard: bool = False
    """True only for the standard FID extractor (torch-fidelity's Inception-v3 pool3, standard weights file)."""

    @property
    @abstractmethod
    def weights_id(self) -> str:
        """sha256 (hex) of the weights file used, or of the module's state dict."""

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """D, the length of one feature vector."""

    @abstractmethod
    def _features(self, images: Tensor) -> Tensor:
        """Features of a validated uint8 batch ``[B, 3, H, W]`` (any device/dtype; converted by the caller)."""

    def __call__(self, images: Tensor) -> Tensor:
        """Features of uint8 images ``[B, 3, H, W]`` as a float64 CPU tensor ``[B, D]``."""
        check_uint8_images(images)
        with torch.no_grad():
            out = self._features(images)
        if out.dim() != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(
                f"Feature extractor {self.name!r} returned shape {tuple(out.shape)} for {images.shape[0]} images; "
                f"it must return [B, D] (flatten or pool the module's output)."
            )
        return out.detach().to("cpu", torch.float64)

    def describe(self) -> dict[str, object]:
        """JSON-ready description recorded with statistics and results."""
        return {"name": self.name, "weights_id": self.weights_id, "resolution": self.resolution,
                "feature_dim": self.feature_dim, "random_weights": self.random_weights, "standard": self.standard}


def check_uint8_images(images: Tensor) -> None:
    """Raise a clear error unless ``images`` is a uint8 tensor ``[B, 3, H, W]``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"Expected a uint8 tensor [B, 3, H, W], got {type(images).__name__}.")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"Expected uint8 images (0..255), got dtype {images.dtype}. FID is defined on 8-bit images: convert "
            f"model outputs in [-1, 1] with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) "
            f"(glide_lightning.data.images.to_uint8)."
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected RGB images [B, 3, H, W], got shape {tuple(images.shape)}.")


def sha256_state_dict(module: nn.Module) -> str:
    """sha256 (hex) over a module's state dict: every key, dtype, shape and the raw bytes, in key order."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        if isinstance(value, Tensor):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # extra state
            digest.update(repr(value).encode())
    return digest.hexdigest()


def inception_weights_default_path() -> Path:
    """Where torch-fidelity's download of the FID Inception weights lands: ``<torch hub dir>/checkpoints/``."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


class InceptionFeatures(FeatureExtractor):
    """The standard FID features: torch-fidelity's TF-ported Inception-v3, pool3 (2048-d).

    Args:
        weights_path: the ``weights-inception-2015-12-05-6726825d.pth`` file. None: use the copy in
            ``$TORCH_HOME/hub/checkpoints/`` (torch-fidelity downloads it there when online).
        device: where the network runs (features come back on the CPU).
        require_standard_weights: raise unless the file's sha256 is :data:`STANDARD_INCEPTION_SHA256` (use it
            for numbers you will publish). Otherwise other weights are accepted with a warning, and everything
            computed with them is flagged ``random_weights`` (not comparable to published FIDs).

    Inputs: uint8 ``[B, 3, H, W]`` at the evaluation resolution; torch-fidelity resizes them to 299 x 299 with
    TF1-compatible bilinear interpolation (not antialiased), exactly as the original FID code did.
    """

    name = "inception-v3-compat-2048"
    resolution = 299

    def __init__(self, weights_path: str | os.PathLike[str] | None = None,
                 device: str | torch.device = "cpu", require_standard_weights: bool = False) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        default = inception_weights_default_path()
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"Inception weights file not found: {path}. Download {URL_INCEPTION_V3} on a machine with "
                    f"internet and pass its path as weights_path, or put it at {default} and pass "
                    f"weights_path=None."
                )
        elif default.is_file():
            path = default
        else:
            path = None
        net = None
        if path is None:  # torch-fidelity downloads the file to `default` (fails offline)
            net = self._build(None, default)
            if not default.is_file():
                raise RuntimeError(f"torch-fidelity loaded Inception weights but the file is not at {default}: pass "
                                   f"weights_path explicitly so its sha256 can be recorded.")
            path = default
        self.weights_path = path
        self._weights_id = sha256_file(path)
        self.standard = self._weights_id == STANDARD_INCEPTION_SHA256
        self.random_weights = not self.standard
        if not self.standard:
            message = (f"Inception weights {path} have sha256 {self._weights_id}, not the standard "
                       f"{STANDARD_INCEPTION_SHA256} of {os.path.basename(URL_INCEPTION_V3)}")
            if require_standard_weights:
                raise ValueError(f"{message}: replace the file with the one from {URL_INCEPTION_V3}.")
            log.warning("%s: distances computed with them are flagged random_weights, NOT real FIDs.", message)
        if net is None:
            net = self._build(path, default)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @staticmethod
    def _build(path: Path | None, default: Path) -> nn.Module:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

        try:
            return FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_FEATURE], verbose=False,
                                               feature_extractor_weights_path=None if path is None else str(path))
        except Exception as e:
            if path is not None:
                raise RuntimeError(
                    f"Could not load the FID Inception weights from {path} ({type(e).__name__}: {e}). The file must "
                    f"be torch-fidelity's {os.path.basename(URL_INCEPTION_V3)} (from {URL_INCEPTION_V3})."
                ) from e
            raise RuntimeError(
                f"The FID Inception weights are not at {default} and downloading them failed "
                f"({type(e).__name__}: {e}). On a machine with internet, download {URL_INCEPTION_V3} and put the "
                f"file at {default} (or set TORCH_HOME), or pass its path as InceptionFeatures(weights_path=...)."
            ) from e

    @property
    def weights_id(self) -> str:
        """sha256 of the weights file actually loaded."""
        return self._weights_id

    @property
    def feature_dim(self) -> int:
        """2048 (pool3)."""
        return 2048

    def _features(self, images: Tensor) -> Tensor:
        (features,) = self.net(images.to(self.device))
        return features


class ModuleFeatures(FeatureExtractor):
    """Features from any ``nn.Module`` that maps images ``[B, 3, H, W]`` to ``[B, D]``.

    Args:
        module: the network; put in eval mode, gradients off. Its weights are hashed on every ``weights_id``
            access, so changing them changes the cache key.
        name: identifier recorded with statistics and results.
        input_range: what the module expects: ``"uint8"`` (0..255 uint8), ``"unit"`` (float [0, 1]) or
            ``"symmetric"`` (float [-1, 1]).
        resolution: if given, images are resized (bilinear, antialiased) to ``resolution`` x ``resolution``
            before the module; None feeds them as they are.
        pretrained: True if the module carries meaningful pretrained weights. False (default: random init, as in
            tests) marks every distance computed with it as NOT a real FID.
        device: where the module runs (features come back on the CPU).
    """

    standard = False

    def __init__(self, module: nn.Module, name: str, *, input_range: InputRange = "unit",
                 resolution: int | None = None, pretrained: bool = False,
                 device: str | torch.device = "cpu") -> None:
        if input_range not in get_args(InputRange):
            raise ValueError(f"input_range={input_range!r} is not one of {get_args(InputRange)}.")
        if resolution is not None and resolution < 1:
            raise ValueError(f"resolution must be a positive int or None, got {resolution}.")
        if not name:
            raise ValueError("ModuleFeatures needs a non-empty name (it is recorded with statistics and results).")
        self.device = torch.device(device)
        self.module = module.to(self.device).eval().requires_grad_(False)
        self.name = name
        self.input_range: InputRange = input_range
        self.resolution = resolution
        self.random_weights = not pretrained
        self._feature_dim: int | None = None

    @property
    def weights_id(self) -> str:
        """sha256 over the module's current state dict."""
        return sha256_state_dict(self.module)

    @property
    def feature_dim(self) -> int:
        """D, found by running one blank image through the module the first time it is asked for."""
        if self._feature_dim is None:
            side = self.resolution or 64
            self(torch.zeros(1, 3, side, side, dtype=torch.uint8))
        assert self._feature_dim is not None
        return self._feature_dim

    def _features(self, images: Tensor) -> Tensor:
        x = images.to(self.device)
        if self.input_range != "uint8" or self.resolution is not None:
            x = x.float() / 255.0
            if self.resolution is not None and tuple(x.shape[-2:]) != (self.resolution, self.resolution):
                x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                                  align_corners=False, antialias=True).clamp(0, 1)
            if self.input_range == "uint8":
                x = (x * 255).round().to(torch.uint8)
            elif self.input_range == "symmetric":
                x = x * 2 - 1
        out = self.module(x)
        if out.dim() == 2:
            self._feature_dim = out.shape[1]
        return out


DINOV2_ABSENT = ("not computed: no DINOv2 weights given (pass --dinov2 with a local directory or hub name of a "
                 "transformers Dinov2Model, e.g. facebook/dinov2-large saved for offline use)")
"""``fd_dinov2_reason`` in results.json when FD_DINOv2 was not computed."""


class Dinov2Features(FeatureExtractor):
    """FD_DINOv2 features (Stein et al. 2023): the final-layer-normed CLS token of a DINOv2 ViT, loaded by
    transformers' ``Dinov2Model.from_pretrained`` from a user-supplied directory or hub name (no weights ship here).

    Preprocessing follows torch-fidelity's ``FeatureExtractorDinoV2`` (its ``dinov2-vit-*-14`` extractors): uint8
    images resized to ``resolution`` (224) with TF1-compatible bilinear interpolation, ImageNet mean/std
    normalisation, then the model; ``pooler_output`` of ``Dinov2Model`` is the layer-normed CLS token, what the
    torch-hub DINOv2 model returns. The published FD_DINOv2 uses ViT-L/14 (``facebook/dinov2-large``, 1024-d).

    Args:
        source: a directory written by ``save_pretrained`` or a hub name (downloaded when online).
        device: where the model runs (features come back on the CPU, float64).
        pretrained: False marks the weights as random (tests): every FD_DINOv2 is then labelled NOT real.
        resolution: the side the images are resized to (224: the standard; a multiple of the patch size).
    """

    standard = False

    def __init__(self, source: str | os.PathLike[str], device: str | torch.device = "cpu", *, pretrained: bool = True,
                 resolution: int = 224) -> None:
        from transformers import Dinov2Model

        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}.")
        try:
            model = Dinov2Model.from_pretrained(str(source))
        except Exception as e:
            raise RuntimeError(
                f"Could not load DINOv2 weights from {str(source)!r} ({type(e).__name__}: {e}). Pass a directory "
                f"written by transformers' Dinov2Model.save_pretrained (e.g. facebook/dinov2-large downloaded on a "
                f"machine with internet) or a hub name reachable from here."
            ) from e
        config = model.config
        self.source = str(source)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.resolution = int(resolution)
        self.random_weights = not pretrained
        self.name = (f"dinov2-d{config.hidden_size}-l{config.num_hidden_layers}-p{config.patch_size}-"
                     f"{self.resolution}px-cls")
        self._weights_id = sha256_state_dict(self.model)
        self._feature_dim = int(config.hidden_size)

    @property
    def weights_id(self) -> str:
        """sha256 over the model's state dict (hashed once, when loaded)."""
        return self._weights_id

    @property
    def feature_dim(self) -> int:
        """The model's hidden size (1024 for ViT-L/14)."""
        return self._feature_dim

    def _features(self, images: Tensor) -> Tensor:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = images.to(self.device).float()
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(self.resolution, self.resolution), align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1) * 255
        return self.model(pixel_values=(x - mean) / std).pooler_output

    def describe(self) -> dict[str, object]:
        """:meth:`FeatureExtractor.describe` plus where the weights came from."""
        return {**super().describe(), "source": self.source}


@contextmanager
def private_rng(seed: int) -> Iterator[None]:
    """Run a block (a module's random initialisation) on torch's CPU RNG seeded with ``seed``,
    leaving the global RNG as it was: ``nn.Module`` constructors take no generator, so fixed random
    weights are drawn inside a fork of the global RNG, never by reseeding it behind a run's back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def write_random_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write randomly initialised weights of torch-fidelity's FID Inception to ``path``.

    Same architecture and compute as the standard extractor, for tests and benchmarks on machines that
    cannot download the real weights; FIDs from them are flagged ``random_weights`` (NOT real FIDs).
    """
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    # the constructor always loads weights: skip that once to get the random initialisation
    load_url, load_state = tf_inception.load_state_dict_from_url, tf_inception.FeatureExtractorInceptionV3.load_state_dict
    tf_inception.load_state_dict_from_url = lambda *a, **k: None
    tf_inception.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None  # type: ignore[method-assign]
    try:
        with private_rng(seed):
            net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        tf_inception.load_state_dict_from_url = load_url
        tf_inception.FeatureExtractorInceptionV3.load_state_dict = load_state  # type: ignore[method-assign]
    out = Path(path)
    torch.save(net.state_dict(), out)
    return out
