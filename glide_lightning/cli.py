"""``python -m glide_lightning fit --config experiments/<name>.yaml``: LightningCLI with run management.

On top of LightningCLI this adds a ``run`` group (name, wandb project / group / tags, where runs
live, checkpoint cadence): every run gets ``<root>/<name>/`` holding its checkpoints, the resolved
``config.yaml``, a CSV of metrics and the wandb run files (see :mod:`glide_lightning.runs`). One
process trains a run at a time (a lock). A run directory that already holds a checkpoint is resumed
(``--run.resume false`` starts over; ``--ckpt_path`` picks one explicitly), unless the new config
changes the model, diffusion or tokenizer settings the checkpoint was trained with.

One CLI trains every task: an experiment's top-level ``task`` (or ``--task``) picks the LightningModule,
``diffusion`` (:class:`GlideModule`, the default) or ``noised_clip``
(:class:`~glide_lightning.clip_module.NoisedCLIPModule`); both take the same data module and ``run`` group.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml
from jsonargparse import ArgumentError, set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, ThroughputMonitor
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from glide_lightning.callbacks import GracefulInterrupt, NonFiniteLossError, ProgressLog, RunCheckpoint
from glide_lightning.callbacks.progress import ModelSummary, StepProgressBar
from glide_lightning.data.datamodule import GlideDataModule
from glide_lightning.data.tokenizers import TokenizerSpec
from glide_lightning.locks import LockBusy
from glide_lightning.module import GlideModule
from glide_lightning.optim import fused_clipping_conflict
from glide_lightning.runs import (  # RunConfig, resolve_wandb_mode, …: still importable from here
    ConfigDriftError,
    RunConfig,
    UnreadableCheckpointError,
    archive_checkpoints,
    check_resume,
    checkpoint_step,
    checkpoint_to_resume,
    is_launching_process,
    lock_run,
    resolve_wandb_mode,
    wandb_logger,
    write_versioned,
)
from glide_lightning.yaml_config import PARSER_OPTIONS, option_error, read_yaml, strict_yaml

log = logging.getLogger("glide_lightning")

Task = Literal["diffusion", "noised_clip"]
"""What ``fit`` trains: a text-to-image diffusion model or a noised CLIP for CLIP guidance."""
TASKS: tuple[str, ...] = get_args(Task)


def module_class(task: str) -> type:
    """The LightningModule of a :data:`Task` (the noised CLIP's imported only when asked for)."""
    if task == "noised_clip":
        from glide_lightning.clip_module import NoisedCLIPModule

        return NoisedCLIPModule
    if task != "diffusion":
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return GlideModule


def _options(args: list[str]) -> Iterator[tuple[str, str]]:
    """``(name, value)`` of each ``--name value`` / ``--name=value`` in ``args`` (a value may be another option's
    name: callers look only at the names they know)."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        yield name, value if eq else (args[i + 1] if i + 1 < len(args) else "")


def task_of(args: list[str]) -> str:
    """The task that ``args`` ask for, read before LightningCLI builds its parser (which needs the module
    class): the last ``--task``, else the last ``task:`` of the ``--config`` files, else ``diffusion``.
    The parser then checks it like any field (:meth:`GlideCLI.before_instantiate_classes`)."""
    task, from_flag = "diffusion", False
    for name, value in _options(args):
        if name == "--task":
            task, from_flag = value, True
        elif name == "--config" and not from_flag and Path(value).is_file():
            found = read_yaml(Path(value))
            if isinstance(found, dict) and "task" in found:
                task = found["task"]
    return task


def experiment_of(args: list[str]) -> str | None:
    """The experiment ``args`` train: the name of the first ``--config`` file in an ``experiments/`` folder
    (``experiments/smoke.yaml``: ``smoke``), for the commands the closing line suggests; None without one."""
    return next((Path(value).stem for name, value in _options(args)
                 if name == "--config" and Path(value).parent.name == "experiments"), None)


def model_tokenizer(model: Any, tokenizer: str | None, bpe_dir: str | None) -> dict[str, Any]:
    """``data.tokenizer_spec`` of a diffusion model: its text encoder's tokenizer (``TokenizerSpec.for_model``), as the
    plain dict the run's hyper-parameters record."""
    return TokenizerSpec.for_model(model, tokenizer, bpe_dir).to_dict()  # type: ignore[arg-type]


def named_tokenizer(name: str, text_ctx: int, bpe_dir: str | None) -> dict[str, Any]:
    """``data.tokenizer_spec`` of a model that names its tokenizer (the noised CLIP): ``bpe_dir`` used by ``gpt2`` only."""
    return TokenizerSpec(name, text_ctx, bpe_dir=bpe_dir if name == "gpt2" else None).to_dict()  # type: ignore[arg-type]


def link_error(error: BaseException) -> BaseException:
    """The error a link's ``compute_fn`` raised, where jsonargparse wrapped it while parsing (its message then
    lists the link's arguments, a whole model config among them): ``error`` itself otherwise."""
    cause: BaseException | None = error
    wrapped = False
    while cause is not None:
        if str(cause).startswith("Call to compute_fn of link"):
            wrapped = True
        elif wrapped:
            return cause
        cause = cause.__cause__ or cause.__context__
    return error


set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config fields' docstrings in --help
strict_yaml()  # a key given twice in a config is an error, not the last one silently


class SaveRunConfig(SaveConfigCallback):
    """Writes the run's ``config.yaml`` once training has started (checkpoint restored, sanity check
    passed), keeping a different earlier one as ``config.v<N>.yaml``."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pass  # LightningCLI's writes here, before the checkpoint is even restored

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        path = os.path.join(trainer.log_dir, self.config_filename)  # every rank: log_dir is a broadcast
        if self.already_saved or not trainer.is_global_zero:
            return
        kept = write_versioned(Path(path), self.parser.dump(self.config, skip_none=False))
        if kept is not None:
            log.info("config.yaml changed: the previous one is kept as %s", kept)
        self.already_saved = True


class GlideCLI(LightningCLI):
    """LightningCLI for the module of the ``task`` (:class:`GlideModule` by default) and
    :class:`GlideDataModule`, with a ``run`` group."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        self.lock: Any = None  # the run directory's lock, held until the process ends
        given = list(sys.argv[1:] if args is None else args)
        self.task, self.experiment = task_of(given), experiment_of(given)
        try:
            model_class = module_class(self.task)
        except ValueError as error:
            sys.exit(f"error: {error}")
        kwargs.setdefault("seed_everything_default", SEED)
        # a parse error raises (one line, from main) instead of printing the whole usage of `fit`; no abbreviations
        # (copies: Lightning adds each subcommand's description to its dict; run=False builds no subcommand)
        subcommands = {name: dict(PARSER_OPTIONS) for name in self.subcommands()} if run else {}
        kwargs.setdefault("parser_kwargs", {**PARSER_OPTIONS, **subcommands})
        try:
            super().__init__(model_class, GlideDataModule, args=args, run=run, save_config_callback=SaveRunConfig,
                             **kwargs)
        except ArgumentError as error:
            command = given[0] if given and not given[0].startswith("-") else "fit"
            raise option_error(link_error(error), getattr(self, "parser", None),
                               f"python -m glide_lightning {command}") from error

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--task", type=Task, default="diffusion",
                            help="what to train: diffusion (text-to-image) or noised_clip (CLIP guidance's CLIP)")
        parser.add_class_arguments(RunConfig, "run")
        # the model owns these knobs; the data module follows. Its tokenizer is one value, derived when parsed (the
        # text encoder implies it: a contradicting model.tokenizer is refused here, before anything is built)
        if self.task == "diffusion":
            parser.link_arguments(("model.model", "model.tokenizer", "model.bpe_dir"), "data.tokenizer_spec",
                                  compute_fn=model_tokenizer)
        else:  # the noised CLIP's own text tower reads the tokenizer it names
            parser.link_arguments(("model.tokenizer", "model.model.text_ctx", "model.bpe_dir"), "data.tokenizer_spec",
                                  compute_fn=named_tokenizer)
        parser.link_arguments("model.model.image_size", "data.image_size")
        if self.task == "diffusion":  # the upsampling / inpainting kinds' inputs (the noised CLIP has no kind)
            parser.link_arguments("model.model.kind", "data.model_kind")
        parser.set_defaults(hardware_defaults(detect_hardware()))

    def before_instantiate_classes(self) -> None:
        task = self._get(self.config, "task")
        if task != self.task:  # e.g. a task set where task_of cannot see it (a --config given as a YAML string)
            sys.exit(f"error: task {task!r} was parsed but the module of {self.task!r} was built: set task in an "
                     f"experiment file or with --task {task}")
        trainer, model = self._get(self.config, "trainer"), self._get(self.config, "model")
        optimizer = _field(model, "optimizer")
        conflict = fused_clipping_conflict(_field(optimizer, "implementation") or "auto", config_amp_clipping(trainer))
        if conflict:  # refused here, not at the first optimizer step
            sys.exit(f"error: {conflict} (trainer.precision {_field(trainer, 'precision')!r}, "
                     f"trainer.gradient_clip_val {_field(trainer, 'gradient_clip_val')})")
        accelerator = str(_field(trainer, "accelerator") or "auto")
        if accelerator in ("gpu", "cuda") and not detect_hardware().cuda:  # before the run folder or wandb exist
            raise ValueError(f"--trainer.accelerator {accelerator}: torch sees no CUDA GPU on this machine: use "
                             f"--trainer.accelerator cpu (or auto)")

    def _run_config(self) -> RunConfig:
        value = self._get(self.config_init, "run")
        return value if isinstance(value, RunConfig) else RunConfig(**value)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        if self.subcommand in ("fit", "validate") and hasattr(self.datamodule, "check_shards"):
            self.datamodule.check_shards(self.subcommand)  # a wrong data path, said before the run starts
        run = self._run_config()
        run.dir.mkdir(parents=True, exist_ok=True)
        if self.subcommand == "fit":
            self.start_run(run)  # before the loggers write anything into the run directory
        mode = resolve_wandb_mode(run.wandb_mode)
        os.environ["WANDB_MODE"] = mode
        from glide_lightning.callbacks.wandb_logging import ImagesSeen, RunWandbLogger, TrainingStats

        wandb = wandb_logger(run, mode, logger_class=RunWandbLogger)
        if self.subcommand == "fit" and mode != "disabled" and is_launching_process():
            wandb.describe(self.wandb_description(run))
        if mode == "offline":
            log.info("wandb logs offline to %s (no API key configured); upload with `wandb sync`", run.dir / "wandb")
        csv = CSVLogger(save_dir=str(run.dir), name="csv")
        trainer = self._get(self.config_init, "trainer", default={})
        # the interrupt first, so that callbacks after it see `trainer.should_stop` at the stopping step
        own = [GracefulInterrupt(), *(trainer.get("callbacks") or [])]
        callbacks = [LearningRateMonitor(logging_interval="step"), images_per_second(),
                     RunCheckpoint(run.dir / "checkpoints", every_n_train_steps=run.checkpoint_every_n_steps,
                                   resumed_from=self._get(self.config_init, "ckpt_path")),
                     ProgressLog(run_dir=str(run.dir), experiment=self.experiment), ImagesSeen(),
                     *([TrainingStats()] if mode != "disabled" else [])]
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        config = {**trainer, **kwargs, "callbacks": own, "default_root_dir": str(run.dir), "logger": [wandb, csv]}
        return self._instantiate_trainer(config, extra + callbacks + readable_progress(config, own + extra))

    def wandb_description(self, run: RunConfig) -> dict[str, Any]:
        """The wandb run config of a training session: the resolved config as ``config.yaml`` holds it (``trainer``,
        ``seed_everything``, ``run``, ``model``, ``data``, …), ``lineage`` (:func:`~glide_lightning.runs.run_lineage`:
        git commit and dirty flag, the training data manifest's sha256) and ``ablation``
        (:func:`~glide_lightning.runs.ablation`: how this arm differs from the other runs of its group)."""
        from glide_lightning.runs import ablation, run_lineage

        resolved = yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
        shards = (resolved.get("data") or {}).get("train_shards")
        return {**resolved, "lineage": run_lineage(shards), "ablation": ablation(run, resolved)}

    def start_run(self, run: RunConfig) -> None:
        """Lock the run, pick the checkpoint to resume and check the new config against it."""
        config = self.config_init[self.subcommand]
        launching = is_launching_process()  # DDP ranks > 0 follow rank 0, which did all this
        if launching:
            self.lock = lock_run(run)
        if config.get("ckpt_path") is None and run.resume:
            found = checkpoint_to_resume(run.dir)
            config["ckpt_path"] = None if found is None else str(found)
        elif config.get("ckpt_path") is None and launching:
            archived = archive_checkpoints(run.dir)
            if archived is not None:
                log.warning("--run.resume false: starting %s over; its checkpoints moved to %s", run.name, archived)
        if config.get("ckpt_path") and launching:
            dumped = yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
            check_resume(run, config["ckpt_path"], self.model.hparams, self.datamodule.hparams,
                         dumped.get("trainer") or {})

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            if config.get("weights_only") is None:
                config["weights_only"] = True  # our checkpoints hold tensors and plain data only
            step, max_steps = checkpoint_step(config["ckpt_path"]), self.trainer.max_steps
            if max_steps is not None and 0 <= max_steps <= step:  # Lightning would say only "max_steps reached"
                log.warning("%s is already at step %d and trainer.max_steps is %d: nothing to train (its weights are in "
                            "%s); raise --trainer.max_steps to train on", self._run_config().name, step, max_steps,
                            config["ckpt_path"])
                return
            log.info("resuming %s from %s at step %d (weights, optimizer, LR schedule, EMA and RNG state restored)",
                     self._run_config().name, config["ckpt_path"], step)


