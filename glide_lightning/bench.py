"""Benchmarks: ``python -m glide_lightning bench --out bench/results.json`` (``make bench``).

For each model preset (the smoke experiment's tiny model and miniGLIDE, read from
``experiments/parts``) it times, per image: the forward pass (contiguous and channels-last), a full
training step (hybrid loss, forward + backward + AdamW step, reported as training images/second;
also under bf16 autocast, and under bf16 autocast through ``torch.compile``) and 25-step guided sampling
with :func:`glide_lightning.sampling.sample_batch` (the per-batch body of ``generate``; classifier-free
guidance at the sampling default scale: a doubled batch per step, tokenization included; also in bf16,
and with ``SamplingConfig.compile``), each path's runs taken in turns (wall-clock and CPU time). Against
each, its *arithmetic floor*: the path's counted FLOPs (:mod:`glide_lightning.models.flops`) at the
machine's measured fp32 matrix-multiply rate (:func:`matmul_flops_per_s`), and the ratio of the measured
time to it (``<path>_over_arithmetic_floor``). It also measures the data pipeline alone (read + decode + RGB + resize + tokenize) on generated shards, and the
training step of a UNet conditioned on a frozen T5 v1.1 base (random weights) with the encoder run per batch
against precomputed embeddings (:func:`bench_precomputed_embeddings`).
Figures are medians of several runs after a warm-up, written with the machine's description to a
JSON file. Timings on a shared machine are noisy: compare figures from one run of this script.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch
import yaml
from torch import Tensor, nn

from glide_lightning.data.tokenizers import TokenizerSpec, build_tokenizer
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion
from glide_lightning.diffusion.losses import training_losses
from glide_lightning.models import ModelConfig, build_model
from glide_lightning.models.flops import denoiser_flops, training_step_flops
from glide_lightning.optim import OptimizerConfig, build_optimizer
from glide_lightning.sampling import SamplingConfig, SamplingModel, sample_batch

PARTS = Path(__file__).resolve().parents[1] / "experiments" / "parts"
# name: (model part of the experiments, batch size used for timing)
# the caption of every timed sampling batch
PROMPT = "a small red circle above a large blue square"
PRESETS: dict[str, tuple[str, int]] = {"tiny": ("tiny_model.yaml", 16), "minig": ("minig_model.yaml", 4)}


def preset_config(name: str) -> ModelConfig:
    """The architecture of a preset, as the experiments define it."""
    return ModelConfig(**yaml.safe_load((PARTS / PRESETS[name][0]).read_text()))


def random_model(config: ModelConfig, device: torch.device) -> nn.Module:
    """``config``'s network on ``device`` with random weights from seed 0; ADM's zero-initialised residual
    outputs are given random values too, so that outputs of different kernels can be compared."""
    torch.manual_seed(0)
    model = build_model(config).to(device)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return model


def random_batch(config: ModelConfig, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A training batch for ``config``'s network: images ``x_t`` ``[B, 3, S, S]`` (standard normal),
    timesteps ``[B]`` of 1000, caption tokens and an all-true mask ``[B, text_ctx]``."""
    size = config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    tokens = torch.randint(0, config.n_vocab, (batch, config.text_ctx), device=device)
    return x, t, tokens, torch.ones(batch, config.text_ctx, dtype=torch.bool, device=device)


def sampling_model(name: str, config: ModelConfig, model: nn.Module) -> SamplingModel:
    """``model`` (preset ``name``'s network) as the samplers take it: a 1000-step process, CLIP BPE tokens."""
    return SamplingModel(model, DiffusionConfig(steps=1000), build_tokenizer("clip", text_ctx=config.text_ctx),
                         config, f"bench preset {name} (random weights)")


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


def _interleaved(fns: dict[str, Callable[[], Tensor]], repeats: int,
                 device: torch.device) -> dict[str, tuple[list[float], list[float], Tensor]]:
    """Wall-clock and process CPU seconds of ``repeats`` runs of each function, taken in turns (A B A
    B …, after one warm-up each) so that a load that comes and goes on a shared machine weighs on
    all of them alike, and each function's last output. CPU time (all threads of this process) is
    the steadier figure where other processes compete for the cores."""
    out: dict[str, tuple[list[float], list[float], Tensor]] = {}
    for name, fn in fns.items():
        out[name] = ([], [], fn())  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            output = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[name][0].append(time.perf_counter() - wall)
            out[name][1].append(time.process_time() - cpu)
            out[name] = (out[name][0], out[name][1], output)
    return out


