"""Claims of glide-text2im behaviour that no other test checked against glide-text2im's own definitions
(issue 22 item 5). Every reference value here is derived in this file from glide-text2im's source and notebooks
(openai/glide-text2im: ``glide_text2im/model_creation.py``, ``gaussian_diffusion.py``, ``respace.py``,
``download.py``, ``clip/config.yaml``, ``clip/model_creation.py``, ``clip/encoders.py``, ``notebooks/*.ipynb``),
written out anew with the function it comes from cited; none is an earlier output of this project.

Cheap by design: tiny networks or stand-ins, no 385M-parameter build with weights (one on the meta device); the
released models' options come from glide-text2im's ``model_and_diffusion_defaults()`` as written below (their
state-dict shapes are tests/models/test_glide_text2im.py's, against ``../shared/fixtures``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from glide_lightning.data import build_tokenizer
from glide_lightning.diffusion import DiffusionConfig, GaussianDiffusion, get_named_beta_schedule, space_timesteps
from glide_lightning.models import GLIDE_OPTIONS, ModelConfig, build_model
from glide_lightning.models.clip import CLIP_MEAN, CLIP_STD, NoisedCLIP, NoisedCLIPConfig
from glide_lightning.models.config import DEFAULT_CHANNEL_MULT
from glide_lightning.models.nn import GroupNorm32
from glide_lightning.sampling import (GLIDE_CLIP_PROCESS, RELEASED_MODELS, GuidanceCLIP, SamplingConfig, SamplingModel,
                                     sample_conditioned, sample_generators)

from tiny_model_config import TINY

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------- glide-text2im, written out
# glide_text2im/model_creation.py, model_and_diffusion_defaults() (use_fp16 left out: a device choice)
GLIDE_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=192, num_res_blocks=3, channel_mult="", num_heads=1, num_head_channels=64,
    num_heads_upsample=-1, attention_resolutions="32,16,8", dropout=0.1, text_ctx=128, xf_width=512, xf_layers=16,
    xf_heads=8, xf_final_ln=True, xf_padding=True, diffusion_steps=1000, noise_schedule="squaredcos_cap_v2",
    timestep_respacing="", use_scale_shift_norm=True, resblock_updown=True, cache_text_emb=False, inpaint=False,
    super_res=False,
)
# model_and_diffusion_defaults_upsampler(): the defaults updated with these
GLIDE_UPSAMPLER_UPDATE: dict[str, Any] = dict(image_size=256, num_res_blocks=2, noise_schedule="linear", super_res=True)


def glide_options(kind: str) -> dict[str, Any]:
    """The options each notebook builds a released model with: ``base`` / ``upsample`` from the two defaults
    functions, the inpainting ones with ``options['inpaint'] = True`` (notebooks/inpaint.ipynb)."""
    options = dict(GLIDE_DEFAULTS)
    if kind.startswith("upsample"):
        options.update(GLIDE_UPSAMPLER_UPDATE)
    if kind.endswith("inpaint"):
        options["inpaint"] = True
    return options


# glide_text2im/download.py, MODEL_PATHS: the file each name downloads (fetch_file_cached keeps the URL's basename)
GLIDE_FILES = {"base": "base.pt", "upsample": "upsample.pt", "base-inpaint": "base_inpaint.pt",
               "upsample-inpaint": "upsample_inpaint.pt"}
# notebooks/text2im.ipynb and clip_guided.ipynb: guidance_scale = 3.0; notebooks/inpaint.ipynb: guidance_scale = 5.0;
# all three: options['timestep_respacing'] = '100' with p_sample_loop for the base model, 'fast27' and
# upsample_temp = 0.997 for the upsampler; ddim_sample_loop's eta defaults to 0.0 (gaussian_diffusion.py)
TEXT2IM_GUIDANCE, INPAINT_GUIDANCE = 3.0, 5.0
BASE_RESPACING, UPSAMPLE_RESPACING, UPSAMPLE_TEMP = "100", "fast27", 0.997
# glide_text2im/clip/config.yaml
GLIDE_CLIP_YAML = dict(logit_scale=100.0, beta_schedule="squaredcos_cap_v2", n_timesteps=1000, image_size=64,
                       patch_size=4, n_vocab=65536, max_text_len=77, n_embd=512, n_head_state_text=64, n_head_text=8,
                       n_xf_blocks_text=12, n_head_state_image=64, n_head_image=12, n_xf_blocks_image=12)
# glide_text2im/clip/encoders.py, image_channel_means / image_channel_stds
GLIDE_CLIP_MEANS = [122.77093945, 116.74601272, 104.09373519]
GLIDE_CLIP_STDS = [68.50053285, 66.63215831, 70.32316309]

OUR_SCHEDULE = {"squaredcos_cap_v2": "cosine", "linear": "linear"}  # our names of glide-text2im's schedules


def glide_betas(name: str, steps: int) -> np.ndarray:
    """gaussian_diffusion.py, get_named_beta_schedule: ``linear`` is np.linspace(scale·1e-4, scale·0.02) with
    scale = 1000 / steps; ``squaredcos_cap_v2`` is betas_for_alpha_bar(steps, cos²((t + 0.008) / 1.008 · π/2))
    with each β = min(1 − ᾱ(t2)/ᾱ(t1), max_beta = 0.999), t1 = i/steps, t2 = (i + 1)/steps (Python floats)."""
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    assert name == "squaredcos_cap_v2"

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])


def glide_space_timesteps(num_timesteps: int, spec: str) -> set[int]:
    """respace.py, space_timesteps: ``ddimN``: the first integer stride in 1 … T − 1 whose range(0, T, stride) has
    exactly N steps (else ValueError); ``fast27``: the steps of "10,10,3,2,2" with T − 1 replaced by T − 3;
    otherwise comma-separated counts, one per equal section (the first T mod n sections one step longer), each
    taken by a float position that starts at 0, advances by (size − 1)/(count − 1) (1 for a count of 1) and is
    rounded with Python's round at every step."""
    if spec.startswith("ddim"):
        wanted = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"no stride gives {wanted} steps")
    if spec == "fast27":
        steps = glide_space_timesteps(num_timesteps, "10,10,3,2,2")
        steps.remove(num_timesteps - 1)
        steps.add(num_timesteps - 3)
        return steps
    counts = [int(c) for c in spec.split(",")]
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide {size} into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class GlideSpacedProcess:
    """respace.py, SpacedDiffusion over gaussian_diffusion.py, GaussianDiffusion: the kept steps' β from the
    original ᾱ (β'_k = 1 − ᾱ_{i_k} / ᾱ_{i_(k-1)}), ``timestep_map`` (the original index of each kept step, what the
    wrapped model receives), and the float64 tables p_mean_variance reads, extracted as float32 as
    ``_extract_into_tensor`` does."""

    def __init__(self, schedule: str, steps: int, respacing: str) -> None:
        alphas_cumprod = np.cumprod(1.0 - glide_betas(schedule, steps))
        kept = glide_space_timesteps(steps, respacing) if respacing else set(range(steps))
        self.timestep_map: list[int] = []
        betas, last = [], 1.0
        for i, abar in enumerate(alphas_cumprod):
            if i in kept:
                betas.append(1 - abar / last)
                last = abar
                self.timestep_map.append(i)
        b = np.array(betas, dtype=np.float64)
        abar = np.cumprod(1.0 - b)
        prev = np.append(1.0, abar[:-1])
        post_var = b * (1.0 - prev) / (1.0 - abar)
        self.num_timesteps = len(b)
        self.tables = {
            "sqrt_recip": np.sqrt(1.0 / abar), "sqrt_recipm1": np.sqrt(1.0 / abar - 1),
            "min_log": np.log(np.append(post_var[1], post_var[1:])), "max_log": np.log(b),
            "coef1": b * np.sqrt(prev) / (1.0 - abar), "coef2": (1.0 - prev) * np.sqrt(1.0 - b) / (1.0 - abar),
        }

    def at(self, name: str, i: int) -> Tensor:
        return torch.tensor(self.tables[name][i]).float()