@dataclass(frozen=True)
class Hardware:
    """What the training CLI resolves its hardware-dependent defaults for (:func:`hardware_defaults`)."""

    cuda: bool
    """A CUDA GPU is visible (Lightning's ``accelerator: auto`` then trains on it)."""
    bf16: bool
    """That GPU computes in bf16 (Ampere and later)."""


def detect_hardware() -> Hardware:
    """This machine's :class:`Hardware` (the one place the training CLI looks at the device)."""
    cuda = torch.cuda.is_available()
    return Hardware(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())


def hardware_defaults(hardware: Hardware) -> dict[str, Any]:
    """The trainer defaults that depend on the hardware, all of them: ``bf16-mixed`` on GPUs that compute in bf16,
    ``32-true`` elsewhere (bf16 is several times slower on CPUs without AVX512-BF16, and fp16 needs its gradient
    scaler: ``16-mixed`` is opt-in). Everything else a GPU run resolves from these, in the code that CI runs on the
    CPU: the AdamW kernel (:func:`~glide_lightning.optim.adamw_kernel`: foreach when mixed precision clips
    gradients), the diffusion math in fp32 (:meth:`~glide_lightning.diffusion.GaussianDiffusion.call_model`) and the
    frozen text encoders outside autocast."""
    return {"trainer.precision": "bf16-mixed" if hardware.cuda and hardware.bf16 else "32-true"}