def _record_interleaved(result: dict[str, object], timed: dict[str, tuple[list[float], list[float], Tensor]],
                        images: int) -> None:
    """Per-image medians (wall-clock and CPU seconds) and the runs of :func:`_interleaved`'s timings."""
    for name, (wall, cpu, _) in timed.items():
        result[f"{name}_s_per_image"] = statistics.median(wall) / images
        result[f"{name}_runs_s"] = wall
        result[f"{name}_cpu_s_per_image"] = statistics.median(cpu) / images
        result[f"{name}_cpu_runs_s"] = cpu


def _train_step(model: nn.Module, diffusion: GaussianDiffusion, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor,
                precision: Literal["fp32", "bf16"] = "fp32", compile: bool = False) -> Callable[[], Tensor]:
    """One hybrid-loss training step (forward, backward, AdamW) on a copy of ``model``'s weights, as
    :class:`~glide_lightning.module.GlideModule` trains with ``channels_last`` and the default optimizer
    (:func:`~glide_lightning.optim.build_optimizer`: decay / no-decay groups, the fused AdamW kernel), in
    fp32 or under bf16 autocast (``precision``); ``compile`` calls the network through ``torch.compile`` as
    ``GlideModule(compile=True)`` does. Returns the step, which returns its loss (detached); its first calls
    compile."""
    model = copy.deepcopy(model).train()
    kwargs = dict(tokens=tokens, mask=mask)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))["optimizer"]
    model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = training_losses(diffusion, net, x, t, kwargs)["loss"].mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def matmul_flops_per_s(device: torch.device, repeats: int, n: int = 2048) -> float:
    """The device's fp32 matrix-multiply rate in FLOP/s: the median over ``repeats`` runs of 4 timed
    ``n`` x ``n`` products (2n³ FLOPs each). A practical peak, against which :func:`bench_model`'s
    arithmetic floors are set: the time the presets' counted FLOPs would take at this rate."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    median, _ = _median_seconds(lambda: [a @ b for _ in range(4)], repeats, device)
    return 4 * 2 * n**3 / median


def bench_model(name: str, repeats: int, device: torch.device, sample_steps: int = 25,
                compile: bool = True, matmul_flops: float | None = None) -> dict[str, object]:
    """``name``'s forward, training step and guided sampling, timed as :class:`BenchCommand` describes;
    with ``matmul_flops`` (FLOP/s, :func:`matmul_flops_per_s`) also the training step's and guided
    sampling's arithmetic floors (their counted FLOPs, :mod:`glide_lightning.models.flops`, at that rate)
    and, for each timed path of either, ``<path>_over_arithmetic_floor``: its measured seconds per image
    over its floor (1 would be the fp32 matmul rate throughout; bf16 paths may go below it)."""
    config, batch = preset_config(name), PRESETS[name][1]
    model = random_model(config, device)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=1000))
    x, t, tokens, mask = random_batch(config, batch, device)
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

    # the training step (AdamW with decay / no-decay groups on its fused kernel, channels-last) in fp32 and
    # under bf16 autocast (bf16-mixed, on CPUs with AVX512-BF16 / AMX too), each on its own copy of the same
    # weights and batch, taken in turns; with compile, the bf16 step through torch.compile too (its
    # compilation is in the warm-up run, not timed)
    training = {"train_step": _train_step(model, diffusion, x, t, tokens, mask, "fp32"),
                "train_step_bf16_autocast": _train_step(model, diffusion, x, t, tokens, mask, "bf16")}
    if compile:
        training["train_step_bf16_autocast_compile"] = _train_step(model, diffusion, x, t, tokens, mask, "bf16",
                                                                   compile=True)
    timed = _interleaved(training, repeats, device)
    _record_interleaved(result, timed, batch)
    result["train_images_per_s"] = 1.0 / result["train_step_s_per_image"]

    model.eval()
    # guided sampling through sample_batch, the body of the one generate() the sample command and FID harness use
    loaded = sampling_model(name, config, model)
    sampling = SamplingConfig(steps=str(sample_steps), batch_size=batch)  # the default guidance scale
    prompts = [PROMPT] * batch
    result["sample_guidance_scale"] = sampling.guidance_scale
    key = f"sample_{sample_steps}_steps_cfg"
    seeds = list(range(batch))
    # bf16: SamplingConfig.precision="bf16" (autocast; AMX on CPUs that have it), an opt-in whose images
    # differ from fp32 by bf16 rounding carried along the chain (far more than float rounding, and more
    # with random weights), so it is timed and its distance recorded, but held to no tolerance
    bf16 = replace(sampling, precision="bf16")
    paths = {key: lambda: sample_batch(loaded, prompts, seeds, sampling, device),
             f"{key}_bf16": lambda: sample_batch(loaded, prompts, seeds, bf16, device)}
    if compile:  # SamplingConfig.compile (its compilation is in the warm-up run, not timed)
        compiled = replace(sampling, compile=True)
        paths[f"{key}_compile"] = lambda: sample_batch(loaded, prompts, seeds, compiled, device)
    with torch.no_grad():  # sample_batch: the per-batch body of generate (tokenization included)
        timed = _interleaved(paths, repeats, device)
    _record_interleaved(result, timed, batch)
    for path in [p for p in paths if p != key]:
        # how far the path's images are from the eager fp32 path's (rounding, amplified along the chain), in
        # [-1, 1] units
        result[f"{path}_max_abs_diff_vs_eager"] = (timed[path][2] - timed[key][2]).abs().max().item()
    result["forward_channels_last_speedup"] = result["forward_s_per_image"] / result["forward_channels_last_s_per_image"]
    # sampling cost is linear in the number of steps: the 100-step rate (GLIDE's setting) from the measured one
    result["guided_generation_images_per_s_100_steps"] = sample_steps / (100 * result[f"sample_{sample_steps}_steps_cfg_s_per_image"])
    result["guided_generation_100_steps_extrapolated_from"] = None if sample_steps == 100 else sample_steps
    # FLOPs per image (2 per multiply-add): the training step's forward and backward; guided sampling's
    # two denoiser evaluations per step (the caption encoded once per call: not counted)
    result["train_step_gflop_per_image"] = training_step_flops(config, 1) / 1e9
    result[f"{key}_gflop_per_image"] = 2 * sample_steps * denoiser_flops(config, 1) / 1e9
    if matmul_flops:
        for floor, timed_paths in (("train_step", training), (key, paths)):
            result[f"{floor}_arithmetic_floor_s_per_image"] = result[f"{floor}_gflop_per_image"] * 1e9 / matmul_flops
            for path in timed_paths:  # how far each measured path is from the arithmetic it has to do
                result[f"{path}_over_arithmetic_floor"] = (result[f"{path}_s_per_image"]
                                                           / result[f"{floor}_arithmetic_floor_s_per_image"])
    return result


def bench_data_pipeline(repeats: int, preset: str = "minig", samples: int = 384) -> dict[str, object]:
    """Images/second of the data pipeline alone on generated shards: 256 px JPEGs (photo-like
    decoding cost) resized to the ``preset``'s image size and tokenized with the CLIP BPE to its
    text context, in one process and with 2 workers."""
    from glide_lightning.data import measure_pipeline
    from glide_lightning.data.shards import write_shards
    from glide_lightning.data.synthetic import synthetic_samples

    config = preset_config(preset)
    image_size = config.image_size
    result: dict[str, object] = {"image_size": image_size, "source": "synthetic recipe, 256 px JPEG",
                                 "samples": samples}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(synthetic_samples(0, samples, image_size=256), tmp, "train", max_per_shard=samples // 4,
                     image_format="jpg")
        shards = f"{tmp}/train-{{000000..000003}}.tar"
        for workers in (0, 2):
            runs = [measure_pipeline(shards, image_size=image_size, tokenizer_spec=TokenizerSpec("clip", config.text_ctx),
                                     num_workers=workers, val_batch_size=32)
                    for _ in range(repeats)]
            result[f"images_per_s_workers{workers}"] = statistics.median(runs)
            result[f"images_per_s_workers{workers}_runs"] = runs
    return result


def bench_features(repeats: int, batch: int = 32, image_size: int = 64) -> dict[str, object]:
    """Images/second of the evaluation feature extractors on uint8 64 px batches: torch-fidelity's
    Inception-v3 (FID; random weights of the same architecture, so the same compute: the real
    weights cannot be downloaded here; denormals flushed, as real activations are not denormal) and
    open_clip's ViT-B-32 image tower (CLIP score; random weights)."""
    from glide_lightning.evaluation.clip_score import CLIPScorer
    from glide_lightning.evaluation.features import InceptionFeatures, write_random_inception_weights

    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    result: dict[str, object] = {"batch": batch, "image_size": image_size, "weights": "random (same architecture)"}
    with tempfile.TemporaryDirectory() as tmp:
        write_random_inception_weights(f"{tmp}/inception.pth")
        inception = InceptionFeatures(f"{tmp}/inception.pth")
        flush = torch.set_flush_denormal(True)
        try:
            median, runs = _median_seconds(lambda: inception(images), repeats, torch.device("cpu"))
        finally:
            torch.set_flush_denormal(False) if flush else None
        result["inception_images_per_s"], result["inception_runs_s"] = batch / median, runs
    clip = CLIPScorer("ViT-B-32", pretrained=None)
    captions = ["a small red circle above a large blue square"] * batch
    median, runs = _median_seconds(lambda: clip.score(images, captions), repeats, torch.device("cpu"))
    result["clip_vit_b32_images_per_s"], result["clip_runs_s"] = batch / median, runs
    return result


