"""``python -m glide_lightning sample``: images from prompts with a trained or released model, or edits of
an image (``--inpaint_image photo.png --mask mask.png`` with an inpainting model; white in the mask =
regenerate; the result can be edited again).

Writes one PNG per image (its prompt, seed, guidance scale, sampler, steps and checkpoint in PNG text
chunks), a grid (rows = prompts, columns = images per prompt) and ``metadata.json`` into ``--out``, which
must be empty or new (``--overwrite true`` first deletes an earlier run's files there). The options are
the fields of :class:`SampleCommand` (``--sampling.*``: :class:`~glide_lightning.sampling.config.SamplingConfig`),
parsed by the front door, :mod:`glide_lightning.commands`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from glide_lightning.data.images import image_grid, save_png, to_rgb
from glide_lightning.data.tokenizers import Truncation, check_prompt_lengths
from glide_lightning.outputs import OutputFolder
from glide_lightning.sampling.cascade import generate
from glide_lightning.sampling.checkpoints import SamplingModel, Weights, check_stored_settings, load_checkpoint
from glide_lightning.sampling.clip_guidance import GuidanceCLIP, load_guidance_clip
from glide_lightning.sampling.config import SamplingConfig
from glide_lightning.sampling.editing import edit, resized_keep
from glide_lightning.sampling.inputs import input_path

log = logging.getLogger(__name__)

CKPT_HINT = ("`make train EXP=<experiment>` writes runs/<experiment>/checkpoints/last.ckpt; glide-text2im's base.pt "
             "works too")
"""How a checkpoint to sample is made: the hint when ``--ckpt`` names nothing (``fid`` / ``sweep`` share it)."""
UPSAMPLER_HINT = ("`make train EXP=smoke_upsample` or EXP=minig_upsample writes runs/<experiment>/checkpoints/"
                  "last.ckpt; glide-text2im's upsample.pt works too")
"""How an upsampler checkpoint is made: the hint when ``--upsampler`` names nothing."""
CLIP_HINT = "`make train EXP=noised_clip` writes runs/noised_clip/clip; glide-text2im's clip/ folder works too"
"""Where a noised CLIP comes from: the hint when ``--clip_dir`` names nothing."""


def read_prompts(prompts: str | list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a file (one per line, blank lines and ``#`` comments skipped)."""
    found = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        found += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not found and prompts_file:
        raise ValueError(f"--prompts_file {prompts_file} holds no prompt (blank lines and # comments are skipped): "
                         f"write one prompt per line, or pass --prompt \"TEXT\"")
    if not found:
        raise ValueError('no prompts: pass --prompt "TEXT" (--prompt+ "TEXT" adds another) or --prompts_file FILE')
    return found


