"""``python -m data_recipes <recipe> [args]``: build webdataset shards with one of the recipes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data_recipes import RECIPES, load_recipe
from data_recipes.common import RecipeError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subcommand per recipe (help text from each module)."""
    modules = {name: load_recipe(name) for name in RECIPES}
    parser = argparse.ArgumentParser(
        prog="python -m data_recipes",
        description="Turn a dataset into webdataset shards {split}-{index:06d}.tar + manifest.json.",
        epilog="Run `python -m data_recipes <recipe> --help` for a recipe's input layout, output and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="recipe", metavar="<recipe>", required=True)
    for name, mod in modules.items():
        p = sub.add_parser(
            name,
            help=mod.SUMMARY,
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the recipe; returns the exit status (2 on a usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in RECIPES:
        print(
            f"error: unknown recipe {first!r}; available recipes: {', '.join(RECIPES)}\n"
            "usage: python -m data_recipes <recipe> [args]   (see python -m data_recipes --help)",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s", force=True
    )
    try:
        load_recipe(args.recipe).run(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