T5_V1_1_BASE: dict[str, object] = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                                      feed_forward_proj="gated-gelu")
"""``google/t5-v1_1-base``'s encoder architecture (its ``config.json``): timed randomly initialised (no download)."""


def bench_precomputed_embeddings(repeats: int, device: torch.device, preset: str = "tiny",
                                 t5: dict[str, object] = T5_V1_1_BASE, text_ctx: int = 128,
                                 caption_tokens: int = 20) -> dict[str, object]:
    """Training step of ``preset``'s UNet conditioned on a frozen T5 (imagen_p2), with the encoder run on every
    batch (tokens) and with precomputed float16 embeddings (the ``embed`` recipe's shards), timed in turns.

    Args:
        t5: the T5 encoder's architecture (default: T5 v1.1 base, ~110M parameters, random weights).
        text_ctx: caption tokens (imagen_p2: 128); ``caption_tokens`` of them are real (an MSCOCO
            caption is about 15-20 T5 tokens), the rest padding.

    Returns:
        Seconds per step (wall and CPU, medians and runs) of both paths and ``speedup`` (encoder path /
        precomputed path, wall) and ``cpu_speedup``.
    """
    from transformers import T5Config, T5EncoderModel

    from glide_lightning.models.encoders import T5TextEncoder

    batch = PRESETS[preset][1]
    torch.manual_seed(0)
    encoder = T5TextEncoder(T5EncoderModel(T5Config(**t5)), "T5 (random weights)").to(device)
    config = replace(preset_config(preset), text_encoder="t5", text_encoder_name="bench", text_ctx=text_ctx,
                     text_encoder_dim=encoder.dim)
    model = build_model(config).to(device).train()
    model.attach_text_encoder(encoder)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(steps=1000, loss_type="p2"))
    size = config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    tokens = torch.randint(3, int(t5["vocab_size"]), (batch, text_ctx), device=device)  # type: ignore[call-overload]
    mask = (torch.arange(text_ctx, device=device) < caption_tokens).expand(batch, -1)
    emb = encoder(tokens, mask).half()  # what the shards hold
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(captions: dict[str, Tensor]) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = training_losses(diffusion, model, x, t, captions)["loss"].mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    timed = _interleaved({"encoder": lambda: step(dict(tokens=tokens, mask=mask)),
                          "precomputed": lambda: step(dict(text_emb=emb, text_mask=mask))}, repeats, device)
    result: dict[str, object] = {"preset": preset, "batch": batch, "text_ctx": text_ctx,
                                 "encoder_params": sum(p.numel() for p in encoder.parameters()),
                                 "unet_params": sum(p.numel() for p in model.parameters())}
    for name, (wall, cpu, _) in timed.items():
        result[f"{name}_s_per_step"], result[f"{name}_runs_s"] = statistics.median(wall), wall
        result[f"{name}_cpu_s_per_step"], result[f"{name}_cpu_runs_s"] = statistics.median(cpu), cpu
    result["speedup"] = result["encoder_s_per_step"] / result["precomputed_s_per_step"]  # type: ignore[operator]
    result["cpu_speedup"] = result["encoder_cpu_s_per_step"] / result["precomputed_cpu_s_per_step"]  # type: ignore[operator]
    return result


