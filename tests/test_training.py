"""utils/training.py's epoch loop: a kill at any point between its writes leaves files that a
rerun makes agree with each other (last.pt, best.pt, log.csv, the epoch pictures).

A tiny synthetic stage (a linear model, a fixed schedule of test losses) runs in-process; the
kill is an exception raised in place of the Nth write of the loop.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

import utils.training as training
from utils.checkpoint import load_checkpoint
from utils.logs import CSVLog
from utils.training import TrainingRun, fit

TEST_LOSSES = {1: 3.0, 2: 2.0, 3: 2.5, 4: 1.0, 5: 1.5}  # improves at epochs 1, 2 and 4
EPOCHS = len(TEST_LOSSES)
BEST_EPOCH = 4


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the loop catches it."""


class EpochData:
    """`batches` batches per pass, each telling the step which epoch it belongs to."""

    def __init__(self, batches: int) -> None:
        self.batches, self.epoch = batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter([self.epoch] * self.batches)


def make_run(stage_dir: Path, events: Events) -> TrainingRun:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)

    def train_step(epoch: int) -> dict[str, float]:
        x = torch.randn(4, 2)  # the global torch RNG, which last.pt carries across a resume
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "items": 4}

    def test_step(epoch: int) -> dict[str, float]:
        return {"loss": TEST_LOSSES[epoch], "items": 1}

    return TrainingRun(
        stage_dir=stage_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        config={"size": 2},
        train_data=EpochData(3),
        test_data=EpochData(1),
        train_step=train_step,
        test_step=test_step,
        patience=0,
        on_epoch_end=lambda epoch, _: events("picture", lambda: events.pictures.add(epoch)),
    )


