"""Data recipes: turn a dataset on disk (or a URL list) into webdataset shards + ``manifest.json``.

Run ``python -m data_recipes <recipe> --help``. Each recipe is a module here with a docstring
(input layout, output, example), ``add_arguments(parser)``, ``run(args)`` and a typed ``build(...)``
function for use from Python. The shard format is documented in
:mod:`glide_lightning.data.shards`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["RECIPES", "load_recipe"]

#: recipe name -> module implementing it
RECIPES: dict[str, str] = {
    "synthetic": "data_recipes.synthetic",
    "folder": "data_recipes.folder",
    "mscoco": "data_recipes.mscoco",
    "stanford_dogs": "data_recipes.stanford_dogs",
    "sbucaptions": "data_recipes.sbucaptions",
    "embed": "data_recipes.embed",
}


def load_recipe(name: str) -> ModuleType:
    """The module of recipe ``name``; a ``KeyError`` listing the recipes if there is none."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available recipes: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])