MIXED_PRECISIONS = ("16-mixed", "bf16-mixed", "16", "bf16", 16)
"""Lightning's ``precision`` values (and aliases) that train under its ``MixedPrecision`` plugin."""


def config_amp_clipping(trainer: Any) -> bool:
    """Whether a parsed ``trainer`` config clips gradients under Lightning's ``MixedPrecision`` plugin: a mixed
    ``precision`` (:data:`MIXED_PRECISIONS`) or that plugin in ``plugins``, with ``gradient_clip_val`` set."""
    if not _field(trainer, "gradient_clip_val"):
        return False
    plugins = _field(trainer, "plugins") or []
    plugins = plugins if isinstance(plugins, list) else [plugins]
    named = any("MixedPrecision" in str(_field(p, "class_path") or type(p).__name__) for p in plugins)
    return named or _field(trainer, "precision") in MIXED_PRECISIONS


def _field(config: Any, key: str) -> Any:
    """``config[key]`` of a parsed config node (a jsonargparse Namespace, a dict or a dataclass); None if absent."""
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


SEED = 0
"""``seed_everything``'s default (``--seed_everything N`` or ``seed_everything: N`` in an experiment picks another):
an int, so that Lightning seeds with it rather than warning "No seed found" and falling back to 0 (its own
default, ``True``, documented as a random seed, is 0 in Lightning 2.6); runs seeded before this keep their seed."""

LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
"""The start of the tip Lightning 2.6 logs on every run without its LitLogger
(``LoggerConnector.configure_logger``)."""


class _DropLogRecords(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_LITLOGGER_TIP_FILTER = _DropLogRecords(LITLOGGER_TIP)


def quiet_dependencies() -> None:
    """Silence what the dependencies print on every run that tells its user nothing about it, each message by its
    text and the module that emits it (the rest stays visible). Idempotent."""
    # torch 2.14 deprecated LeafSpec (`isinstance(treespec, LeafSpec)` ...) and Lightning 2.6.6's CombinedLoader
    # still builds one (lightning/pytorch/utilities/_pytree.py, `_tree_flatten`): nothing here to change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Lightning 2.6's LoggerConnector.configure_logger advertises its cloud LitLogger (rank_zero_info) whenever a
    # run logs elsewhere: runs here log to wandb and CSV by design
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)  # rank_zero_info logs on the one of them imported last
        if _LITLOGGER_TIP_FILTER not in logger.filters:
            logger.addFilter(_LITLOGGER_TIP_FILTER)


def main(args: list[str] | None = None) -> None:
    """Train (``fit``) or validate with ``args``, the command line after the program name (``sys.argv[1:]`` when
    None)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_dependencies()
    if args is not None and list(args) == sys.argv[1:]:
        # the front door hands over its own command line: LightningCLI reads that from sys.argv itself, and warns
        # that a script mixes the two when it gets it as `args` as well
        args = None
    try:
        cli = GlideCLI(args=args)
    except (LockBusy, ConfigDriftError, UnreadableCheckpointError) as error:
        log.error("%s", error)
        sys.exit(2)
    except NonFiniteLossError as error:
        log.error("%s", error)
        sys.exit(1)
    interrupt = next((c for c in getattr(cli.trainer, "callbacks", []) if isinstance(c, GracefulInterrupt)), None)
    if interrupt is not None and interrupt.exit_status:
        sys.exit(interrupt.exit_status)  # stopped by a signal, saved: not a finished run (see GracefulInterrupt)


def readable_progress(config: dict[str, Any], callbacks: list[Any]) -> list[Any]:
    """The progress bar counting optimizer steps out of ``max_steps`` (on a terminal: where stdout is a file, unless
    ``trainer.enable_progress_bar`` asks for it, :class:`ProgressLog`'s plain lines stand in) and the model summary
    whose FLOPs count one image's forward pass, unless switched off (``trainer.enable_progress_bar`` /
    ``enable_model_summary``) or given as callbacks already. ``config``'s ``enable_model_summary`` is turned off where the summary is added
    here (otherwise Lightning announces it skips its own)."""
    added: list[Any] = []
    if config.get("enable_progress_bar") is None and not sys.stdout.isatty():
        config["enable_progress_bar"] = False  # a log file: ProgressLog's plain lines, not a bar's frames
    if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        added.append(StepProgressBar())
    if config.get("enable_model_summary") is not False and not any(isinstance(c, LightningModelSummary)
                                                                   for c in callbacks):
        added.append(ModelSummary())
        config["enable_model_summary"] = False
    return added


def images_per_second() -> ThroughputMonitor:
    """Lightning's throughput monitor: ``train/samples_per_sec`` (images per second, all ranks; logged under DDP),
    ``train/device/samples_per_sec`` and ``train/device/flops_per_sec`` per device, and
    ``train/device/mfu`` on GPUs in Lightning's peak-FLOPs table (the module's ``flops_per_batch``,
    counted by torch's FLOP counter), each over a window of the last 5 batches."""
    from glide_lightning.callbacks.wandb_logging import count_images

    return ThroughputMonitor(batch_size_fn=count_images, window_size=5)
