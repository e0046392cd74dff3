"""The training CLI end to end, in subprocesses as users run it: smoke fit, resume after a kill,
graceful SIGINT / SIGTERM, 2-process DDP, and every shipped experiment's YAML."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from glide_lightning.diffusion import DiffusionConfig
from glide_lightning.models import ModelConfig
from glide_lightning.models.clip import NoisedCLIPConfig
from glide_lightning.optim import OptimizerConfig
from hang_guard import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_API_KEY")}
    env.update(WANDB_MODE="offline", WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb_data"), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests/helpers"), env.get("PYTHONPATH", "")]))
    return env


def parse_in_process(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m glide_lightning fit … --print_config`` run in this process (the same ``main``, with ``sys.argv``
    and the working directory it would have): its exit status, stdout and stderr as the interpreter would leave
    them (a ``SystemExit`` with a message prints it to stderr, status 1). For commands that only parse: the
    ~7 s import of a fresh interpreter is most of such a command's cost. Only the ``fit`` subcommand's parser is
    built (LightningCLI builds fit, validate, test and predict ones otherwise; fit's is the same either way)."""
    from glide_lightning.cli import GlideCLI
    from glide_lightning.commands import main

    assert args[0] == "fit" and "--print_config" in args, args
    out, err, code = io.StringIO(), io.StringIO(), None
    environ = dict(os.environ)
    only_fit = {"fit": GlideCLI.subcommands()["fit"]}
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["glide_lightning", *args])
        patch.setattr(GlideCLI, "subcommands", staticmethod(lambda: only_fit))
        try:
            main(args)
        except SystemExit as exit_:
            code = exit_.code
        finally:
            os.environ.clear()
            os.environ.update(environ)
    if code is not None and not isinstance(code, int):
        print(code, file=err)
        code = 1
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def smoke_command(shards: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "glide_lightning", "fit", "--config", str(REPO / "experiments/smoke.yaml"),
            "--data.train_shards", f"{shards}/train-*.tar", "--data.val_shards", f"{shards}/val-*.tar",
            "--data.num_workers", "0", "--data.batch_size", "4", "--run.root", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1", *extra]


def probe_config(tmp_path: Path, *callbacks: dict) -> str:
    """An extra --config that keeps smoke's EMA and adds test probes (a later --config replaces lists)."""
    path = tmp_path / "probes.yaml"
    ema = {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.99}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [ema, *callbacks]}}))
    return str(path)


def read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def test_smoke_fit_through_the_cli(synthetic_shards, tmp_path):
    run = subprocess.run(smoke_command(synthetic_shards, tmp_path, "--trainer.max_steps", "7",
                                       "--trainer.val_check_interval", "6", "--run.checkpoint_every_n_steps", "3"),
                         env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step00000003.ckpt", "step00000006.ckpt"]
    last = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 7, "last.ckpt holds the step the run ended at, not the last periodic one"
    assert "current_model_state" in last  # EMA weights + the raw ones
    # the raw weights are the optimizer's own, not the average Lightning's EMA copies over them at the end
    assert any(not torch.equal(last["current_model_state"][k], v) for k, v in last["state_dict"].items())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["diffusion"]["loss_type"] == "hybrid"
    rows = read_csv_metrics(run_dir)
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/mse", "train/vb", "train/loss_q0", "val/loss", "val/vb_q3", "data/skipped"} <= logged
    # Lightning's ThroughputMonitor: images per second, and FLOPs per second from the module's count
    # (one process: the per-device figures; Lightning adds the all-rank train/samples_per_sec under DDP only)
    assert {"train/device/samples_per_sec", "train/device/flops_per_sec"} <= logged
    assert len([r for r in rows if r.get("val/loss")]) == 1  # validation at step 6
    # the experiment's GenerationMetrics: offline adherence and a labelled random-feature FID
    assert {"val/fid@1", "val/fid@3", "val/adherence@3", "val/fid_random_weights"} <= logged
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))
    assert "wandb logs offline" in run.stderr
    # progress for a log (stdout is not a terminal here): plain lines, then where the result is and what to run
    assert re.search(r"step 1/7 \(14\.3%\) · .*elapsed", run.stderr), run.stderr[-3000:]
    closing = next(line for line in run.stderr.splitlines() if "training stopped at step 7" in line)
    # a run outside ./runs (make's RUN= cannot reach it): the fid command with its folder
    assert str(run_dir / "checkpoints/last.ckpt") in closing and f"fid --run_dir {run_dir}" in closing


# what a run printed before it was made quiet, each caused by how the project used its dependencies (or a
# dependency's noise filtered at the CLI's start): glide_lightning/cli.py's quiet_dependencies and main, RunCheckpoint
SILENCED = {"args and command line arguments": "LightningCLI given sys.argv as args as well",
            "No seed found": "seed_everything left to Lightning's guess",
            "litlogger": "Lightning's LitLogger tip",
            "isinstance(treespec, LeafSpec)": "torch's LeafSpec deprecation, in Lightning's CombinedLoader",
            "exists and is not empty": "ModelCheckpoint's warning about the run's own checkpoint directory",
            "The anonymous setting has no effect": "wandb, told anonymous=None by Lightning's WandbLogger",
            "Epoch 0/-2": "Lightning's bar counting an epoch's batches of a step-based run",
            "Total FLOPs: 0": "the model summary without an example input"}


