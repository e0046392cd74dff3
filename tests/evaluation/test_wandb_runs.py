"""The offline wandb run reader: what wandb.init/log/define_metric/summary/Table wrote comes back as written,
and the log framing is checked (a record split over blocks, a torn tail, a corrupt record)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from glide_lightning.evaluation.wandb_eval import metric_name
from glide_lightning.evaluation.wandb_runs import BLOCK, HEADER, find_runs, read_run, records
from wandb_offline import offline_wandb


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    import wandb

    root = tmp_path_factory.mktemp("wandb")
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    with offline_wandb(root):
        run = wandb.init(project="p", group="g", job_type="train", name="arm", tags=["t"], dir=str(root),
                         mode="offline", config={"a": 1, "nested": {"b": [2, 3]}})
        run.define_metric("images_seen")
        run.define_metric("train/*", step_metric="images_seen", summary="min")
        run.define_metric(metric_name("val/fid@1.5"), step_metric="images_seen", summary="min")  # a dot: escaped
        table = wandb.Table(columns=["step", "prompt", "image"])
        table.add_data(7, "a red circle", wandb.Image(pixels))
        run.log({"train/loss": 0.5, "images_seen": 32, "samples": table, "val/fid@1.5": 4.0})
        run.log({"train/loss": 0.25, "images_seen": 64, "long": "x" * (3 * BLOCK), "val/fid@1.5": 3.0})  # a record over several blocks
        run.config.update({"git": {"commit": "abc", "dirty": True}})
        run.summary["eval/fid"] = 12.5
        run.finish()
    return root, pixels


def test_a_run_reads_back_as_written(offline_run: tuple[Path, np.ndarray]) -> None:
    root, pixels = offline_run
    (run,) = find_runs(root)
    assert (run.name, run.project, run.group, run.job_type, run.tags) == ("arm", "p", "g", "train", ["t"])
    assert run.config["a"] == 1 and run.config["nested"] == {"b": [2, 3]}
    assert run.config["git"] == {"commit": "abc", "dirty": True}
    assert run.series("train/loss", x="images_seen") == [(32, 0.5), (64, 0.25)]
    assert run.history[1]["long"] == "x" * (3 * BLOCK)
    assert run.metrics["train/*"] == {"step_metric": "images_seen", "hidden": False, "summary": ["min"]}
    assert run.summary["eval/fid"] == 12.5 and run.summary["train/loss"] == {"min": 0.25}
    # unescaped, the dot would define "val/fid@1" → "5": no step metric, no summary for the logged key
    assert run.summary["val/fid@1.5"] == {"min": 3.0} and run.metrics["val/fid@1.5"]["step_metric"] == "images_seen"
    (row,) = run.table("samples")
    assert (row["step"], row["prompt"]) == (7, "a red circle")
    assert np.array_equal(np.asarray(Image.open(row["image"]["local_path"]).convert("RGB")), pixels)
    with pytest.raises(KeyError, match="no wandb Table 'nope'"):
        run.table("nope")


def test_the_framing_is_checked(offline_run: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    root, _ = offline_run
    (log_file,) = root.rglob("run-*.wandb")
    data = log_file.read_bytes()
    whole = list(records(log_file))
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(data[:-5])  # a killed writer's last record: the records before it still read
    assert len(list(records(torn))) == len(whole) - 1
    corrupt = tmp_path / "corrupt.wandb"
    corrupt.write_bytes(data[:len(HEADER) + 9] + bytes([data[len(HEADER) + 9] ^ 1]) + data[len(HEADER) + 10:])
    with pytest.raises(ValueError, match="checksum"):
        list(records(corrupt))
    (tmp_path / "not.wandb").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a wandb run log"):
        list(records(tmp_path / "not.wandb"))
    with pytest.raises(FileNotFoundError, match="not a wandb run folder"):
        read_run(tmp_path / "empty")


def test_the_sessions_of_a_resumed_run_are_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    for session, steps in enumerate(([1, 2], [3])):  # a run interrupted after step 2, then resumed
        with offline_wandb(tmp_path):  # each session a process of its own
            run = wandb.init(project="p", id="resumed1", resume="allow", dir=str(tmp_path), mode="offline",
                             config={"session": session})
            for step in steps:
                run.log({"train/loss": 1 / step, "images_seen": 32 * step})
            run.finish()
    assert len(list(tmp_path.rglob("run-*.wandb"))) == 2
    (run,) = find_runs(tmp_path)
    assert run.series("train/loss", x="images_seen") == [(32, 1.0), (64, 0.5), (96, 1 / 3)]
    assert run.config["session"] == 1 and run.summary["train/loss"] == 1 / 3


# ----------------------------------------------------------------------------- torn tails and damage in the middle
@pytest.fixture(scope="module")
def long_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log of an offline run of 24 rows of 2-9 KB, marked ``<row07>``: records over several blocks, some split."""
    import wandb

    root = tmp_path_factory.mktemp("long")
    with offline_wandb(root):
        run = wandb.init(project="p", dir=str(root), mode="offline")
        for i in range(24):
            run.log({"i": i, "text": f"<row{i:02d}>" + "x" * (2000 + 300 * i)})
        run.finish()
    (log_file,) = root.rglob("run-*.wandb")
    return log_file


