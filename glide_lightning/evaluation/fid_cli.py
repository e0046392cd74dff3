"""``python -m glide_lightning fid|sweep``: zero-shot FID (with KID, precision/recall and, given DINOv2 weights,
FD_DINOv2), CLIP score and adherence over guidance scales.

``fid`` writes ``results.json`` (and the run's wandb summary) into one folder per evaluation setting,
``<out>/res<R>_<sampler><steps>_n<N>/``, beside the setting's image cache ``images-<key>/``; ``sweep`` also
writes ``sweep.md`` (a table per scale) and ``sweep.png`` (FID against CLIP score, one point per scale, as
the GLIDE paper's guidance curves) there. Every metric carries its bootstrap interval (value ± z·se) over the generated
images (``--bootstrap``; :mod:`glide_lightning.evaluation.uncertainty`). A setting folder holds one invocation's results: one that already
holds results (or other files) is refused before any model is loaded, unless ``--overwrite true`` (see
:meth:`FIDCommand.outputs`); the image cache is kept and reused. Every figure says how it was computed: N,
resolution, scale, sampler, steps and the feature extractor, and figures from random weights are labelled so. The
options are the fields of :class:`FIDCommand` / :class:`SweepCommand`, parsed by the front door,
:mod:`glide_lightning.commands`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal


from glide_lightning.models import ModelConfig
from glide_lightning.models.glide_text2im import detect_glide_kind
from glide_lightning.outputs import OutputFolder
from glide_lightning.evaluation.fid import ReferenceStatsCache
from glide_lightning.evaluation.kid_prc import MetricOptions
from glide_lightning.evaluation.results import ScaleResult
from glide_lightning.evaluation.uncertainty import BootstrapOptions
from glide_lightning.evaluation.zero_shot import FIDJob, build_extractor, check_reference, run
from glide_lightning.diffusion import SamplerName
from glide_lightning.diffusion.samplers import sampler_names
from glide_lightning.data.tokenizers import check_prompt_lengths
from glide_lightning.sampling import DEFAULT_GUIDANCE_SWEEP, RELEASED_MODELS, SamplingConfig, Weights, load_checkpoint
from glide_lightning.sampling.checkpoints import check_stored_settings, mapped_state
from glide_lightning.sampling.command import CKPT_HINT, UPSAMPLER_HINT, resolve_device
from glide_lightning.sampling.inputs import RUN_HINT, input_path

log = logging.getLogger(__name__)


def read_captions(path: str, n: int) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"caption list not found: {file} (the mscoco recipe writes fid_captions.txt; "
                                f"any file with one caption per line works)")
    captions = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if len(captions) < n:
        raise ValueError(f"{file} has {len(captions)} captions, fewer than --n {n}: pass a smaller --n or a longer "
                         f"caption list")
    return captions[:n]


_NONE = ("none", "None", "")
RESULT_FILES = (r"results\.json", r"sweep\.(md|png|json)")
"""What ``fid`` / ``sweep`` write in a setting's folder (its ``images-<key>/`` cache is not a result: kept)."""
NFE_SWEEP_FILES = (r"nfe_sweep\.(md|png|json)",)
"""What a sweep over several samplers or step counts writes in ``--out`` itself, beside the setting folders."""


def model_image_size(checkpoint: str) -> int | None:
    """The size of the images a checkpoint's model makes, read without building it (:func:`mapped_state`: its
    hyper-parameters, or the released model its keys and shapes match); None when the file
    cannot be read so (:func:`~glide_lightning.sampling.load_checkpoint` then says why)."""
    state = mapped_state(checkpoint)
    if state is None:
        return None
    try:
        if "hyper_parameters" in state:
            return ModelConfig(**state["hyper_parameters"]["model"]).image_size
        kind = detect_glide_kind(state)
        return RELEASED_MODELS[kind].model.image_size if kind else None
    except Exception:  # noqa: BLE001 - any unreadable file: the real reader reports it
        return None


