"""``python -m glide_lightning fid|sweep``: zero-shot FID, CLIP score and adherence over guidance scales.

``fid`` writes ``<out>/results.json`` (and the run's wandb summary); ``sweep`` also writes
``sweep.md`` (a table per scale) and ``sweep.png`` (FID against CLIP score, one point per scale, as
the GLIDE paper's guidance curves). Every figure says how it was computed: N, resolution, scale,
sampler, steps and the feature extractor, and figures from random weights are labelled so.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from glide_lightning.runs import resolve_wandb_mode
from glide_lightning.evaluation.fid import ReferenceStatsCache
from glide_lightning.evaluation.results import ScaleResult
from glide_lightning.evaluation.sample_cli import add_sampling_arguments, resolve_device, sampling_config
from glide_lightning.evaluation.zero_shot import FIDJob, build_extractor, run
from glide_lightning.sampling import load_checkpoint

log = logging.getLogger(__name__)


def read_captions(path: str, n: int) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"caption list not found: {file} (the mscoco recipe writes fid_captions.txt; "
                                f"any file with one caption per line works)")
    captions = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if len(captions) < n:
        raise ValueError(f"{file} has {len(captions)} captions, fewer than --n {n}")
    return captions[:n]


def parser_for(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m glide_lightning {command}", description=__doc__)
    parser.add_argument("--ckpt", help="checkpoint (default: <run-dir>/checkpoints/last.ckpt)")
    parser.add_argument("--run-dir", help="the training run (runs/<experiment>): default checkpoint, output, wandb")
    parser.add_argument("--captions", default="data/mscoco/fid_captions.txt", help="held-out captions, one per line")
    parser.add_argument("--reference", default="data/mscoco/fid_reference", help="directory of reference images")
    parser.add_argument("--n", type=int, default=5000, help="number of captions / generated images")
    parser.add_argument("--scales", type=float, nargs="+", help="guidance scales (default: the sampling default)")
    parser.add_argument("--res", type=int, help="evaluation resolution, checked against the model's output (e.g. 64 "
                        "for a base model, 256 with --upsampler); default: what the model produces")
    parser.add_argument("--extractor", choices=["inception", "random-conv"], default="inception",
                        help="inception: the standard FID features; random-conv: no weights needed, NOT a real FID")
    parser.add_argument("--inception-weights", help="local Inception weights file (offline machines)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip model for the CLIP score ('none': skip)")
    parser.add_argument("--clip-pretrained", default="openai",
                        help="open_clip pretrained tag or local file ('none': random weights, labelled)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i at every scale")
    parser.add_argument("--out", help="output directory (default: <run-dir>/fid or ./fid)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "glide_lightning" / "fid_reference"),
                        help="where reference statistics are cached")
    add_sampling_arguments(parser)
    return parser


def main(command: str, argv: list[str] | None = None) -> list[ScaleResult] | None:
    args = parser_for(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_dir = Path(args.run_dir) if args.run_dir else None
    checkpoint = args.ckpt or (str(run_dir / "checkpoints" / "last.ckpt") if run_dir else None)
    if checkpoint is None:
        raise SystemExit("pass --ckpt CKPT or --run-dir runs/<experiment>")
    device = resolve_device(args.device)
    sampling = sampling_config(args)
    base = load_checkpoint(checkpoint, device, weights=args.weights, kind="base")
    upsampler = load_checkpoint(args.upsampler, device, kind="upsample") if args.upsampler else None
    res = (upsampler or base).image_size
    if args.res is not None and args.res != res:
        hint = " (256 px needs --upsampler, e.g. glide-text2im's upsample.pt)" if args.res > res else ""
        raise SystemExit(f"--res {args.res}, but {'the upsampler' if upsampler else 'the model'} makes {res} px images{hint}")
    out = Path(args.out) if args.out else (run_dir / "fid" if run_dir else Path("fid"))
    out = out / f"res{res}_{sampling.sampler}{sampling.steps}_n{args.n}"
    none = ("none", "None", "")
    job = FIDJob(captions=read_captions(args.captions, args.n), reference=args.reference, out_dir=out,
                 scales=args.scales or [sampling.guidance_scale], sampling=sampling, seed=args.seed,
                 clip_model=None if args.clip_model in none else args.clip_model,
                 clip_pretrained=None if args.clip_pretrained in none else args.clip_pretrained)
    extractor = build_extractor(args.extractor, args.inception_weights, device=str(device))
    results = run(job, base, extractor, ReferenceStatsCache(args.cache_dir), upsampler=upsampler)
    if results is None:
        return None
    if run_dir is not None:
        log_to_wandb(run_dir, results)
    if command == "sweep":
        write_sweep(out, results)
    for r in results:
        print(r.summary_line())
    return results


def log_to_wandb(run_dir: Path, results: list[ScaleResult]) -> None:
    """Put the figures in the summary of a wandb run beside the training run (same project and group)."""
    import wandb

    config_file = run_dir / "config.yaml"
    run_cfg = (yaml.safe_load(config_file.read_text()) or {}).get("run", {}) if config_file.exists() else {}
    name = run_cfg.get("name", run_dir.name)
    summary: dict[str, Any] = {}
    for r in results:
        s = f"{r.guidance_scale:g}"
        summary[f"eval/fid@{s}"] = r.fid.fid
        if r.clip_score is not None:
            summary[f"eval/clip_score@{s}"] = r.clip_score.mean
        if r.adherence is not None:
            summary[f"eval/adherence@{s}"] = r.adherence
    first = results[0]
    summary.update({"eval/n": first.n, "eval/resolution": first.resolution, "eval/sampler": first.sampler,
                    "eval/steps": first.steps, "eval/extractor": first.fid.extractor_name,
                    "eval/fid_label": first.fid.label})
    run = wandb.init(project=run_cfg.get("project", "glide_lightning"), group=run_cfg.get("group"),
                     name=f"{name}-eval", job_type="eval", dir=str(run_dir), tags=run_cfg.get("tags"),
                     mode=resolve_wandb_mode(run_cfg.get("wandb_mode", "auto")),
                     config={"results": [r.to_dict() for r in results]})
    run.summary.update(summary)
    run.finish()


def write_sweep(out: Path, results: list[ScaleResult]) -> None:
    """``sweep.md`` (table) and ``sweep.png`` (FID vs CLIP score, annotated with the scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[0]
    lines = [f"# Guidance sweep: {first.checkpoint}", "",
             f"N = {first.n}, {first.resolution} px, {first.sampler} {first.steps} steps, "
             f"features: {first.fid.extractor_name}", "", f"> {first.fid.label}", "",
             "| guidance | FID | CLIP score | adherence |", "|---:|---:|---:|---:|"]
    for r in results:
        clip = f"{r.clip_score.mean:.2f}" if r.clip_score is not None else "–"
        adherence = f"{r.adherence:.3f}" if r.adherence is not None else "–"
        lines.append(f"| {r.guidance_scale:g} | {r.fid.fid:.2f} | {clip} | {adherence} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 4))
    fids = [r.fid.fid for r in results]
    x = [r.clip_score.mean if r.clip_score is not None else r.guidance_scale for r in results]
    ax.plot(x, fids, "o-")
    for xi, fi, r in zip(x, fids, results):
        ax.annotate(f"s={r.guidance_scale:g}", (xi, fi), textcoords="offset points", xytext=(4, 4))
    against = "CLIP score" if first.clip_score is not None else "guidance scale"
    ax.set_xlabel(against)
    ax.set_ylabel("FID")
    ax.set_title(f"FID vs {against}" + (" (NOT real FIDs: random features)" if first.fid.random_weights else ""))
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    (out / "sweep.json").write_text(json.dumps([r.to_dict() for r in results], indent=1))
