import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glide_lightning import bench
from glide_lightning.commands import main as glide_main
from glide_lightning.models.flops import denoiser_flops, training_step_flops

ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_per_image_medians(tmp_path):
    out = tmp_path / "results.json"
    glide_main(["bench", "--out", str(out), "--presets", "[tiny]", "--repeats", "1", "--sample_steps", "4",
                "--compile", "false", "--skip_features", "true", "--skip_precomputed", "true"])
    report = json.loads(out.read_text())
    tiny = report["models"]["tiny"]
    assert report["machine"]["torch"] == torch.__version__
    assert tiny["params"] == sum(p.numel() for p in bench.build_model(bench.preset_config("tiny")).parameters())
    for key in ["forward", "train_step", "sample_4_steps_cfg"]:
        runs = tiny[f"{key}_runs_s"]
        assert len(runs) == 1 and all(r > 0 for r in runs)
        assert tiny[f"{key}_s_per_image"] * tiny["batch"] <= max(runs)
    assert tiny["train_images_per_s"] == 1 / tiny["train_step_s_per_image"]
    assert tiny["guided_generation_images_per_s_100_steps"] == pytest.approx(
        4 / (100 * tiny["sample_4_steps_cfg_s_per_image"]))
    assert tiny["guided_generation_100_steps_extrapolated_from"] == 4
    for key in ["train_step_bf16_autocast", "sample_4_steps_cfg_bf16"]:  # bf16 timed in the same turns
        assert len(tiny[f"{key}_runs_s"]) == len(tiny[f"{key}_cpu_runs_s"]) == 1 and tiny[f"{key}_s_per_image"] > 0
    assert tiny["sample_4_steps_cfg_bf16_max_abs_diff_vs_eager"] > 0  # bf16 rounding: held to no tolerance
    assert not any("compile" in key for key in tiny)  # --compile false: no compiled paths timed
    assert not any("before" in key or "speedup_vs" in key for key in tiny)  # absolute timings, no old code paths
    # the arithmetic floors: the counted FLOPs per image at the machine's measured fp32 matmul rate, and how far
    # each measured path is above its floor
    peak = report["machine"]["fp32_matmul_gflop_per_s"]
    assert tiny["sample_4_steps_cfg_gflop_per_image"] == pytest.approx(2 * 4 * denoiser_flops(bench.preset_config("tiny"), 1) / 1e9)
    assert tiny["train_step_gflop_per_image"] == pytest.approx(training_step_flops(bench.preset_config("tiny"), 1) / 1e9)
    for floor, paths in [("train_step", ["train_step", "train_step_bf16_autocast"]),
                         ("sample_4_steps_cfg", ["sample_4_steps_cfg", "sample_4_steps_cfg_bf16"])]:
        assert tiny[f"{floor}_arithmetic_floor_s_per_image"] == pytest.approx(tiny[f"{floor}_gflop_per_image"] / peak)
        for path in paths:
            ratio = tiny[f"{path}_over_arithmetic_floor"]
            # (not held to > 1: with one repeat on a shared machine the matmul rate and the path are timed at
            # different loads, and the tiny preset runs near that rate)
            assert 0 < ratio < float("inf") and ratio == pytest.approx(
                tiny[f"{path}_s_per_image"] / tiny[f"{floor}_arithmetic_floor_s_per_image"])
    data = report["data_pipeline"]
    assert data["images_per_s_workers0"] > 0 and data["images_per_s_workers2"] > 0


