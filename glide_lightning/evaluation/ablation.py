"""``python -m glide_lightning ablation <group> --seeds 0 1 2``: every arm of an ablation group × training seeds,
trained, evaluated and compared with the spread of both seeds and generated images.

An ablation group is ``experiments/ablations/<group>.yaml``::

    arms:            # arm name: the experiment configs its `fit` reads, in order (later ones win)
      hybrid: [experiments/minig_hybrid.yaml]
      simple: [experiments/minig_simple.yaml]
    eval: null       # the evaluation settings file `sweep --config` reads (experiments/eval/*.yaml); null: its defaults

The first arm is the baseline: every other arm's difference is taken against it (``other - baseline``).
Run ``<arm>_seed<k>`` of the group lives in ``<runs_root>/<group>/<arm>_seed<k>/``, trained by ``python -m
glide_lightning fit --config ... --run.name <arm>_seed<k> --run.group <group> --seed_everything k`` and evaluated by
``python -m glide_lightning sweep --config <eval> --run_dir <run>`` (subprocesses: the evaluation package never
imports the training side). Resumable: a run whose ``ablation_state.json`` says its training (or evaluation) finished
with the same command line and the same checkpoint is skipped; an unfinished one is started again, which resumes it
from its newest checkpoint (and the sweep from the images on disk).

Then, per evaluation setting, guidance scale and metric (:data:`~glide_lightning.evaluation.results.INTERVAL_METRICS`):
each arm's mean, standard deviation and t interval over its seeds, and each arm's difference from the baseline with
its interval (Welch across seeds when both arms have >= 2 seeds, else from the runs' bootstrap intervals over
generated images; :mod:`glide_lightning.evaluation.uncertainty`), and whether that interval excludes 0. They go to
``<runs_root>/<group>/ablation.json``, the markdown report ``reports/<group>.md`` (with the per-run tables and plots
of ``compare``) and the summary of a wandb run ``<group>-compare`` (``job_type="compare"``) in the group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from glide_lightning.evaluation.report import RunSummary, load_run, report_output, write_ablation_report
from glide_lightning.evaluation.results import INTERVAL_METRICS
from glide_lightning.evaluation.uncertainty import LEVEL, difference, seed_summary
from glide_lightning.runs import checkpoint_step, resolve_wandb_mode

log = logging.getLogger(__name__)

GROUPS_DIR = Path("experiments/ablations")
STATE_FILE = "ablation_state.json"
"""In each run directory: the fit and sweep command lines that finished there, and the checkpoint's step."""
GROUP_KEYS = {"arms", "eval"}


@dataclass(frozen=True)
class AblationGroup:
    """An ablation group's YAML: its arms (name → experiment configs) and evaluation settings file."""

    name: str
    arms: dict[str, list[str]]
    eval: str | None

    @classmethod
    def load(cls, group: str) -> AblationGroup:
        """``experiments/ablations/<group>.yaml`` (or ``group`` itself when it is a YAML path).

        Raises:
            FileNotFoundError: no such group, or a config file it names is missing.
            ValueError: an unknown key, fewer than 2 arms, or an arm without configs.
        """
        path = Path(group) if group.endswith((".yaml", ".yml")) else GROUPS_DIR / f"{group}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in GROUPS_DIR.glob("*.yaml"))) or "none"
            raise FileNotFoundError(f"no ablation group {path} (groups in {GROUPS_DIR}/: {known})")
        data = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(data) - GROUP_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; a group has {sorted(GROUP_KEYS)}")
        arms = data.get("arms") or {}
        if not isinstance(arms, dict) or len(arms) < 2:
            raise ValueError(f"{path}: 'arms' must map at least 2 arm names to lists of experiment configs")
        checked: dict[str, list[str]] = {}
        for arm, configs in arms.items():
            configs = [configs] if isinstance(configs, str) else list(configs or [])
            if not configs:
                raise ValueError(f"{path}: arm {arm!r} names no experiment config")
            for config in [*configs, *([data["eval"]] if data.get("eval") else [])]:
                if not Path(config).is_file():
                    raise FileNotFoundError(f"{path}: {config} not found (paths are relative to the repository root)")
            checked[str(arm)] = configs
        return cls(name=path.stem, arms=checked, eval=data.get("eval"))


