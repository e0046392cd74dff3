"""The offline wandb run reader: what wandb.init/log/define_metric/summary/Table wrote comes back as written,
and the log framing is checked (a record split over blocks, a torn tail, a corrupt record)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glide_lightning.evaluation.wandb_eval import metric_name
from glide_lightning.evaluation.wandb_runs import BLOCK, HEADER, find_runs, read_run, records


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    import wandb

    root = tmp_path_factory.mktemp("wandb")
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DATA_DIR", str(root / "data"))  # the staged artifacts (Tables) stay in the test's folder
        mp.setenv("WANDB_SILENT", "true")
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

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for session, steps in enumerate(([1, 2], [3])):  # a run interrupted after step 2, then resumed
        run = wandb.init(project="p", id="resumed1", resume="allow", dir=str(tmp_path), mode="offline",
                         config={"session": session})
        for step in steps:
            run.log({"train/loss": 1 / step, "images_seen": 32 * step})
        run.finish()
    assert len(list(tmp_path.rglob("run-*.wandb"))) == 2
    (run,) = find_runs(tmp_path)
    assert run.series("train/loss", x="images_seen") == [(32, 1.0), (64, 0.5), (96, 1 / 3)]
    assert run.config["session"] == 1 and run.summary["train/loss"] == 1 / 3
