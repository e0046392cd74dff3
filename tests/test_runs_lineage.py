"""A run's lineage (git state of the code, the training data's manifest) and how an arm of an ablation differs from
its siblings: the helpers of glide_lightning.runs the training CLI puts into the wandb run config. The CLI end to
end: tests/callbacks/test_wandb_logging.py."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from glide_lightning.runs import RunConfig, ablation, flat_config, git_lineage, manifest_lineage

REPO = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@needs_git
def test_the_package_checkout_gives_its_commit_and_dirty_flag():
    state = git_lineage()  # the glide_lightning package's folder
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode:  # the tests run from a copy that is no git checkout
        assert state["git_commit"] is None and "not a git checkout" in state["git_reason"]
        return
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip() != ""
    assert state == {"git_commit": head.stdout.strip(), "git_dirty": dirty, "git_reason": None}


@needs_git
def test_outside_a_checkout_or_untracked_or_without_git_the_commit_is_none_with_the_reason(tmp_path, monkeypatch):
    plain = tmp_path / "copy"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no checkout above the temp folder counts
    state = git_lineage(plain)
    assert state["git_commit"] is None and state["git_dirty"] is None
    reason = state["git_reason"]
    assert reason.startswith(f"{plain} is not a git checkout") and "not a git repository" in reason

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    state = git_lineage(repo / "pkg")  # a checkout around it that does not track it
    assert state["git_commit"] is None
    assert state["git_reason"] == f"{repo / 'pkg'} is not tracked by the git checkout at {repo}"

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert git_lineage(REPO / "glide_lightning") == {
        "git_commit": None, "git_dirty": None, "git_reason": "git is not installed (no git executable on PATH)"}


def test_the_manifest_sha256_is_that_of_the_shard_folders_manifest_json(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        (shards / name).write_bytes(b"tar")
    missing = manifest_lineage(f"{shards}/train-*.tar")
    assert missing["data_manifest_sha256"] is None and missing["data_reason"] == f"no manifest.json in {shards}"
    (shards / "manifest.json").write_text('{"recipe": "synthetic"}\n')
    found = manifest_lineage(f"{shards}/train-*.tar")
    expected = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert found == {"data_manifests": {str(shards): expected}, "data_manifest_sha256": expected, "data_reason": None}
    other = tmp_path / "other"
    other.mkdir()
    (other / "train-000000.tar").write_bytes(b"tar")
    two = manifest_lineage([f"{shards}/train-*.tar", str(other / "train-000000.tar")])
    assert two["data_manifest_sha256"] is None and two["data_manifests"] == {str(shards): expected, str(other): None}
    assert two["data_reason"] == "shards from 2 folders: see data_manifests"
    assert manifest_lineage(None)["data_reason"] == "no data.train_shards"
    assert manifest_lineage(str(tmp_path / "none-*.tar"))["data_reason"].startswith("the shards cannot be listed")


def smoke_like(name: str, lr: float, seed: int = 0, group: str | None = "g") -> dict:
    return {"seed_everything": seed, "ckpt_path": None,
            "run": {"name": name, "root": "runs", "group": group, "tags": ["t"], "resume": True},
            "model": {"optimizer": {"lr": lr}, "diffusion": {"steps": 100}},
            "trainer": {"max_steps": 10, "callbacks": [
                {"class_path": "BestCheckpoint", "init_args": {"dirpath": f"runs/{name}/best", "mode": "min"}}]}}


def test_an_arm_differs_from_its_siblings_in_the_keys_of_its_ablation_only(tmp_path):
    for name, lr, seed, group in (("hybrid", 1e-3, 0, "g"), ("other_group", 5e-4, 0, "h"), ("seed1", 1e-4, 1, "g")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(smoke_like(name, lr, seed, group)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("run: [unclosed\n")
    run = RunConfig(name="simple", root=str(tmp_path), group="g")
    config = smoke_like("simple", 1e-4)
    config["model"]["diffusion"]["loss_type"] = "simple"  # a key the siblings' configs do not have
    config["kind"] = "hybrid"  # equal to a sibling's name, and no path: compared as it is
    for path in (tmp_path / "hybrid" / "config.yaml", tmp_path / "seed1" / "config.yaml"):
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "kind": "hybrid"}))
    found = ablation(run, config)
    # the name, and the callback path holding it, are no difference; the seed is listed on its own
    assert found["siblings"] == ["hybrid", "seed1"] and found["group"] == "g"
    assert found["keys"] == ["model.diffusion.loss_type", "model.optimizer.lr"]
    assert found["values"] == {"model.diffusion.loss_type": {"simple": "simple", "hybrid": None, "seed1": None},
                               "model.optimizer.lr": {"simple": 1e-4, "hybrid": 1e-3, "seed1": 1e-4}}
    assert found["arm"] == "model.diffusion.loss_type=simple, model.optimizer.lr=0.0001"
    assert found["seed"] == {"simple": 0, "hybrid": 0, "seed1": 1}
    alone = ablation(RunConfig(name="x", root=str(tmp_path), group=None), smoke_like("x", 1e-3, group=None))
    assert alone["siblings"] == [] and alone["keys"] == [] and alone["seed"] == {"x": 0}


def test_flat_config_indexes_lists_of_mappings():
    flat = flat_config({"trainer": {"callbacks": [{"class_path": "A", "init_args": {"k": 1}}], "devices": [0, 1]},
                        "model": {}})
    assert flat == {"trainer.callbacks.0.class_path": "A", "trainer.callbacks.0.init_args.k": 1,
                    "trainer.devices": [0, 1], "model": {}}


@needs_git
def test_a_checkout_without_a_commit_says_so(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.py").write_text("")
    subprocess.run(["git", "add", "a.py"], cwd=repo, check=True)
    state = git_lineage(repo)
    assert state["git_commit"] is None and state["git_reason"].startswith(f"the git checkout at {repo} has no readable")