@dataclass
class AblationCommand:
    """Train and evaluate every arm of an ablation group (``experiments/ablations/<group>.yaml``) × training seeds,
    resumably, then report each metric per arm over seeds (mean, std, t interval) and each arm's difference from the
    first arm with its interval (Welch over seeds, else bootstrap over generated images): ``reports/<group>.md``,
    ``<runs_root>/<group>/ablation.json`` and a wandb ``compare`` run in the group."""

    group: str
    """The ablation group: a name under ``experiments/ablations/`` (``minig``, ``ablation_smoke``) or a YAML path."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds (``--seed_everything``): every arm is trained once per seed, as run ``<arm>_seed<k>``."""
    fit_args: list[str] = field(default_factory=list)
    """Extra ``fit`` flags for every run, e.g. ``'[--trainer.max_steps, "100"]'``."""
    eval_args: list[str] = field(default_factory=list)
    """Extra ``sweep`` flags for every run, after the group's settings file, e.g. ``'[--n, "64"]'``."""
    runs_root: str = "runs"
    """Where the group's runs go: ``<runs_root>/<group>/<arm>_seed<k>/``."""
    out: str | None = None
    """The markdown report (default ``reports/<group>.md``; its plots beside it). The command owns it: it is
    rewritten on every call."""
    confidence: float = LEVEL
    """Coverage of the intervals across seeds and of the differences."""
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """The ``compare`` run's wandb mode (as ``run.wandb_mode``: ``auto`` is online only with an API key; a
    ``WANDB_MODE`` environment variable wins)."""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")

    def runs(self, group: AblationGroup) -> list[tuple[str, int, Path]]:
        """(arm, seed, run directory) of every run of the group, arm-major."""
        return [(arm, seed, Path(self.runs_root) / group.name / f"{arm}_seed{seed}")
                for arm in group.arms for seed in self.seeds]

    def fit_argv(self, group: AblationGroup, arm: str, seed: int) -> list[str]:
        """The ``fit`` command line of run ``<arm>_seed<seed>`` (after ``python -m glide_lightning``)."""
        configs = [arg for config in group.arms[arm] for arg in ("--config", config)]
        return ["fit", *configs, "--run.root", str(Path(self.runs_root) / group.name), "--run.name",
                f"{arm}_seed{seed}", "--run.group", group.name, "--seed_everything", str(seed), *self.fit_args]

    def sweep_argv(self, group: AblationGroup, run_dir: Path) -> list[str]:
        """The ``sweep`` command line of a run (``--overwrite true``: the group's runs are this command's own)."""
        config = ["--config", group.eval] if group.eval else []
        return ["sweep", *config, "--run_dir", str(run_dir), "--overwrite", "true", *self.eval_args]

    def run(self) -> dict[str, Any]:
        """Train, evaluate, summarise; returns the summary written to ``ablation.json``."""
        group = AblationGroup.load(self.group)
        for arm, seed, run_dir in self.runs(group):
            _step(run_dir, "fit", self.fit_argv(group, arm, seed), f"{group.name}: train {arm} seed {seed}")
            _step(run_dir, "sweep", self.sweep_argv(group, run_dir), f"{group.name}: evaluate {arm} seed {seed}")
        for _, _, run_dir in self.runs(group):
            complete_ablation_keys(run_dir)
        runs = {(arm, seed): load_run(run_dir) for arm, seed, run_dir in self.runs(group)}
        summary = summarize(group, self.seeds, runs, self.confidence)
        path = Path(self.runs_root) / group.name / "ablation.json"
        path.write_text(json.dumps(summary, indent=1, default=_jsonable))
        out = Path(self.out or f"reports/{group.name}.md")
        report_output(out).claim(True)
        write_ablation_report(summary, list(runs.values()), out)
        log_compare_run(group, summary, runs, self.wandb_mode, path.parent)
        print(f"wrote {out} and {path}")
        return summary