@dataclass
class FIDCommand:
    """Zero-shot FID, CLIP score and adherence at each guidance scale: ``<out>/results.json`` and the
    run's wandb summary. Prints the number of images to generate and an ETA before the work starts."""

    ckpt: str | None = field(default=None, metadata=input_path(CKPT_HINT))
    """Checkpoint to evaluate (default: ``<run_dir>/checkpoints/last.ckpt``)."""
    run_dir: str | None = field(default=None, metadata=input_path(RUN_HINT, run_folders=True))
    """The training run (``runs/<name>``): default checkpoint, output and wandb project."""
    captions: str = field(default="data/mscoco/fid_captions.txt", metadata=input_path(
        "`python -m glide_lightning data mscoco` writes data/mscoco/fid_captions.txt; any file with one caption "
        "per line works"))
    """Held-out captions, one per line (the mscoco recipe writes this file)."""
    reference: str = field(default="data/mscoco/fid_reference", metadata=input_path(
        "`python -m glide_lightning data mscoco` writes data/mscoco/fid_reference; any folder of images works"))
    """Directory of reference images."""
    n: int = 5000
    """Number of captions, i.e. of generated images per scale."""
    scales: list[float] | None = None
    """Guidance scales (default: the sampling config's ``guidance_scale``)."""
    res: int | None = None
    """Evaluation resolution, checked against the model's output (64 for a base model, 256 with
    ``--upsampler``); default: what the model produces."""
    extractor: Literal["inception", "random-conv"] = "inception"
    """``inception``: the standard FID features; ``random-conv``: no weights needed, NOT a real FID."""
    inception_weights: str | None = field(default=None, metadata=input_path())
    """A local Inception weights file (offline machines)."""
    metrics: list[Literal["kid", "prc"]] | None = None
    """Metrics beside FID (always computed), from the same features: ``kid`` (Kernel Inception Distance, mean and
    std over subsets) and ``prc`` (precision and recall, k-NN manifolds); ``[]``: FID alone. Default: both, ``prc``
    only where ``n`` exceeds ``prc_neighborhood`` (named explicitly, a too small ``n`` is an error)."""
    kid_subset_size: int | None = None
    """Samples per KID subset (default: min(1000, n, reference images))."""
    kid_subsets: int = 100
    """KID's random subsets (its std is over them)."""
    prc_neighborhood: int = 3
    """k of precision/recall's k-nearest-neighbour radii (3, as in the paper and torch-fidelity)."""
    dinov2: str | None = None
    """DINOv2 weights for FD_DINOv2 (the Fréchet distance of DINOv2 ViT CLS features): a directory written by
    transformers' ``Dinov2Model.save_pretrained`` (e.g. ``facebook/dinov2-large``) or a hub name. Not given: no
    FD_DINOv2, and ``results.json`` says ``fd_dinov2: null`` with the reason."""
    dinov2_pretrained: bool = True
    """``false``: the ``--dinov2`` weights are random or untrained (tests): FD_DINOv2 is labelled NOT real."""
    clip_model: str | None = "ViT-B-32"
    """open_clip model of the CLIP score (``none``: no CLIP score)."""
    clip_pretrained: str | None = "openai"
    """open_clip pretrained tag or local file (``none``: random weights, labelled)."""
    seed: int = 0
    """Image i uses seed + i at every scale."""
    out: str | None = None
    """Output directory (default: ``<run_dir>/fid`` or ``./fid``): one folder per setting,
    ``res<R>_<sampler><steps>_n<N>/``, which ``compare`` reads. Evaluating a setting whose folder already holds
    results is refused before the model is loaded (two evaluations never share a folder): pass ``--overwrite
    true`` or another ``--out``. Other settings' folders are left alone, and the image cache is reused."""
    cache_dir: str = str(Path.home() / ".cache" / "glide_lightning" / "fid_reference")
    """Where reference statistics are cached."""
    upsampler: str | None = field(default=None, metadata=input_path(UPSAMPLER_HINT))
    """An upsampler checkpoint to evaluate the cascade at its size (256 px for glide-text2im's ``upsample.pt`` or
    ``minig_upsample``): ours (``runs/<upsample run>/checkpoints/last.ckpt``) or released; its source, sampler
    (``--sampling.upsample_sampler``: DDIM by default, as glide-text2im's text2im notebook), steps
    (``--sampling.upsample_steps``) and temperature (``--sampling.upsample_temp``) are recorded with each result."""
    weights: Weights = "ema"
    """Of a glide_lightning ``.ckpt``: its EMA weights (when the run kept them) or the ``raw`` ones."""
    device: str = "auto"
    """``cuda``, ``cpu``, … (auto: cuda when available)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How images are drawn (sampler, steps, batch size, …; ``guidance_scale`` when ``--scales`` is not given)."""
    overwrite: bool = False
    """Replace the results of the settings evaluated: their ``results.json`` and ``sweep.*`` (and ``--out``'s
    ``nfe_sweep.*`` for a sweep over samplers or step counts) are deleted first; the image cache and files
    ``fid`` / ``sweep`` do not write stay."""
    bootstrap: int = 200
    """Bootstrap replicates over the generated images (reference fixed) for every metric's interval (value ± z·se,
    :mod:`glide_lightning.evaluation.uncertainty`), stored as ``<metric>_interval`` in ``results.json`` and shown as
    ``value [lo, hi]``; 0: no intervals. Cost at N = 5000 Inception features on a 2-core CPU: ~5 s per FID and ~4 s
    per KID replicate (~30 minutes per scale at 200); on a GPU they run on ``--device`` (not timed here)."""
    bootstrap_seed: int = 0
    """Seed of the resamples (the same seed gives the same intervals)."""
    confidence: float = 0.95
    """Coverage of the bootstrap intervals."""

    name: ClassVar[str] = "fid"
    writes_sweep: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.scales is not None and (not self.scales or min(self.scales) < 0):
            raise ValueError(f"scales must be a non-empty list of guidance scales >= 0, got {self.scales}")
        options = self.metric_options()  # checks the metric options at parse time
        self.bootstrap_options()
        if self.metrics is not None and "prc" in options.metrics and self.n <= self.prc_neighborhood:
            raise ValueError(f"precision/recall with --prc_neighborhood {self.prc_neighborhood} needs --n > "
                             f"{self.prc_neighborhood}; lower it or drop prc from --metrics")
        if "kid" in options.metrics and self.kid_subset_size is not None and self.kid_subset_size > self.n:
            raise ValueError(f"--kid_subset_size {self.kid_subset_size} is larger than --n {self.n}")

    def metric_options(self) -> MetricOptions:
        """The metrics computed beside FID, and their settings."""
        chosen = self.metrics if self.metrics is not None else \
            ["kid", *(["prc"] if self.n > self.prc_neighborhood else [])]  # k-NN radii need more than k images
        return MetricOptions(metrics=tuple(dict.fromkeys(chosen)), kid_subset_size=self.kid_subset_size,
                             kid_subsets=self.kid_subsets, prc_neighborhood=self.prc_neighborhood)

    def bootstrap_options(self) -> BootstrapOptions:
        """How the intervals are bootstrapped (checked at parse time)."""
        return BootstrapOptions(replicates=self.bootstrap, seed=self.bootstrap_seed, level=self.confidence)

    def samplings(self) -> list[SamplingConfig]:
        """The sampling settings evaluated, one output folder each (``fid``: ``sampling`` alone)."""
        return [self.sampling]

    def outputs(self, root: Path, res: int) -> list[OutputFolder]:
        """The folders this evaluation writes: one per setting (:meth:`samplings`) at resolution ``res``, and,
        for a sweep over several settings, ``root`` itself for its ``nfe_sweep.*`` (shared with the settings)."""
        paths = [root / f"res{res}_{s.sampler}{s.steps}_n{self.n}" for s in self.samplings()]
        folders = [OutputFolder(path, self.name, RESULT_FILES, kept=(r"images-[0-9a-f]+",), writers="fid or sweep",
                                label=f"the results folder {path}") for path in paths]
        if self.writes_sweep and len(folders) > 1:
            folders.append(OutputFolder(root, self.name, NFE_SWEEP_FILES, shared=True))
        return folders

    def check_steps(self, checkpoint: str) -> None:
        """Raise ``ValueError`` (naming the option) when a step count evaluated does not fit the process of
        ``checkpoint`` (``--sampling.steps``, or ``--step_counts`` of a sweep) or ``--sampling.upsample_steps`` the
        upsampler's, read from the checkpoints' stored hyper-parameters before any model is loaded
        (:func:`~glide_lightning.sampling.checkpoints.check_stored_settings`; a model of another kind too)."""
        swept = getattr(self, "step_counts", None)
        check_stored_settings(checkpoint, "--step_counts" if swept else "--sampling.steps",
                              [s.steps for s in self.samplings()], kind="base")
        if self.upsampler:
            check_stored_settings(self.upsampler, "--sampling.upsample_steps", [self.sampling.upsample_steps],
                                  "the upsampler", kind="upsample")

    def checkpoint(self) -> str:
        """The checkpoint evaluated: ``--ckpt``, else ``<run_dir>/checkpoints/last.ckpt``."""
        if self.ckpt:
            return self.ckpt
        if self.run_dir:
            return str(Path(self.run_dir) / "checkpoints" / "last.ckpt")
        raise ValueError("pass --ckpt CKPT or --run_dir runs/<name>")

    def output_root(self) -> Path:
        """``--out``, else ``<run_dir>/fid``, else ``./fid``: the parent of the setting folders."""
        return Path(self.out) if self.out else (Path(self.run_dir) / "fid" if self.run_dir else Path("fid"))

    def check_outputs(self) -> None:
        """Refuse setting folders that already hold results (:meth:`outputs`, unless ``overwrite``), at ``--res`` or
        the size the checkpoint's model makes, read without loading it (:func:`model_image_size`; a checkpoint that
        cannot be read so is checked when the folders are claimed, after loading). The front door runs it before
        it checks the input paths (:func:`glide_lightning.commands.check_inputs`), and :meth:`run` again."""
        expected = self.res or model_image_size(self.upsampler or self.checkpoint())
        for folder in self.outputs(self.output_root(), expected) if expected else []:
            folder.check(self.overwrite)

    def check_res(self, res: int | None) -> None:
        """Raise ``ValueError`` when ``--res`` is not ``res``, the size the model (the upsampler, with one) makes
        (None: not known yet)."""
        if self.res is None or res is None or self.res == res:
            return
        maker = "the upsampler" if self.upsampler else "the model"
        hint = (" (a larger size needs an upsampler: --upsampler, e.g. glide-text2im's upsample.pt for 256 px)"
                if self.res > res and not self.upsampler else "")
        raise ValueError(f"--res {self.res}, but {maker} makes {res} px images: pass --res {res} or leave it out"
                         f"{hint}")

    def run(self) -> list[ScaleResult] | None:
        """Generate, score and write the results (None on ranks other than 0 under torchrun). Result folders that
        already hold results (:meth:`outputs`), the reference folder, the captions and step counts that do not fit
        the models' processes (:meth:`check_steps`) are refused first, before any model is loaded."""
        run_dir = Path(self.run_dir) if self.run_dir else None
        if run_dir is not None and not run_dir.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir} (make fid/sweep take EXP=<experiment> or "
                                    f"RUN=<run name>, both directories under runs/)")
        checkpoint = self.checkpoint()
        if not self.ckpt and not Path(checkpoint).exists():
            raise FileNotFoundError(f"--run_dir: {run_dir} has no checkpoint yet ({checkpoint} does not exist): train "
                                    f"it first (make train EXP=<experiment>) or pass --ckpt CKPT")
        self.check_outputs()
        root = self.output_root()
        check_reference(self.reference)  # before any model is loaded or image generated
        captions = read_captions(self.captions, self.n)
        self.check_steps(checkpoint)  # from the stored hyper-parameters, before the weights are loaded
        self.check_res(model_image_size(self.upsampler or checkpoint))  # likewise, where it can be read so
        device = resolve_device(self.device)
        base = load_checkpoint(checkpoint, device, weights=self.weights, kind="base")
        upsampler = load_checkpoint(self.upsampler, device, kind="upsample") if self.upsampler else None
        res = (upsampler or base).image_size
        self.check_res(res)
        for name, model in (("base", base), ("upsampler", upsampler)):
            if model is not None:
                check_prompt_lengths(model.tokenizer, captions, f"{name} model")  # a warning: FID scores what was read
        extractor = build_extractor(self.extractor, self.inception_weights, device=str(device))
        dinov2 = None
        if self.dinov2:
            from glide_lightning.evaluation.features import Dinov2Features

            dinov2 = Dinov2Features(self.dinov2, device=device, pretrained=self.dinov2_pretrained)
        samplings = self.samplings()
        outputs = [folder.claim(self.overwrite) for folder in self.outputs(root, res)]  # checked again if not above
        everything: list[ScaleResult] = []
        for sampling, out in zip(samplings, outputs):
            job = FIDJob(captions=captions, reference=self.reference, out_dir=out,
                         scales=list(self.scales or [sampling.guidance_scale]), sampling=sampling, seed=self.seed,
                         clip_model=None if self.clip_model in _NONE else self.clip_model,
                         clip_pretrained=None if self.clip_pretrained in _NONE else self.clip_pretrained)
            results = run(job, base, extractor, ReferenceStatsCache(self.cache_dir), upsampler=upsampler,
                          metrics=self.metric_options(), dinov2=dinov2, bootstrap=self.bootstrap_options())
            if results is None:  # another rank: it generated its share, rank 0 scores
                continue
            if self.writes_sweep:
                write_sweep(out, results)
            for r in results:
                print(f"{r.sampler} {r.steps} steps, {r.nfe} NFE, {r.summary_line()}")
            everything.extend(results)
        if not everything:
            return None
        if self.writes_sweep and len(samplings) > 1:
            write_nfe_sweep(root, everything)
        if run_dir is not None:  # one eval run for the whole invocation (an NFE sweep: quality against NFE)
            log_to_wandb(run_dir, everything, checkpoint=checkpoint, command=self.name, upsampler=self.upsampler)
        return everything


