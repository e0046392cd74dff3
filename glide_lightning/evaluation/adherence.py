"""Text adherence without learned weights: which attributes of a synthetic-shapes caption an image shows.

A deterministic, offline check (CPU, 1-2 ms per image at 32-64 px) that text conditioning and
classifier-free guidance work on models trained on :mod:`glide_lightning.data.synthetic`: the
mean :attr:`AdherenceResult.fraction` of samples should rise with the guidance scale.

Images: ``[3, H, W]`` tensors, uint8 in 0-255 or floating point in ``value_range`` (default
``(-1, 1)``, the models' output), or PIL images; square, >= 8 px (lengths are fractions of the side).

Method (tuned on rendered scenes at 32 and 64 px; checked under noise and blur in the tests):

1. **Pixels to colours.** Nearest (RGB 0-255) of :data:`BACKGROUND` and :data:`COLOURS`, or none
   beyond :data:`REJECT_DISTANCE` (72.5, half the smallest distance between two of them). Drops
   antialiased edges (a black/background blend comes within 107 of green, never 72.5) and keeps
   interiors under noise (sigma 0.1 in [-1, 1] units is 12.75 per channel).
2. **Regions.** Per object of the caption, the largest 4-connected component ("core") of its
   colour; present if it has at least :data:`MIN_AREA_FRACTION` of the pixels (smallest rendered
   core: 2.05%, at 32 px). Two objects of one colour take the two largest, in the better order.
3. **Coverage.** Within two pixels of the core, each pixel weighs its position on the blend line
   from the background to the colour (0 if nearer another colour's line or more than
   ``2 * REJECT_DISTANCE`` off it), sharpened about 1/2 by :data:`SHARPEN` (undoes blur, keeps the
   half-covered edge in place). Width and height: the largest row and column sums of the
   weights, sub-pixel, so 8-px objects at 32 px keep their geometry.
4. **Size.** ``max(width, height)``, nearest of :data:`SIZES` in log space (boundary 0.335;
   rendered: small 0.226-0.250, large 0.42-0.469).
5. **Shape.** ``fill`` = area / (width * height) (square 1, circle pi/4, triangle ~0.55) and
   ``skew_y``, skewness of the weights' vertical distribution (0 for circle and square, -0.56 for
   the apex-up triangle). Nearest of :data:`SHAPE_PROTOTYPES` by ``hypot(d_fill, SKEW_WEIGHT *
   d_skew)``, or none beyond :data:`MAX_SHAPE_DISTANCE` (blobs, apex-down triangles): circle vs
   square splits at fill 0.89, triangle vs circle near skew -0.28.
6. **Relation.** :func:`~glide_lightning.data.synthetic.relation_holds` on the boxes of the
   pixels at least half covered.

A caption asks for colour, shape and size per object, plus the relation for two: 3 or 7
attributes. Those of an object whose colour is missing are unsatisfied. Captions outside the
synthetic grammar raise ``ValueError`` (from :func:`~glide_lightning.data.synthetic.parse_caption`,
before any image is scored); filter with it first if a batch may hold others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from glide_lightning.data.synthetic import BACKGROUND, COLOURS, SIZES, parse_caption, relation_holds

__all__ = [
    "MAX_SHAPE_DISTANCE", "MIN_AREA_FRACTION", "REJECT_DISTANCE", "SHAPE_PROTOTYPES", "SHARPEN", "SKEW_WEIGHT",
    "AdherenceResult", "Detection", "ImageLike", "ObjectResult", "ValueRange", "adherence_rate", "attribute_rates",
    "image_to_rgb", "score_batch", "score_image",
]

ImageLike = torch.Tensor | Image.Image
#: ``(low, high)`` of floating-point image tensors.
ValueRange = tuple[float, float]

#: Pixels farther than this from every reference colour (RGB 0-255) belong to no colour.
REJECT_DISTANCE = 72.5
#: Smallest core (fraction of the image's pixels) that counts as an object.
MIN_AREA_FRACTION = 0.008
#: Slope of the coverage sharpening ``clip(SHARPEN * (c - 1/2) + 1/2, 0, 1)``.
SHARPEN = 2.0
#: ``(fill, skew_y)`` of each shape: square and circle exact; the triangle's near the mean over
#: rendered scenes (fill 0.51-0.63, above 1/2 from pixelation at 32 px; skew -0.47 to -0.61).
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.0),
    "circle": (math.pi / 4, 0.0),
    "triangle": (0.56, -0.56),
}
#: ``skew_y`` counts this much against ``fill`` in the distance to a prototype.
SKEW_WEIGHT = 1.0
#: Regions farther than this from every prototype have no shape (and match none).
MAX_SHAPE_DISTANCE = 0.25
_MIN_SIDE = 8
_REF_NAMES: tuple[str, ...] = ("background", *COLOURS)
_REFS = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float64)
_SIZE_NAMES = tuple(SIZES)
_LOG_SIZES = np.log(np.array(list(SIZES.values())))


@dataclass(frozen=True)
class Detection:
    """The object found for one colour; lengths in fractions of the image side, box ``(x0, y0, x1, y1)`` y down."""

    colour: str
    bbox: tuple[float, float, float, float]
    area_fraction: float
    width: float
    height: float
    extent: float
    fill: float
    skew_y: float
    shape: str | None
    size: str


@dataclass(frozen=True)
class ObjectResult:
    """One object of the caption: what was asked, what was found, and which attributes match."""

    size: str
    colour: str
    shape: str
    detection: Detection | None
    colour_ok: bool
    shape_ok: bool
    size_ok: bool


@dataclass(frozen=True)
class AdherenceResult:
    """Per-attribute verdicts for one image and caption, plus what was detected (for debugging)."""

    caption: str
    objects: tuple[ObjectResult, ...]
    relation: str | None = None
    relation_ok: bool | None = None
    #: Fraction of the image's pixels per reference colour, ``"background"`` and ``"unknown"``.
    colour_fractions: dict[str, float] = field(default_factory=dict)

    @property
    def attributes(self) -> dict[str, bool]:
        """``{"colour_0": ..., "shape_0": ..., "size_0": ..., [..._1, "relation"]}``."""
        out: dict[str, bool] = {}
        for i, obj in enumerate(self.objects):
            out.update({f"colour_{i}": obj.colour_ok, f"shape_{i}": obj.shape_ok, f"size_{i}": obj.size_ok})
        if self.relation_ok is not None:
            out["relation"] = self.relation_ok
        return out

    @property
    def matched(self) -> int:
        """Attributes satisfied."""
        return sum(self.attributes.values())

    @property
    def total(self) -> int:
        """Attributes asked (3 or 7)."""
        return len(self.attributes)

    @property
    def fraction(self) -> float:
        """``matched / total``."""
        return self.matched / self.total


def image_to_rgb(image: ImageLike, value_range: ValueRange = (-1.0, 1.0)) -> np.ndarray:
    """``[H, W, 3]`` float64 array in 0-255 (rounded to integers) from a tensor or PIL image.

    Tensors are ``[3, H, W]``: uint8 in 0-255, or floating point in ``value_range`` (``(-1, 1)``,
    the diffusion models' output, by default; pass ``(0, 1)`` for ``to_tensor``-style images),
    clamped to it. PIL images are converted to RGB.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor [3, H, W] or a PIL image, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must have shape [3, H, W], got {list(image.shape)}")
    if not (image.dtype == torch.uint8 or image.is_floating_point()):
        raise TypeError(f"image tensor must be uint8 (0-255) or floating point (value_range), got {image.dtype}")
    x = image.detach().cpu().to(torch.float64).permute(1, 2, 0).numpy()  # numpy: torch is slow on tiny tensors
    if image.dtype == torch.uint8:
        return x
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if not np.isfinite(x).all():
        raise ValueError("image tensor contains NaN or infinite values")
    return np.round((np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo)))


