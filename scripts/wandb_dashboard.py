"""Draw an ablation's wandb dashboard from its runs' local (offline) wandb files:
``python scripts/wandb_dashboard.py --runs runs/ablation_smoke --group ablation_smoke --out reports/x.png``.

The panels (see :mod:`glide_lightning.evaluation.dashboard`) are the layout we recommend for an ablation's wandb
workspace; this picture is made without a server, from the same files ``wandb sync`` uploads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glide_lightning.evaluation.dashboard import draw_dashboard
from glide_lightning.evaluation.wandb_runs import find_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--runs", nargs="+", required=True,
                        help="folders searched for wandb runs: an ablation's group folder (runs/<group>), or run "
                             "folders (runs/<group>/<arm>_seed<k>, runs/<name>)")
    parser.add_argument("--group", default=None, help="keep only wandb runs of this group")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    missing = [folder for folder in args.runs if not Path(folder).is_dir()]
    if missing:
        parser.error(f"--runs: {', '.join(missing)} {'is not a folder' if len(missing) == 1 else 'are not folders'}")
    found = {run.id: run for folder in args.runs for run in find_runs(folder)}  # (a run under two folders: once)
    runs = [run for run in found.values() if args.group is None or run.group == args.group]
    if not runs:
        parser.error(f"no wandb runs{f' of group {args.group!r}' if args.group else ''} under {', '.join(args.runs)}")
    try:
        draw_dashboard(runs, args.out, args.group or "ablation")
    except ValueError as error:  # nothing to draw: said in one line
        parser.error(str(error))
    print(f"wrote {args.out} from {len(runs)} wandb runs")


if __name__ == "__main__":
    main()
