"""Synthetic shapes: deterministic pictures of coloured shapes with compositional captions.

The framework's default dataset for smoke runs and CI, and the ground truth of a text-adherence
scorer: every attribute in a caption can be read back from the picture.

- One or two objects on a plain light background (:data:`BACKGROUND`). Objects have a shape
  (:data:`SHAPES`), a colour (:data:`COLOURS`, far apart in RGB) and a size (:data:`SIZES`, the
  side of the object's square bounding box as a fraction of the image side). Two-object scenes
  always use two different colours (so objects can be segmented by colour), never overlap, and
  satisfy their relation (:data:`RELATIONS`) strictly: ``"A above B"`` means A's box ends above
  B's box begins and the vertical offset of the centres is at least the horizontal one.
- Captions: ``"a large green triangle"``, ``"a small red circle above a large blue square"``
  (the relation describes the first object relative to the second); :func:`parse_caption`
  inverts :func:`caption`.
- Geometry is resolution independent (fractions of the image side, y downward), so one scene
  renders at any size; :func:`render` draws it, supersampled 4x and box-filtered when
  ``antialias`` (object interiors keep their exact palette colour either way).
- Determinism: sample ``index`` of ``split`` with ``seed`` uses its own
  ``random.Random(f"{seed}-{split}-{index}")`` (string seeds hash with SHA-512: the same on every
  machine and Python >= 3.2), so it is identical across runs and machines.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from PIL import Image, ImageDraw

from glide_lightning.data.shards import Sample

__all__ = [
    "BACKGROUND", "COLOURS", "MIN_IMAGE_SIZE", "RELATIONS", "SHAPES", "SIZES", "Colour", "Relation", "Scene",
    "SceneObject", "Shape", "Size", "caption", "nearest_colour", "parse_caption", "relation_holds", "render",
    "sample_scene", "scene_rng", "synthetic_sample", "synthetic_samples",
]

Shape = Literal["circle", "square", "triangle"]
Colour = Literal["red", "green", "blue", "yellow", "purple", "black"]
Size = Literal["small", "large"]
Relation = Literal["above", "below", "left of", "right of"]

SHAPES: tuple[str, ...] = get_args(Shape)
#: Palette (min pairwise RGB distance 145, each at least 145 from the background).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (30, 60, 230),
    "yellow": (245, 210, 20),
    "purple": (170, 40, 200),
    "black": (25, 25, 25),
}
#: Side of an object's (square) bounding box as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.25, "large": 0.45}
RELATIONS: tuple[str, ...] = get_args(Relation)
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
MIN_IMAGE_SIZE = 16
MARGIN = 0.03  # free border, fraction of the image side
GAP = 0.04  # minimum gap between the two boxes along the relation's axis
_SUPERSAMPLE = 4


def _check(value: str, name: str, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


@dataclass(frozen=True)
class SceneObject:
    """One shape: attributes plus its centre ``(cx, cy)`` as fractions of the image side."""

    shape: Shape
    colour: Colour
    size: Size
    cx: float
    cy: float

    def __post_init__(self) -> None:
        _check(self.shape, "shape", SHAPES)
        _check(self.colour, "colour", COLOURS)
        _check(self.size, "size", SIZES)

    @property
    def extent(self) -> float:
        """Bounding-box side as a fraction of the image side."""
        return SIZES[self.size]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in fractions of the image side (y downward)."""
        h = self.extent / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def bbox_pixels(self, image_size: int) -> tuple[int, int, int, int]:
        """Half-open pixel box ``[x0, x1) x [y0, y1)`` covered by the object at ``image_size``."""
        x0, y0, x1, y1 = self.bbox
        return (round(x0 * image_size), round(y0 * image_size), round(x1 * image_size), round(y1 * image_size))

    def phrase(self) -> str:
        """``"a small red circle"``."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; ``relation`` (two objects only) places ``objects[0]`` w.r.t. ``objects[1]``."""

    objects: tuple[SceneObject, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError("a one-object scene has no relation; pass relation=None")
        if len(self.objects) == 2:
            if self.relation is None:
                raise ValueError(f"a two-object scene needs a relation, one of {list(RELATIONS)}")
            _check(self.relation, "relation", RELATIONS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stored in each sample's ``json`` metadata as ``scene``)."""
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scene:
        """Inverse of :meth:`to_dict`."""
        return cls(objects=tuple(SceneObject(**o) for o in d["objects"]), relation=d.get("relation"))


def scene_rng(seed: int, index: int, split: str = "train") -> random.Random:
    """The private generator of sample ``index`` of ``split`` (identical on every machine)."""
    return random.Random(f"{seed}-{split}-{index}")


def _place_pair(rng: random.Random, e_first: float, e_second: float) -> tuple[float, float, float, float]:
    """Centres for ``first above second``: ``(cx1, cy1, cx2, cy2)``; other relations are symmetries."""
    free = max(0.0, 1.0 - 2 * MARGIN - e_first - e_second - GAP)
    a = rng.uniform(0.0, free)
    b = rng.uniform(0.0, free - a)
    top1 = MARGIN + a
    cy1 = top1 + e_first / 2
    cy2 = top1 + e_first + GAP + b + e_second / 2
    dy = cy2 - cy1
    cx1 = rng.uniform(MARGIN + e_first / 2, 1 - MARGIN - e_first / 2)
    lo = max(MARGIN + e_second / 2, cx1 - dy)
    hi = min(1 - MARGIN - e_second / 2, cx1 + dy)
    cx2 = rng.uniform(lo, hi)
    return cx1, cy1, cx2, cy2


def sample_scene(rng: random.Random, *, two_object_prob: float = 0.5) -> Scene:
    """Draw a scene: one object, or (with ``two_object_prob``) two differently coloured ones."""
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
    two = rng.random() < two_object_prob
    shape, size = rng.choice(SHAPES), rng.choice(tuple(SIZES))
    colours = list(COLOURS)
    colour = rng.choice(colours)
    if not two:
        e = SIZES[size]
        cx = rng.uniform(MARGIN + e / 2, 1 - MARGIN - e / 2)
        cy = rng.uniform(MARGIN + e / 2, 1 - MARGIN - e / 2)
        return Scene((SceneObject(shape, colour, size, cx, cy),))  # type: ignore[arg-type]
    shape2, size2 = rng.choice(SHAPES), rng.choice(tuple(SIZES))
    colour2 = rng.choice([c for c in colours if c != colour])
    relation: Relation = rng.choice(RELATIONS)
    e1, e2 = SIZES[size], SIZES[size2]
    if relation in ("above", "left of"):
        cx1, cy1, cx2, cy2 = _place_pair(rng, e1, e2)
    else:  # "below" / "right of": the second object is the upper (left) one
        cx2, cy2, cx1, cy1 = _place_pair(rng, e2, e1)
    if relation in ("left of", "right of"):  # transpose: vertical layout -> horizontal
        cx1, cy1, cx2, cy2 = cy1, cx1, cy2, cx2
    first = SceneObject(shape, colour, size, cx1, cy1)  # type: ignore[arg-type]
    second = SceneObject(shape2, colour2, size2, cx2, cy2)  # type: ignore[arg-type]
    return Scene((first, second), relation)


def caption(scene: Scene) -> str:
    """``"a large green triangle"`` / ``"a small red circle above a large blue square"``."""
    if scene.relation is None:
        return scene.objects[0].phrase()
    return f"{scene.objects[0].phrase()} {scene.relation} {scene.objects[1].phrase()}"


_WORD = "|".join
_PHRASE = rf"a ({_WORD(SIZES)}) ({_WORD(COLOURS)}) ({_WORD(SHAPES)})"
_CAPTION_RE = re.compile(rf"^{_PHRASE}(?: ({_WORD(RELATIONS)}) {_PHRASE})?$")


def parse_caption(text: str) -> tuple[tuple[tuple[str, str, str], ...], str | None]:
    """Attributes of a caption made by :func:`caption`: ``(((size, colour, shape), ...), relation)``.

    Raises ``ValueError`` for text outside the synthetic grammar.
    """
    m = _CAPTION_RE.match(" ".join(text.strip().lower().split()))
    if m is None:
        raise ValueError(
            f"{text!r} is not a synthetic-shapes caption: expected 'a <size> <colour> <shape>' optionally "
            f"followed by '<relation> a <size> <colour> <shape>' (sizes {list(SIZES)}, colours "
            f"{list(COLOURS)}, shapes {list(SHAPES)}, relations {list(RELATIONS)})"
        )
    g = m.groups()
    first = (g[0], g[1], g[2])
    if g[3] is None:
        return (first,), None
    return (first, (g[4], g[5], g[6])), g[3]


def relation_holds(
    first: tuple[float, float, float, float], second: tuple[float, float, float, float], relation: str
) -> bool:
    """Whether box ``first`` is ``relation`` box ``second`` (boxes ``(x0, y0, x1, y1)``, y downward).

    Centre based: the centres are offset in the relation's direction, at least as much as along
    the other axis. (Generated scenes also keep a gap between the boxes along that axis.)
    """
    _check(relation, "relation", RELATIONS)
    dx = (second[0] + second[2]) / 2 - (first[0] + first[2]) / 2
    dy = (second[1] + second[3]) / 2 - (first[1] + first[3]) / 2
    along, across = {"above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy)}[relation]
    return along > 0 and along >= abs(across)


def nearest_colour(rgb: tuple[float, float, float]) -> str:
    """The palette colour name closest to ``rgb`` (Euclidean in RGB)."""
    return min(COLOURS, key=lambda name: math.dist(COLOURS[name], rgb))


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int) -> None:
    x0, y0, x1, y1 = obj.bbox_pixels(size)
    fill = COLOURS[obj.colour]
    box = (x0, y0, x1 - 1, y1 - 1)  # PIL boxes are inclusive
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle, apex up
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)


def render(scene: Scene, image_size: int = 64, *, antialias: bool = True) -> Image.Image:
    """Draw ``scene`` as an ``image_size`` x ``image_size`` RGB image on :data:`BACKGROUND`."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} for shapes to stay recognisable, got {image_size}")
    scale = _SUPERSAMPLE if antialias else 1
    canvas = Image.new("RGB", (image_size * scale, image_size * scale), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, image_size * scale)
    if scale > 1:
        canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return canvas


def synthetic_sample(
    seed: int,
    index: int,
    *,
    split: str = "train",
    image_size: int = 64,
    antialias: bool = True,
    two_object_prob: float = 0.5,
) -> Sample:
    """Sample ``index`` of ``split``: rendered scene, caption, metadata (with the scene)."""
    scene = sample_scene(scene_rng(seed, index, split), two_object_prob=two_object_prob)
    meta = {
        "source": "synthetic",
        "source_id": f"{seed}-{split}-{index}",
        "original_size": [image_size, image_size],
        "seed": seed,
        "index": index,
        "scene": scene.to_dict(),
    }
    return Sample(f"{index:06d}", render(scene, image_size, antialias=antialias), caption(scene), meta)


def synthetic_samples(
    seed: int,
    count: int,
    *,
    split: str = "train",
    start: int = 0,
    image_size: int = 64,
    antialias: bool = True,
    two_object_prob: float = 0.5,
) -> Iterator[Sample]:
    """Samples ``start .. start + count - 1`` of ``split`` (see :func:`synthetic_sample`)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    for index in range(start, start + count):
        yield synthetic_sample(
            seed, index, split=split, image_size=image_size, antialias=antialias, two_object_prob=two_object_prob
        )