@dataclass
class BenchCommand:
    """Time the model presets (forward, training step, guided sampling), the feature extractors and the
    data pipeline; medians of several runs, written with the machine's description to a JSON file."""

    out: str = "bench/results.json"
    """The JSON file to write."""
    presets: list[Literal["tiny", "minig"]] = field(default_factory=lambda: ["tiny", "minig"])
    """Model presets to time (the experiments' ``parts/tiny_model.yaml`` and ``parts/minig_model.yaml``)."""
    repeats: int = 5
    """Timed runs per measurement (the median is reported)."""
    device: str = "auto"
    """``cuda``, ``cpu``, … (auto: cuda when available)."""
    skip_data: bool = False
    """Do not benchmark the data pipeline."""
    sample_steps: int = 25
    """Guided sampling steps timed (the 100-step rate is scaled from it; 100 measures it)."""
    skip_features: bool = False
    """Do not benchmark the FID / CLIP feature extractors."""
    compile: bool = True
    """Also time the training step (bf16 autocast) and guided sampling through ``torch.compile``
    (compiling takes a while per preset on a CPU, longer for miniGLIDE; not in the timings)."""
    skip_precomputed: bool = False
    """Do not time training with a frozen T5 v1.1 base run per batch against precomputed embeddings (needs
    ``pip install 'glide_lightning[text]'``; skipped with a note without it)."""

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.sample_steps < 1 or not self.presets:
            raise ValueError(f"repeats and sample_steps must be >= 1 and presets non-empty, got "
                             f"repeats={self.repeats}, "
                             f"sample_steps={self.sample_steps}, presets={self.presets}")

    def run(self) -> dict[str, object]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" \
            else torch.device(self.device)
        report: dict[str, object] = {
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": str(device),
                        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
            "repeats": self.repeats,
            "models": {},
        }
        matmul_flops = matmul_flops_per_s(device, self.repeats)
        report["machine"]["fp32_matmul_gflop_per_s"] = matmul_flops / 1e9  # type: ignore[index]
        for name in self.presets:
            print(f"benchmarking {name} …", flush=True)
            report["models"][name] = bench_model(name, self.repeats, device, self.sample_steps,  # type: ignore[index]
                                                 self.compile, matmul_flops)
            summary = {k: v for k, v in report["models"][name].items()  # type: ignore[index]
                       if k.endswith(("_per_image", "per_s", "steps", "_over_arithmetic_floor")) or "speedup" in k}
            print(json.dumps({name: summary}, indent=1), flush=True)
        if not self.skip_precomputed:
            try:
                from glide_lightning.models.encoders import require_text_extra

                require_text_extra("the precomputed-embedding benchmark")
                report["precomputed_embeddings"] = {}
                for name in self.presets:
                    print(f"benchmarking training with and without precomputed T5 embeddings ({name}) …", flush=True)
                    timed = bench_precomputed_embeddings(self.repeats, device, name)
                    report["precomputed_embeddings"][name] = timed  # type: ignore[index]
                    print(json.dumps({k: v for k, v in timed.items() if not k.endswith("runs_s")}), flush=True)
            except ImportError as error:
                report["precomputed_embeddings"] = {"skipped": str(error)}
                print(f"skipped: {error}", flush=True)
        if not self.skip_features:
            print("benchmarking the feature extractors …", flush=True)
            report["features"] = bench_features(self.repeats)
            print(json.dumps({k: v for k, v in report["features"].items() if k.endswith("per_s")}), flush=True)
        if not self.skip_data:
            print("benchmarking the data pipeline …", flush=True)
            report["data_pipeline"] = bench_data_pipeline(self.repeats)
            print(json.dumps({k: v for k, v in report["data_pipeline"].items() if not k.endswith("runs")}), flush=True)
        out = Path(self.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
        return report