@dataclass
class SweepCommand(FIDCommand):
    """A sweep over guidance scales, and optionally samplers and step counts: FID, CLIP score and
    adherence per setting, as ``fid`` does, plus per sampler and step count ``sweep.md`` (a table) and
    ``sweep.png`` (FID against CLIP score, one point per scale), and, when several samplers or step
    counts are swept, ``nfe_sweep.md`` / ``.png`` / ``.json`` in the output folder: quality against the
    number of model evaluations per image (NFE)."""

    scales: list[float] | None = field(default_factory=lambda: list(DEFAULT_GUIDANCE_SWEEP))
    """Guidance scales (default: the sampling module's ``DEFAULT_GUIDANCE_SWEEP``)."""
    samplers: list[SamplerName] | None = None
    """Samplers to sweep (default: ``sampling.sampler`` alone); ``sampling.eta`` (DDIM's η) applies to the samplers
    that take it (``ddim``), the others sample at 0."""
    step_counts: list[str] | None = None
    """Step counts (respacings: ``"10"``, ``"25"``, ``"ddim50"``…) to sweep for every sampler (default:
    ``sampling.steps`` alone)."""

    name: ClassVar[str] = "sweep"
    writes_sweep: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samplers is not None and not self.samplers or self.step_counts is not None and not self.step_counts:
            raise ValueError("samplers and step_counts must be non-empty lists when given")
        self.samplings()  # every combination is a valid SamplingConfig: fails at parse time otherwise

    def samplings(self) -> list[SamplingConfig]:  # noqa: D102
        configs = []
        takes_eta = sampler_names(takes_eta=True)  # the registry's: a new stochastic sampler gets the sweep's eta
        for sampler in self.samplers or [self.sampling.sampler]:
            for steps in self.step_counts or [self.sampling.steps]:
                eta = self.sampling.eta if sampler in takes_eta else 0.0
                configs.append(replace(self.sampling, sampler=sampler, steps=str(steps), eta=eta))
        return configs


