"""``python -m glide_lightning sample``: images from prompts with a trained or released model.

Writes one PNG per image (its prompt, seed, guidance scale, sampler, steps and checkpoint in PNG text
chunks), a grid (rows = prompts, columns = images per prompt) and ``metadata.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from glide_lightning.data.images import image_grid, save_png
from glide_lightning.sampling import SamplingConfig, generate, load_checkpoint

log = logging.getLogger(__name__)
DEFAULTS = SamplingConfig()


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line, blank lines and ``#`` comments skipped)."""
    found = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        found += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not found:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return found


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The :class:`SamplingConfig` knobs as options, with its defaults (defined only there)."""
    parser.add_argument("--guidance-scale", type=float, default=DEFAULTS.guidance_scale,
                        help=f"classifier-free guidance scale (default {DEFAULTS.guidance_scale})")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default=DEFAULTS.sampler)
    parser.add_argument("--steps", default=DEFAULTS.steps,
                        help=f"sampling steps: a respacing such as 100, ddim50, fast27 (default {DEFAULTS.steps})")
    parser.add_argument("--eta", type=float, default=DEFAULTS.eta, help="DDIM eta")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--upsampler", help="upsampler checkpoint (glide-text2im's upsample.pt) for 256 px")
    parser.add_argument("--upsample-steps", default=DEFAULTS.upsample_steps)
    parser.add_argument("--upsample-temp", type=float, default=DEFAULTS.upsample_temp)
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema",
                        help="of a glide_lightning .ckpt: its EMA weights (when the run kept them) or the raw ones")
    parser.add_argument("--device", default="auto", help="cuda, cpu, … (auto: cuda when available)")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(guidance_scale=args.guidance_scale, sampler=args.sampler, steps=str(args.steps),
                          eta=args.eta, batch_size=args.batch_size, upsample_steps=args.upsample_steps,
                          upsample_temp=args.upsample_temp)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m glide_lightning sample", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="a glide_lightning .ckpt (EMA weights) or glide-text2im's base.pt")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a file with one prompt per line")
    parser.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt (grid columns)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--out", default="samples", help="output directory")
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prompts = read_prompts(args.prompt, args.prompts_file)
    config = sampling_config(args)
    device = resolve_device(args.device)
    base = load_checkpoint(args.ckpt, device, weights=args.weights, kind="base")
    upsampler = load_checkpoint(args.upsampler, device, kind="upsample") if args.upsampler else None
    all_prompts = [p for p in prompts for _ in range(args.num_per_prompt)]
    seeds = [args.seed + i for i in range(len(all_prompts))]
    log.info("sampling %d images from %s at guidance %.2f (%s, %s steps)", len(all_prompts), base.source,
             config.guidance_scale, config.sampler, config.steps)
    images = generate(base, all_prompts, seeds, config, upsampler=upsampler, progress=True)
    out = Path(args.out)
    common = {"guidance_scale": config.guidance_scale, "sampler": config.sampler, "steps": config.steps,
              "eta": config.eta, "checkpoint": base.source,
              "upsampler": upsampler.source if upsampler else None,
              "upsample_steps": config.upsample_steps if upsampler else None,
              "upsample_temp": config.upsample_temp if upsampler else None}
    records = []
    for i, (image, prompt, seed) in enumerate(zip(images, all_prompts, seeds)):
        record = {"file": f"{i:04d}.png", "prompt": prompt, "seed": seed, **common}
        save_png(image, out / record["file"], record)
        records.append(record)
    save_png(image_grid(images, rows=len(prompts)), out / "grid.png", {"prompts": prompts, **common})
    (out / "metadata.json").write_text(json.dumps({"config": asdict(config), "images": records}, indent=1))
    log.info("wrote %d images and grid.png to %s", len(records), out)
    return out
