"""Run-directory helpers: the directory lock (with real second processes), config drift on resume,
versioned files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glide_lightning.data.tokenizers import TokenizerSpec
from glide_lightning.locks import DirectoryLock, LockBusy
from hang_guard import HANG_GUARD_S
from glide_lightning.runs import ConfigDriftError, RunConfig, check_resume, write_versioned

REPO = Path(__file__).resolve().parents[1]


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process that takes the directory's lock, says so, and waits to be killed (however long the test
    takes to get there: it holds the lock until then)."""
    code = ("import sys, time; from glide_lightning.locks import DirectoryLock; "
            f"DirectoryLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep({HANG_GUARD_S})")
    process = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_held_lock_refuses_naming_its_holder_and_dies_with_it(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(LockBusy) as busy:
            DirectoryLock(tmp_path / "run", "run 'x': its directory").acquire()
        message = str(busy.value)
        assert f"pid {holder.pid} on " in message and "started " in message and "-c" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel releases the lock
        holder.wait()
    lock = DirectoryLock(tmp_path / "run").acquire()
    assert json.loads((tmp_path / "run/.lock").read_text())["pid"] == os.getpid()
    assert DirectoryLock(tmp_path / "run").acquire() is lock  # re-entrant within a process
    lock.release()


def fake_checkpoint(path: Path, **data_changes) -> Path:
    """A checkpoint whose data module recorded its tokenizer as separate fields (the form before TokenizerSpec)."""
    hparams = {"model": {"model_channels": 32, "channel_mult": [1, 2]}, "diffusion": {"steps": 100},
               "optimizer": {"lr": 3e-4, "betas": (0.9, 0.999)}, "tokenizer": "clip", "init_from": None}
    data = {"batch_size": 4, "tokenizer": "clip", "text_ctx": 16, "bpe_dir": None, "tokenizer_path": None,
            "tokenizer_revision": None, "_instantiator": "x", **data_changes}
    torch.save({"global_step": 7, "hyper_parameters": hparams, "datamodule_hyper_parameters": data}, path)
    return path


def test_resume_refuses_model_diffusion_and_tokenizer_changes_listing_each(tmp_path):
    run = RunConfig(name="r", root=str(tmp_path))
    run.dir.mkdir()
    ckpt = fake_checkpoint(run.dir / "last.ckpt")
    same = {"model": {"model_channels": 32, "channel_mult": (1, 2)}, "diffusion": {"steps": 100},
            "optimizer": {"lr": 3e-4, "betas": [0.9, 0.999]}, "tokenizer": "clip", "init_from": "base.pt"}
    # init_from: ignored; the old flat tokenizer fields are the same spec as the data module's one value now
    assert check_resume(run, ckpt, same, {"batch_size": 4, "tokenizer_spec": TokenizerSpec("clip", 16).to_dict()}, {}) == []
    drift = {**same, "model": {"model_channels": 64, "channel_mult": [1, 2]}, "diffusion": {"steps": 1000},
             "tokenizer": "gpt2"}
    with pytest.raises(ConfigDriftError) as error:
        check_resume(run, ckpt, drift, {"batch_size": 8, "tokenizer_spec": TokenizerSpec("gpt2", 32).to_dict()}, {})
    message = str(error.value)
    for line in ("model.model.model_channels: 32 → 64", "model.diffusion.steps: 100 → 1000",
                 "model.tokenizer: 'clip' → 'gpt2'", "data.tokenizer_spec.name: 'clip' → 'gpt2'",
                 "data.tokenizer_spec.text_ctx: 16 → 32"):
        assert line in message
    assert "batch_size" not in message and "--run.name r_2" in message and "--run.resume false" in message
    assert not (run.dir / "config_changes.jsonl").exists()


def test_resume_warns_about_and_records_optimisation_and_data_changes(tmp_path, caplog):
    run = RunConfig(name="r", root=str(tmp_path))
    run.dir.mkdir()
    (run.dir / "config.yaml").write_text("trainer:\n  accumulate_grad_batches: 1\n  max_steps: 10\n")
    ckpt = fake_checkpoint(run.dir / "last.ckpt")
    new = {"model": {"model_channels": 32, "channel_mult": [1, 2]}, "diffusion": {"steps": 100},
           "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999]}, "tokenizer": "clip"}
    found = check_resume(run, ckpt, new, {"batch_size": 8, "tokenizer_spec": TokenizerSpec("clip", 16).to_dict()},
                         {"accumulate_grad_batches": 2, "max_steps": 20})
    assert [str(c) for c in found] == ["data.batch_size: 4 → 8", "model.optimizer.lr: 0.0003 → 0.001",
                                       "trainer.accumulate_grad_batches: 1 → 2"]  # max_steps: routine
    assert "data.batch_size: 4 → 8" in caplog.text
    record = json.loads((run.dir / "config_changes.jsonl").read_text())
    assert record["step"] == 7 and {c["field"] for c in record["changes"]} == {
        "model.optimizer.lr", "data.batch_size", "trainer.accumulate_grad_batches"}


def test_resume_refuses_another_t5_tokenizer_but_only_warns_about_moved_gpt2_files(tmp_path):
    """The tokenizer's name, context and T5 files are what the weights learned; where GPT-2's BPE files lie on this
    machine is not (warned about and recorded, as before)."""
    run = RunConfig(name="r", root=str(tmp_path))
    run.dir.mkdir()
    model = {"model": {"model_channels": 32, "channel_mult": [1, 2]}, "diffusion": {"steps": 100},
             "optimizer": {"lr": 3e-4, "betas": [0.9, 0.999]}, "tokenizer": "gpt2"}
    ckpt = fake_checkpoint(run.dir / "gpt2.ckpt", tokenizer="gpt2", bpe_dir="/old/bpe")
    torch.save({**torch.load(ckpt, weights_only=True), "hyper_parameters": {**model, "init_from": None}}, ckpt)
    found = check_resume(run, ckpt, model, {"batch_size": 4, "tokenizer_spec": TokenizerSpec("gpt2", 16, bpe_dir="/new/bpe")
                                            .to_dict()}, {})
    assert [str(c) for c in found] == ["data.tokenizer_spec.bpe_dir: '/old/bpe' → '/new/bpe'"]
    t5 = {**model, "tokenizer": "t5"}
    ckpt = fake_checkpoint(run.dir / "t5.ckpt", tokenizer="t5", tokenizer_path="google/t5-v1_1-base", bpe_dir="/x")
    torch.save({**torch.load(ckpt, weights_only=True), "hyper_parameters": {**t5, "init_from": None}}, ckpt)
    assert check_resume(run, ckpt, t5, {"batch_size": 4, "tokenizer_spec": TokenizerSpec(
        "t5", 16, path="google/t5-v1_1-base").to_dict()}, {}) == []  # the old form's unused bpe_dir: no change
    with pytest.raises(ConfigDriftError, match="data.tokenizer_spec.path: 'google/t5-v1_1-base' → 'google/t5-v1_1-large'"):
        check_resume(run, ckpt, t5, {"batch_size": 4, "tokenizer_spec": TokenizerSpec(
            "t5", 16, path="google/t5-v1_1-large").to_dict()}, {})


def test_write_versioned_keeps_each_earlier_content(tmp_path):
    path = tmp_path / "config.yaml"
    assert write_versioned(path, "a: 1\n") is None
    assert write_versioned(path, "a: 1\n") is None  # unchanged: no new version
    assert write_versioned(path, "a: 2\n") == tmp_path / "config.v1.yaml"
    assert write_versioned(path, "a: 3\n") == tmp_path / "config.v2.yaml"
    assert [p.read_text() for p in (tmp_path / "config.v1.yaml", tmp_path / "config.v2.yaml", path)] == [
        "a: 1\n", "a: 2\n", "a: 3\n"]


def test_starting_over_moves_the_old_checkpoints_aside(tmp_path):
    from glide_lightning.runs import archive_checkpoints, newest_checkpoint

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert archive_checkpoints(run_dir) is None  # nothing to keep
    torch.save({"global_step": 300}, run_dir / "checkpoints/last.ckpt")
    assert archive_checkpoints(run_dir) == run_dir / "checkpoints.v1"
    assert newest_checkpoint(run_dir) is None, "the new run does not resume the old one's step 300 later"
    assert (run_dir / "checkpoints.v1/last.ckpt").is_file()


def test_an_unreadable_newest_checkpoint_is_moved_aside_and_the_newest_readable_one_resumed(tmp_path, caplog):
    from glide_lightning.runs import checkpoint_to_resume

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert checkpoint_to_resume(run_dir) is None  # a new run
    torch.save({"global_step": 200}, run_dir / "checkpoints/step=200.ckpt")
    torch.save({"global_step": 300}, run_dir / "checkpoints/last.ckpt")
    damaged = (run_dir / "checkpoints/last.ckpt").read_bytes()[:40]
    (run_dir / "checkpoints/last.ckpt").write_bytes(damaged)  # truncated, as a full disk leaves it
    with caplog.at_level("WARNING"):
        assert checkpoint_to_resume(run_dir) == run_dir / "checkpoints/step=200.ckpt"
    assert (run_dir / "checkpoints/last.ckpt.unreadable").read_bytes() == damaged  # kept, never overwritten
    assert not (run_dir / "checkpoints/last.ckpt").exists()
    assert "last.ckpt cannot be read" in caplog.text and "resumes from step=200.ckpt instead" in caplog.text


def test_a_run_whose_checkpoints_are_all_unreadable_is_not_restarted_from_step_0(tmp_path):
    from glide_lightning.runs import UnreadableCheckpointError, checkpoint_to_resume

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/last.ckpt").write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(UnreadableCheckpointError, match=r"cannot resume r: none of its checkpoints can be read "
                                                        r"\(last.ckpt: .*--run.resume false"):
        checkpoint_to_resume(run_dir)
    assert (run_dir / "checkpoints/last.ckpt").read_bytes() == b"PK\x03\x04 not a whole checkpoint"  # untouched


def test_a_wandb_run_deleted_on_the_server_is_replaced_and_its_new_id_kept(tmp_path):
    """wandb refuses to resume a deleted run ("previously created and deleted"): a new run at once, its id kept for
    the next session; a write that only makes sense on that run (replace=False) gets None instead, as after an id
    that stays busy."""
    from glide_lightning.runs import start_wandb_run

    id_file, calls = tmp_path / "wandb_id.txt", []

    def start(wandb_id: str) -> str:
        calls.append(wandb_id)
        if wandb_id == "gone0000":
            raise RuntimeError(f"run {wandb_id} was previously created and deleted; try a new run name")
        if wandb_id == "held0000":
            raise RuntimeError(f"run ID {wandb_id} is in use")
        return wandb_id

    id_file.write_text("gone0000")
    new = start_wandb_run(id_file, start, wait_s=0)
    assert calls == ["gone0000", new] and new != "gone0000" and id_file.read_text() == new
    assert start_wandb_run(id_file, start, wait_s=0) == new  # the next session resumes the new one
    id_file.write_text("gone0000")
    assert start_wandb_run(id_file, start, wait_s=0, replace=False) is None and id_file.read_text() == "gone0000"
    id_file.write_text("held0000")
    calls.clear()
    assert start_wandb_run(id_file, start, attempts=2, wait_s=0, replace=False) is None and calls == ["held0000"] * 2
    (tmp_path / "fresh.txt").unlink(missing_ok=True)
    assert start_wandb_run(tmp_path / "fresh.txt", start) == (tmp_path / "fresh.txt").read_text()  # an id is made
