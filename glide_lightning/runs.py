"""Run directories: where a run lives, its lock, its newest checkpoint, its wandb run, what a resume may
change, and the RNG state a resumed run restores (:func:`capture_rng_state`, kept in its checkpoints).

``<root>/<name>/`` holds ``checkpoints/`` (``last.ckpt``, always the newest state, and
``step<N>.ckpt``), ``config.yaml`` (earlier versions kept as ``config.v1.yaml``, …),
``config_changes.jsonl`` (settings changed by resumes), ``csv/``, ``wandb/`` and ``.lock`` (the one
process training it). No LightningCLI here: the training CLI and the evaluation commands both use it.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from glide_lightning.locks import DirectoryLock

log = logging.getLogger("glide_lightning")
T = TypeVar("T")

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
    """Keep a checkpoint every this many optimizer steps (``last.ckpt`` is refreshed at each, and
    wherever training stops)."""
    resume: bool = True
    """Resume from the newest checkpoint in the run directory, if there is one (refused if the model,
    diffusion or tokenizer settings differ from the checkpoint's). ``false`` starts the run over: its
    checkpoints move to ``checkpoints.v<N>/``."""

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


def is_launching_process() -> bool:
    """True in the process a user started; False in the per-rank processes a DDP launcher (Lightning's,
    torchrun) starts for ranks other than 0, which must not lock, check or write run files."""
    return not int(os.environ.get("LOCAL_RANK", 0)) and not int(os.environ.get("RANK", 0))


def lock_run(run: RunConfig) -> DirectoryLock:
    """The run directory's lock (``LockBusy`` names the process that trains it already)."""
    return DirectoryLock(run.dir, f"run {run.name!r}: its directory").acquire()


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
    """The readable checkpoint of ``run_dir`` with the most optimizer steps (``last.ckpt`` on ties), or None."""
    readable, _ = scan_checkpoints(run_dir)
    return readable[0] if readable else None


def scan_checkpoints(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``run_dir``'s checkpoints: the readable ones, most optimizer steps first (``last.ckpt`` first on ties),
    and the unreadable ones (a truncated or damaged file) with the reason."""
    readable: list[tuple[int, bool, Path]] = []
    unreadable: list[tuple[Path, str]] = []
    for path in sorted((Path(run_dir) / "checkpoints").glob("*.ckpt")):
        try:
            readable.append((checkpoint_step(path), path.name == "last.ckpt", path))
        except Exception as error:  # noqa: BLE001 - any failure to read it makes it unusable
            unreadable.append((path, f"{type(error).__name__}: {error}".splitlines()[0][:200]))
    readable.sort(key=lambda item: item[:2], reverse=True)
    return [path for *_, path in readable], unreadable


class UnreadableCheckpointError(RuntimeError):
    """A run to resume has checkpoints, none of which can be read."""


def checkpoint_to_resume(run_dir: Path) -> Path | None:
    """The checkpoint a resume of ``run_dir`` starts from: the newest readable one, or None for a run without any.

    An unreadable checkpoint (e.g. ``last.ckpt`` truncated by a full disk) is never overwritten and never skipped
    silently: it is moved aside as ``<name>.unreadable`` (kept for recovery; training would otherwise write a new
    ``last.ckpt`` over it) and the resume says plainly which checkpoint it continues from instead.

    Raises:
        UnreadableCheckpointError: checkpoints exist but none is readable: the run is not restarted from step 0
            behind the user's back (the message offers ``--run.resume false``, which keeps them in
            ``checkpoints.v<N>/``). Nothing is moved then.
    """
    readable, unreadable = scan_checkpoints(run_dir)
    if unreadable and not readable:
        listed = "; ".join(f"{path.name}: {reason}" for path, reason in unreadable)
        raise UnreadableCheckpointError(
            f"cannot resume {Path(run_dir).name}: none of its checkpoints can be read ({listed}). Nothing was changed. "
            f"Start the run over with --run.resume false (the damaged files are kept in checkpoints.v<N>/), or train "
            f"under another --run.name")
    for path, reason in unreadable:
        aside = path.with_name(f"{path.name}.unreadable")
        if aside.exists():  # an earlier one kept: last.ckpt.unreadable2, …
            aside = _next_version(path.parent, f"{path.name}.unreadable{{}}")
        path.rename(aside)
        log.warning("%s cannot be read (%s): moved to %s, and %s resumes from %s instead", path, reason, aside.name,
                    Path(run_dir).name, readable[0].name)
    return readable[0] if readable else None


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def archive_checkpoints(run_dir: Path) -> Path | None:
    """Move ``checkpoints/`` aside as ``checkpoints.v<N>/`` (a run started over), if it holds any."""
    checkpoints = run_dir / "checkpoints"
    if not any(checkpoints.glob("*.ckpt")):
        return None
    target = _next_version(run_dir, "checkpoints.v{}")
    checkpoints.rename(target)
    return target


def wandb_id(id_file: Path) -> str:
    """The wandb run id ``id_file`` keeps, a new one written there first when it holds none."""
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4))  # wandb run ids are short [a-z0-9] strings
    return id_file.read_text().strip()


def start_wandb_run(id_file: Path, start: Callable[[str], T], attempts: int = 6, wait_s: float = 5.0,
                    replace: bool = True) -> T | None:
    """``start(wandb_id)``, the wandb run ``id_file`` keeps the id of (a new id written there first when it holds
    none) started or resumed, whatever ``start`` returns.

    Right after a kill, the killed process's wandb service can still hold the id ("run ID … is in use"): this
    waits ``wait_s`` and retries, and if the id stays busy for ``attempts`` tries, starts this session as a new
    wandb run (a new id; the same name and group), saying so, rather than failing. A run deleted on the server
    ("previously created and deleted") can never be resumed: it starts a new run at once, and ``id_file`` keeps the
    new id from then on. With ``replace`` False (a write that only makes sense on that very run) both cases
    return None instead, with a warning. Other errors are raised."""
    run_id = wandb_id(id_file)
    for attempt in range(attempts):
        try:
            return start(run_id)
        except Exception as error:
            if "previously created and deleted" in str(error):
                if not replace:
                    log.warning("wandb run %s was deleted on the server: not updated", run_id)
                    return None
                fresh = secrets.token_hex(4)
                log.warning("wandb run %s was deleted on the server: this run logs to a new wandb run %s from now on "
                            "(same name and group)", run_id, fresh)
                id_file.write_text(fresh)
                return start(fresh)
            if "in use" not in str(error):
                raise
            log.warning("wandb run %s is still held by a previous process (attempt %d of %d)", run_id,
                        attempt + 1, attempts)
            time.sleep(wait_s)
    if not replace:
        log.warning("wandb run %s stayed busy: not updated", run_id)
        return None
    fresh = secrets.token_hex(4)
    log.warning("wandb run %s stayed busy: logging this session to a new wandb run %s (same name and group)",
                run_id, fresh)
    return start(fresh)


def wandb_logger(run: RunConfig, mode: str, attempts: int = 6, wait_s: float = 5.0, job_type: str = "train",
                 logger_class: type | None = None) -> Any:
    """The run's WandbLogger, continuing the run's wandb run (its id is kept in ``wandb_id.txt``), in the wandb group
    ``run.group`` with ``job_type`` (``train``: evaluations of the run log ``eval`` runs to the same group), in
    wandb ``mode``.
    ``logger_class``: a ``WandbLogger`` subclass to build (the training CLI's ``RunWandbLogger``); None: Lightning's.

    The wandb run starts here, on the main process, rather than lazily, through :func:`start_wandb_run` (a busy
    id is waited for, a deleted one replaced). Lightning's logger takes over a wandb run already open in the
    process: call it where none is (the training CLI).
    """
    from lightning.pytorch.loggers import WandbLogger

    cls = logger_class or WandbLogger
    id_file = run.dir / "wandb_id.txt"

    def make(run_id: str) -> WandbLogger:
        logger = cls(name=run.name, project=run.project, group=run.group, tags=run.tags,
                     save_dir=str(run.dir), id=run_id, resume="allow", job_type=job_type, mode=mode)
        # Lightning passes anonymous=None to wandb.init, which wandb >= 0.19 answers with "The anonymous setting
        # has no effect" on every run: leave the setting out (None is its default anyway)
        if getattr(logger, "_wandb_init", {}).get("anonymous", "") is None:
            del logger._wandb_init["anonymous"]
        return logger

    def started(run_id: str) -> WandbLogger:
        logger = make(run_id)
        logger.experiment  # noqa: B018 (starts the wandb run)
        return logger

    if mode == "disabled" or not is_launching_process():  # other ranks never start a wandb run
        return make(wandb_id(id_file))
    return start_wandb_run(id_file, started, attempts, wait_s)


# ----------------------------------------------------------------------------- lineage and ablation
GIT_TIMEOUT_S = 10.0
"""How long each git command of :func:`git_lineage` may take, seconds."""
ABLATION_IGNORED = ("run.name", "run.resume", "ckpt_path", "weights_only", "seed_everything")
"""Settings that differ between the arms of an ablation without being what it compares: the name (and the paths that
hold it, see :func:`ablation`), how a session started, and the seed (listed on its own)."""


def git_lineage(source_dir: str | os.PathLike[str] | None = None, timeout_s: float = GIT_TIMEOUT_S) -> dict[str, Any]:
    """The git state of the code that trains: ``git_commit`` (HEAD's sha), ``git_dirty`` (tracked files differ from
    it) and ``git_reason``, None when both are known, else why they are None: not a git checkout (an installed
    package), the source not tracked by the checkout around it, no commit yet, git not installed, or a git command
    that took more than ``timeout_s`` seconds. ``source_dir``: the ``glide_lightning`` package's folder by default.
    Never raises."""
    import subprocess

    source = Path(source_dir) if source_dir is not None else Path(__file__).resolve().parent
    state: dict[str, Any] = {"git_commit": None, "git_dirty": None, "git_reason": None}

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=timeout_s,
                              check=False, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        if done.returncode:
            first = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
            raise LookupError(f"git {args[0]}: {first}")
        return done.stdout.strip()

    top = None
    try:
        top = git("rev-parse", "--show-toplevel")
        if not git("ls-files", "--", "."):
            state["git_reason"] = f"{source} is not tracked by the git checkout at {top}"
            return state
        state["git_commit"] = git("rev-parse", "HEAD")
        state["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        state["git_reason"] = "git is not installed (no git executable on PATH)"
    except subprocess.TimeoutExpired as error:
        state["git_reason"] = f"{' '.join(error.cmd[:2])} took more than {timeout_s:g} s"
    except (LookupError, OSError) as error:
        state["git_reason"] = (f"{source} is not a git checkout ({error})" if top is None else
                               f"the git checkout at {top} has no readable state ({error})")  # e.g. no commit yet
    if state["git_reason"]:
        state["git_commit"] = state["git_dirty"] = None
    return state


def manifest_lineage(train_shards: str | list[str] | None) -> dict[str, Any]:
    """The training data's ``manifest.json`` (written by every ``data`` recipe beside its shards): ``data_manifests``,
    the sha256 of each shard folder's manifest (None where a folder has none); ``data_manifest_sha256``, that of the
    only folder's; ``data_reason``, None when that is known, else why not (no manifest, several folders, remote
    shards, shards that do not exist). Never raises."""
    from glide_lightning.data.datamodule import expand_shards
    from glide_lightning.data.shards import MANIFEST_NAME, sha256_file

    state: dict[str, Any] = {"data_manifests": {}, "data_manifest_sha256": None, "data_reason": None}
    if not train_shards:
        state["data_reason"] = "no data.train_shards"
        return state
    try:
        urls = expand_shards(train_shards)
    except (FileNotFoundError, ValueError) as error:
        state["data_reason"] = f"the shards cannot be listed: {error}"
        return state
    remote = [u for u in urls if not u.startswith("file:") and ("://" in u or u.startswith("pipe:"))]
    local = [u.removeprefix("file:") for u in urls if u not in remote]
    folders = list(dict.fromkeys(str(Path(u).expanduser().resolve().parent) for u in local))
    for folder in folders:
        try:
            state["data_manifests"][folder] = sha256_file(Path(folder) / MANIFEST_NAME)
        except OSError:  # none (or unreadable)
            state["data_manifests"][folder] = None
    if len(local) < len(urls):
        state["data_reason"] = f"{len(urls) - len(local)} of the {len(urls)} shards are remote: no manifest read"
    elif len(folders) != 1:
        state["data_reason"] = f"shards from {len(folders)} folders: see data_manifests"
    elif state["data_manifests"][folders[0]] is None:
        state["data_reason"] = f"no {MANIFEST_NAME} in {folders[0]}"
    else:
        state["data_manifest_sha256"] = state["data_manifests"][folders[0]]
    return state


def run_lineage(train_shards: str | list[str] | None,
                source_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What a run's results descend from: :func:`git_lineage` and :func:`manifest_lineage` together."""
    return {**git_lineage(source_dir), **manifest_lineage(train_shards)}


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A resolved config as dotted keys: ``{"model": {"diffusion": {"steps": 100}}}`` → ``{"model.diffusion.steps":
    100}``; lists of mappings (``trainer.callbacks``) by index (``trainer.callbacks.1.init_args.every_n_steps``),
    other lists as values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            flat.update(flat_config({str(i): v for i, v in enumerate(value)}, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def ablation(run: RunConfig, config: Mapping[str, Any]) -> dict[str, Any]:
    """How this run (resolved ``config``) differs from its sibling arms: the other run folders under ``run.root``
    whose ``config.yaml`` has the same ``run.group``.

    Returns ``group``; ``siblings`` (folder names); ``keys``, the dotted settings (:func:`flat_config`) in which
    any sibling differs from this run, :data:`ABLATION_IGNORED` left out, and a path whose components name the run
    (``runs/<name>/best``) compared with that name replaced; ``values``: per key, each run's value (this one's
    included, None where a config lacks the key); ``arm``: this run's values of those keys, ``key=value, …`` (to
    group runs by in wandb); ``seed``: each run's ``seed_everything``. Unreadable sibling configs are skipped.
    """
    import yaml

    mine = flat_config(config)
    found: dict[str, Any] = {"group": run.group, "siblings": [], "keys": [], "values": {}, "arm": "",
                             "seed": {run.name: config.get("seed_everything")}}
    if not run.group:
        return found
    siblings: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(run.root).glob("*/config.yaml")):
        if path.parent.name == run.name:
            continue
        try:
            other = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(other, dict) and (other.get("run") or {}).get("group") == run.group:
            siblings[path.parent.name] = other
            found["seed"][path.parent.name] = other.get("seed_everything")
    found["siblings"] = sorted(siblings)
    flats = {name: flat_config(other) for name, other in siblings.items()}
    keys = sorted(set(mine).union(*flats.values()) - set(ABLATION_IGNORED))
    found["keys"] = [k for k in keys if any(_named(mine.get(k), run.name) != _named(flat.get(k), name)
                                            for name, flat in flats.items())]
    found["values"] = {k: {run.name: mine.get(k), **{name: flat.get(k) for name, flat in flats.items()}}
                       for k in found["keys"]}
    found["arm"] = ", ".join(f"{k}={mine.get(k)}" for k in found["keys"])
    return found


def _named(value: Any, name: str) -> Any:
    """``value`` with the path components equal to the run's ``name`` replaced by a placeholder (in paths only: a
    setting that happens to equal the name, ``kind: base`` of a run named ``base``, stays as it is)."""
    if isinstance(value, str) and "/" in value:
        return "/".join("<run>" if part == name else part for part in value.split("/"))
    if isinstance(value, list):
        return [_named(v, name) for v in value]
    return value


# ------------------------------------------------------------------------------------ config drift
REFUSED = ("model.model.", "model.diffusion.", "model.tokenizer", "model.timestep_sampler",
           "data.tokenizer_spec.name", "data.tokenizer_spec.text_ctx", "data.tokenizer_spec.path",
           "data.tokenizer_spec.revision", "data.image_size")
"""Settings the checkpoint's weights (or its timestep sampler state) were trained for: a resume may
not change them (the data module's tokenizer but where its GPT-2 BPE files are, ``data.tokenizer_spec.bpe_dir``:
a path on this machine, warned about). An older checkpoint's flat ``data.tokenizer`` / ``data.text_ctx`` are
compared in this form (``migrations.nest_tokenizer_spec``)."""
IGNORED = ("model.init_from",)
"""Settings that only matter when a run starts."""
TRAINER_WARNED = ("trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm",
                  "trainer.precision", "trainer.devices", "trainer.num_nodes", "trainer.strategy")
"""Trainer settings (not in the checkpoint's hyper-parameters; compared with the previous
``config.yaml``) that change the optimisation: warned about and recorded like the optimizer's."""


@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {self.old!r} → {self.new!r}"


class ConfigDriftError(ValueError):
    """A resume would change settings the checkpoint was trained with."""


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"<prefix>.a.b": 1}``; tuples as lists; keys starting with ``_`` left out."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not str(key).startswith("_"):
                out.update(flatten(f"{prefix}.{key}", item))
        return out
    if isinstance(value, tuple):
        value = list(value)
    return {prefix: value}


def changes(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None) -> list[Change]:
    """Fields present in both flat mappings (or in ``keys``) whose values differ."""
    names = sorted(set(old) & set(new)) if keys is None else [k for k in keys if k in old and k in new]
    return [Change(k, old[k], new[k]) for k in names if old[k] != new[k]]


def check_resume(run: RunConfig, checkpoint_path: str | os.PathLike[str], model_hparams: Mapping[str, Any],
                 data_hparams: Mapping[str, Any], trainer_config: Mapping[str, Any]) -> list[Change]:
    """Compare a resume's settings with the checkpoint's (brought to the current form first:
    ``migrations.migrate_hyper_parameters``, so an old spelling of the same setting is no change); refuse
    (``ConfigDriftError``) model, diffusion and tokenizer changes; warn about and record (``config_changes.jsonl``)
    the other ones; return those."""
    from glide_lightning.migrations import migrate_hyper_parameters

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    # the checkpoint's settings in the current form (fields added since, the current spelling), as the run reads them
    migrate_hyper_parameters(checkpoint, where=str(checkpoint_path))
    old = {**flatten("model", checkpoint.get("hyper_parameters", {})),
           **flatten("data", checkpoint.get("datamodule_hyper_parameters", {}))}
    new = {**flatten("model", model_hparams), **flatten("data", data_hparams)}
    found = [c for c in changes(old, new) if not c.field.startswith(IGNORED)]
    previous = run.dir / "config.yaml"
    if previous.is_file():
        import yaml

        found += changes(flatten("trainer", (yaml.safe_load(previous.read_text()) or {}).get("trainer", {})),
                         flatten("trainer", trainer_config), TRAINER_WARNED)
    refused = [c for c in found if c.field.startswith(REFUSED)]
    step = int(checkpoint["global_step"])
    if refused:
        raise ConfigDriftError(
            f"run {run.name!r} ({run.dir}) has a checkpoint at step {step} ({Path(checkpoint_path).name}) trained with "
            "other model, diffusion or tokenizer settings; resuming it would change:\n"
            + "\n".join(f"  {c}" for c in refused)
            + f"\nStart a new run (--run.name {run.name}_2), start this one over (--run.resume false: its checkpoints "
            "move to checkpoints.v<N>/), or drop these overrides.")
    if found:
        log.warning("resuming run %r at step %d with changed settings (recorded in %s):\n%s", run.name, step,
                    run.dir / "config_changes.jsonl", "\n".join(f"  {c}" for c in found))
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, "checkpoint": str(checkpoint_path),
                  "changes": [{"field": c.field, "old": c.old, "new": c.new} for c in found]}
        with (run.dir / "config_changes.jsonl").open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    return found


def write_versioned(path: Path, text: str) -> Path | None:
    """Write ``text`` to ``path``, first keeping a different earlier content as ``<stem>.v<N><suffix>``;
    returns where the earlier version went (None: there was none, or it was the same)."""
    kept = None
    if path.is_file() and path.read_text() != text:
        kept = _next_version(path.parent, f"{path.stem}.v{{}}{path.suffix}")
        path.rename(kept)
    if kept is not None or not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(text)
        os.replace(tmp, path)
    return kept


def _next_version(directory: Path, pattern: str) -> Path:
    n = 1
    while (directory / pattern.format(n)).exists():
        n += 1
    return directory / pattern.format(n)


# ----------------------------------------------------------------------------- RNG state of a resume
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain lists (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the Python, NumPy and torch (and CUDA, where both have it) RNG states of :func:`capture_rng_state`."""
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """random.setstate needs tuples where a checkpoint may hold lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
