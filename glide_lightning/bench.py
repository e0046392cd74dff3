"""Benchmarks: ``python -m glide_lightning.bench --out bench/results.json`` (``make bench``).

Times, per image, the forward pass, a training step's forward + backward (hybrid loss) and 25-step
guided sampling (classifier-free guidance at scale 3: a doubled batch per step) for each model
preset, as medians of several runs after a warm-up, and writes them with the machine's description
to a JSON file. Timings on a shared machine are noisy: compare figures from one run of this script.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, classifier_free_guidance, get_sampler
from glide_lightning.models import ModelConfig, build_model

PRESETS: dict[str, tuple[ModelConfig, int]] = {
    # name: (architecture, batch size used for timing)
    "tiny": (ModelConfig(image_size=32, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                         attention_resolutions=[16], xf_width=64, xf_layers=2, xf_heads=4, text_ctx=32), 8),
    "minig": (ModelConfig(), 4),  # miniGLIDE: 64 px, 96 channels, 32 channels per head, 16-layer text transformer
}


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, list[float]]:
    fn()  # warm-up (allocator, kernels, lazy imports)
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs


def bench_model(name: str, repeats: int, device: torch.device, sample_steps: int = 25) -> dict[str, object]:
    config, batch = PRESETS[name]
    torch.manual_seed(0)
    model = build_model(config).to(device)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=1000))
    size = config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    tokens = torch.randint(0, config.n_vocab, (batch, config.text_ctx), device=device)
    mask = torch.ones(batch, config.text_ctx, dtype=torch.bool, device=device)
    result: dict[str, object] = {"config": asdict(config), "batch": batch,
                                 "params": sum(p.numel() for p in model.parameters())}

    def record(key: str, fn: Callable[[], object], images: int) -> None:
        median, runs = _median_seconds(fn, repeats, device)
        result[f"{key}_s_per_image"] = median / images
        result[f"{key}_runs_s"] = runs

    model.eval()
    with torch.no_grad():
        record("forward", lambda: model(x, t, tokens=tokens, mask=mask), batch)
        model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        record("forward_channels_last", lambda: model(x_cl, t, tokens=tokens, mask=mask), batch)
        model.to(memory_format=torch.contiguous_format)

    model.train()

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        diffusion.training_losses(model, x, t, dict(tokens=tokens, mask=mask))["loss"].mean().backward()

    record("forward_backward", train_step, batch)

    model.eval()
    sampling = diffusion.respace(str(sample_steps))
    empty = dict(tokens=torch.zeros_like(tokens[:1]), mask=torch.zeros_like(mask[:1]))
    guided = classifier_free_guidance(model, 3.0, empty)
    sampler = get_sampler("ddpm")
    record(f"sample_{sample_steps}_steps_cfg", lambda: sampler(
        sampling, guided, tuple(x.shape), model_kwargs=dict(tokens=tokens, mask=mask), device=device), batch)
    result["forward_channels_last_speedup"] = result["forward_s_per_image"] / result["forward_channels_last_s_per_image"]
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"), help="JSON file to write")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report: dict[str, object] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": str(device),
                    "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "repeats": args.repeats,
        "models": {},
    }
    for name in args.presets:
        print(f"benchmarking {name} …", flush=True)
        report["models"][name] = bench_model(name, args.repeats, device)  # type: ignore[index]
        summary = {k: v for k, v in report["models"][name].items() if k.endswith(("_per_image", "speedup"))}  # type: ignore[index]
        print(json.dumps({name: summary}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