def log_to_wandb(run_dir: Path, results: list[ScaleResult], checkpoint: str, command: str = "fid",
                 upsampler: str | None = None) -> str | None:
    """Log the invocation's results to an eval wandb run beside the training run (same project and group,
    ``job_type="eval"``, linked by ``train_run_id`` and the checkpoint's sha256): step metrics against the guidance
    scale (or NFE), the ``eval/results`` Table and its plots
    (:func:`glide_lightning.evaluation.wandb_eval.log_eval_run`). Returns the eval run's wandb id."""
    from glide_lightning.evaluation.wandb_eval import log_eval_run

    return log_eval_run(run_dir, results, checkpoint, command=command, upsampler=upsampler)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SCORE_COLUMNS = ["FID", "CLIP score", "adherence", "KID", "precision", "recall", "FD_DINOv2"]
"""The score columns of the sweep tables (:func:`_score_cells`), after the setting's own columns."""


def metric_notes(first: ScaleResult) -> list[str]:
    """How KID, precision/recall and FD_DINOv2 of a table were computed (or why FD_DINOv2 was not), as quoted
    lines: the FID label already says whether the shared features are real."""
    notes = []
    if first.kid is not None:
        notes.append(f"> KID: {first.kid.method}; "
                     f"{'NOT a real KID (random features)' if first.kid.random_weights else 'same features as FID'}")
    if first.precision_recall is not None:
        prc = first.precision_recall
        notes.append(f"> precision/recall: {prc.method}; "
                     f"{'NOT real (random features)' if prc.random_weights else 'same features as FID'}")
    if first.fd_dinov2 is not None:
        notes.append(f"> {first.fd_dinov2.label}")
    elif first.fd_dinov2_reason:
        notes.append(f"> FD_DINOv2 {first.fd_dinov2_reason}")
    return notes