def _classify(rgb: np.ndarray) -> np.ndarray:
    """``[H, W]`` index into ``_REF_NAMES`` of each pixel's nearest reference colour, -1 if none is near."""
    d = np.linalg.norm(rgb[:, :, None, :] - _REFS[None, None], axis=-1)
    labels = d.argmin(axis=-1)
    return np.where(d.min(axis=-1) <= REJECT_DISTANCE, labels, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 4-connected components of ``mask``, largest first (ties: top-left first)."""
    h, w = mask.shape
    n = h * w
    lab = np.where(mask, np.arange(n).reshape(h, w), n)
    while True:  # propagate the smallest index through each component, with pointer jumping
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = n
        flat = new.reshape(-1)
        inside = flat < n
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, lab):
            break
        lab = new
    ids, counts = np.unique(lab[mask], return_counts=True)
    order = np.lexsort((ids, -counts))
    return [lab == ids[k] for k in order]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in all 8 directions."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _coverage(rgb: np.ndarray, colour: str) -> np.ndarray:
    """Per pixel, how much of ``colour`` is blended into the background (0-1; antialiasing, blur).

    The pixel's position along the line from :data:`BACKGROUND` to ``colour``; 0 where the pixel
    is nearer another palette colour's blend line, or farther than ``2 * REJECT_DISTANCE`` from it.
    """
    bg = _REFS[0]
    axes = _REFS[1:] - bg  # [C, 3]
    alpha = np.clip((rgb - bg) @ axes.T / (axes * axes).sum(axis=1), 0.0, 1.0)  # [H, W, C]
    off = np.linalg.norm(rgb[..., None, :] - bg - alpha[..., None] * axes, axis=-1)
    k = _REF_NAMES.index(colour) - 1
    mine = (off.argmin(axis=-1) == k) & (off[..., k] <= 2 * REJECT_DISTANCE)
    return np.where(mine, alpha[..., k], 0.0)


def _shape_of(fill: float, skew_y: float) -> str | None:
    """Nearest :data:`SHAPE_PROTOTYPES` entry, or ``None`` beyond :data:`MAX_SHAPE_DISTANCE`."""
    best, best_d = None, MAX_SHAPE_DISTANCE
    for name, (f, k) in SHAPE_PROTOTYPES.items():
        d = math.hypot(fill - f, SKEW_WEIGHT * (skew_y - k))
        if d <= best_d:
            best, best_d = name, d
    return best


def _detect(rgb: np.ndarray, core: np.ndarray, colour: str) -> Detection:
    """Geometry of the object whose interior is ``core`` (steps 3-5 of the module docstring)."""
    h, w = core.shape
    side = max(h, w)
    ys, xs = np.nonzero(core)
    ya, yb = max(int(ys.min()) - 2, 0), min(int(ys.max()) + 3, h)
    xa, xb = max(int(xs.min()) - 2, 0), min(int(xs.max()) + 3, w)
    crop = core[ya:yb, xa:xb]
    cover = np.where(_dilate(_dilate(crop)), _coverage(rgb[ya:yb, xa:xb], colour), 0.0)
    weight = np.clip(SHARPEN * (cover - 0.5) + 0.5, 0.0, 1.0)
    if not (weight >= 0.5).any():
        # generated colours can be nearest the palette colour yet off its blend line with the
        # background (e.g. a dull green): measure the classified pixels themselves
        weight = crop.astype(float)
    ys, xs = np.nonzero(crop | (weight >= 0.5))
    y0, y1, x0, x1 = int(ys.min()) + ya, int(ys.max()) + 1 + ya, int(xs.min()) + xa, int(xs.max()) + 1 + xa
    area = float(weight.sum())
    width, height = float(weight.sum(axis=1).max()), float(weight.sum(axis=0).max())
    fill = area / (width * height)
    rows = weight.sum(axis=1) / area
    dy = np.arange(len(rows)) - float(rows @ np.arange(len(rows)))
    skew_y = float(rows @ dy**3) / max(float(rows @ dy**2), 1e-12) ** 1.5
    extent = max(width, height) / side
    size = _SIZE_NAMES[int(np.abs(_LOG_SIZES - math.log(extent)).argmin())]
    box = (x0 / side, y0 / side, x1 / side, y1 / side)
    return Detection(colour, box, area / (h * w), width / side, height / side, extent, fill, skew_y,
                     _shape_of(fill, skew_y), size)


def _judge(asked: tuple[str, str, str], det: Detection | None) -> ObjectResult:
    """Verdicts for one asked ``(size, colour, shape)`` given the object found (or ``None``)."""
    size, colour, shape = asked
    if det is None:
        return ObjectResult(size, colour, shape, None, False, False, False)
    return ObjectResult(size, colour, shape, det, True, det.shape == shape, det.size == size)


def _score_rgb(rgb: np.ndarray, text: str) -> AdherenceResult:
    """:func:`score_image` on an ``[H, W, 3]`` 0-255 array."""
    objects, relation = parse_caption(text)
    h, w = rgb.shape[:2]
    if min(h, w) < _MIN_SIDE:
        raise ValueError(f"image must be at least {_MIN_SIDE}x{_MIN_SIDE} pixels, got {h}x{w}")
    labels = _classify(rgb)
    fractions = {name: float((labels == i).mean()) for i, name in enumerate(_REF_NAMES)}
    fractions["unknown"] = float((labels < 0).mean())
    min_area = MIN_AREA_FRACTION * h * w
    regions: dict[str, list[Detection]] = {}
    for colour in {c for _, c, _ in objects}:
        comps = _components(labels == _REF_NAMES.index(colour))
        wanted = sum(c == colour for _, c, _ in objects)
        regions[colour] = [_detect(rgb, m, colour) for m in comps[:wanted] if m.sum() >= min_area]

    candidates: list[tuple[ObjectResult, ...]] = []
    if len(objects) == 2 and objects[0][1] == objects[1][1]:  # same colour: try both assignments
        dets = regions[objects[0][1]] + [None, None]  # type: ignore[list-item]
        for a, b in ((0, 1), (1, 0)):
            candidates.append((_judge(objects[0], dets[a]), _judge(objects[1], dets[b])))
    else:
        candidates.append(tuple(_judge(o, (regions[o[1]] or [None])[0]) for o in objects))

    def build(objs: tuple[ObjectResult, ...]) -> AdherenceResult:
        rel_ok = None
        if relation is not None:
            d0, d1 = objs[0].detection, objs[1].detection
            rel_ok = d0 is not None and d1 is not None and relation_holds(d0.bbox, d1.bbox, relation)
        return AdherenceResult(text, objs, relation, rel_ok, fractions)

    return max((build(c) for c in candidates), key=lambda r: r.matched)  # first wins ties


def score_image(image: ImageLike, caption: str, *, value_range: ValueRange = (-1.0, 1.0)) -> AdherenceResult:
    """Which attributes of ``caption`` the image shows (see the module docstring).

    ``image``: ``[3, H, W]`` uint8 tensor (0-255), float tensor in ``value_range`` (default
    ``(-1, 1)``) or PIL image. Raises ``ValueError`` if ``caption`` is not a synthetic-shapes caption.
    """
    return _score_rgb(image_to_rgb(image, value_range), caption)


def score_batch(
    images: torch.Tensor | Sequence[ImageLike], captions: Sequence[str], *, value_range: ValueRange = (-1.0, 1.0)
) -> list[AdherenceResult]:
    """:func:`score_image` for each image of a ``[B, 3, H, W]`` tensor (or a sequence) and its caption.

    All captions are parsed before any image is scored; the first invalid one raises ``ValueError``
    naming its index.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not a single string")
    if isinstance(images, torch.Tensor) and images.dim() != 4:
        raise ValueError(f"a batch tensor must have shape [B, 3, H, W], got {list(images.shape)}")
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    for i, text in enumerate(captions):
        try:
            parse_caption(text)
        except ValueError as e:
            raise ValueError(f"caption {i}: {e}") from None
    return [score_image(img, text, value_range=value_range) for img, text in zip(images, captions)]


def adherence_rate(
    images: torch.Tensor | Sequence[ImageLike], captions: Sequence[str], *, value_range: ValueRange = (-1.0, 1.0)
) -> float:
    """Mean :attr:`AdherenceResult.fraction` over a batch (each image weighs the same)."""
    if len(captions) == 0:
        raise ValueError("adherence_rate needs at least one image and caption")
    results = score_batch(images, captions, value_range=value_range)
    return sum(r.fraction for r in results) / len(results)


def attribute_rates(results: Sequence[AdherenceResult]) -> dict[str, float]:
    """Fraction satisfied per attribute type over ``results``: ``colour``, ``shape``, ``size``, ``relation``.

    A type no result asks for (``relation`` with one-object captions only) is left out.
    """
    hits: dict[str, list[bool]] = {"colour": [], "shape": [], "size": [], "relation": []}
    for r in results:
        for name, ok in r.attributes.items():
            hits[name.split("_")[0]].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items() if v}
