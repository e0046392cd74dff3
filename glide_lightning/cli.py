"""``python -m glide_lightning fit --config experiments/<name>.yaml``: LightningCLI with run management.

On top of LightningCLI this adds a ``run`` group (name, wandb project / group / tags, where runs
live, checkpoint cadence): every run gets ``<root>/<name>/`` holding its checkpoints, the resolved
``config.yaml``, a CSV of metrics and the wandb run files; a run directory that already holds a
checkpoint is resumed (``--run.resume false`` starts over; ``--ckpt_path`` picks one explicitly).
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from glide_lightning.callbacks import GracefulInterrupt
from glide_lightning.data.datamodule import GlideDataModule
from glide_lightning.module import GlideModule

log = logging.getLogger("glide_lightning")
set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config fields' docstrings in --help

WandbMode = Literal["auto", "online", "offline", "disabled"]


@dataclass
class RunConfig:
    """Where a run lives and how it is logged."""

    name: str = "default"
    """Run name: the run directory is ``<root>/<name>`` and the wandb run is named after it."""
    root: str = "runs"
    """Directory that holds the run directories."""
    project: str = "glide_lightning"
    """wandb project."""
    group: str | None = None
    """wandb group: the ablation a run belongs to (e.g. ``minig`` for minig_simple and minig_hybrid)."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    wandb_mode: WandbMode = "auto"
    """``auto``: online when a wandb API key is configured (``WANDB_API_KEY`` or ``wandb login``),
    offline otherwise (files in the run directory; ``wandb sync`` uploads them later); or
    ``online`` / ``offline`` / ``disabled``. A ``WANDB_MODE`` environment variable wins."""
    checkpoint_every_n_steps: int = 1000
    """Keep a checkpoint every this many optimizer steps (``last.ckpt`` is refreshed at each)."""
    resume: bool = True
    """Resume from the newest checkpoint in the run directory, if there is one."""

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


def resolve_wandb_mode(mode: WandbMode) -> str:
    """The wandb mode to use: never a login prompt and never a hang without a key."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of ``run_dir`` with the most optimizer steps (``last.ckpt`` on ties)."""
    candidates = list((run_dir / "checkpoints").glob("*.ckpt"))
    best: tuple[int, int, Path] | None = None
    for path in candidates:
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception as error:  # a truncated file from a killed save: skip it, say so
            log.warning("ignoring unreadable checkpoint %s (%s)", path, error)
            continue
        key = (step, path.name == "last.ckpt", path)
        best = key if best is None or key[:2] > best[:2] else best
    return None if best is None else best[2]


def wandb_logger(run: RunConfig, mode: str, attempts: int = 6, wait_s: float = 5.0) -> WandbLogger:
    """The run's WandbLogger, continuing the run's wandb run (its id is kept in ``wandb_id.txt``).

    The wandb run starts here, on the main process, rather than lazily: right after a kill, the
    killed process's wandb service can still hold the run id for a few seconds ("run ID … is in
    use"). Then this waits and retries, and if the id stays busy, logs this session to a new wandb
    run of the same name and group, saying so, rather than failing the resume.
    """
    id_file = run.dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4))  # wandb run ids are short [a-z0-9] strings
    run_id = id_file.read_text().strip()

    def make(wandb_id: str) -> WandbLogger:
        return WandbLogger(name=run.name, project=run.project, group=run.group, tags=run.tags,
                           save_dir=str(run.dir), id=wandb_id, resume="allow")

    if mode == "disabled" or int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("RANK", 0)):
        return make(run_id)  # other ranks never start a wandb run
    for attempt in range(attempts):
        logger = make(run_id)
        try:
            logger.experiment  # noqa: B018 (starts the wandb run)
            return logger
        except Exception as error:
            if "in use" not in str(error):
                raise
            log.warning("wandb run %s is still held by a previous process (attempt %d of %d)", run_id,
                        attempt + 1, attempts)
            time.sleep(wait_s)
    fresh = secrets.token_hex(4)
    log.warning("wandb run %s stayed busy: logging this session to a new wandb run %s (same name and group)",
                run_id, fresh)
    return make(fresh)


class GlideCLI(LightningCLI):
    """LightningCLI for :class:`GlideModule` and :class:`GlideDataModule` with a ``run`` group."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(GlideModule, GlideDataModule, args=args, run=run,
                         save_config_kwargs={"overwrite": True}, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        # the model owns these knobs; the data module follows
        parser.link_arguments("model.tokenizer", "data.tokenizer")
        parser.link_arguments("model.model.text_ctx", "data.text_ctx")
        parser.link_arguments("model.model.image_size", "data.image_size")
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        # bf16 on GPUs that have it; fp32 elsewhere (bf16 is several times slower on CPUs without it)
        parser.set_defaults({"trainer.precision": "bf16-mixed" if bf16 else "32-true"})

    def _run_config(self) -> RunConfig:
        value = self._get(self.config_init, "run")
        return value if isinstance(value, RunConfig) else RunConfig(**value)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        run = self._run_config()
        run.dir.mkdir(parents=True, exist_ok=True)
        checkpoints = run.dir / "checkpoints"
        mode = resolve_wandb_mode(run.wandb_mode)
        os.environ["WANDB_MODE"] = mode
        wandb = wandb_logger(run, mode)
        if mode == "offline":
            log.info("wandb logs offline to %s (no API key configured); upload with `wandb sync`", run.dir / "wandb")
        csv = CSVLogger(save_dir=str(run.dir), name="csv")
        callbacks = [
            ModelCheckpoint(dirpath=checkpoints, filename="step{step:08d}", auto_insert_metric_name=False,
                            every_n_train_steps=run.checkpoint_every_n_steps, save_top_k=-1, save_last=True),
            GracefulInterrupt(checkpoints),
            LearningRateMonitor(logging_interval="step"),
        ]
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs,
                  "default_root_dir": str(run.dir), "logger": [wandb, csv]}
        return self._instantiate_trainer(config, extra + callbacks)

    def before_fit(self) -> None:
        run = self._run_config()
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is None and run.resume:
            found = newest_checkpoint(run.dir)
            if found is not None:
                config["ckpt_path"] = str(found)
        if config.get("ckpt_path"):
            if config.get("weights_only") is None:
                config["weights_only"] = True  # our checkpoints hold tensors and plain data only
            step = torch.load(config["ckpt_path"], map_location="cpu", weights_only=True, mmap=True)["global_step"]
            log.warning("resuming %s from %s at step %d (weights, optimizer, LR schedule, EMA and RNG state restored)",
                        run.name, config["ckpt_path"], step)


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    GlideCLI(args=args)
