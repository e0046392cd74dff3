"""Data recipes: turn a dataset on disk (or a URL list) into webdataset shards + ``manifest.json``.

Run ``python -m glide_lightning data <recipe> --help`` (``python -m data_recipes <recipe>`` is an alias). Each
recipe is one module here: its docstring (input layout, output, examples) is the recipe's ``--help`` text, and
its ``RECIPE`` a dataclass (a :class:`~data_recipes.common.Recipe`) whose fields, with their docstrings and
defaults, are the options, parsed by the front door (:mod:`glide_lightning.commands`) as every other command's;
``RECIPE(out=..., ...).run()`` (or the module's ``build(out, ...)``) does the same from Python. Adding a recipe
is adding its module: the registry below, ``python -m glide_lightning data --help`` and the Makefile's
``RECIPES`` all list this folder's modules. The shard format is documented in :mod:`glide_lightning.data.shards`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["NOT_RECIPES", "RECIPES", "load_recipe", "recipe_class"]

NOT_RECIPES = frozenset({"common", "images"})
"""Modules of this folder that are not recipes (``__main__`` and ``_private`` ones neither)."""

RECIPES: dict[str, str] = {
    info.name: f"{__name__}.{info.name}"
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda info: info.name)
    if not info.name.startswith("_") and info.name not in NOT_RECIPES
}
"""Recipe name → the module implementing it: every module of this folder but :data:`NOT_RECIPES`."""


def load_recipe(name: str) -> ModuleType:
    """The module of recipe ``name``; a ``KeyError`` listing the recipes if there is none."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available recipes: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])


def recipe_class(name: str) -> Any:
    """The options dataclass of recipe ``name`` (its module's ``RECIPE``)."""
    return load_recipe(name).RECIPE
