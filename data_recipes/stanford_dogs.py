"""stanford_dogs: Stanford Dogs (120 breeds) → shards captioned "a photo of a <breed>".

Input layout (--dogs_dir ROOT, as extracted from images.tar and lists.tar):
  ROOT/Images/<synset>-<Breed_name>/<synset>_<n>.jpg
      e.g. ROOT/Images/n02085620-Chihuahua/n02085620_10074.jpg
  (ROOT/images/, ROOT/images/Images/ or ROOT itself holding the breed folders also work)
  optional ROOT/train_list.mat and ROOT/test_list.mat (or under ROOT/lists/): the official split.

Captions: the breed from the folder name, underscores → spaces, lower case, with "a"/"an" chosen
by the first letter (n02085782-Japanese_spaniel → "a photo of a japanese spaniel",
n02088094-Afghan_hound → "a photo of an afghan hound"); change the wording with --template.

Split (--split):
  official  train_list.mat → train, test_list.mat → val (MATLAB files, read with scipy.io.loadmat: their
            ``file_list`` of ``<synset>-<Breed>/<file>.jpg`` paths); an image in neither list is skipped.
  hash      a deterministic split hashing each image's path: --val_fraction of the images in val.
  auto      (default) official when both lists are present, else hash.

Output:  train-*.tar, val-*.tar (RGB JPEG, txt, json {source_id, breed, synset, original_size,
         size}), manifest.json; image order shuffled with --seed. Unreadable images are skipped
         and counted.

Example:
  python -m glide_lightning data stanford_dogs --dogs_dir /data/stanford_dogs --out data/dogs --max_size 128
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_recipes.common import (
    IMAGE_EXTENSIONS,
    ImageRecipe,
    RecipeError,
    SkipCounter,
    check_fraction,
    check_out_dir,
    finish,
    hash_split,
    log,
    prepare_out_dir,
    require_dir,
)
from data_recipes.images import Entry, ImageOptions, write_entries
from glide_lightning.data.shards import Manifest

NAME = "stanford_dogs"
SplitMode = Literal["auto", "official", "hash"]
DEFAULT_TEMPLATE = "a photo of {article} {breed}"
NUM_BREEDS = 120
_BREED_DIR = re.compile(r"^(n\d+)-(.+)$")


def breed_name(folder: str) -> str:
    """``"n02085782-Japanese_spaniel"`` → ``"japanese spaniel"`` (text after the first '-')."""
    m = _BREED_DIR.match(folder)
    if m is None:
        raise ValueError(f"{folder!r} is not a Stanford Dogs breed folder name ('<synset>-<Breed_name>')")
    return " ".join(m.group(2).replace("_", " ").lower().split())


def article(word: str) -> str:
    """``"an"`` before a vowel letter, else ``"a"``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def breed_caption(breed: str, template: str = DEFAULT_TEMPLATE) -> str:
    """``template`` with ``{breed}`` and ``{article}`` filled in."""
    return template.format(breed=breed, article=article(breed))


def _images_root(root: Path) -> Path:
    for cand in (root / "Images", root / "images" / "Images", root / "images", root):
        if cand.is_dir() and any(_BREED_DIR.match(p.name) for p in cand.iterdir() if p.is_dir()):
            return cand
    raise RecipeError(
        f"no breed folders such as Images/n02085620-Chihuahua/ under {root}; expected the layout "
        "ROOT/Images/<synset>-<Breed_name>/*.jpg (see --help)"
    )


def _find_list(root: Path, name: str) -> Path | None:
    for cand in (root / name, root / "lists" / name):
        if cand.is_file():
            return cand
    return None


def _read_mat_list(path: Path) -> set[str]:
    import numpy as np
    from scipy.io import loadmat

    try:
        return {str(np.ravel(x)[0]) for x in np.ravel(loadmat(path)["file_list"])}
    except Exception as e:  # noqa: BLE001 - report any malformed list clearly
        raise RecipeError(f"cannot read the file list in {path} ({type(e).__name__}: {e})") from e


