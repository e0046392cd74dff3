"""Scale-out with no code change: the training CLI under ``torchrun`` on two "nodes" (one CPU process
each, on localhost) trains as a one-node two-process DDP run launched by Lightning itself: every rank
on the same batches, both ranks in step to the same final state."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hang_guard import HANG_GUARD_S
from test_cli import assert_identical, cli_env, smoke_command, step_keys

TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_command(shards: Path, root: Path, keys_file: Path) -> list[str]:
    probes = root / "probes.yaml"
    probes.parent.mkdir(parents=True, exist_ok=True)
    probes.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
        {"class_path": "glide_test_probes.StepKeys", "init_args": {"out_file": str(keys_file)}}]}}))
    return smoke_command(shards, root, "--config", str(probes), "--trainer.accelerator", "cpu",
                         "--trainer.strategy", "ddp", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                         "--trainer.val_check_interval", "1000", "--run.checkpoint_every_n_steps", "1000")


@pytest.mark.slow
def test_two_torchrun_nodes_train_as_one_node_with_two_processes(synthetic_shards, tmp_path):
    env = {**cli_env(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # one node, two processes: Lightning's own launcher
    one_node = ddp_command(synthetic_shards, tmp_path / "one_node", tmp_path / "one_node/keys{rank}.jsonl")
    run = subprocess.run(one_node + ["--trainer.devices", "2"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    # two nodes of one process each: torchrun sets the ranks, the CLI is unchanged but for num_nodes
    two_nodes = ddp_command(synthetic_shards, tmp_path / "two_nodes", tmp_path / "two_nodes/keys{rank}.jsonl")
    port = free_port()
    nodes = [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *two_nodes[1:], "--trainer.num_nodes", "2", "--trainer.devices", "1"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=HANG_GUARD_S)
        assert node.returncode == 0, err[-3000:]

    keys = {layout: [step_keys(tmp_path / layout / f"keys{rank}.jsonl") for rank in (0, 1)]
            for layout in ("one_node", "two_nodes")}
    for layout in keys.values():
        assert [sorted(rank) for rank in layout] == [[1, 2, 3]] * 2  # both ranks ran steps 1-3, in step
        assert all(layout[0][step] != layout[1][step] for step in (1, 2, 3))  # each rank its own stream
    assert keys["two_nodes"] == keys["one_node"]  # rank r reads what rank r of a one-node run reads

    checkpoints = {layout: torch.load(tmp_path / layout / "smoke/checkpoints/last.ckpt", map_location="cpu",
                                      weights_only=True) for layout in ("one_node", "two_nodes")}
    assert checkpoints["two_nodes"]["global_step"] == checkpoints["one_node"]["global_step"] == 3
    for part in ("state_dict", "current_model_state", "optimizer_states"):
        assert_identical(checkpoints["two_nodes"][part], checkpoints["one_node"][part], part)
    stream = checkpoints["two_nodes"]["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert json.dumps(stream) == json.dumps(checkpoints["one_node"]["loops"]["fit_loop"]["state_dict"]["combined_loader"])