class Events:
    """Counts the loop's writes and raises Killed in place of write number `kill_at`."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at, self.count, self.pictures, self.names = kill_at, 0, set(), []

    def __call__(self, name: str, write, half=None):
        if self.count == self.kill_at:
            if half is not None:
                half()  # a kill in the middle of appending a row leaves half of it
            raise Killed(name)
        self.count += 1
        self.names.append(name)
        return write()


@pytest.fixture
def events(monkeypatch) -> Events:
    events = Events()
    save, append, plot = training.save_checkpoint, training.CSVLog.append, training.plot_columns

    def save_checkpoint(path, payload):
        return events(Path(path).name, lambda: save(path, payload))

    def csv_append(log, row):
        def half():
            line = ",".join(str(row.get(f, "")) for f in log.fields)
            with open(log.path, "a") as handle:
                handle.write(line[: len(line) // 2])

        return events("row", lambda: append(log, row), half)

    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(training.CSVLog, "append", csv_append)
    monkeypatch.setattr(
        training, "plot_columns", lambda *args, **kwargs: events("curves", lambda: plot(*args, **kwargs))
    )
    return events


def log_rows(stage: Path) -> list[dict[str, str]]:
    with open(stage / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_consistent(stage: Path, epoch: int) -> None:
    """The files of a run committed up to `epoch` agree with each other."""
    last, best = load_checkpoint(stage / "last.pt"), load_checkpoint(stage / "best.pt")
    expected_best = min(range(1, epoch + 1), key=TEST_LOSSES.get)
    assert last["epoch"] == epoch
    assert last["best_epoch"] == best["epoch"] == expected_best
    assert last["best_loss"] == best["test_loss"] == best["best_loss"] == TEST_LOSSES[expected_best]
    rows = log_rows(stage)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epoch + 1))
    assert [float(r["test_loss"]) for r in rows] == [TEST_LOSSES[e] for e in range(1, epoch + 1)]
    assert all(r["epoch_time_s"] for r in rows)  # whole rows, no half row
    assert [int(r["epoch"]) for r in last["log_rows"]] == list(range(1, epoch + 1))


def test_kill_between_any_two_writes_then_rerun_agrees(events, tmp_path, capsys):
    reference = tmp_path / "reference"
    fit(make_run(reference, events), EPOCHS)
    writes, names = events.count, list(events.names)
    assert names[:4] == ["picture", "last.pt", "best.pt", "row"]  # the order the protocol relies on
    assert names.count("best.pt") == 3 and names.count("last.pt") == EPOCHS
    reference_last, reference_best = (
        load_checkpoint(reference / "last.pt"),
        load_checkpoint(reference / "best.pt"),
    )
    assert reference_best["epoch"] == BEST_EPOCH
    assert_consistent(reference, EPOCHS)
    capsys.readouterr()

    for kill_at in range(writes):
        stage = tmp_path / f"kill_{kill_at}"
        events.kill_at, events.count, events.pictures = kill_at, 0, set()
        with pytest.raises(Killed) as killed:
            fit(make_run(stage, events), EPOCHS)
        # first, the kill happened where it was meant to: in place of the reference run's write kill_at
        assert killed.value.args == (names[kill_at],) and events.count == kill_at, (kill_at, killed.value)
        events.kill_at = None
        pictures = set(events.pictures)
        committed = load_checkpoint(stage / "last.pt")["epoch"] if (stage / "last.pt").exists() else 0
        if committed:
            # a rerun that only resumes (nothing left to train) must already leave agreeing files
            capsys.readouterr()
            fit(make_run(stage, events), committed)
            said = re.search(
                r"resuming .* after epoch (\d+) \(best test loss ([\d.e+-]+)\)", capsys.readouterr().out
            )
            assert said and int(said[1]) == committed
            assert float(said[2]) == min(TEST_LOSSES[e] for e in range(1, committed + 1)), kill_at
            assert_consistent(stage, committed)
            assert set(range(1, committed + 1)) <= pictures, (
                f"a committed epoch without its pictures (kill at {kill_at})"
            )
        # and a rerun to the end resumes (trains only the epochs not committed) and gives the
        # uninterrupted run's files
        done_before = len(events.names)
        fit(make_run(stage, events), EPOCHS)
        assert events.names[done_before:].count("last.pt") == EPOCHS - committed, (kill_at, committed)
        assert_consistent(stage, EPOCHS)
        last, best = load_checkpoint(stage / "last.pt"), load_checkpoint(stage / "best.pt")
        for name, value in reference_last["state_dict"].items():
            assert torch.equal(last["state_dict"][name], value), (kill_at, name)
        for name, value in reference_best["state_dict"].items():
            assert torch.equal(best["state_dict"][name], value), (kill_at, name)
        assert pictures | events.pictures == set(range(1, EPOCHS + 1))


def test_fresh_start_drops_a_best_pt_it_cannot_resume(events, tmp_path):
    """No last.pt (e.g. a kill between --noreload's two deletions): best.pt is from a run that
    cannot be resumed, so a fresh start removes it before its first epoch."""
    stage = tmp_path / "stage"
    fit(make_run(stage, events), 2)
    (stage / "last.pt").unlink()
    events.kill_at, events.count = 0, 0  # killed before the first epoch's first write
    with pytest.raises(Killed):
        fit(make_run(stage, events), 2)
    assert not (stage / "best.pt").exists()


def test_resume_from_a_last_pt_without_log_rows(events, tmp_path):
    """A last.pt written before log_rows existed resumes from log.csv as before."""
    stage = tmp_path / "stage"
    fit(make_run(stage, events), 2)
    last = load_checkpoint(stage / "last.pt")
    del last["log_rows"], last["best_epoch"]
    torch.save(last, stage / "last.pt")
    fit(make_run(stage, events), 3)
    assert_consistent(stage, 3)


def test_a_log_of_another_kind_of_run_is_started_afresh(tmp_path):
    """An --imagine run (rows by round) starting where a CMA-ES search logged generations."""
    path = tmp_path / "log.csv"
    search = CSVLog(path, ["generation", "fitness"], step_field="generation", keep_before=0)
    search.append({"generation": 1, "fitness": 2.0})
    rounds = CSVLog(path, ["round", "eval_return"], step_field="round", keep_before=1)
    assert rounds.read() == [] and path.read_text().splitlines() == ["round,eval_return"]
    rounds.append({"round": 1, "eval_return": 3.0})
    assert CSVLog(path, ["round", "eval_return"], step_field="round", keep_before=2).read() == [
        {"round": "1", "eval_return": "3"}
    ]


@pytest.mark.parametrize(
    "value, expected", [("1", 1), ("3", 3), (None, "cores"), ("", "cores"), ("0", "cores"), ("x", "cores")]
)
def test_cpu_threads_honour_omp_num_threads_when_it_is_a_count(monkeypatch, value, expected):
    """V and M take every core unless OMP_NUM_THREADS names a count (the parallel test processes set 1)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if value is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setattr(training.os, "cpu_count", lambda: 7)
    assert training.cpu_threads() == (7 if expected == "cores" else expected)
