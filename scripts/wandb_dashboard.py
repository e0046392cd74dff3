"""Draw an ablation's wandb dashboard from its runs' local (offline) wandb files:
``python scripts/wandb_dashboard.py --runs runs/ablation_smoke_* --group ablation_smoke --out docs/images/x.png``.

The panels (see :mod:`glide_lightning.evaluation.dashboard`) are the layout we recommend for an ablation's wandb
workspace; this picture is made without a server, from the same files ``wandb sync`` uploads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glide_lightning.evaluation.dashboard import draw_dashboard
from glide_lightning.evaluation.wandb_runs import find_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (each holding wandb/)")
    parser.add_argument("--group", default=None, help="keep only wandb runs of this group")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    runs = [run for folder in args.runs for run in find_runs(Path(folder) / "wandb")
            if args.group is None or run.group == args.group]
    if not runs:
        parser.error(f"no wandb runs{f' of group {args.group!r}' if args.group else ''} under {args.runs}")
    draw_dashboard(runs, args.out, args.group or "ablation")
    print(f"wrote {args.out} from {len(runs)} wandb runs")


if __name__ == "__main__":
    main()