def _official_lists(root: Path, mode: SplitMode) -> tuple[set[str], set[str]] | None:
    lists = (_find_list(root, "train_list.mat"), _find_list(root, "test_list.mat"))
    if mode == "hash":
        return None
    if None in lists:
        if mode == "official":
            raise RecipeError(f"--split official needs train_list.mat and test_list.mat in {root} or {root / 'lists'}")
        log.info("using the hash split (--val_fraction): train_list.mat/test_list.mat not found")
        return None
    assert lists[0] is not None and lists[1] is not None
    return _read_mat_list(lists[0]), _read_mat_list(lists[1])


@dataclass(kw_only=True)
class StanfordDogs(ImageRecipe):
    """Stanford Dogs' Images/<synset>-<breed>/ tree, captioned "a photo of a <breed>"."""

    NAME = NAME
    dogs_dir: Path
    """Dataset root (holds Images/)."""
    split: SplitMode = "auto"
    """``official`` (the dataset's train_list.mat / test_list.mat), ``hash`` (by path, ``val_fraction``), or
    ``auto`` (official when both lists are present)."""
    val_fraction: float = 0.1
    """Share of images in val for the hash split."""
    template: str = DEFAULT_TEMPLATE
    """Caption template with ``{breed}`` and ``{article}``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dogs_dir = Path(self.dogs_dir)
        check_fraction(self.val_fraction, "--val_fraction")
        if "{breed}" not in self.template:
            raise RecipeError(f"--template must contain {{breed}}, got {self.template!r}")
        try:
            breed_caption("dog", self.template)
        except (KeyError, IndexError, ValueError) as e:
            raise RecipeError(f"--template {self.template!r} may use only {{breed}} and {{article}} ({e!r})") from e

    def run(self) -> Manifest:
        """Shard the Stanford Dogs images under ``dogs_dir`` into ``out``."""
        out, template = self.out, self.template
        root = require_dir(self.dogs_dir, "--dogs_dir", "it should contain Images/<synset>-<breed>/")
        images_root = _images_root(root)
        check_out_dir(out, self.overwrite)
        official = _official_lists(root, self.split)

        skips = SkipCounter()
        entries: list[tuple[str, Entry]] = []
        breeds: set[str] = set()
        for folder in sorted(p for p in images_root.iterdir() if p.is_dir()):
            if not _BREED_DIR.match(folder.name):
                skips.add("not a breed folder", folder.name)
                continue
            breed, synset = breed_name(folder.name), folder.name.split("-", 1)[0]
            breeds.add(breed)
            for path in sorted(folder.iterdir()):
                if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                rel = f"{folder.name}/{path.name}"
                if official is None:
                    which = hash_split(rel, self.val_fraction)
                elif rel in official[0] or rel in official[1]:
                    which = "train" if rel in official[0] else "val"
                else:
                    skips.add("not in the official lists", rel)
                    continue
                meta = {"breed": breed, "synset": synset}
                entries.append((which, Entry(path, rel, ((path.stem, breed_caption(breed, template)),), meta)))
        if not entries:
            raise RecipeError(f"no images found in the breed folders under {images_root}")
        if len(breeds) != NUM_BREEDS:
            log.warning("found %d breeds, Stanford Dogs has %d", len(breeds), NUM_BREEDS)
        random.Random(self.seed).shuffle(entries)
        by_split: dict[str, list[Entry]] = {"train": [], "val": []}
        for which, entry in entries:
            by_split[which].append(entry)

        prepare_out_dir(out, self.overwrite)
        opts = ImageOptions(image_format="jpg", max_size=self.max_size, reencode=self.reencode)
        checks = self.checks()
        splits = write_entries(out, by_split, opts, skips, workers=self.workers, max_per_shard=self.max_per_shard,
                               checks=checks)
        args: dict[str, Any] = {**self.options(), "split": "official" if official else "hash"}
        extra = {"preprocessing": opts.to_dict(), "breeds": sorted(breeds)}
        return finish(out, NAME, args, splits, skips, extra, checks)


RECIPE = StanfordDogs


def build(out: Path, **options: Any) -> Manifest:
    """:class:`StanfordDogs` (its fields are the options) written to ``out``; returns the manifest."""
    return StanfordDogs(out=out, **options).run()
