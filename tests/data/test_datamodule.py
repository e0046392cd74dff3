"""Tests for GlideDataModule on real webdataset shards written to temp dirs (offline, CPU)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from glide_lightning.data.datamodule import GlideDataModule
from glide_lightning.data.tokenizers import TokenizerSpec

N_SHARDS, PER_SHARD = 4, 6


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def varied_image(i: int) -> tuple[str, bytes]:
    """Images in several formats and PIL modes, of several sizes."""
    rng = np.random.default_rng(i)
    rgb = Image.fromarray(rng.integers(0, 255, (24 + i % 5, 40, 3), dtype=np.uint8))
    kind = i % 7
    if kind == 0:
        return "jpg", encode(rgb, "JPEG")
    if kind == 1:
        return "png", encode(rgb.convert("RGBA"), "PNG")
    if kind == 2:
        pal = rgb.convert("P")
        pal.info["transparency"] = 0
        return "png", encode(pal, "PNG")
    if kind == 3:
        return "png", encode(rgb.convert("L"), "PNG")
    if kind == 4:
        return "jpeg", encode(rgb.convert("CMYK"), "JPEG")
    if kind == 5:
        return "png", encode(Image.fromarray(rng.integers(0, 65535, (30, 20), dtype=np.uint16)), "PNG")
    return "webp", encode(rgb, "WEBP")


def write_tar(path: Path, samples: list[dict[str, Any]]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def good_sample(key: str, i: int, caption_in: str = "txt") -> dict[str, Any]:
    ext, data = varied_image(i)
    sample: dict[str, Any] = {"__key__": key, ext: data}
    if caption_in == "txt":
        sample["txt"] = f"caption of {key}"
    else:
        sample["json"] = json.dumps({"caption": f"caption of {key}", "width": 40}).encode()
    return sample


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    for s in range(N_SHARDS):
        samples = [good_sample(f"s{s}_{i:02d}", s * PER_SHARD + i) for i in range(PER_SHARD)]
        write_tar(root / f"train-{s:06d}.tar", samples)
    return root


ALL_KEYS = [f"s{s}_{i:02d}" for s in range(N_SHARDS) for i in range(PER_SHARD)]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Good samples mixed with 4 bad things: a corrupt JPEG, a sample without caption, a sample
    with an empty caption, a garbage shard; returns the dir and the good keys in order."""
    root = tmp_path_factory.mktemp("bad")
    samples = [good_sample(f"b{i}", i) for i in range(5)]
    samples.insert(1, {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "txt": "broken"})
    samples.insert(3, {"__key__": "nocaption", "png": encode(Image.new("RGB", (8, 8)), "PNG")})
    samples.insert(4, {"__key__": "emptycaption", "png": encode(Image.new("RGB", (8, 8)), "PNG"), "txt": "  "})
    write_tar(root / "a.tar", samples)
    (root / "b.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    write_tar(root / "c.tar", [good_sample(f"c{i}", i) for i in range(3)])
    return root, [f"b{i}" for i in range(5)] + [f"c{i}" for i in range(3)]


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (SIGALRM interrupts the main process waiting on workers)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s: the data pipeline hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_dm(train: Any = None, val: Any = None, stage: str = "fit", **kw: Any) -> GlideDataModule:
    kw = {"image_size": 32, "batch_size": 4, "num_workers": 0, "tokenizer_spec": TokenizerSpec("clip", 16),
          "shuffle_buffer": 8, **kw}
    dm = GlideDataModule(train_shards=None if train is None else str(train),
                         val_shards=None if val is None else str(val), **kw)
    dm.setup(stage)
    return dm


def keys_of(batches: Any) -> list[str]:
    return [k for batch in batches for k in batch["key"]]


# ---------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_shapes_dtypes_ranges(train_dir: Path, workers: int) -> None:
    dm = make_dm(train_dir, num_workers=workers, samples_per_epoch=13)
    loader = dm.train_dataloader()
    assert len(loader) == 3  # 13 // 4 full batches per rank and epoch
    with time_limit(60):
        batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.05
        assert batch["tokens"].shape == batch["mask"].shape == (4, 16)
        assert batch["tokens"].dtype == torch.long and batch["mask"].dtype == torch.bool
        assert batch["mask"][:, 0].all()
        assert batch["caption"] == [f"caption of {k}" for k in batch["key"]]
        assert all(url.startswith(str(train_dir)) for url in batch["url"])
        assert batch["skipped"].dtype == torch.long and int(batch["skipped"]) == 0
        assert set(batch["key"]) <= set(ALL_KEYS)
    assert dm.skipped_total() == 0


def test_epochs_are_seeded(train_dir: Path) -> None:
    def epochs(seed: int) -> list[list[str]]:
        loader = make_dm(train_dir, samples_per_epoch=8, seed=seed).train_dataloader()
        return [keys_of(loader) for _ in range(2)]  # without a trainer: epoch = pass number

    first = epochs(0)
    assert first[0] != first[1]  # a new epoch reshuffles
    assert epochs(0) == first  # same seed, same epochs
    assert epochs(1)[0] != first[0]


def test_caption_from_json_field(tmp_path: Path) -> None:
    write_tar(tmp_path / "j.tar", [good_sample(f"j{i}", i, caption_in="json") for i in range(5)])
    dm = make_dm(val=tmp_path / "j.tar", stage="validate", caption_key="json:caption")
    batches = list(dm.val_dataloader())
    assert keys_of(batches) == [f"j{i}" for i in range(5)]
    assert [c for b in batches for c in b["caption"]] == [f"caption of j{i}" for i in range(5)]


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_logged_and_counted(
    bad_dir: tuple[Path, list[str]], workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    root, good = bad_dir
    dm = make_dm(val=root, stage="validate", num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="glide_lightning.data.pipeline"), time_limit(60):
        batches = list(dm.val_dataloader())
    assert keys_of(batches) == good  # every good sample, in order
    assert dm.skipped_total("val") == 4  # corrupt jpeg, no caption, empty caption, garbage shard
    if workers == 0:  # (worker processes log to their own handlers)
        text = caplog.text
        assert f"skipped sample 'corrupt' of shard {root / 'a.tar'}: OSError: Truncated File Read" in text
        assert "'nocaption'" in text and "no caption under ['txt']" in text
        assert f"shard {root / 'b.tar'}: ReadError" in text


def test_skips_reach_training_batches_from_workers(bad_dir: tuple[Path, list[str]]) -> None:
    root, good = bad_dir
    dm = make_dm(root, num_workers=2)
    with time_limit(60):
        loader = iter(dm.train_dataloader())
        batches = [next(loader) for _ in range(6)]
    assert set(keys_of(batches)) <= set(good)
    assert int(batches[-1]["skipped"]) > 0 and dm.skipped_total("train") >= int(batches[-1]["skipped"])


def test_truncated_shard_keeps_its_good_samples(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", [good_sample(f"t{i}", 0) for i in range(4)])
    with tarfile.open(full) as tar:
        last_image = next(m for m in tar.getmembers() if m.name == "t3.jpg")
    (tmp_path / "cut.tar").write_bytes(full.read_bytes()[: last_image.offset_data + 100])  # inside t3's image
    full.unlink()
    dm = make_dm(val=tmp_path, stage="validate")
    assert keys_of(dm.val_dataloader()) == ["t0", "t1", "t2"]
    assert dm.skipped_total("val") == 1  # the truncated rest of the shard (t3 never started)


def test_no_shards_is_a_clear_error_at_setup(tmp_path: Path) -> None:
    pattern = str(tmp_path / "train-{000000..000009}.tar")
    with pytest.raises(FileNotFoundError, match=r"10 shard\(s\) of spec .*train-\{000000..000009\}.tar"):
        make_dm(pattern)
    with pytest.raises(FileNotFoundError, match=f"no \\*.tar shards in directory '{tmp_path}'"):
        make_dm(tmp_path)
    with pytest.raises(ValueError, match="train_shards is required"):
        make_dm(None)


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_is_an_error_not_a_hang(tmp_path: Path, workers: int) -> None:
    (tmp_path / "garbage.tar").write_bytes(os.urandom(2048))
    write_tar(tmp_path / "corrupt.tar", [{"__key__": f"x{i}", "jpg": b"nope", "txt": "a cat"} for i in range(3)])
    dm = make_dm(tmp_path, val=tmp_path, num_workers=workers)
    with time_limit(60), pytest.raises(RuntimeError, match=r"no valid sample in train_shards.*jpg.*'txt'.*skipped"):
        next(iter(dm.train_dataloader()))
    with time_limit(60), pytest.raises(RuntimeError, match=r"no valid sample in val_shards.* 4 sample\(s\)/shard"):
        list(dm.val_dataloader())


# ----------------------------------------------------------------------------- ranks, validation
def test_validation_is_exactly_once_in_a_fixed_order(train_dir: Path) -> None:
    orders = [keys_of(make_dm(val=train_dir, stage="validate", num_workers=w, val_batch_size=5).val_dataloader())
              for w in (0, 2, 0)]
    assert orders[0] == orders[1] == orders[2] == ALL_KEYS  # tar order, whatever the worker count
    dm = make_dm(val=train_dir, stage="validate", max_val_samples=7, num_workers=2)
    assert keys_of(dm.val_dataloader()) == ALL_KEYS[:7]


def test_two_ranks_get_different_data(train_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    val, train = {}, {}
    for rank in (0, 1):  # wds.split_by_node's convention: $RANK / $WORLD_SIZE, else torch.distributed
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = make_dm(train_dir, val=train_dir, samples_per_epoch=8, num_workers=2 * rank)
        val[rank] = keys_of(dm.val_dataloader())
        train[rank] = keys_of(dm.train_dataloader())
    assert set(val[0]).isdisjoint(val[1]) and sorted(val[0] + val[1]) == sorted(ALL_KEYS)
    assert abs(len(val[0]) - len(val[1])) <= 1
    assert len(train[0]) == len(train[1]) == 8 and train[0] != train[1]


def test_more_workers_than_shards(tmp_path: Path) -> None:
    write_tar(tmp_path / "only.tar", [good_sample(f"o{i}", i) for i in range(6)])
    dm = make_dm(tmp_path, val=tmp_path, num_workers=2, samples_per_epoch=8)
    with time_limit(60):
        assert len(keys_of(dm.train_dataloader())) == 8
        assert keys_of(dm.val_dataloader()) == [f"o{i}" for i in range(6)]


# ----------------------------------------------------------------------------------- Lightning
class Recorder(L.LightningModule):
    """A trivial model that records the keys of the batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.train_keys: list[list[str]] = []
        self.val_keys: list[list[str]] = []
        self.skipped: list[int] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.train_keys.append(list(batch["key"]))
        self.skipped.append(int(batch["skipped"]))
        self.log("data/skipped", batch["skipped"].float(), on_step=True, on_epoch=False)
        return (self.weight * batch["image"].mean()) ** 2

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_keys.append(list(batch["key"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kw: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_overfit_batches_repeats_the_same_batch(train_dir: Path) -> None:
    dm = GlideDataModule(train_shards=str(train_dir), val_shards=str(train_dir), image_size=32, batch_size=4,
                         tokenizer_spec=TokenizerSpec("clip", 16), num_workers=2)
    model = Recorder()
    with time_limit(120):
        trainer(max_steps=3, overfit_batches=1).fit(model, datamodule=dm)
    assert len(model.train_keys) == 3 and model.train_keys[0] == model.train_keys[1] == model.train_keys[2]
    assert model.val_keys and all(keys == ALL_KEYS[:4] for keys in model.val_keys)


def test_fit_end_to_end(bad_dir: tuple[Path, list[str]], train_dir: Path) -> None:
    root, good = bad_dir
    dm = GlideDataModule(train_shards=str(root), val_shards=str(train_dir), image_size=32, batch_size=4,
                         num_workers=2, samples_per_epoch=12,
                         tokenizer_spec=TokenizerSpec("clip", 16), max_val_samples=8)
    model = Recorder()
    with time_limit(120):
        fit = trainer(max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0)
        fit.fit(model, datamodule=dm)
    assert fit.global_step == 4 and len(model.train_keys) == 4
    assert model.train_keys[:2] != model.train_keys[2:]  # epoch 1 is not a replay of epoch 0
    assert set(k for keys in model.train_keys for k in keys) <= set(good)
    assert model.skipped == sorted(model.skipped) and fit.callback_metrics["data/skipped"] == model.skipped[-1]
    assert [k for keys in model.val_keys for k in keys] == ALL_KEYS[:8] * 2  # once per validation run


def fit_recording(train_dir: Path, ckpt_dir: Path, max_steps: int, workers: int, ckpt_path: Path | None = None,
                  samples_per_epoch: int | None = 15) -> tuple[list[list[str]], torch.Tensor]:
    """Fit a Recorder with a checkpoint at every step and one at the end (``end.ckpt``, saved after
    ``fit`` returns, as a run's last checkpoint is); the batch keys it trained on and its weight.
    Epochs of 5 batches (samples_per_epoch 15, batch 3), so 12 steps cross two epoch boundaries."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = GlideDataModule(train_shards=str(train_dir), image_size=16, batch_size=3,
                         tokenizer_spec=TokenizerSpec("clip", 8), num_workers=workers,
                         samples_per_epoch=samples_per_epoch, shuffle_buffer=7, seed=3)
    model = Recorder()
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    fit = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, max_steps=max_steps, callbacks=[checkpoints], limit_val_batches=0)
    with time_limit(120):
        fit.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert fit.global_step == max_steps
    fit.save_checkpoint(ckpt_dir / "end.ckpt")
    return model.train_keys, model.weight.detach().clone()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(train_dir: Path, tmp_path: Path, workers: int) -> None:
    """Resumed from the checkpoint of step k (mid-epoch, at an epoch's last batch, with worker
    round-robin mid-cycle), a run trains on exactly the batches of steps k+1.. of an uninterrupted
    run and ends with the same weight."""
    keys, weight = fit_recording(train_dir, tmp_path / "full", 12, workers)
    assert len({k for batch in keys for k in batch}) > 15  # the run sees new samples after its first epoch
    for k in (3, 5, 10):
        resumed, resumed_weight = fit_recording(train_dir, tmp_path / f"from{k}", 12, workers,
                                                ckpt_path=tmp_path / f"full/step={k}.ckpt")
        assert resumed == keys[k:], f"resumed at step {k}"
        assert torch.equal(resumed_weight, weight)


@pytest.mark.parametrize("samples_per_epoch", [None, 15])
def test_a_run_stopped_by_max_steps_continues_its_unfinished_epoch(train_dir: Path, tmp_path: Path,
                                                                   samples_per_epoch: int | None) -> None:
    """Stopped by max_steps, Lightning saves its loops with the epoch finished and resumes at the next
    one; the data continues the unfinished epoch, as in the uninterrupted run."""
    keys, weight = fit_recording(train_dir, tmp_path / "full", 7, 2, samples_per_epoch=samples_per_epoch)
    first, _ = fit_recording(train_dir, tmp_path / "first", 3, 2, samples_per_epoch=samples_per_epoch)
    rest, rest_weight = fit_recording(train_dir, tmp_path / "rest", 7, 2, ckpt_path=tmp_path / "first/end.ckpt",
                                      samples_per_epoch=samples_per_epoch)
    assert first + rest == keys and torch.equal(rest_weight, weight)


def test_resume_with_another_worker_count_restarts_from_a_step_seed(
    train_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys, _ = fit_recording(train_dir, tmp_path / "full", 6, workers=0)
    with caplog.at_level(logging.WARNING, logger="glide_lightning.data.loaders"):
        resumed, _ = fit_recording(train_dir, tmp_path / "more", 6, workers=2, ckpt_path=tmp_path / "full/step=3.ckpt")
    assert "restarts from a new seed derived from batch 3" in caplog.text
    assert resumed != keys[3:] and resumed[0] != keys[0]  # not a replay of the run's first batches


DDP_SCRIPT = """
import json, sys
import lightning as L, torch
from glide_lightning.data.datamodule import GlideDataModule
from glide_lightning.data.tokenizers import TokenizerSpec

class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.train_keys, self.val_keys = [], []
    def training_step(self, batch, batch_idx):
        self.train_keys.append(batch["key"])
        self.log("data/skipped", batch["skipped"].float(), reduce_fx="sum", sync_dist=True, batch_size=1)
        return (self.weight * batch["image"].mean()) ** 2
    def validation_step(self, batch, batch_idx):
        self.val_keys.append(batch["key"])
        self.log("val/mean", batch["image"].mean(), sync_dist=True, batch_size=len(batch["key"]))
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    shards, out = sys.argv[1], sys.argv[2]
    dm = GlideDataModule(train_shards=shards, val_shards=shards, image_size=16, batch_size=3,
                         tokenizer_spec=TokenizerSpec("clip", 8),
                         num_workers=1, samples_per_epoch=7, shuffle_buffer=4)
    runs = {}
    for name, ckpt_path in (("full", None), ("resumed", f"{out}/ckpt/step=1.ckpt")):
        model = Recorder()
        every_step = L.pytorch.callbacks.ModelCheckpoint(dirpath=f"{out}/ckpt" if name == "full" else f"{out}/ckpt2",
                                                         filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                            callbacks=[every_step], enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        runs[name] = {"train": model.train_keys, "val": model.val_keys, "steps": trainer.global_step}
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(runs, f)
"""


@pytest.mark.slow
def test_ddp_two_processes(train_dir: Path, tmp_path: Path) -> None:
    """A real 2-process DDP fit (gloo, in a subprocess: Lightning's ddp launcher re-runs the
    command): ranks take the same number of steps on different data, validation is split, and a
    run resumed from step 1 trains every rank on the batches of the uninterrupted run."""
    import subprocess
    import sys

    from hang_guard import HANG_GUARD_S  # (here: the scripts of other tests import this module on their own path)

    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    try:
        run = subprocess.run([sys.executable, str(script), str(train_dir), str(tmp_path)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired as hung:  # seen once in a full suite: say where the ranks stood
        pytest.fail(f"the two-process DDP fit hung for {HANG_GUARD_S} s; its output:\n{(hung.stderr or b'')[-4000:]!r}")
    assert run.returncode == 0, run.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for run_of_rank in runs:
        assert run_of_rank["resumed"]["train"] == run_of_rank["full"]["train"][1:]
    ranks = [run_of_rank["full"] for run_of_rank in runs]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 7 // 3 = 2 batches per rank and epoch
    assert ranks[0]["train"] != ranks[1]["train"]
    val = [[k for keys in rank["val"] for k in keys] for rank in ranks]
    assert len(val[0]) == len(val[1]) == len(ALL_KEYS)  # 2 validation runs, half the samples each
    assert set(val[0]).isdisjoint(val[1]) and set(val[0]) | set(val[1]) == set(ALL_KEYS)


def test_the_model_owns_image_size_and_tokenizer_the_data_module_has_no_defaults(tmp_path, monkeypatch):
    """One default per knob: GlideDataModule takes them from its caller, its tokenizer as one value (name, text_ctx
    and files); the training CLI derives that value from the model's config."""
    import inspect

    from glide_lightning.cli import GlideCLI

    params = inspect.signature(GlideDataModule).parameters
    for name in ("image_size", "tokenizer_spec"):
        assert params[name].default is inspect.Parameter.empty, name
    assert not {"text_ctx", "bpe_dir", "tokenizer_path", "tokenizer_revision"} & params.keys()  # all in the spec
    with pytest.raises(TypeError, match="image_size"):
        GlideDataModule(train_shards="x.tar", tokenizer_spec=TokenizerSpec("clip", 8))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    repo = Path(__file__).resolve().parents[2]
    cli = GlideCLI(args=["--config", str(repo / "experiments/smoke.yaml"), "--run.root", str(tmp_path),
                         "--model.model.text_ctx", "24", "--model.model.image_size", "16",
                         "--trainer.callbacks", "[]", "--trainer.logger", "false"], run=False)
    assert cli.datamodule.image_size == cli.model.model_config.image_size == 16
    assert cli.datamodule.tokenizer_spec == cli.model.tokenizer_spec == TokenizerSpec("clip", 24)
    assert cli.datamodule.tokenizer.text_ctx == cli.model.tokenizer.text_ctx == 24
    assert cli.model.hparams["tokenizer"] == "clip"
    assert cli.datamodule.hparams["tokenizer_spec"] == {"name": "clip", "text_ctx": 24, "bpe_dir": None, "path": None,
                                                        "revision": None}  # plain data: loads with weights_only=True


def test_the_tokenizer_spec_is_checked_when_made_and_taken_as_its_dict():
    """A hand-made spec names what is wrong; the data module takes a spec or its dict (as checkpoints store it)."""
    with pytest.raises(ValueError, match="unknown tokenizer 'bert'; choices: clip, gpt2, t5"):
        TokenizerSpec("bert", 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="text_ctx must be an int >= 1, got 0"):
        TokenizerSpec("clip", 0)
    with pytest.raises(ValueError, match="bpe_dir belongs to tokenizer 'gpt2', not 'clip': drop it"):
        TokenizerSpec("clip", 8, bpe_dir="/bpe")
    with pytest.raises(ValueError, match="TokenizerSpec\\('t5'\\) needs path"):
        TokenizerSpec("t5", 8)
    with pytest.raises(TypeError, match="TokenizerSpec\\('clip', text_ctx=77\\)"):
        GlideDataModule(train_shards="x.tar", image_size=16, tokenizer_spec="clip")  # type: ignore[arg-type]
    dm = GlideDataModule(train_shards="x.tar", image_size=16, tokenizer_spec=TokenizerSpec("clip", 8).to_dict())
    assert dm.tokenizer_spec == TokenizerSpec("clip", 8) and dm.tokenizer.text_ctx == 8