# ----------------------------------------------------------------------------------- helpers
def tiny_sampling_model(kind: str, diffusion: DiffusionConfig, seed: int = 0) -> SamplingModel:
    """A tiny model of ``kind`` (TINY, 32 px) whose zero-initialised layers get random weights, with ``diffusion``."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY.to_dict(), "kind": kind})
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return SamplingModel(model, diffusion, build_tokenizer("clip", TINY.text_ctx), config, "tiny")


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------------- schedules and respacing
@pytest.mark.parametrize("steps", [50, 100, 1000])
def test_cosine_betas_are_betas_for_alpha_bar_at_every_step(steps: int) -> None:
    """schedules.py: ``cosine`` is GLIDE's ``squaredcos_cap_v2`` (β clipped at 0.999): every β, the clipped last one
    included (the existing test checks ᾱ at four steps and the maximum only)."""
    ours = get_named_beta_schedule("cosine", steps).numpy()
    reference = glide_betas("squaredcos_cap_v2", steps)
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=0)
    assert ours[-1] == reference[-1] == 0.999


@pytest.mark.parametrize("steps", [100, 1000, 4000])
def test_linear_betas_are_glides_linspace_at_every_step(steps: int) -> None:
    """schedules.py / diffusion/config.py: ``linear`` is GLIDE's upsampler schedule, np.linspace scaled by 1000 / T
    (the existing test checks the end points only)."""
    np.testing.assert_allclose(get_named_beta_schedule("linear", steps).numpy(), glide_betas("linear", steps),
                               rtol=1e-13, atol=0)


@pytest.mark.parametrize("num_timesteps", [100, 1000])
def test_ddim_respacing_takes_glides_stride(num_timesteps: int) -> None:
    """schedules.py space_timesteps ``ddimN`` against respace.py's rule for every N from 2 to T (the existing test
    checks ddim50 of 1000 only): the same steps where a stride gives exactly N, an error where none does."""
    for n in range(2, num_timesteps + 1):
        try:
            expected = sorted(glide_space_timesteps(num_timesteps, f"ddim{n}"))
        except ValueError:
            with pytest.raises(ValueError, match="no integer stride gives exactly"):
                space_timesteps(num_timesteps, f"ddim{n}")
            continue
        assert space_timesteps(num_timesteps, f"ddim{n}") == expected, n


def test_solvers_note_on_glides_cosine_respaced_to_five_steps() -> None:
    """solvers.py: "GLIDE's cosine, 1000 steps respaced to 5: β_T = 1 - 1.7e-8 … ᾱ (2.4e-9 at T)"."""
    glide = GlideSpacedProcess("squaredcos_cap_v2", 1000, "5")
    one_minus_beta_t = 1 - math.exp(glide.tables["max_log"][-1])  # 1 - β_T, from glide's respaced β
    abar_t = float(np.cumprod(1.0 - glide_betas("squaredcos_cap_v2", 1000))[-1])
    ours = GaussianDiffusion.from_config(DiffusionConfig(steps=1000, noise_schedule="cosine")).respace("5")
    assert ours.timestep_map.tolist() == glide.timestep_map == [0, 250, 500, 749, 999]
    assert 1 - ours.table("betas")[-1].item() == pytest.approx(one_minus_beta_t, rel=1e-6)
    assert one_minus_beta_t == pytest.approx(1.7e-8, rel=0.02) and abar_t == pytest.approx(2.4e-9, rel=0.02)
    assert ours.table("alphas_cumprod")[-1].item() == pytest.approx(abar_t, rel=1e-9)


# ----------------------------------------------------------------------------------- released models' settings
@pytest.mark.parametrize("kind", ["base", "upsample", "base-inpaint", "upsample-inpaint"])
def test_released_process_and_architecture_are_model_and_diffusion_defaults(kind: str) -> None:
    """sampling/checkpoints.py RELEASED_MODELS / models/glide_text2im.py GLIDE_OPTIONS against glide-text2im's defaults
    functions written out here (the existing tests compare with the fixture's copy of them), with what the options
    imply: out_channels 6 read as ε then the learned-range value (text2im_model / p_mean_variance), so
    ``prediction`` ε and ``learned_range``; the channel multipliers create_model picks for the image size."""
    opts, released = glide_options(kind), RELEASED_MODELS[kind]
    model, process = released.model, released.diffusion
    assert released.file == GLIDE_FILES[kind]
    assert process.steps == opts["diffusion_steps"]
    assert process.noise_schedule == OUR_SCHEDULE[opts["noise_schedule"]]
    assert process.variance_type == "learned_range" and process.prediction == "eps" and model.learn_sigma
    assert model.kind == {(False, False): "base", (True, False): "upsample", (False, True): "inpaint",
                          (True, True): "upsample_inpaint"}[(opts["super_res"], opts["inpaint"])]
    assert model.image_size == opts["image_size"] and model.model_channels == opts["num_channels"]
    assert model.attention_resolutions == [int(r) for r in opts["attention_resolutions"].split(",")]
    assert opts["channel_mult"] == "" and model.channel_mult is None
    for name in ("num_res_blocks", "num_heads", "num_head_channels", "num_heads_upsample", "dropout", "text_ctx",
                 "xf_width", "xf_layers", "xf_heads", "xf_final_ln", "xf_padding", "use_scale_shift_norm",
                 "resblock_updown"):
        assert getattr(model, name) == opts[name], name
    assert released.tokenizer == "gpt2" and model.n_vocab == 50257  # tokenizer/bpe.py: n_vocab = len(encoder.json)


def test_default_channel_multipliers_are_create_models() -> None:
    """models/config.py DEFAULT_CHANNEL_MULT (used when ``channel_mult`` is None, as the released configs leave it)
    against model_creation.py create_model's choice for channel_mult == ""."""
    create_model_rule = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    for size, mult in create_model_rule.items():
        assert DEFAULT_CHANNEL_MULT[size] == mult, size


def test_released_configs_normalise_with_32_groups_everywhere() -> None:
    """models/config.py groupnorm_min_channels: "1: ADM / GLIDE's 32 groups everywhere (released checkpoints)"; nn.py
    normalization() of glide-text2im is GroupNorm32(num_groups=32, eps=1e-5) at every width, and its LayerNorm
    (xf.py) is nn.LayerNorm's default eps 1e-5."""
    with torch.device("meta"):
        model = build_model(GLIDE_OPTIONS["base"])
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups and all(isinstance(m, GroupNorm32) for m in groups)
    assert {(m.num_groups, m.eps) for m in groups} == {(32, 1e-5)}
    layer_norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(layer_norms) == 2 * GLIDE_DEFAULTS["xf_layers"] + 1 and {m.eps for m in layer_norms} == {1e-5}


EXPERIMENT_PARTS = {"glide_base_model.yaml": "base", "glide_upsample_model.yaml": "upsample",
                    "glide_inpaint_model.yaml": "base-inpaint"}
FINETUNES = {"glide_finetune.yaml": "base", "glide_upsample_finetune.yaml": "upsample",
             "glide_inpaint_finetune.yaml": "base-inpaint"}


@pytest.mark.parametrize("part", sorted(EXPERIMENT_PARTS))
def test_experiment_parts_are_the_released_architectures(part: str) -> None:
    """experiments/parts/glide_*_model.yaml: "glide-text2im's released … model: loads <file> strictly. GPT-2 BPE,
    128 tokens", field by field against the notebook's options (no test read these files before)."""
    kind = EXPERIMENT_PARTS[part]
    fields = yaml.safe_load((REPO / "experiments" / "parts" / part).read_text())
    opts = glide_options(kind)
    renamed = {"model_channels": "num_channels"}
    for name, value in fields.items():
        if name in ("kind", "learn_sigma", "n_vocab", "attention_resolutions"):
            continue
        assert value == opts[renamed.get(name, name)], name
    assert fields["attention_resolutions"] == [int(r) for r in opts["attention_resolutions"].split(",")]
    assert fields["learn_sigma"] is True and fields["n_vocab"] == 50257 and fields["text_ctx"] == 128
    assert "channel_mult" not in fields and "num_heads_upsample" not in fields  # None / -1: create_model's defaults
    assert ModelConfig().num_heads_upsample == opts["num_heads_upsample"]
    config = ModelConfig(**fields)
    assert config == GLIDE_OPTIONS[kind]  # which test_glide_text2im checks against the fixture's keys and shapes


@pytest.mark.parametrize("experiment", sorted(FINETUNES))
def test_finetune_experiments_use_the_released_process_tokenizer_and_file(experiment: str) -> None:
    """experiments/glide_*finetune.yaml and README's experiment table ("linear schedule", "cosine schedule", "GPT-2
    BPE"): the process is the released model's (diffusion_steps, noise_schedule, learned Σ), the tokenizer GPT-2's,
    init_from the file download.py names."""
    kind = FINETUNES[experiment]
    model = yaml.safe_load((REPO / "experiments" / experiment).read_text())["model"]
    opts = glide_options(kind)
    assert model["diffusion"]["steps"] == opts["diffusion_steps"]
    assert model["diffusion"]["noise_schedule"] == OUR_SCHEDULE[opts["noise_schedule"]]
    assert model["diffusion"]["variance_type"] == "learned_range"
    assert model["tokenizer"] == "gpt2"
    assert Path(model["init_from"]).name == GLIDE_FILES[kind]
    assert model["model"] == f"parts/{next(p for p, k in EXPERIMENT_PARTS.items() if k == kind)}"


def test_minig_upsample_has_glides_upsampler_process() -> None:
    """experiments/minig_upsample.yaml: "GLIDE's upsampler process (1000 linear steps, learned variance)" and its
    sample grid at "fast27"."""
    experiment = yaml.safe_load((REPO / "experiments" / "minig_upsample.yaml").read_text())
    opts = glide_options("upsample")
    diffusion = experiment["model"]["diffusion"]
    assert diffusion["steps"] == opts["diffusion_steps"] and diffusion["noise_schedule"] == "linear"
    assert diffusion["variance_type"] == "learned_range" and experiment["model"]["model"]["learn_sigma"] is True
    assert experiment["model"]["model"]["image_size"] == opts["image_size"]
    grids = [c for c in experiment["trainer"]["callbacks"] if c["class_path"].endswith("SampleGrid")]
    assert grids[0]["init_args"]["sampling"]["steps"] == UPSAMPLE_RESPACING


# ----------------------------------------------------------------------------------- sampling defaults
def test_sampling_defaults_are_the_text2im_notebooks() -> None:
    """sampling/config.py SamplingConfig / README "The pipeline, stage by stage": guidance 3, ancestral (p_sample_loop) over
    '100' for the base model, 'fast27' and temperature 0.997 for the upsampler, DDIM's η 0."""
    config = SamplingConfig()
    assert config.guidance_scale == TEXT2IM_GUIDANCE
    assert config.sampler == "ddpm" and config.steps == BASE_RESPACING
    assert config.upsample_steps == UPSAMPLE_RESPACING and config.upsample_temp == UPSAMPLE_TEMP
    assert config.eta == 0.0


def guidance_scale_used(monkeypatch: pytest.MonkeyPatch, run: Any) -> float:
    """The scale the base stage hands classifier_free_guidance when ``run()`` samples (stopped right there)."""
    import glide_lightning.sampling.batch as sampling_module

    seen: list[float] = []

    def probe(model: Any, guidance_scale: float, *args: Any, **kwargs: Any) -> Any:
        seen.append(guidance_scale)
        raise _Stop

    monkeypatch.setattr(sampling_module, "classifier_free_guidance", probe)
    with pytest.raises(_Stop):
        run()
    return seen[0]


def test_text_to_image_guides_at_the_text2im_notebooks_scale_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from glide_lightning.sampling import generate

    base = tiny_sampling_model("base", RELEASED_MODELS["base"].diffusion)
    assert guidance_scale_used(monkeypatch, lambda: generate(base, ["a corgi"], [0])) == TEXT2IM_GUIDANCE


# ----------------------------------------------------------------------------------- the base stage, end to end
def glide_notebook_base_stage(loaded: SamplingModel, prompts: list[str], seeds: list[int], guidance_scale: float,
                              image: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, list[int]]:
    """notebooks/text2im.ipynb (and inpaint.ipynb with ``image`` / ``keep``) base stage written out: the released
    process respaced to '100' (GlideSpacedProcess), ``model_fn`` (the conditional half duplicated, one forward of
    [captions; empty captions], half_eps = uncond + s·(cond − uncond) on the first 3 channels, the rest from the
    forward), ``p_sample_loop`` (p_mean_variance: learned range between log β̃ clipped and log β, x̂_0 from ε,
    ``denoised_fn`` then clip to [-1, 1], posterior mean; noise except at index 0) and, for inpainting,
    inpaint_image = image·mask and the notebook's ``denoised_fn`` x̂_0·(1 − mask) + inpaint_image·mask. The model
    is called with timestep_map[t] (_WrappedModel). The noise comes from the generators our sampler draws from (an
    input here, not a result). Returns the samples and the timesteps the network saw per step."""
    schedule = {"cosine": "squaredcos_cap_v2", "linear": "linear"}[loaded.diffusion_config.noise_schedule]
    process = GlideSpacedProcess(schedule, loaded.diffusion_config.steps, BASE_RESPACING)
    b = len(prompts)
    tokens, mask = loaded.tokenizer(prompts)
    empty_tokens, empty_mask = loaded.tokenizer.empty(b)
    kwargs: dict[str, Tensor] = dict(tokens=torch.cat([tokens, empty_tokens]), mask=torch.cat([mask, empty_mask]))
    denoised_fn = None
    if image is not None and keep is not None:
        inpaint_image = image * keep
        kwargs.update(inpaint_image=inpaint_image.repeat(2, 1, 1, 1), inpaint_mask=keep.repeat(2, 1, 1, 1))

        def denoised_fn(x_start: Tensor) -> Tensor:
            return x_start * (1 - keep) + inpaint_image * keep

    size = loaded.image_size
    generators = sample_generators(seeds)
    x = torch.stack([torch.randn(3, size, size, generator=g) for g in generators])
    seen: list[int] = []
    for i in reversed(range(process.num_timesteps)):
        ts = torch.full((2 * b,), process.timestep_map[i])
        seen.append(process.timestep_map[i])
        with torch.no_grad():
            out = loaded.model(torch.cat([x, x]), ts, **kwargs)
        cond_eps, uncond_eps = out[:b, :3], out[b:, :3]
        eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        frac = (out[:b, 3:] + 1) / 2
        log_var = frac * process.at("max_log", i) + (1 - frac) * process.at("min_log", i)
        x_start = process.at("sqrt_recip", i) * x - process.at("sqrt_recipm1", i) * eps
        if denoised_fn is not None:
            x_start = denoised_fn(x_start)
        x_start = x_start.clamp(-1, 1)
        mean = process.at("coef1", i) * x_start + process.at("coef2", i) * x
        noise = torch.stack([torch.randn(3, size, size, generator=g) for g in generators])
        x = mean + (1.0 if i != 0 else 0.0) * torch.exp(0.5 * log_var) * noise
    return x, seen


class StandInNetwork(nn.Module):
    """A cheap stand-in for a base / inpainting network with the Text2ImUNet call convention (``tokens``/``mask`` or
    their ``encode_caption`` encoding; ``inpaint_image``/``inpaint_mask``): a smooth function of x_t, the original
    timestep, the caption and the known pixels, 3 ε channels then 3 learned-range values in (-1, 1). The network is
    not what the test is about (its forward has tests of its own); this one makes 100 steps cost nothing."""

    def __init__(self, n_vocab: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.token_embedding = nn.Parameter(torch.randn(n_vocab, 6, generator=g) * 0.5)
        self.mix = nn.Parameter(torch.randn(6, 3, generator=g) * 0.5)

    def encode_caption(self, tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
        xf_proj = (self.token_embedding[tokens] * mask[..., None]).sum(1)  # [B, 6]; the empty caption: 0
        return dict(xf_proj=xf_proj, xf_out=xf_proj[:, :, None])

    def forward(self, x: Tensor, timesteps: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None,
                xf_proj: Tensor | None = None, xf_out: Tensor | None = None, inpaint_image: Tensor | None = None,
                inpaint_mask: Tensor | None = None) -> Tensor:
        if tokens is not None:
            xf_proj = self.encode_caption(tokens, mask)["xf_proj"]
        s = (timesteps.float() / 1000).reshape(-1, 1, 1, 1)
        c = (xf_proj @ self.mix).reshape(-1, 3, 1, 1)
        h = x
        if inpaint_mask is not None:
            h = h + 0.7 * inpaint_image * inpaint_mask - 0.3 * inpaint_mask
        eps = 0.9 * torch.tanh(h + 0.5 * c * (1 + s)) + 0.2 * torch.sin(3 * h.flip(-1))
        v = torch.tanh(0.6 * h.mean(1, keepdim=True) - c * s).expand_as(x)
        return torch.cat([eps, v], dim=1)


@pytest.mark.parametrize("kind", ["base", "base-inpaint"])
def test_base_stage_samples_as_the_notebooks_p_sample_loop(kind: str) -> None:
    """README "The pipeline, stage by stage (as glide-text2im's notebooks run it). The base stage: ddpm over '100',
    classifier-free guidance", guidance.py's formula on the ε channels with the conditional variance, gaussian.py's
    "the model always receives the original step indices", inpainting.py's "glide-text2im's denoised_fn": our
    defaults (sampler, steps) with the released base process against the notebook's loop written out
    (text2im.ipynb at its scale 3; inpaint.ipynb at its scale 5), both driving the same stand-in network."""
    released = RELEASED_MODELS[kind]
    tokenizer = build_tokenizer("clip", TINY.text_ctx)
    config = ModelConfig(**{**TINY.to_dict(), "kind": released.model.kind})
    loaded = SamplingModel(StandInNetwork(tokenizer.n_vocab), released.diffusion, tokenizer, config, "stand-in")
    prompts, seeds = ["a large red circle", "a small blue square"], [3, 8]
    image = keep = None
    scale = TEXT2IM_GUIDANCE
    if kind == "base-inpaint":
        scale = INPAINT_GUIDANCE
        image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
        keep = torch.ones(2, 1, 32, 32)
        keep[..., 20:, :] = 0  # as the notebook's source_mask_64[:, :, 20:] = 0
    expected, glide_timesteps = glide_notebook_base_stage(loaded, prompts, seeds, scale, image, keep)
    seen: list[list[int]] = []
    hook = loaded.model.register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    try:
        ours = sample_conditioned(loaded, prompts, seeds, SamplingConfig(guidance_scale=scale), image=image, keep=keep)
    finally:
        hook.remove()
    assert [t[0] for t in seen] == glide_timesteps and all(len(set(t)) == 1 and len(t) == 4 for t in seen)
    assert glide_timesteps[0] == 999 and glide_timesteps[-1] == 0 and len(glide_timesteps) == 100
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    unguided, _ = glide_notebook_base_stage(loaded, prompts, seeds, 1.0, image, keep)
    assert (unguided - expected).abs().max() > 0.1  # the guidance scale shows in the samples: the test can tell
    if keep is not None:
        known = keep.bool().expand_as(image)
        torch.testing.assert_close(ours[known], image[known], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- the upsampler stage's inputs
class RecordingUpsampler(nn.Module):
    """Stands in for an upsampler: records what each step gives it, predicts ε = 0 and v = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Tensor]] = []

    def encode_caption(self, tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {}

    def forward(self, x: Tensor, timesteps: Tensor, low_res: Tensor) -> Tensor:
        self.calls.append(dict(x=x.clone(), timesteps=timesteps.clone(), low_res=low_res.clone()))
        return torch.zeros(x.shape[0], 6, *x.shape[2:])


def test_upsampler_stage_gets_the_notebooks_inputs_by_default() -> None:
    """sampling/cascade.py upsample_batch with the default SamplingConfig on the released upsampler process (1000 linear
    steps): the network sees fast27's original steps (respace.py's rule, noisiest first), ``low_res`` rounded to 8
    bits exactly as text2im.ipynb's ((samples + 1)·127.5).round()/127.5 − 1, and starts from noise × 0.997."""
    from glide_lightning.sampling import upsample_batch

    recorder = RecordingUpsampler()
    config = ModelConfig(**{**TINY.to_dict(), "kind": "upsample"})
    loaded = SamplingModel(recorder, RELEASED_MODELS["upsample"].diffusion, build_tokenizer("clip", TINY.text_ctx),
                           config, "recorder")
    g = torch.Generator().manual_seed(0)
    low_res = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    low_res[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 1 / 127.5])  # the ends, 127.5 and 128.5 before rounding
    seeds = [1, 2]
    upsample_batch(loaded, low_res, ["a", "b"], seeds, SamplingConfig(), task="text2im")
    kept = sorted(glide_space_timesteps(GLIDE_DEFAULTS["diffusion_steps"], UPSAMPLE_RESPACING), reverse=True)
    assert len(kept) == 27
    assert [c["timesteps"].tolist() for c in recorder.calls] == [[t, t] for t in kept]
    notebook_low_res = ((low_res + 1) * 127.5).round() / 127.5 - 1
    assert all(torch.equal(c["low_res"], notebook_low_res) for c in recorder.calls)
    noise = torch.stack([torch.randn(3, 32, 32, generator=gen) for gen in sample_generators(seeds, offset=1)])
    torch.testing.assert_close(recorder.calls[0]["x"], noise * UPSAMPLE_TEMP, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- CLIP guidance
def test_noised_clip_defaults_are_clip_config_yaml() -> None:
    """models/clip.py NoisedCLIPConfig ("the defaults are glide-text2im's released one (its clip/config.yaml)"),
    sampling/clip_guidance.py GLIDE_CLIP_PROCESS ("squaredcos_cap_v2, 1000 steps"), clip_module.py / README ("logit scale
    100"), models/clip.py CLIP_MEAN / CLIP_STD: against config.yaml and encoders.py. Widths are heads × head state
    (clip/model_creation.py builds TextEncoder / ImageEncoder with n_head and n_head_state)."""
    c, y = NoisedCLIPConfig(), GLIDE_CLIP_YAML
    assert (c.image_size, c.patch_size, c.n_vocab, c.text_ctx, c.embed_dim) == (
        y["image_size"], y["patch_size"], y["n_vocab"], y["max_text_len"], y["n_embd"])
    assert c.text_width == y["n_head_text"] * y["n_head_state_text"] and c.text_layers == y["n_xf_blocks_text"]
    assert c.image_width == y["n_head_image"] * y["n_head_state_image"] and c.image_layers == y["n_xf_blocks_image"]
    assert c.head_channels == y["n_head_state_text"] == y["n_head_state_image"]
    assert c.n_timesteps == y["n_timesteps"] and c.logit_scale == y["logit_scale"]
    assert GLIDE_CLIP_PROCESS.steps == y["n_timesteps"]
    assert GLIDE_CLIP_PROCESS.noise_schedule == OUR_SCHEDULE[y["beta_schedule"]]
    assert list(CLIP_MEAN) == GLIDE_CLIP_MEANS and list(CLIP_STD) == GLIDE_CLIP_STDS


TINY_CLIP = NoisedCLIPConfig(image_size=32, patch_size=8, image_width=32, image_layers=1, text_width=32, text_layers=1,
                             head_channels=16, embed_dim=16, n_vocab=49408, text_ctx=16, n_timesteps=1000,
                             logit_scale=100.0)


def test_clip_image_embedding_normalises_pixels_as_glide_text2im() -> None:
    """models/clip.py: "x in [-1, 1] → [0, 255] → minus CLIP's channel means, divided by its standard deviations
    (glide-text2im's image embedding does the same)" and the timestep token first: CLIPModel.image_embeddings
    passes (x + 1)·127.5; encoders.py ImageEmbedding subtracts the means, divides by the stds, patch-projects
    (bias-free, stride = patch), prepends w_t[t], adds w_pos, then LayerNorm (eps 1e-5)."""
    torch.manual_seed(0)
    embed = NoisedCLIP(TINY_CLIP).image_encoder.blocks["input"]
    with torch.no_grad():
        embed.ln.g.normal_(1.0, 0.1)
        embed.ln.b.normal_(0.0, 0.1)
    x, t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 731])
    means = torch.tensor(GLIDE_CLIP_MEANS, dtype=torch.float32)[None, :, None, None]
    stds = torch.tensor(GLIDE_CLIP_STDS, dtype=torch.float32)[None, :, None, None]
    with torch.no_grad():
        h = F.conv2d(((x + 1) * 127.5 - means) / stds, embed.patch_proj, stride=TINY_CLIP.patch_size)
        h = h.reshape(2, TINY_CLIP.image_width, -1).permute(0, 2, 1)
        h = torch.cat([embed.w_t[t][:, None], h], dim=1) + embed.w_pos[None]
        expected = F.layer_norm(h, (TINY_CLIP.image_width,), embed.ln.g, embed.ln.b, eps=1e-5)
        torch.testing.assert_close(embed(x, t), expected, rtol=1e-5, atol=1e-5)


def test_clip_guidance_gradient_is_clip_models_cond_fn() -> None:
    """sampling/clip_guidance.py / README "s·Σ·∇_{x_t}(logit_scale · f(x_t, t)·g(c))": clip/model_creation.py CLIPModel.cond_fn
    is grad_scale · ∇_x [exp(log 100) · Σ (z_t · z_i)] with z = e / (‖e‖ + 1e-12), at the timesteps SpacedDiffusion's
    _WrappedModel passes (the released base model's original steps, which index the CLIP's own 1000 cosine steps
    unchanged)."""
    torch.manual_seed(0)
    clip = NoisedCLIP(TINY_CLIP).eval()
    guide = GuidanceCLIP(clip, GLIDE_CLIP_PROCESS, build_tokenizer("clip", TINY_CLIP.text_ctx), "tiny")
    prompts = ["an oil painting of a corgi", "a red cube"]
    base = GaussianDiffusion.from_config(RELEASED_MODELS["base"].diffusion)
    cond_fn = guide.cond_fn(prompts, base.base_alphas_cumprod, 3.0, torch.device("cpu"))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([999, 412])
    with torch.no_grad():
        ours = cond_fn(x, t)
    tokens, mask = guide.tokenizer(prompts)
    with torch.no_grad():
        z_t = clip.text_encoder(tokens, mask.long().sum(-1))
        z_t = z_t / (torch.linalg.norm(z_t, dim=-1, keepdim=True) + 1e-12)
    x_var = x.detach().requires_grad_(True)
    z_i = clip.image_encoder(x_var, t)
    z_i = z_i / (torch.linalg.norm(z_i, dim=-1, keepdim=True) + 1e-12)
    loss = torch.exp(torch.tensor(math.log(GLIDE_CLIP_YAML["logit_scale"]))) * (z_t * z_i).sum()
    (grad,) = torch.autograd.grad(loss, x_var)
    torch.testing.assert_close(ours, grad * 3.0, rtol=1e-4, atol=1e-6)
