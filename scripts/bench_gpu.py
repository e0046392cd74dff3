"""The GPU benchmark (issue 12, item 4): one prepared run for a machine with a CUDA GPU.

    python scripts/bench_gpu.py --out bench/results-gpu.json          # make bench-gpu

For the miniGLIDE preset (``experiments/parts/minig_model.yaml``, random weights) it measures:

- the training step (hybrid loss, forward + backward + AdamW, as :func:`glide_lightning.bench._train_step`
  builds it) under bf16 autocast, eager and through ``torch.compile``: images/s and MFU, the step's
  FLOPs (:func:`glide_lightning.models.flops.training_step_flops`: torch's FLOP counter, forward and
  backward) per second over the device's bf16 peak from Lightning's table
  (``lightning.fabric.utilities.throughput.get_available_flops``; None where the table has no entry);
- guided 25-step sampling (:func:`glide_lightning.sampling.sample_batch`, the body of ``generate``) at
  batch 1 and 64, eager and with ``SamplingConfig.compile`` (on CUDA: ``mode="reduce-overhead"``, CUDA
  graphs), ``precision: auto`` (bf16 on GPUs that support it): images/s.

Figures are medians of ``--repeats`` runs after a warm-up (the compilation), taken in turns, written
with the device's name to the JSON file. It also runs on a CPU with small settings (the tests do that:
``--preset tiny --device cpu``); there the MFU is None.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from lightning.fabric.utilities.throughput import get_available_flops

from glide_lightning import bench
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.models.flops import training_step_flops
from glide_lightning.sampling import SamplingConfig, sample_batch


def train(preset: str, batch: int, repeats: int, device: torch.device, compile: bool) -> dict[str, object]:
    """Training images/s and MFU of the bf16 training step, eager and (``compile``) compiled."""
    config = bench.preset_config(preset)
    model = bench.random_model(config, device)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=1000))
    x, t, tokens, mask = bench.random_batch(config, batch, device)
    params = sum(p.numel() for p in model.parameters())
    steps = {"bf16": bench._train_step(model, diffusion, x, t, tokens, mask, "bf16")}
    if compile:
        steps["bf16_compile"] = bench._train_step(model, diffusion, x, t, tokens, mask, "bf16", compile=True)
    del model
    timed = bench._interleaved(steps, repeats, device)
    flops = training_step_flops(config, batch)
    peak = get_available_flops(device, torch.bfloat16)
    result: dict[str, object] = {"batch": batch, "params": params, "flops_per_step": flops,
                                 "peak_bf16_flops": peak}
    for name, (wall, _, _) in timed.items():
        seconds = statistics.median(wall)
        result[name] = {"images_per_s": batch / seconds, "step_s": seconds, "runs_s": wall,
                        "mfu": None if peak is None else flops / seconds / peak}
    return result


def sample(preset: str, batches: list[int], steps: int, repeats: int, device: torch.device,
           compile: bool) -> dict[str, object]:
    """Guided sampling images/s at each batch size, eager and (``compile``) compiled (CUDA graphs on CUDA)."""
    config = bench.preset_config(preset)
    model = bench.random_model(config, device).eval()
    loaded = bench.sampling_model(preset, config, model)
    result: dict[str, object] = {"steps": steps}
    for batch in batches:
        sampling = SamplingConfig(steps=str(steps), batch_size=batch, precision="auto")
        prompts, seeds = [bench.PROMPT] * batch, list(range(batch))
        paths = {"eager": lambda s=sampling, p=prompts, z=seeds: sample_batch(loaded, p, z, s, device)}
        if compile:
            compiled = replace(sampling, compile=True)
            paths["compile"] = lambda s=compiled, p=prompts, z=seeds: sample_batch(loaded, p, z, s, device)
        with torch.no_grad():
            timed = bench._interleaved(paths, repeats, device)
        result[f"batch_{batch}"] = {name: {"images_per_s": batch / statistics.median(wall), "runs_s": wall}
                                    for name, (wall, _, _) in timed.items()}
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results-gpu.json", help="the JSON file written")
    parser.add_argument("--preset", default="minig", choices=sorted(bench.PRESETS), help="the model preset")
    parser.add_argument("--device", default="cuda", help="cuda (the point of this script) or cpu")
    parser.add_argument("--train-batch", type=int, default=64, help="training images per step")
    parser.add_argument("--sample-batches", default="1,64", help="comma-separated sampling batch sizes")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is reported)")
    parser.add_argument("--no-compile", action="store_true", help="time the eager paths only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use a GPU machine, or --device cpu to try it)")
    compile = not args.no_compile
    report = {"machine": {"platform": platform.platform(), "device": str(device), "torch": torch.__version__,
                          "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "preset": args.preset, "repeats": args.repeats}
    print(f"timing the {args.preset} training step on {device} …", flush=True)
    report["train_bf16"] = train(args.preset, args.train_batch, args.repeats, device, compile)
    print(json.dumps(report["train_bf16"]), flush=True)
    print("timing guided sampling …", flush=True)
    batches = [int(b) for b in args.sample_batches.split(",")]
    report["sample_guided"] = sample(args.preset, batches, args.steps, args.repeats, device, compile)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