def _marker(data: bytes, row: int) -> int:
    """Where row ``row``'s logged text last appears in the log: in its history record (each step's summary records,
    which hold it too, come before)."""
    return data.rindex(b"<row%02d>" % row)


def _record_starts(data: bytes) -> list[tuple[int, int]]:
    """(byte, type) of every record (fragment) of an intact log."""
    starts, pos = [], len(HEADER)
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        starts.append((pos, data[pos + 6]))
        pos += 7 + int.from_bytes(data[pos + 4:pos + 6], "little")
    return starts


def _read_damaged(tmp_path: Path, name: str, data: bytes, caplog: pytest.LogCaptureFixture) -> tuple[Any, int | None]:
    """The run of the log ``data`` (as ``<tmp_path>/<name>/run-x.wandb``), and the byte its torn-tail warning names
    (None: no warning); the warning must name the file."""
    import re

    folder = tmp_path / name
    folder.mkdir()
    (folder / "run-x.wandb").write_bytes(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glide_lightning.evaluation.wandb_runs"):
        run = read_run(folder)
    warned = [r.getMessage() for r in caplog.records if "unreadable tail" in r.getMessage()]
    if not warned:
        return run, None
    (message,) = warned
    assert str(folder / "run-x.wandb") in message
    return run, int(re.search(r"unreadable tail from byte (\d+)", message).group(1))


def test_a_log_cut_off_mid_record_reads_up_to_the_cut_with_a_warning(
        long_log: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = long_log.read_bytes()
    intact = read_run(long_log.parent)
    assert [row["i"] for row in intact.history] == list(range(24))
    for row in (3, 12, 23):  # a killed writer: the log ends inside row `row`'s record
        cut = _marker(data, row) + 1000
        run, tail = _read_damaged(tmp_path, f"cut{row}", data[:cut], caplog)
        assert run.history == intact.history[:row]
        assert tail is not None and _marker(data, row - 1) < tail < _marker(data, row)  # where row's record begins
        run, again = _read_damaged(tmp_path, f"header{row}", data[:tail + 3], caplog)  # inside its header
        assert run.history == intact.history[:row] and again == tail
    # a record split over blocks whose last fragment is missing: the log ends where a fragment begins
    first, (cut, _) = next((a, b) for a, b in zip(_record_starts(data), _record_starts(data)[1:])
                           if b[1] == 4 and a[1] == 2)
    rows = sum(_marker(data, i) < first[0] for i in range(24))
    run, tail = _read_damaged(tmp_path, "fragment", data[:cut], caplog)
    assert run.history == intact.history[:rows] and tail == first[0]
    run, tail = _read_damaged(tmp_path, "whole", data, caplog)  # the intact log: no warning
    assert run.history == intact.history and tail is None


def test_a_zero_filled_tail_reads_up_to_the_zeros_with_a_warning(
        long_log: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = long_log.read_bytes()
    intact = read_run(long_log.parent)
    whole = len(list(records(long_log)))
    run, tail = _read_damaged(tmp_path, "extended", data + bytes(3 * BLOCK), caplog)  # zeros after the last record
    assert run.history == intact.history and run.summary == intact.summary and tail == len(data)
    assert len(list(records(tmp_path / "extended/run-x.wandb"))) == whole
    for row in (3, 12, 23):  # the last part of the file overwritten with zeros, from inside row `row`'s record
        cut = _marker(data, row) + 500
        run, tail = _read_damaged(tmp_path, f"zeroed{row}", data[:cut] + bytes(len(data) - cut), caplog)
        assert run.history == intact.history[:row]
        assert tail is not None and _marker(data, row - 1) < tail < _marker(data, row)
        # cut there, then zero-filled to a block boundary past the end (a preallocated extension)
        size = (len(data) // BLOCK + 2) * BLOCK
        run, again = _read_damaged(tmp_path, f"prealloc{row}", data[:cut] + bytes(size - cut), caplog)
        assert run.history == intact.history[:row] and again == tail


def test_damage_in_the_middle_raises_naming_the_file(long_log: Path, tmp_path: Path) -> None:
    data = long_log.read_bytes()
    starts = _record_starts(data)
    at = _marker(data, 10) + 100
    flipped = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
    zeroed = data[:at] + bytes(3000) + data[at + 3000:]  # zeros in the middle are no torn tail
    # a length that runs past the end of the file, in the last block (read as a torn tail, it would drop 2 rows)
    last = max(pos for pos, _ in starts if pos < _marker(data, 22))
    long = data[:last + 4] + b"\xff\xff" + data[last + 6:]
    for name, damaged, match in (("long", long, "65535 bytes"), ("flipped", flipped, "checksum"),
                                 ("zeroed", zeroed, "byte")):
        path = tmp_path / f"{name}.wandb"
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=match) as raised:
            list(records(path))
        assert str(path) in str(raised.value) and "damaged in the middle" in str(raised.value), name
