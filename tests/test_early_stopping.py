"""The V/M epoch loop's stopping rules (utils/training.py: fit): early stopping after
`patience` epochs without a better test loss, ReduceLROnPlateau halving the learning rate after
`lr_patience` of them, both carried across a resume by last.pt; and trainvae.py's flags reaching them.

A toy stage runs in-process: a linear model trained by SGD, and a fixed schedule of test
losses, so which epochs improve is known in advance (curves.png is not drawn).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import utils.training as training
from utils.checkpoint import load_checkpoint
from utils.training import TrainingRun, fit

LR = 0.1
LR_PATIENCE, PATIENCE = 1, 6
TEST_LOSS = {1: 5.0, 2: 4.0}  # improves at epochs 1 and 2, never after (4.5 from epoch 3 on)
# the lr each epoch trains at: halved once an epoch ends with more than LR_PATIENCE bad epochs in a
# row (torch's ReduceLROnPlateau, which then counts afresh): after epochs 4 and 6 and 8
LR_USED = {1: LR, 2: LR, 3: LR, 4: LR, 5: LR / 2, 6: LR / 2, 7: LR / 4, 8: LR / 4}
STOP_EPOCH = 2 + PATIENCE  # the 6th epoch in a row without improvement


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """curves.png is redrawn every epoch (tested elsewhere); here it would only cost time."""
    monkeypatch.setattr(training, "plot_columns", lambda *args, **kwargs: None)


class Epochs:
    """`batches` batches per pass, each telling the step which epoch it belongs to."""

    def __init__(self, batches: int) -> None:
        self.batches, self.epoch = batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter([self.epoch] * self.batches)


def make_run(stage_dir: Path, lr_used: dict[int, float], patience: int = PATIENCE) -> TrainingRun:
    """A stage as trainvae.py builds one: Adam-like plumbing, ReduceLROnPlateau(factor 0.5)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=LR_PATIENCE
    )

    def train_step(epoch: int) -> dict[str, float]:
        lr_used[epoch] = optimizer.param_groups[0]["lr"]
        loss = model(torch.randn(4, 2)).pow(2).mean()  # falls every epoch: not what the schedule may follow
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "items": 4}

    def test_step(epoch: int) -> dict[str, float]:
        return {"loss": TEST_LOSS.get(epoch, 4.5), "items": 1}

    return TrainingRun(
        stage_dir=stage_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        config={"size": 2},
        train_data=Epochs(2),
        test_data=Epochs(1),
        train_step=train_step,
        test_step=test_step,
        patience=patience,
    )


def test_patience_stops_and_plateau_halves_the_lr(tmp_path, capsys):
    lr_used: dict[int, float] = {}
    summary = fit(make_run(tmp_path, lr_used), epochs=20)
    out = capsys.readouterr().out
    assert summary == {"epoch": STOP_EPOCH, "best_loss": 4.0, "stopped_early": True}
    assert f"early stopping: no test-loss improvement in {PATIENCE} epochs" in out
    assert lr_used == pytest.approx(LR_USED)  # epochs 9..20 never ran
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert last["epoch"] == STOP_EPOCH and best["epoch"] == 2
    assert [row["epoch"] for row in last["log_rows"]] == list(range(1, STOP_EPOCH + 1))

    # the stop is final: a rerun with more epochs says so and trains nothing
    again: dict[int, float] = {}
    summary = fit(make_run(tmp_path, again), epochs=30)
    assert summary["stopped_early"] and summary["epoch"] == STOP_EPOCH and not again
    assert "early stopping had already triggered" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == STOP_EPOCH


@pytest.mark.parametrize("interrupted_after", [3, 5, 7])
def test_resume_keeps_the_plateau_and_patience_counts(tmp_path, interrupted_after):
    """Stopped after epoch e (its last.pt committed) and rerun: the same lr per epoch and the
    same stop as an uninterrupted run, so last.pt carried both counters."""
    lr_used: dict[int, float] = {}
    fit(make_run(tmp_path, lr_used), epochs=interrupted_after)
    assert sorted(lr_used) == list(range(1, interrupted_after + 1))
    summary = fit(make_run(tmp_path, lr_used), epochs=20)
    assert summary == {"epoch": STOP_EPOCH, "best_loss": 4.0, "stopped_early": True}
    assert lr_used == pytest.approx(LR_USED)


def test_patience_zero_never_stops(tmp_path):
    lr_used: dict[int, float] = {}
    summary = fit(make_run(tmp_path, lr_used, patience=0), epochs=STOP_EPOCH + 2)
    assert summary == {"epoch": STOP_EPOCH + 2, "best_loss": 4.0, "stopped_early": False}
    assert sorted(lr_used) == list(range(1, STOP_EPOCH + 3))


def test_trainvae_flags_reach_the_loop(tiny_dataset, tmp_path, monkeypatch):
    """--patience and --lr-patience are the loop's: the run trainvae.py hands to fit stops after
    --patience bad epochs and its scheduler halves the lr after --lr-patience."""
    import trainvae

    handed = []
    monkeypatch.setattr(
        trainvae, "fit", lambda run, epochs, noreload: handed.append(run) or {"epoch": 0, "best_loss": 1.0}
    )
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main() takes every core
    argv = ["--logdir", str(tmp_path), "--dataset", str(tiny_dataset), "--device", "cpu"]
    assert trainvae.main([*argv, "--patience", "4", "--lr-patience", "2"]) == 0
    (run,) = handed
    assert run.patience == 4
    assert isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert run.scheduler.patience == 2 and run.scheduler.factor == 0.5 and run.scheduler.mode == "min"