def read_edit_inputs(image_path: str, mask_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The picture to edit as float ``[1, 3, H, W]`` in [-1, 1] and its keep-mask ``[1, 1, H, W]`` (1 = keep):
    mask pixels whose gray level is at least 128 (white) are regenerated, darker ones kept. A mask of another
    size but the picture's aspect ratio is resized to the picture (:func:`~glide_lightning.sampling.editing.resized_keep`),
    so the mask of an edit also serves to edit its result again (which has the model's size).

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: the mask's aspect ratio differs from the image's, or it keeps or regenerates everything.
    """
    for name, path in (("--inpaint_image", image_path), ("--mask", mask_path)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} file not found: {path}")
    with Image.open(image_path) as img:
        image = torch.from_numpy(np.array(to_rgb(img), dtype=np.float32))  # [H, W, 3]
    with Image.open(mask_path) as img:
        white = torch.from_numpy(np.array(to_rgb(img).convert("L"), dtype=np.float32)) >= 128  # [H, W]
    (mask_h, mask_w), (height, width) = white.shape, image.shape[:2]
    keep = rearrange((~white).float(), "h w -> 1 1 h w")
    if (mask_h, mask_w) != (height, width):
        if round(mask_w * height / mask_h) != width:
            raise ValueError(f"--mask is {mask_w}x{mask_h} px but --inpaint_image is {width}x{height}: give a mask "
                             f"of the image's size or at least its aspect ratio (white = regenerate)")
        log.info("resizing the %dx%d mask to the %dx%d picture", mask_w, mask_h, width, height)
        keep = resized_keep(keep, (height, width))
    if keep.all():
        raise ValueError(f"--mask {mask_path} has no white pixel: nothing to regenerate (white = regenerate)")
    image = rearrange(image, "h w c -> 1 c h w") / 127.5 - 1
    return image, keep


def prompt_use(fits: dict[str, dict[str, Truncation]], prompt: str) -> dict[str, object]:
    """What an image's metadata records of how its prompt reached each model: ``prompt_tokens`` (tokens read,
    per model), and where a model's context cut the prompt, ``prompt_used`` (the text that model read)."""
    record: dict[str, object] = {"prompt_tokens": {name: min(f[prompt].n_tokens, f[prompt].text_ctx)
                                                   for name, f in fits.items()}}
    cut = {name: f[prompt].used_text for name, f in fits.items() if f[prompt].cut}
    if cut:
        record["prompt_used"] = cut
    return record


def resolve_device(name: str) -> torch.device:
    """The device ``--device name`` means (``auto``: the GPU if there is one, else the CPU).

    Raises:
        ValueError: not a device name, or a CUDA device on a machine where torch sees no (such) GPU: said before
            any model is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N ({error})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: torch sees no CUDA GPU on this machine: use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


@dataclass
class SampleCommand:
    """Images from prompts with a trained or released model: one PNG per image (prompt, seed, scale,
    sampler, steps and checkpoint in its metadata), ``grid.png`` and ``metadata.json``."""

    ckpt: str = field(metadata=input_path(CKPT_HINT))
    """A glide_lightning ``.ckpt`` (``runs/<name>/checkpoints/last.ckpt``) or glide-text2im's ``base.pt``; an
    inpainting model (``model.kind: inpaint`` or ``base_inpaint.pt``) with ``--inpaint_image`` and ``--mask``."""
    prompt: str | list[str] | None = None
    """A prompt; ``--prompt+ TEXT`` adds another (or ``--prompt '["a", "b"]'``)."""
    prompts_file: str | None = field(default=None, metadata=input_path())
    """A file with one prompt per line (blank lines and ``#`` comments skipped)."""
    num_per_prompt: int = 1
    """Images per prompt (the grid's columns)."""
    seed: int = 0
    """Image i uses seed + i."""
    out: str = "samples"
    """Output directory. One holding anything already is refused before the model is loaded (the files of
    another run would mix with this one's): pass ``--overwrite true`` or another folder."""
    upsampler: str | None = field(default=None, metadata=input_path(UPSAMPLER_HINT))
    """An upsampler checkpoint (ours, ``model.kind: upsample``, or glide-text2im's ``upsample.pt``) for 256 px
    images; for edits an inpainting upsampler (``upsample_inpaint``, ``upsample_inpaint.pt``)."""
    clip_dir: str | None = field(default=None, metadata=input_path(CLIP_HINT))
    """A noised CLIP for CLIP guidance at ``--sampling.clip_guidance_scale``: a directory with
    ``image_enc.pt`` and ``text_enc.pt`` (glide-text2im's ``clip/``, or a noised_clip run's ``runs/<name>/clip``),
    or ``clip_image_enc.pt`` and ``clip_text_enc.pt`` (glide-text2im's download folder, ``glide_model_cache``)."""
    inpaint_image: str | None = field(default=None, metadata=input_path())
    """Edit this picture (PNG/JPEG, e.g. an earlier result) with the inpainting model ``--ckpt``: the masked
    region is regenerated from the prompt, the rest kept (``--inpaint-image`` works too)."""
    mask: str | None = field(default=None, metadata=input_path())
    """The edit's mask, an image of the picture's size: white (gray >= 128) = regenerate, black = keep."""
    weights: Weights = "ema"
    """Of a glide_lightning ``.ckpt``: its EMA weights (when the run kept them) or the ``raw`` ones."""
    device: str = "auto"
    """``cuda``, ``cpu``, … (auto: cuda when available)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How images are drawn (guidance scale, sampler, steps, …): the sampling defaults."""
    overwrite: bool = False
    """Write into a non-empty ``--out``: its ``NNNN.png``, ``grid.png`` and ``metadata.json`` (an earlier
    run's) are deleted first; files ``sample`` does not write stay."""

    def __post_init__(self) -> None:
        if self.num_per_prompt < 1:
            raise ValueError(f"num_per_prompt must be >= 1, got {self.num_per_prompt}")
        if self.sampling.clip_guidance_scale > 0 and not self.clip_dir:
            raise ValueError(f"sampling.clip_guidance_scale {self.sampling.clip_guidance_scale} needs a noised CLIP: "
                             f"pass --clip_dir DIR (image_enc.pt and text_enc.pt, or clip_image_enc.pt and "
                             f"clip_text_enc.pt)")
        if self.clip_dir and self.sampling.clip_guidance_scale == 0:
            raise ValueError("clip_dir is given but sampling.clip_guidance_scale is 0, so it would not be used: "
                             "pass --sampling.clip_guidance_scale S (> 0) or drop --clip_dir")
        if (self.inpaint_image is None) != (self.mask is None):
            raise ValueError("an edit needs both --inpaint_image (the picture) and --mask (white = regenerate)")

    def output(self) -> OutputFolder:
        """``--out`` and the files ``sample`` writes there (an atomic write's temporary name included)."""
        return OutputFolder(Path(self.out), "sample", (r"\.?(\d{4,}|grid)\.png(\.tmp)?", r"metadata\.json"))

    def check_outputs(self) -> None:
        """Refuse a ``--out`` that holds files (:class:`~glide_lightning.outputs.OutputNotEmpty`) unless
        ``overwrite``. The front door runs it before it checks the input paths
        (:func:`glide_lightning.commands.check_inputs`), and :meth:`run` again."""
        self.output().check(self.overwrite)

    def check_steps(self) -> None:
        """Raise ``ValueError`` (naming the option) when ``--sampling.steps`` does not fit the base model's process or
        ``--sampling.upsample_steps`` the upsampler's, or a model is not of the kind the task needs, read from the
        checkpoints' stored hyper-parameters before either model is loaded
        (:func:`~glide_lightning.sampling.checkpoints.check_stored_settings`)."""
        editing = self.inpaint_image is not None
        check_stored_settings(self.ckpt, "--sampling.steps", [self.sampling.steps],
                              kind="inpaint" if editing else "base")
        if self.upsampler:
            check_stored_settings(self.upsampler, "--sampling.upsample_steps", [self.sampling.upsample_steps],
                                  "the upsampler", kind="upsample_inpaint" if editing else "upsample")

    def run(self) -> Path:
        """Sample and write the images; returns the output directory. A non-empty ``--out`` is refused first
        (:class:`~glide_lightning.outputs.OutputNotEmpty`) unless ``overwrite``, then steps that do not fit the models'
        processes (:meth:`check_steps`), before any model is loaded."""
        self.check_outputs()
        prompts = read_prompts(self.prompt, self.prompts_file)
        config = self.sampling
        device = resolve_device(self.device)
        self.check_steps()  # from the stored hyper-parameters, before the weights are loaded
        editing = self.inpaint_image is not None
        base = load_checkpoint(self.ckpt, device, weights=self.weights, kind="inpaint" if editing else "base")
        upsampler = load_checkpoint(self.upsampler, device, kind="upsample_inpaint" if editing else "upsample") \
            if self.upsampler else None
        clip = load_guidance_clip(self.clip_dir, base.image_size, device) if self.clip_dir else None
        # prompts longer than a model's context are cut: warned, and each image records what was read
        fits = {name: dict(zip(prompts, check_prompt_lengths(model.tokenizer, prompts, f"{name} model")))
                for name, model in (("base", base), ("upsampler", upsampler)) if model is not None}
        all_prompts = [p for p in prompts for _ in range(self.num_per_prompt)]
        seeds = [self.seed + i for i in range(len(all_prompts))]
        upsample_sampler = config.upsample_sampler_for("edit" if editing else "text2im") if upsampler else None
        log.info("%s %d images from %s at guidance %.2f (%s, %s steps)%s%s", "editing" if editing else "sampling",
                 len(all_prompts), base.source, config.guidance_scale, config.sampler, config.steps,
                 f", CLIP guidance {config.clip_guidance_scale:g} with {clip.source}" if clip else "",
                 f", then {upsampler.source} ({upsample_sampler}, {config.upsample_steps} steps, temperature "
                 f"{config.upsample_temp:g})" if upsampler else "")
        unconditional = config.guidance_scale == 0 and not clip  # ε = ε_u: the prompt reaches no network
        if unconditional:
            log.warning("--sampling.guidance_scale 0 samples the unconditional model: the prompts are not used "
                        "(the images' metadata says so); 1 is the conditional model without guidance")
        images = self._edit(base, upsampler, all_prompts, seeds, clip) if editing else \
            generate(base, all_prompts, seeds, config, upsampler=upsampler, clip=clip, progress=True)
        out = self.output().claim(self.overwrite)
        common = {"conditioning": "unconditional: guidance_scale 0 does not use the prompt" if unconditional
                  else "the prompt", "guidance_scale": config.guidance_scale, "sampler": config.sampler,
                  "steps": config.steps,
                  "eta": config.eta, "checkpoint": base.source,
                  "upsampler": upsampler.source if upsampler else None,
                  "upsample_steps": config.upsample_steps if upsampler else None,
                  "upsample_temp": config.upsample_temp if upsampler else None,
                  "upsample_sampler": upsample_sampler,
                  "clip_guidance_scale": config.clip_guidance_scale, "clip": clip.source if clip else None,
                  **({"inpaint_image": self.inpaint_image, "mask": self.mask} if editing else {})}
        records = []
        for i, (image, prompt, seed) in enumerate(zip(images, all_prompts, seeds)):
            record = {"file": f"{i:04d}.png", "prompt": prompt, "seed": seed, **prompt_use(fits, prompt), **common}
            save_png(image, out / record["file"], record)
            records.append(record)
        save_png(image_grid(images, rows=len(prompts)), out / "grid.png", {"prompts": prompts, **common})
        (out / "metadata.json").write_text(json.dumps({"config": asdict(config), "images": records}, indent=1))
        log.info("wrote %d images and grid.png to %s", len(records), out)
        return out

    def _edit(self, base: SamplingModel, upsampler: SamplingModel | None, prompts: list[str],
              seeds: list[int], clip: GuidanceCLIP | None = None) -> torch.Tensor:
        image, keep = read_edit_inputs(self.inpaint_image or "", self.mask or "")
        count = len(prompts)
        return edit(base, image.expand(count, -1, -1, -1), keep.expand(count, -1, -1, -1), prompts, seeds,
                    self.sampling, upsampler=upsampler, clip=clip, progress=True)