@pytest.mark.slow
def test_bench_times_the_compiled_training_step_and_sampling(monkeypatch):
    """With compile (the default of ``make bench``) the bf16 training step and guided sampling are also timed
    through torch.compile, in the same interleaved runs, against their arithmetic floors; the compiled sampler's
    images are the eager sampler's up to float rounding."""
    # the tiny preset made smaller still (one resolution level with its attention, one text layer, batch 2): what
    # torch.compile costs grows with the network's graph, and nothing claimed here depends on its size
    small = dataclasses.replace(bench.preset_config("tiny"), image_size=16, channel_mult=(1,),
                                attention_resolutions=[16], xf_layers=1, text_ctx=8)
    monkeypatch.setattr(bench, "preset_config", lambda name: small)
    monkeypatch.setitem(bench.PRESETS, "tiny", (bench.PRESETS["tiny"][0], 2))
    peak = bench.matmul_flops_per_s(torch.device("cpu"), 1)
    tiny = bench.bench_model("tiny", 1, torch.device("cpu"), sample_steps=2, compile=True, matmul_flops=peak)
    for key in ["train_step_bf16_autocast_compile", "sample_2_steps_cfg_compile"]:
        assert len(tiny[f"{key}_runs_s"]) == 1 and tiny[f"{key}_s_per_image"] > 0
        assert tiny[f"{key}_cpu_s_per_image"] > 0 and tiny[f"{key}_over_arithmetic_floor"] > 0
    # other kernels, the same images: two steps from x_T amplify float rounding most (the first x̂_0 by
    # 1/√ᾱ_T = 2e4 on the cosine schedule, before clipping), so the bound is loose
    assert tiny["sample_2_steps_cfg_compile_max_abs_diff_vs_eager"] < 5e-2


def test_feature_extractor_bench():
    result = bench.bench_features(repeats=1, batch=2)
    assert result["inception_images_per_s"] > 0 and result["clip_vit_b32_images_per_s"] > 0
    assert len(result["inception_runs_s"]) == 1


@pytest.mark.gpu
def test_bf16_autocast_forward_matches_fp32_on_gpu():
    model = bench.build_model(bench.preset_config("tiny")).cuda().eval()
    for p in model.parameters():  # make the zero-initialised output layers non-trivial
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    t = torch.tensor([10, 500], device="cuda")
    tokens = torch.randint(0, 49408, (2, 32), device="cuda")
    with torch.no_grad():
        ref = model(x, t, tokens=tokens)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, t, tokens=tokens)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_precomputed_embedding_bench_times_both_paths():
    """The two training steps of a frozen-T5 model (tiny T5 here) are timed in turns; speedup is their ratio."""
    transformers = pytest.importorskip("transformers")
    tiny_t5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
    result = bench.bench_precomputed_embeddings(1, torch.device("cpu"), "tiny", t5=tiny_t5, text_ctx=16,
                                                caption_tokens=5)
    for path in ("encoder", "precomputed"):
        assert len(result[f"{path}_runs_s"]) == 1 and result[f"{path}_s_per_step"] > 0
    assert result["speedup"] == pytest.approx(result["encoder_s_per_step"] / result["precomputed_s_per_step"])
    t5 = transformers.T5EncoderModel(transformers.T5Config(**tiny_t5))
    assert result["encoder_params"] == sum(p.numel() for p in t5.parameters())


def test_gpu_bench_script_writes_training_mfu_and_sampling_rates(tmp_path):
    """scripts/bench_gpu.py (the prepared GPU run, ``make bench-gpu``) runs end to end on a CPU with small
    settings; its FLOPs are the FLOP counter's for the step, its rates follow from its timings, and the MFU is
    None where Lightning's peak table has no entry (CPUs). Without a CUDA device, --device cuda is refused."""
    out = tmp_path / "gpu.json"
    script = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py")]
    subprocess.run(script + ["--out", str(out), "--preset", "tiny", "--device", "cpu", "--train-batch", "2",
                             "--sample-batches", "1,2", "--steps", "2", "--repeats", "1", "--no-compile"],
                   check=True, cwd=ROOT)
    report = json.loads(out.read_text())
    train = report["train_bf16"]
    assert train["flops_per_step"] == training_step_flops(bench.preset_config("tiny"), 2) > 0
    assert train["bf16"]["images_per_s"] == pytest.approx(2 / train["bf16"]["step_s"])
    assert train["peak_bf16_flops"] is None and train["bf16"]["mfu"] is None
    assert "bf16_compile" not in train
    for batch in (1, 2):
        timed = report["sample_guided"][f"batch_{batch}"]["eager"]
        assert timed["images_per_s"] == pytest.approx(batch / timed["runs_s"][0])
    if not torch.cuda.is_available():
        refused = subprocess.run(script + ["--out", str(tmp_path / "no.json")], cwd=ROOT, capture_output=True,
                                 text=True)
        assert refused.returncode == 2 and "no CUDA device is visible" in refused.stderr
        assert not (tmp_path / "no.json").exists()