def test_a_run_and_its_resume_print_none_of_the_silenced_warnings(synthetic_shards, tmp_path):
    env = {**cli_env(tmp_path), "WANDB_MODE": "offline"}  # wandb's own warnings are printed too
    command = smoke_command(synthetic_shards, tmp_path, "--trainer.limit_val_batches", "0",
                            "--run.checkpoint_every_n_steps", "1")
    first = subprocess.run(command + ["--trainer.max_steps", "2"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=HANG_GUARD_S)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run(command + ["--trainer.max_steps", "4"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stderr  # it did resume, into the checkpoint directory it left
    again = subprocess.run(command + ["--trainer.max_steps", "4"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is already at step 4 and trainer.max_steps is 4: nothing to train" in again.stderr, again.stderr[-3000:]
    for run in (first, resumed, again):
        printed = run.stdout + run.stderr
        assert not re.search(r"step ━", printed), "stdout is a file here: plain progress lines, not a bar's frames"
        assert "Seed set to 0" in printed  # the seed is still said, and set
        shown = {message: why for message, why in SILENCED.items() if message in printed}
        assert not shown, f"{shown}\n{printed[-5000:]}"


def test_a_checkpoint_directory_of_another_lineage_is_still_warned_about(tmp_path):
    """The "exists and is not empty" warning stays where it says something: a session that does not resume from the
    checkpoints already in the directory (a --ckpt_path elsewhere) and will write its own among them."""
    from types import SimpleNamespace

    from glide_lightning.callbacks import BestCheckpoint, RunCheckpoint

    (tmp_path / "run/checkpoints/best").mkdir(parents=True)
    (tmp_path / "run/checkpoints/last.ckpt").touch()
    (tmp_path / "run/checkpoints/best/best_val_loss-step00000002.ckpt").touch()
    for resumed_from in (tmp_path / "run/checkpoints/last.ckpt", tmp_path / "other/checkpoints/last.ckpt", None):
        run = RunCheckpoint(tmp_path / "run/checkpoints", 1, resumed_from=resumed_from)
        trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda x: x), is_global_zero=True,
                                  default_root_dir=str(tmp_path / "run"), callbacks=[run])
        for callback in (run, BestCheckpoint()):  # the run's best/ (BestCheckpoint's default) follows the run
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                callback.setup(trainer, None, "fit")
            warned = [w for w in caught if "exists and is not empty" in str(w.message)]
            assert len(warned) == (resumed_from != tmp_path / "run/checkpoints/last.ckpt"), (callback, resumed_from)


def test_resume_refuses_architecture_drift_and_records_optimisation_drift(synthetic_shards, tmp_path):
    env = cli_env(tmp_path)
    first = subprocess.run(smoke_command(synthetic_shards, tmp_path, "--trainer.max_steps", "2",
                                         "--trainer.val_check_interval", "1000", "--trainer.num_sanity_val_steps", "0"),
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    config = (run_dir / "config.yaml").read_bytes()
    last = (run_dir / "checkpoints/last.ckpt").read_bytes()
    refused = subprocess.run(smoke_command(synthetic_shards, tmp_path, "--trainer.max_steps", "4",
                                           "--model.model.model_channels", "64", "--model.diffusion.steps", "1000"),
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert refused.returncode == 2
    assert "model.model.model_channels: 32 → 64" in refused.stderr
    assert "model.diffusion.steps: 100 → 1000" in refused.stderr
    assert "Start a new run (--run.name smoke_2)" in refused.stderr and "--run.resume false" in refused.stderr
    assert "size mismatch" not in refused.stderr and "Traceback" not in refused.stderr
    assert (run_dir / "config.yaml").read_bytes() == config and not list(run_dir.glob("config.v*.yaml"))
    assert (run_dir / "checkpoints/last.ckpt").read_bytes() == last
    warned = subprocess.run(smoke_command(synthetic_shards, tmp_path, "--trainer.max_steps", "3",
                                          "--trainer.val_check_interval", "1000", "--trainer.num_sanity_val_steps",
                                          "0", "--data.batch_size", "6", "--model.optimizer.lr", "5e-4"),
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert warned.returncode == 0, warned.stderr[-3000:]
    assert "with changed settings" in warned.stderr and "data.batch_size: 4 → 6" in warned.stderr
    record = json.loads((run_dir / "config_changes.jsonl").read_text())
    assert record["step"] == 2 and {c["field"] for c in record["changes"]} == {"data.batch_size", "model.optimizer.lr"}
    assert yaml.safe_load((run_dir / "config.v1.yaml").read_text())["data"]["batch_size"] == 4  # the earlier one
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["batch_size"] == 6
    assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_a_nonfinite_loss_stops_the_run_and_never_reaches_a_checkpoint(synthetic_shards, tmp_path):
    run = subprocess.run(smoke_command(synthetic_shards, tmp_path, "--model.optimizer.lr", "1e5",
                                       "--model.optimizer.warmup_steps", "0", "--model.max_nonfinite_steps", "3",
                                       "--trainer.max_steps", "60", "--run.checkpoint_every_n_steps", "2",
                                       "--trainer.val_check_interval", "1000", "--trainer.num_sanity_val_steps", "0"),
                         env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "were all non-finite (3 in a row, model.max_nonfinite_steps=3)" in run.stderr
    assert re.search(r"loss: \[[^\]]*(nan|inf)[^\]]*\] \(\d of 4 non-finite\)", run.stderr)
    assert "vb: [" in run.stderr and "t: [" in run.stderr
    checkpoints = sorted((tmp_path / "smoke/checkpoints").glob("*.ckpt"))
    assert checkpoints
    for path in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "current_model_state"):
            for name, value in checkpoint[key].items():
                assert torch.isfinite(value).all(), f"{path.name} {key} {name}"
        for state in checkpoint["optimizer_states"][0]["state"].values():
            assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
    skipped = [float(r["train/nonfinite_steps"]) for r in read_csv_metrics(tmp_path / "smoke")
               if r.get("train/nonfinite_steps")]
    assert skipped[0] == 0.0 and {1.0, 2.0} <= set(skipped)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = HANG_GUARD_S) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before {path.name} appeared:\n"
                                 + process.stderr.read()[-3000:])
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


def assert_resumed_state(probe_file: Path, checkpoint: dict) -> None:
    probe = torch.load(probe_file, map_location="cpu", weights_only=True)
    assert probe["global_step"] == checkpoint["global_step"]
    for key, value in checkpoint["current_model_state"].items():  # the raw (trained) weights
        torch.testing.assert_close(probe["model"][key], value, rtol=0, atol=0)
    for key, value in checkpoint["state_dict"].items():  # the EMA weights
        torch.testing.assert_close(probe["ema"][key], value, rtol=0, atol=0)
    saved = checkpoint["optimizer_states"][0]["state"]
    assert saved and saved.keys() == probe["optimizer"]["state"].keys()
    for index, state in saved.items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(probe["optimizer"]["state"][index][name], state[name], rtol=0, atol=0)
    assert probe["lr"] == checkpoint["lr_schedulers"][0]["_last_lr"][0]
    assert torch.equal(probe["torch_rng"], checkpoint["rng"]["torch"])


LONG_RUN_STEPS = "100000"


def start_long_run(shards: Path, tmp_path: Path, checkpoint_every: int, *extra: str, new_session: bool = False,
                   env_extra: dict[str, str] | None = None) -> tuple[list[str], dict, subprocess.Popen]:
    """A smoke run of LONG_RUN_STEPS slowed-down steps (0.3 s each: hours, however fast the machine, so it is
    still running whenever a test acts on it; the tests stop it) with a StateProbe; returns its command (to
    resume it), environment and process (``new_session``: in a process group of its own, as a
    terminal's foreground job is)."""
    env = {**cli_env(tmp_path), **(env_extra or {})}
    probes = {"class_path": "glide_test_probes.StateProbe",
              "init_args": {"out_dir": str(tmp_path / "probes"), "sleep_per_step": 0.3}}
    command = smoke_command(shards, tmp_path, "--config", probe_config(tmp_path, probes),
                            "--run.checkpoint_every_n_steps", str(checkpoint_every), "--trainer.val_check_interval",
                            "1000", *extra)
    process = subprocess.Popen(command + ["--trainer.max_steps", LONG_RUN_STEPS], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=new_session)
    return command, env, process


def resume(command: list[str], env: dict, tmp_path: Path, max_steps: int) -> subprocess.CompletedProcess:
    run = subprocess.run(command + ["--trainer.max_steps", str(max_steps)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def step_keys(path: Path) -> dict[int, list[str]]:
    """The batch keys trained on at each step; a step run again after a resume keeps its last record."""
    return {record["step"]: record["keys"] for record in map(json.loads, path.read_text().splitlines())}


def assert_identical(actual: object, expected: object, where: str = "") -> None:
    """Bit-for-bit equality of nested checkpoint values (tensors, containers, plain data)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


CHECKPOINT_STATE = ("state_dict", "current_model_state", "optimizer_states", "lr_schedulers", "rng",
                    "timestep_sampler")


def test_preempted_run_trains_on_the_batches_and_ends_in_the_state_of_an_uninterrupted_run(synthetic_shards, tmp_path):
    """Stopped by max_steps, then SIGKILLed mid-step at three steps (mid-epoch, after a validation, at an
    epoch's end) and resumed each time, a run sees the batch sequence of an uninterrupted one and ends
    bit-identical to it: weights, EMA, optimizer, LR schedule, RNG and the data streams' state."""
    env = {**cli_env(tmp_path), "WANDB_MODE": "disabled"}
    extra = ["--data.num_workers", "2", "--data.samples_per_epoch", "20", "--data.shuffle_buffer", "30",
             "--run.checkpoint_every_n_steps", "2", "--trainer.val_check_interval", "4",
             "--trainer.limit_val_batches", "1", "--trainer.max_steps", "12"]
    callbacks = [{"class_path": "glide_lightning.callbacks.SampleGrid",
                  "init_args": {"prompts": ["a large red circle"], "guidance_scales": [1.0, 3.0], "every_n_steps": 3,
                                "sampling": {"steps": "2"}}},
                 {"class_path": "glide_lightning.callbacks.GenerationMetrics",
                  "init_args": {"num_samples": 4, "guidance_scales": [3.0], "extractor": "random-conv",
                                "adherence": True, "sampling": {"steps": "2"}}}]

    def run(name: str, kill_after: int | None, *more: str) -> subprocess.CompletedProcess:
        probes = [*callbacks, {"class_path": "glide_test_probes.StepKeys",
                               "init_args": {"out_file": str(tmp_path / f"{name}.jsonl")}}]
        if kill_after is not None:
            probes.append({"class_path": "glide_test_probes.KillSwitch", "init_args": {"after_step": kill_after}})
        config = tmp_path / f"{name}_{kill_after}.yaml"
        config.write_text(Path(probe_config(tmp_path, *probes)).read_text())
        command = smoke_command(synthetic_shards, tmp_path, "--config", str(config), "--run.name", name, *extra, *more)
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)

    uninterrupted = run("whole", None)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    # 5 steps per epoch: stopped by max_steps after step 3 (mid-epoch; Lightning resumes at its next
    # epoch, the data must not), killed in step 6 (resumes at 4), in step 9 (resumes at 8, after a
    # validation), in step 11 (resumes at 10, the end of epoch 1), then runs to step 12
    stopped = run("preempted", None, "--trainer.max_steps", "3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    for kill_after in (5, 8, 10, None):
        segment = run("preempted", kill_after)
        if kill_after is None:
            assert segment.returncode == 0, segment.stderr[-3000:]
        else:
            assert segment.returncode == -signal.SIGKILL, segment.stderr[-3000:]
    assert step_keys(tmp_path / "preempted.jsonl") == step_keys(tmp_path / "whole.jsonl")
    assert len(step_keys(tmp_path / "whole.jsonl")) == 12
    whole, preempted = (torch.load(tmp_path / f"{name}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
                        for name in ("whole", "preempted"))
    assert whole["global_step"] == preempted["global_step"] == 12
    for key in CHECKPOINT_STATE:
        assert_identical(preempted[key], whole[key], key)
    streams = whole["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert streams == preempted["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert streams[0]["ranks"][0]["epoch"] == 2 and len(streams[0]["ranks"][0]["positions"]) == 2  # both workers


def test_a_second_writer_is_refused_and_a_killed_run_resumes_at_its_saved_step(synthetic_shards, tmp_path):
    command, env, first = start_long_run(synthetic_shards, tmp_path, checkpoint_every=4)
    checkpoints = tmp_path / "smoke/checkpoints"
    wait_for(checkpoints / "step00000008.ckpt", first)
    # one writer per run: the same command again is refused, naming the process that trains it
    second = subprocess.run(command + ["--trainer.max_steps", LONG_RUN_STEPS], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert second.returncode == 2 and f"is in use by pid {first.pid} on " in second.stderr, second.stderr[-3000:]
    assert first.poll() is None, "the refused process left the running one alone"
    first.kill()  # SIGKILL: no chance to save anything more (nor to release its lock: the kernel does)
    first.wait()
    newest = max(checkpoints.glob("step*.ckpt"))
    saved = torch.load(newest, map_location="cpu", weights_only=True)
    second = resume(command, env, tmp_path, saved["global_step"] + 2)
    assert f"at step {saved['global_step']}" in second.stderr
    assert_resumed_state(tmp_path / f"probes/start_{saved['global_step']}.pt", saved)
    final = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == saved["global_step"] + 2


def slurm_job(tmp_path: Path) -> dict[str, str]:
    """The environment of a one-task SLURM job (Lightning then uses its SLURMEnvironment) with a stand-in
    ``scontrol`` on PATH that records its arguments (no SLURM controller on this machine)."""
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls.txt"}\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
            "SLURM_JOB_NAME": "glide", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_interrupt_saves_a_resumable_checkpoint(synthetic_shards, tmp_path, signum):
    # 2 DataLoader workers; the signal goes to the whole process group, as Ctrl-C in a terminal, SLURM's
    # scancel or docker stop send it: the workers must leave it to the main process, not die of it.
    # SIGUSR1 is SLURM's requeue signal (sbatch --signal=USR1@N): save, then requeue the job.
    slurm = slurm_job(tmp_path) if signum == signal.SIGUSR1 else None
    command, env, first = start_long_run(synthetic_shards, tmp_path, 3, "--data.num_workers", "2", new_session=True,
                                         env_extra=slurm)
    checkpoints = tmp_path / "smoke/checkpoints"
    wait_for(checkpoints / "step00000003.ckpt", first)
    time.sleep(0.45)  # somewhere inside a later step
    os.killpg(first.pid, signum)
    first.wait(timeout=HANG_GUARD_S)
    stderr = first.stderr.read()
    # as a command a signal ends (so `make train && make fid` goes no further), but 0 once requeued
    assert first.returncode == (0 if slurm else 128 + signum), stderr[-5000:]
    assert stderr.count(f"received {signal.Signals(signum).name}") == 1, "one message, not one per worker"
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] > 3, "the interrupt must save the step it stopped at, not an older one"
    assert f"stopped at step {last['global_step']}" in stderr
    assert f"training interrupted at step {last['global_step']} of " in stderr and "Sample it" not in stderr
    assert not [r for r in read_csv_metrics(tmp_path / "smoke") if r.get("val/loss")], "no validation on the way out"
    requeued = (tmp_path / "scontrol_calls.txt").read_text().splitlines() if slurm else []
    assert requeued == (["requeue 4242"] if slurm else [])
    assert not list(tmp_path.rglob("hpc_ckpt*")), "last.ckpt is the one checkpoint, not Lightning's hpc_ckpt"
    resume(command, env, tmp_path, last["global_step"] + 1)
    assert_resumed_state(tmp_path / f"probes/start_{last['global_step']}.pt", last)
    # one last.ckpt, the newest: never a last-v1.ckpt beside a stale last.ckpt
    assert not list(checkpoints.glob("last-*.ckpt"))
    final = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == last["global_step"] + 1


@pytest.mark.slow
def test_two_process_ddp_fit_splits_the_data(synthetic_shards, tmp_path):
    recorder = {"class_path": "glide_test_probes.KeyRecorder", "init_args": {"out_dir": str(tmp_path / "keys")}}
    poison = {"class_path": "glide_test_probes.PoisonBatch", "init_args": {"step": 2, "rank": 1}}
    run = subprocess.run(smoke_command(synthetic_shards, tmp_path, "--config", probe_config(tmp_path, recorder, poison),
                                       "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                                       "--trainer.strategy", "ddp", "--trainer.max_steps", "3",
                                       "--trainer.val_check_interval", "3"),
                         env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"keys/keys_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    seen = [{k for batch in rank for k in batch} for rank in ranks]
    assert seen[0] != seen[1] and len(seen[0] | seen[1]) > len(seen[0])
    last = torch.load(tmp_path / "smoke/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    # rank 1's NaN batch at step 2: both ranks skipped that step (no hang, no NaN weights)
    assert all(torch.isfinite(v).all() for v in last["current_model_state"].values())
    skipped = [float(r["train/nonfinite_steps"]) for r in read_csv_metrics(tmp_path / "smoke")
               if r.get("train/nonfinite_steps")]
    assert skipped == [0.0, 1.0, 1.0]  # logged by rank 0, whose own batch was finite
    assert "is in use" not in run.stderr  # one run lock, taken by the launching process only


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_parses_against_the_code(name):
    run = parse_in_process(["fit", "--config", str(REPO / f"experiments/{name}.yaml"), "--print_config"])
    assert run.returncode == 0, run.stderr[-3000:]
    config = yaml.safe_load(run.stdout)
    model = config["model"]
    architecture = NoisedCLIPConfig if config["task"] == "noised_clip" else ModelConfig
    architecture(**model["model"])  # the dataclasses validate their values (choices, shapes, heads)
    DiffusionConfig(**model["diffusion"])
    OptimizerConfig(**{k: tuple(v) if k == "betas" else v for k, v in model["optimizer"].items()})
    assert config["run"]["name"] == name
    assert config["data"]["train_shards"]


def test_laptop_folder_trains_on_a_folder_dataset_through_the_cli(folder_shards, tmp_path):
    """The laptop experiment as the README runs it (with its 32 px variant), on folder-recipe shards of 8 px
    images: it warns that a 32 px model is far above them, trains with v (without min-SNR weighting), groups
    of at least 4 channels, the cosine LR and WarmupEMA, and its checkpoint says so."""
    shards = folder_shards(8)
    run = subprocess.run([sys.executable, "-m", "glide_lightning", "fit", "--config",
                          str(REPO / "experiments/laptop_folder.yaml"), "--data.train_shards", f"{shards}/train-*.tar",
                          "--data.num_workers", "0", "--data.batch_size", "4", "--run.root", str(tmp_path),
                          "--model.model.image_size", "32", "--trainer.max_steps", "2",
                          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"],
                         env=cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "model.model.image_size 32 is 4.0x the median size of the training images (8 px" in run.stderr
    last = torch.load(tmp_path / "laptop_folder/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    hp = last["hyper_parameters"]
    assert hp["diffusion"]["prediction"] == "v" and hp["diffusion"]["min_snr_gamma"] is None
    assert hp["model"]["groupnorm_min_channels"] == 4
    assert hp["optimizer"]["lr_schedule"] == "cosine" and hp["model"]["image_size"] == 32
    assert int(last["averaging_state"]["n_averaged"]) == 2  # WarmupEMA averaged after each step
    assert [k for k in last["callbacks"] if "WarmupEMA" in k]
    lrs = [float(r["lr-AdamW/decay"]) for r in read_csv_metrics(tmp_path / "laptop_folder") if r.get("lr-AdamW/decay")]
    assert lrs[:2] == pytest.approx([1e-5, 2e-5])  # warm-up: lr·(s + 1)/100


def test_minig_arms_differ_only_in_loss_and_variance():
    arms = [yaml.safe_load((REPO / f"experiments/minig_{arm}.yaml").read_text()) for arm in ("simple", "hybrid")]
    for arm in arms:
        arm["run"].pop("name"), arm["run"].pop("tags")
        arm["model"]["diffusion"].pop("loss_type"), arm["model"]["diffusion"].pop("variance_type")
    assert arms[0] == arms[1]


def test_smoke_is_the_laptop_preset_at_32_px():
    smoke = yaml.safe_load((REPO / "experiments/smoke.yaml").read_text())["model"]
    laptop = yaml.safe_load((REPO / "experiments/parts/laptop_model.yaml").read_text())
    assert smoke["model"] == {**laptop["model"], "image_size": 32}
    assert {k: v for k, v in smoke.items() if k != "model"} == {k: v for k, v in laptop.items() if k != "model"}


@pytest.mark.parametrize("name", ["smoke_inpaint", "smoke_upsample"])
def test_the_smoke_upsampler_and_inpainting_model_are_smoke_of_another_kind(name):
    smoke = yaml.safe_load((REPO / "experiments/smoke.yaml").read_text())["model"]
    other = yaml.safe_load((REPO / f"experiments/{name}.yaml").read_text())["model"]
    assert other["model"].pop("kind") != smoke["model"].pop("kind")
    assert other == smoke


def test_the_toy_ablation_arms_are_smoke_with_another_loss_and_variance():
    """`make ablation-smoke` gives each arm's file after smoke.yaml: the resolved configs differ in the
    run's name and tags and in the loss and variance only."""
    configs = {}
    for arm in ("hybrid", "simple"):
        run = parse_in_process(["fit", "--config", str(REPO / "experiments/smoke.yaml"), "--config",
                                str(REPO / f"experiments/ablation_smoke/{arm}.yaml"), "--print_config"])
        assert run.returncode == 0, run.stderr[-3000:]
        configs[arm] = yaml.safe_load(run.stdout)
    hybrid, simple = configs["hybrid"], configs["simple"]
    assert (hybrid["run"]["name"], simple["run"]["name"]) == ("ablation_smoke_hybrid", "ablation_smoke_simple")
    assert [c["model"]["diffusion"]["loss_type"] for c in (hybrid, simple)] == ["hybrid", "simple"]
    assert [c["model"]["diffusion"]["variance_type"] for c in (hybrid, simple)] == ["learned_range", "fixed_small"]
    assert hybrid["model"]["diffusion"]["prediction"] == "v" and hybrid["trainer"]["max_steps"] == 1800
    for config in (hybrid, simple):
        config["run"].pop("name"), config["run"].pop("tags")
        config["model"]["diffusion"].pop("loss_type"), config["model"]["diffusion"].pop("variance_type")
    assert hybrid == simple


def test_bad_config_value_fails_at_parse_time_with_the_choices():
    run = parse_in_process(["fit", "--config", str(REPO / "experiments/smoke.yaml"), "--model.diffusion.loss_type",
                            "hybird", "--print_config"])
    assert run.returncode != 0
    assert "hybird" in run.stderr and "hybrid" in run.stderr


def test_an_abbreviated_option_is_refused_not_taken_for_the_option_it_begins(capsys):
    """argparse would take ``--trainer.max_step`` (a typo) for ``--trainer.max_steps``, ``--ckp`` for ``--ckpt``."""
    from glide_lightning.commands import main

    run = parse_in_process(["fit", "--config", str(REPO / "experiments/smoke.yaml"), "--trainer.max_step", "3",
                            "--print_config"])
    assert run.returncode != 0 and "--trainer.max_step: did you mean --trainer.max_steps?" in run.stderr, run.stderr
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckp", "model.ckpt", "--prompt", "a red circle"])
    assert exit_info.value.code == 2 and "--ckp: did you mean --ckpt?" in capsys.readouterr().err


def test_make_train_with_an_unknown_experiment_lists_the_available_ones():
    run = subprocess.run(["make", "-s", "train", "EXP=nope"], cwd=REPO, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert run.returncode != 0
    assert "unknown experiment 'nope'" in run.stderr
    for name in EXPERIMENTS:
        assert name in run.stderr


def fresh_checkout(tmp_path: Path) -> Path:
    """The repository's tracked files (as `git clone` gives them: no data/, no runs/) in a temp dir."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip("needs a git checkout")
    checkout = tmp_path / "checkout"
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    assert not (checkout / "data").exists()
    return checkout


def test_make_train_smoke_on_a_fresh_checkout_builds_data_and_stops_at_max_time(tmp_path):
    checkout = fresh_checkout(tmp_path)
    venv = tmp_path / "venv"  # `make setup` is up to date: this interpreter already has everything
    venv.mkdir()
    (venv / ".installed").touch()
    recorder = {"class_path": "glide_test_probes.KeyRecorder", "init_args": {"out_dir": str(tmp_path / "keys")}}
    # max_time's Timer on a clock of 4 s per step: 15 s run out in step 4 on any machine, however loaded
    clock = {"class_path": "glide_test_probes.StepClock", "init_args": {"seconds_per_step": 4.0}}
    args = ["--config", probe_config(tmp_path, recorder, clock), "--run.root", str(tmp_path / "runs"),
            "--trainer.max_time", "00:00:00:15", "--trainer.max_steps", "100000", "--trainer.limit_val_batches", "0",
            "--run.checkpoint_every_n_steps", "3", "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.enable_progress_bar", "false"]
    env = {**cli_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(checkout), str(REPO / "tests/helpers")])}
    run = subprocess.run(["make", "-s", "train", "EXP=smoke", f"VENV={venv}", f"PY={sys.executable}",
                          "SMOKE_DATA_ARGS=--train 40 --val 8 --image-size 32 --max-per-shard 20",
                          f"ARGS={' '.join(args)}"], cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "building the synthetic shards first" in run.stdout
    manifest = json.loads((checkout / "data/synthetic/manifest.json").read_text())
    assert manifest["args"]["train"] == 40  # the recipe got its own flags, and the training its ARGS
    assert "Time limit reached" in run.stderr, run.stderr[-3000:]
    assert len(json.loads((tmp_path / "keys/keys_rank0.json").read_text())) == 4  # steps run
    checkpoints = tmp_path / "runs/smoke/checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt", "step00000003.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4, "max_time saves the step it reached, not the last periodic one"


def readme_block(after: str) -> list[str]:
    """The commands of the README's first bash block after the text ``after`` (comments dropped)."""
    text = (REPO / "README.md").read_text()
    start = text.index("```bash\n", text.index(after)) + len("```bash\n")
    lines = (line.split("#")[0].strip() for line in text[start:text.index("```", start)].splitlines())
    return [line for line in lines if line]


# make variables that shrink each quick-start command to seconds; the commands themselves are the README's
TINY = {"train": ["SMOKE_DATA_ARGS=--train 40 --val 8 --image-size 32 --max-per-shard 20",
                  "ARGS=--trainer.max_steps 3 --data.batch_size 4 --data.num_workers 0 --trainer.limit_val_batches 0 "
                  "--trainer.log_every_n_steps 1 --trainer.enable_progress_bar false"],
        "sweep": ["N=8"],  # ARGS (the cache dir) added in the test
        "compare": []}


def test_readme_quick_start_runs_as_written_on_a_fresh_checkout(tmp_path):
    checkout = fresh_checkout(tmp_path)
    venv = tmp_path / "venv"  # `make setup` is up to date: this interpreter already has everything
    venv.mkdir()
    (venv / ".installed").touch()
    env = {**cli_env(tmp_path), "PYTHONPATH": str(checkout)}
    commands = readme_block("Then, on any machine")
    assert [c.split()[:2] for c in commands] == [["make", "train"], ["make", "sweep"], ["make", "compare"]]
    TINY["sweep"].append(f"ARGS=--sampling.steps 2 --sampling.batch_size 8 --cache_dir {tmp_path / 'cache'}")
    for command in commands:
        target = command.split()[1]
        run = subprocess.run([*shlex.split(command), "-s", f"VENV={venv}", f"PY={sys.executable}", *TINY[target]],
                             cwd=checkout, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert run.returncode == 0, f"{command}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
        if target == "sweep":  # the command's own default scales (4: the Makefile has no list), announced first
            assert "4 scale(s) x 8 captions, ddpm 2 steps: 32 images to generate" in run.stderr
            assert "about" in run.stderr and "left" in run.stderr
    sweep = (checkout / "runs/smoke/fid/res32_ddpm2_n8/sweep.md").read_text()
    assert all(f"| {s} |" in sweep for s in (1, 3, 6, 12)) and "NOT a real FID" in sweep
    report = (checkout / "reports/smoke.md").read_text()
    assert "| smoke | hybrid | learned_range | v | 3 |" in report
    assert all(f"| smoke | res32_ddpm2_n8 | {s} |" in report for s in (1, 3, 6, 12))
    # RUN= evaluates a run by its directory name (one started with --run.name), EXP= picks the settings
    shutil.copytree(checkout / "runs/smoke/checkpoints", checkout / "runs/renamed/checkpoints")
    run = subprocess.run(["make", "-s", "fid", "RUN=renamed", "EXP=smoke", f"VENV={venv}", f"PY={sys.executable}",
                          *TINY["sweep"]], cwd=checkout, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 scale(s) x 8 captions" in run.stderr  # fid: the sampling default scale alone
    assert (checkout / "runs/renamed/fid/res32_ddpm2_n8/results.json").is_file()
    run = subprocess.run(["make", "-s", "fid", "RUN=nope", f"VENV={venv}"], cwd=checkout, capture_output=True,
                         text=True, timeout=HANG_GUARD_S)
    assert run.returncode != 0 and "no run directory runs/nope" in run.stderr and "renamed" in run.stderr


def test_busy_wandb_id_is_retried_then_replaced(tmp_path, monkeypatch):
    """Right after a kill, the old process's wandb service can hold the run id: retry, then move on."""
    from lightning.pytorch.loggers import WandbLogger

    from glide_lightning.cli import RunConfig, wandb_logger

    calls = []

    def experiment(self):
        calls.append(self._id)
        if (self._id == "abcd1234" and len(calls) <= 3) or self._id == "held0000":
            raise RuntimeError(f"run ID {self._id} is in use")
        return "started"

    monkeypatch.setattr(WandbLogger, "experiment", property(experiment))
    monkeypatch.delenv("RANK", raising=False), monkeypatch.delenv("LOCAL_RANK", raising=False)
    run = RunConfig(name="r", root=str(tmp_path))
    run.dir.mkdir(parents=True)
    (run.dir / "wandb_id.txt").write_text("abcd1234")
    logger = wandb_logger(run, "offline", attempts=5, wait_s=0)
    assert calls == ["abcd1234"] * 4 and logger._id == "abcd1234"  # freed on the 4th try
    calls.clear()
    (run.dir / "wandb_id.txt").write_text("held0000")
    logger = wandb_logger(run, "offline", attempts=2, wait_s=0)
    assert calls == ["held0000"] * 2 + [logger._id] and logger._id != "held0000"  # a new wandb run, started


def test_the_gpu_configuration_resolves_and_trains_on_the_cpu(synthetic_shards, tmp_path, monkeypatch):
    """The CLI on a bf16-capable CUDA machine, minus the GPU: every hardware-dependent default is resolved as
    there (glide_lightning.cli.detect_hardware is the one place the CLI looks at the device), then the smoke
    experiment trains two steps with it on the CPU. A GPU default can no longer be one CI never ran."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from glide_lightning import cli as cli_module
    from glide_lightning.callbacks import WarmupEMA

    assert cli_module.hardware_defaults(cli_module.Hardware(cuda=False, bf16=False)) == {"trainer.precision": "32-true"}
    gpu = cli_module.Hardware(cuda=True, bf16=True)
    monkeypatch.setattr(cli_module, "detect_hardware", lambda: gpu)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["fit", "--config", str(REPO / "experiments/smoke.yaml"), "--trainer.accelerator", "cpu",
            "--data.train_shards", f"{synthetic_shards}/train-*.tar", "--data.val_shards", f"{synthetic_shards}/val-*.tar",
            "--data.num_workers", "0", "--data.batch_size", "4", "--run.root", str(tmp_path),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    cli = cli_module.GlideCLI(args=args)
    trainer, module = cli.trainer, cli.model
    resolved = cli.config["fit"]["trainer"]
    assert resolved["precision"] == "bf16-mixed" and resolved["gradient_clip_val"] == 1.0  # the GPU's, not the CPU's
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.scaler is None
    kernel = trainer.optimizers[0].defaults
    assert kernel["foreach"] and not kernel["fused"], kernel  # fused cannot be clipped under bf16-mixed
    assert any(isinstance(c, WarmupEMA) for c in trainer.callbacks)
    assert module._compiled == [module.model]  # eager: compile is opt-in on every device
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert (tmp_path / "smoke" / "checkpoints").is_dir()


def test_bf16_mixed_training_resumes_bit_exactly(synthetic_shards, tmp_path):
    """The GPU's default precision through the real CLI: 2 steps, then a resume to 4, end bit-identical to 4
    uninterrupted steps (weights, EMA, AdamW, LR schedule, RNG), with the experiment's clipping and EMA."""
    env = {**cli_env(tmp_path), "WANDB_MODE": "disabled"}

    def run(name: str, steps: int) -> None:
        command = smoke_command(synthetic_shards, tmp_path, "--config", probe_config(tmp_path), "--run.name", name,
                                "--trainer.precision", "bf16-mixed", "--trainer.max_steps", str(steps),
                                "--trainer.limit_val_batches", "0", "--model.optimizer.warmup_steps", "0",
                                # the cosine decay ends at a fixed step, not at each session's max_steps
                                "--model.optimizer.decay_steps", "50")
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert done.returncode == 0, done.stderr[-3000:]

    run("whole", 4)
    run("resumed", 2)
    run("resumed", 4)
    whole, resumed = (torch.load(tmp_path / f"{name}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
                      for name in ("whole", "resumed"))
    assert whole["global_step"] == resumed["global_step"] == 4
    assert whole["hyper_parameters"]["optimizer"]["implementation"] == "auto"
    for key in CHECKPOINT_STATE:
        assert_identical(resumed[key], whole[key], key)
    # the EMA (state_dict) is not the raw weights (current_model_state): both were compared above
    assert any(not torch.equal(whole["state_dict"][k], v) for k, v in whole["current_model_state"].items())


def test_a_run_whose_only_checkpoint_is_unreadable_stops_instead_of_starting_over(synthetic_shards, tmp_path):
    """issue 25's case: `truncate -s` of the only last.ckpt, then train again: one line offering --run.resume false,
    exit 2, before any training; the damaged file is left as it was and no new CSV version is started."""
    env = {**cli_env(tmp_path), "WANDB_MODE": "disabled"}
    first = subprocess.run(smoke_command(synthetic_shards, tmp_path, "--trainer.max_steps", "1",
                                         "--trainer.limit_val_batches", "0"),
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "smoke/checkpoints/last.ckpt"
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size // 2)
    damaged = last.read_bytes()
    again = subprocess.run(smoke_command(synthetic_shards, tmp_path, "--trainer.max_steps", "2"),
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "none of its checkpoints can be read" in again.stderr and "--run.resume false" in again.stderr
    assert "Traceback" not in again.stderr
    assert last.read_bytes() == damaged
    assert not (tmp_path / "smoke/csv/version_1").exists()