def _jsonable(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if to_dict is None:
        raise TypeError(f"not JSON: {type(value).__name__}")
    return to_dict()


def _state(run_dir: Path) -> dict[str, Any]:
    file = run_dir / STATE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _short_of_max_steps(run_dir: Path) -> tuple[int, int] | None:
    """(saved step, ``trainer.max_steps``) of a run whose last checkpoint is short of its ``max_steps``, else None."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    max_steps, step = ((config or {}).get("trainer") or {}).get("max_steps"), _last_step(run_dir)
    short = isinstance(max_steps, int) and max_steps > 0 and step is not None and step < max_steps
    return (step, max_steps) if short else None


def _last_step(run_dir: Path) -> int | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    return checkpoint_step(last) if last.is_file() else None


def _step(run_dir: Path, what: str, argv: list[str], label: str) -> bool:
    """Run ``python -m glide_lightning <argv>`` unless ``run_dir``'s state says it finished with this command line
    and the current checkpoint; records it when it finishes. Returns whether it ran.

    Raises:
        ChildProcessError: the command failed (its exit status; rerunning the ablation resumes it); an ``OSError``,
            so the front door prints it as one ``error:`` line.
    """
    done = _state(run_dir).get(what)
    if done is not None and done["argv"] == argv and done["step"] == _last_step(run_dir) and (
            what != "sweep" or any(run_dir.glob("fid/*/results.json"))):
        print(f"{label}: done already (skipped)")
        return False
    print(f"{label}: python -m glide_lightning {' '.join(argv)}", flush=True)
    # Each command gets a wandb service of its own, as when typed in a shell: once this process has used wandb
    # (a group run before, a notebook), WANDB_SERVICE in its environment would attach the child's runs to this
    # process's service, whose streams outlive the child ("run ID is in use" when a run is resumed afterwards).
    env = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}
    status = subprocess.run([sys.executable, "-m", "glide_lightning", *argv], env=env).returncode
    if status != 0:
        raise ChildProcessError(f"{label} failed (exit status {status}); run the ablation again to resume it")
    if what == "fit" and (short := _short_of_max_steps(run_dir)):  # e.g. stopped, saved and requeued by SLURM
        raise ChildProcessError(f"{label} stopped at step {short[0]} of its max_steps {short[1]} (interrupted, "
                                f"requeued or out of --trainer.max_time); run the ablation again to resume it")
    state = _state(run_dir)  # (re-read: the run directory may have just been made)
    state[what] = {"argv": argv, "step": _last_step(run_dir)}  # a sweep of other weights then no longer matches
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    return True


def summarize(group: AblationGroup, seeds: list[int], runs: dict[tuple[str, int], RunSummary],
              level: float = LEVEL) -> dict[str, Any]:
    """Per evaluation setting, guidance scale and metric: each arm's :func:`seed_summary` over its seeds and each
    non-baseline arm's :func:`difference` from the baseline (the first arm), with ``exceeds`` (interval excludes 0).
    A (setting, scale, metric) that some run lacks is left out."""
    arms = list(group.arms)
    baseline = arms[0]
    keys = sorted({(setting, r.guidance_scale) for run in runs.values() for setting, rs in run.evals.items()
                   for r in rs})
    rows = []
    for setting, scale in keys:
        found = {key: next((r for r in run.evals.get(setting, []) if r.guidance_scale == scale), None)
                 for key, run in runs.items()}
        if any(r is None for r in found.values()):
            continue
        for metric in INTERVAL_METRICS:
            values = {key: r.value(metric) for key, r in found.items()}
            if any(v is None for v in values.values()):
                continue
            per_arm = {}
            for arm in arms:
                intervals = [found[(arm, s)].interval(metric) for s in seeds]
                per_arm[arm] = seed_summary([values[(arm, s)] for s in seeds],
                                            [i.se if i is not None else None for i in intervals], level)
                per_arm[arm]["bootstrap"] = [i.to_dict() if i is not None else None for i in intervals]
            diffs = {arm: difference(per_arm[baseline], per_arm[arm], level) for arm in arms[1:]}
            rows.append({"setting": setting, "guidance": scale, "metric": metric, "arms": per_arm,
                         "differences": {arm: d.to_dict() if d is not None else None for arm, d in diffs.items()}})
    first = next(iter(runs.values()))
    labels = sorted({r.fid.label.split(":")[0] for run in runs.values() for rs in run.evals.values() for r in rs})
    return {"group": group.name, "arms": group.arms, "baseline": baseline, "eval": group.eval, "seeds": seeds,
            "confidence": level, "runs": {f"{arm}_seed{seed}": str(run.path) for (arm, seed), run in runs.items()},
            "labels": labels, "n": sorted({r.n for rs in first.evals.values() for r in rs}), "rows": rows}


def complete_ablation_keys(run_dir: Path) -> bool:
    """Bring the training run's wandb config ``ablation`` (:func:`glide_lightning.runs.ablation`: how this arm
    differs from the others of its group) up to date with every run of the group now in its folder: a run trained
    before its sibling arms existed recorded none of them. Its wandb run is resumed by id (offline: a new session
    folder, which :func:`~glide_lightning.evaluation.wandb_runs.find_runs` merges) only where the keys or the
    siblings changed. Returns whether it wrote."""
    from glide_lightning.evaluation.wandb_runs import find_runs
    from glide_lightning.runs import RunConfig, ablation, start_wandb_run

    config_file, id_file = run_dir / "config.yaml", run_dir / "wandb_id.txt"
    if not config_file.is_file() or not id_file.is_file():
        return False
    config = yaml.safe_load(config_file.read_text()) or {}
    run = RunConfig(**{k: v for k, v in (config.get("run") or {}).items() if k in RunConfig.__dataclass_fields__})
    mode = resolve_wandb_mode(run.wandb_mode)
    wandb_id = id_file.read_text().strip()
    logged = [r for r in find_runs(run_dir / "wandb") if r.id == wandb_id] if (run_dir / "wandb").is_dir() else []
    if mode == "disabled" or not logged:
        return False
    now = ablation(run, config)
    stored = logged[0].config.get("ablation") or {}
    if (stored.get("keys"), stored.get("siblings")) == (now["keys"], now["siblings"]):
        return False
    import wandb

    def start(run_id: str) -> Any:
        return wandb.init(project=run.project, group=run.group, job_type="train", id=run_id, resume="allow",
                          dir=str(run_dir), mode=mode, reinit="create_new")

    resumed = start_wandb_run(id_file, start, replace=False)  # a busy id waited for; none but this run's
    if resumed is None:
        return False
    resumed.config.update({"ablation": now}, allow_val_change=True)
    resumed.finish()
    return True


def log_compare_run(group: AblationGroup, summary: dict[str, Any], runs: dict[tuple[str, int], RunSummary],
                    mode: str, save_dir: Path) -> None:
    """The summary as a wandb run ``<group>-compare`` (``job_type="compare"``) in the group, in the arms' project:
    ``<arm>/<metric>@<scale>/<setting>`` mean, std, lo, hi and ``diff/<arm>-<baseline>/…`` estimate, lo, hi,
    exceeds, plus a ``comparison`` Table of the same rows.

    One such run per project and group, however often the ablation is rerun (after adding seeds, say): its id,
    kept in ``<save_dir>/wandb_id.txt``, is first derived from them (a hash), and the run is resumed
    (``resume="allow"``) by :func:`glide_lightning.runs.start_wandb_run` (a busy id waited for, one deleted on the
    server replaced and the new id kept). A rerun replaces its config and summary: every key compared now gets its
    value (None where there is none) and every key an earlier call logged but this one does not compare gets None
    (offline, a resumed session starts from an empty summary: the earlier keys are read from the sessions under
    ``<save_dir>/wandb``, which :func:`~glide_lightning.evaluation.wandb_runs.find_runs` merges into one run), and
    it logs the new ``comparison`` Table after the earlier ones. A wandb run already open in the process is left
    alone (``reinit="create_new"``)."""
    resolved = resolve_wandb_mode(mode)  # type: ignore[arg-type]
    if resolved == "disabled":
        return
    import wandb

    project = next((run.config.get("run", {}).get("project") for run in runs.values()), None) or "glide_lightning"
    flat: dict[str, Any] = {}
    table = wandb.Table(columns=["setting", "guidance", "metric", "arm", "seeds", "mean", "std", "lo", "hi",
                                 "difference", "diff_lo", "diff_hi", "exceeds"])
    for row in summary["rows"]:
        where = f"{row['metric']}@{row['guidance']:g}/{row['setting']}"
        for arm, s in row["arms"].items():
            interval = s["interval"] or _bootstrap_of(s)
            flat.update({f"{arm}/{where}": s["mean"], f"{arm}/{where}_std": s["std"],
                         f"{arm}/{where}_lo": interval.lo if interval else None,
                         f"{arm}/{where}_hi": interval.hi if interval else None})
            d = row["differences"].get(arm)
            if d is not None:
                key = f"diff/{arm}-{summary['baseline']}/{where}"
                flat.update({key: d["estimate"], f"{key}_lo": d["interval"]["lo"], f"{key}_hi": d["interval"]["hi"],
                             f"{key}_exceeds": d["exceeds"]})
            table.add_data(row["setting"], row["guidance"], row["metric"], arm, s["n"], s["mean"], s["std"],
                           interval.lo if interval else None, interval.hi if interval else None,
                           d["estimate"] if d else None, d["interval"]["lo"] if d else None,
                           d["interval"]["hi"] if d else None, d["exceeds"] if d else None)
    from glide_lightning.evaluation.wandb_runs import find_runs
    from glide_lightning.runs import start_wandb_run

    config = {"arms": group.arms, "eval": group.eval, "seeds": summary["seeds"], "baseline": summary["baseline"],
              "confidence": summary["confidence"], "runs": summary["runs"]}
    save_dir.mkdir(parents=True, exist_ok=True)
    id_file = save_dir / "wandb_id.txt"
    if not id_file.is_file():
        id_file.write_text(hashlib.sha256(f"{project}/{group.name}".encode()).hexdigest()[:12])
    logged = {k for r in (find_runs(save_dir / "wandb") if (save_dir / "wandb").is_dir() else [])
              if r.job_type == "compare" for k in r.summary}

    def start(wandb_id: str) -> Any:
        return wandb.init(project=project, group=group.name, name=f"{group.name}-compare", job_type="compare",
                          id=wandb_id, resume="allow", dir=str(save_dir), mode=resolved, reinit="create_new")

    run = start_wandb_run(id_file, start)
    try:
        run.config.update(config, allow_val_change=True)  # over a resumed run's: this call's seeds and runs
        stale = (logged | set(run.summary.keys())) - flat.keys()  # online, a resumed run keeps its summary
        run.log({"comparison": table})
        run.summary.update({**{k: None for k in stale if not k.startswith("_") and k != "comparison"}, **flat})
    finally:
        run.finish()


def _bootstrap_of(arm_summary: dict[str, Any]) -> Any:
    """A single-seed arm's bootstrap interval (None when it has several seeds or none was computed)."""
    from glide_lightning.evaluation.uncertainty import Interval

    boots = arm_summary.get("bootstrap") or []
    return Interval.from_dict(boots[0]) if len(boots) == 1 and boots[0] is not None else None
