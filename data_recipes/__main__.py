"""``python -m data_recipes <recipe> [options]``: an alias of ``python -m glide_lightning data <recipe> [options]``
(the front door, :mod:`glide_lightning.commands`), with the same options and errors."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m glide_lightning data *argv``; returns the exit status (2 on a usage or input error)."""
    from glide_lightning.commands import main as front_door

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        front_door(["data", *argv])
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