def _table_head(title: str, first: ScaleResult, settings: str, columns: list[str]) -> list[str]:
    """A sweep table's title, settings, FID label (and the other metrics' notes) and header row (``columns``
    right-aligned)."""
    return [f"# {title}: {first.checkpoint}", "", f"N = {first.n}, {first.resolution} px, {settings}features: "
            f"{first.fid.extractor_name}", "", f"> {first.fid.label}", *metric_notes(first), "",
            "| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]


def score_cells(r: ScaleResult) -> list[str]:
    """A result's cells under :data:`SCORE_COLUMNS` ('–' where not measured; KID as mean ± std over subsets), each
    followed by its bootstrap interval ``[lo, hi]`` where computed."""
    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    def ci(metric: str, spec: str) -> str:
        interval = r.interval(metric)
        return "" if interval is None else f" {interval.format(spec)}"

    kid = "–" if r.kid is None else f"{r.kid.mean:.4f} ± {r.kid.std:.4f}{ci('kid', '.4f')}"
    cells = [fmt(r.value(m), spec) + ("" if r.value(m) is None else ci(m, spec)) for m, spec in
             (("fid", ".2f"), ("clip_score", ".2f"), ("adherence", ".3f"))]
    return [*cells, kid, *(fmt(r.value(m), spec) + ("" if r.value(m) is None else ci(m, spec)) for m, spec in
                           (("precision", ".3f"), ("recall", ".3f"), ("fd_dinov2", ".2f")))]


def _score_cells(r: ScaleResult) -> str:
    """A row's score cells, joined (:func:`score_cells`)."""
    return " | ".join(score_cells(r))


def write_sweep(out: Path, results: list[ScaleResult]) -> None:
    """``sweep.md`` (table) and ``sweep.png`` (FID vs CLIP score, annotated with the scales)."""
    plt = _pyplot()
    first = results[0]
    upsampled = f"{first.upsampled()}, " if first.upsampler else ""
    lines = _table_head("Guidance sweep", first, f"{first.sampler} {first.steps} steps, {upsampled}",
                        ["guidance", *SCORE_COLUMNS])
    for r in results:
        lines.append(f"| {r.guidance_scale:g} | {_score_cells(r)} |")
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


def write_nfe_sweep(out: Path, results: list[ScaleResult]) -> None:
    """``nfe_sweep.md`` (table), ``nfe_sweep.png`` (FID, and adherence where scored, against the model
    evaluations per image: one line per sampler and guidance scale) and ``nfe_sweep.json``."""
    plt = _pyplot()
    first = results[0]
    rows = sorted(results, key=lambda r: (r.sampler, r.guidance_scale, r.nfe or 0))
    lines = _table_head("Quality against model evaluations", first,
                        "NFE = network evaluations per image (a guided step counts two), ",
                        ["sampler", "steps", "guidance", "NFE", *SCORE_COLUMNS])
    for r in rows:
        lines.append(f"| {r.sampler} | {r.steps} | {r.guidance_scale:g} | {r.nfe} | {_score_cells(r)} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "nfe_sweep.md").write_text("\n".join(lines) + "\n")
    panels = [("FID" + (" (NOT a real FID: random features)" if first.fid.random_weights else ""),
               lambda r: r.fid.fid)]
    if all(r.adherence is not None for r in results):
        panels.append(("adherence", lambda r: r.adherence))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (label, value) in zip(axes[0], panels):
        for sampler, scale in dict.fromkeys((r.sampler, r.guidance_scale) for r in rows):
            line = [r for r in rows if r.sampler == sampler and r.guidance_scale == scale]
            ax.plot([r.nfe for r in line], [value(r) for r in line], "o-", label=f"{sampler}, s={scale:g}")
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations per image (NFE)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs NFE", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "nfe_sweep.png", dpi=120)
    plt.close(fig)
    (out / "nfe_sweep.json").write_text(json.dumps([r.to_dict() for r in rows], indent=1))

