"""WarmupEMA: the averaged weights after each update equal the closed form of the warmed-up decay,
through a real Trainer, and a run resumed from a checkpoint continues the warm-up where it stopped."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from glide_lightning.callbacks import WarmupEMA
from glide_lightning.callbacks.ema import ema_decay

LR = 0.5


class Drift(L.LightningModule):
    """One weight, loss = w·1: SGD moves it by exactly −LR per step, so w after k steps is w_0 − k·LR."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([3.0]))

    def training_step(self, batch, batch_idx):
        return self.w.sum() + 0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class RecordAverage(L.Callback):
    """The averaged weight after each step (callbacks run after the EMA callback, which is listed first)."""

    def __init__(self) -> None:
        self.average: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, WarmupEMA))
        self.average[trainer.global_step] = float(ema._average_model.module.w)


def closed_form(steps: int, decay: float, warmup: str, **kw) -> list[float]:
    """w̄_1 = w_1, w̄_{n+1} = d_n·w̄_n + (1 − d_n)·w_{n+1}, d_n by the module docstring's formulas."""
    weights = [3.0 - k * LR for k in range(1, steps + 1)]
    formulas = {"tf": lambda n: min(decay, (1 + n) / (10 + n)),
                "power": lambda n: min(decay, 1 - (1 + n / kw.get("inv_gamma", 1.0)) ** -kw.get("power", 2 / 3)),
                "none": lambda n: decay}
    average = [weights[0]]
    for n in range(1, steps):
        d = formulas[warmup](n)
        average.append(d * average[-1] + (1 - d) * weights[n])
    return average


def run(max_steps: int, ema: WarmupEMA, tmp_path, ckpt_path=None,
        *extra: L.Callback) -> tuple[L.Trainer, RecordAverage]:
    record = RecordAverage()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=bool(extra),
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ema, record, *extra],
                        default_root_dir=tmp_path)
    data = DataLoader(TensorDataset(torch.zeros(100, 1)), batch_size=1)
    trainer.fit(Drift(), data, ckpt_path=ckpt_path)
    return trainer, record


@pytest.mark.parametrize("warmup,kw", [("tf", {}), ("power", {"inv_gamma": 2.0, "power": 0.75}), ("none", {})])
def test_the_average_after_each_update_equals_the_closed_form(warmup, kw, tmp_path):
    _, record = run(8, WarmupEMA(decay=0.9, warmup=warmup, **kw), tmp_path)
    assert list(record.average.values()) == pytest.approx(closed_form(8, 0.9, warmup, **kw), abs=1e-6)


def test_the_warmup_follows_the_weights_early_where_a_fixed_decay_stays_at_the_start(tmp_path):
    warm = closed_form(8, 0.999, "tf")[-1]
    fixed = closed_form(8, 0.999, "none")[-1]
    assert abs(warm - (3.0 - 8 * LR)) < 1.5 < abs(fixed - (3.0 - 8 * LR))  # the live weight after 8 steps: -1
    assert ema_decay(1, 0.999) == pytest.approx(2 / 11) and ema_decay(10**6, 0.999) == 0.999


def test_a_resumed_run_continues_the_warmup_and_matches_an_uninterrupted_one(tmp_path):
    _, whole = run(6, WarmupEMA(decay=0.9), tmp_path / "a")
    # saved mid-run, as a run's checkpoints are (after fit, Lightning copies the average over the live weights)
    run(4, WarmupEMA(decay=0.9), tmp_path / "b", None,
        ModelCheckpoint(dirpath=tmp_path, filename="at{step}", every_n_train_steps=3, save_top_k=-1))
    path = tmp_path / "atstep=3.ckpt"
    assert int(torch.load(path, weights_only=True)["averaging_state"]["n_averaged"]) == 3
    _, resumed = run(6, WarmupEMA(decay=0.9), tmp_path / "c", ckpt_path=str(path))
    assert set(resumed.average) == {4, 5, 6}
    assert [resumed.average[s] for s in (4, 5, 6)] == pytest.approx([whole.average[s] for s in (4, 5, 6)], abs=1e-6)


def test_bad_settings_fail_when_the_callback_is_made():
    with pytest.raises(ValueError, match="unknown EMA warmup 'karras'; choose one of tf, power, none"):
        WarmupEMA(warmup="karras")
    with pytest.raises(ValueError, match="0 <= decay < 1"):
        WarmupEMA(decay=1.0)
