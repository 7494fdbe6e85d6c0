"""The epoch loop V and M share: resume, train, test, checkpoint, log, plot, stop early.

A stage script builds its model, optimizer, scheduler and data, says how to run one batch
(`train_step`, `test_step`), and hands them to `fit`. Everything the guide asks of a
training stage lives here once:

- `last.pt` after every epoch (model, optimizer, scheduler, early-stopping state, epoch,
  best test loss, torch RNG), so a killed run loses at most the epoch in progress and a
  rerun resumes exactly; `best.pt` only when the test loss improves;
- `log.csv` with one row per epoch and `curves.png` redrawn from it;
- a tqdm bar whose rate is in items (frames, sequences) per second;
- a non-finite loss stops training with one line and leaves the last good checkpoints.

Kill safety (each file is written atomically; the question is their order). Epoch e ends
with: the epoch's pictures (`on_epoch_end`), then `last.pt` -- the commit point -- then
`best.pt` if e improved, then e's row of `log.csv` and `curves.png`. `last.pt` holds all
a resume needs to redo the other writes: the log rows of every committed epoch
(`log_rows`) and `best_epoch`, and when e improved its payload *is* best.pt's. So a resume
from `last.pt` at epoch k first rolls forward: it copies `last.pt` to `best.pt` if
`best_epoch == k` and best.pt does not hold epoch k, and rewrites `log.csv` as exactly the
committed rows (a row of the uncommitted epoch k+1 cannot exist; a lost or half row of k is
restored). A kill before epoch k+1's commit loses that epoch, which the rerun redoes; a kill
after it loses nothing. Either way best.pt, log.csv and the rerun's messages agree with last.pt.
A run that starts without resuming deletes best.pt first: it must only hold this run's best.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import BEST, LAST, check_config, load_checkpoint, save_checkpoint
from utils.cli import error_line
from utils.errors import BadCheckpointError, BadInputError, BadRolloutError, StageError
from utils.files import atomic_write, remove_orphaned_temps
from utils.logs import CSVLog, plot_columns


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" -> CUDA when present, else CPU. Asking for CUDA without one is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(
            "--device cuda asked but no CUDA GPU is visible to torch; use --device cpu or auto"
        )
    device = torch.device(name)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    return device


def cpu_threads() -> int:
    """Torch's threads for intra-op math: OMP_NUM_THREADS where it is set to a count (a shared
    machine, the test suite's parallel workers), else every core."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else max(1, os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without a test-loss improvement (0 disables)."""

    patience: int
    best: float = math.inf
    bad_epochs: int = 0

    def step(self, loss: float) -> bool:
        """Record an epoch's test loss; True when training should stop."""
        if loss < self.best:
            self.best, self.bad_epochs = loss, 0
        else:
            self.bad_epochs += 1
        return self.triggered()

    def triggered(self) -> bool:
        """Whether the recorded epochs already call for a stop."""
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])


StepFn = Callable[[Any], dict[str, float]]


@dataclass
class TrainingRun:
    """What `fit` needs from a stage. `train_step`/`test_step` take one batch and return
    float metrics including "loss" and "items" (the batch's frames or sequences, used to
    weight the epoch means and for the rate)."""

    stage_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.ReduceLROnPlateau
    config: dict[str, Any]  # sizes and hyper-parameters needed to rebuild the model
    train_data: Iterable
    test_data: Iterable
    train_step: StepFn
    test_step: StepFn
    metrics: list[str] = field(default_factory=list)  # extra metric names to log, besides loss
    unit: str = "frame"
    patience: int = 5
    train_items: int | None = None  # total for the progress bar, if known
    config_keys: list[str] | None = None  # which config entries must match to resume
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    extra_state: dict[str, Any] = field(default_factory=dict)  # saved as-is in checkpoints


def _run_epoch(step: StepFn, data: Iterable, names: list[str], bar: tqdm | None) -> dict[str, float]:
    totals = {name: 0.0 for name in names}
    items = 0.0
    for batch in data:
        out = step(batch)
        if not math.isfinite(out["loss"]):
            if bar is not None:
                bar.close()
            raise StageError(
                f"loss became {out['loss']} (non-finite); stopped, the last good checkpoints are kept; try a lower --lr"
            )
        n = out["items"]
        items += n
        for name in names:
            totals[name] += out[name] * n
        if bar is not None:
            bar.update(n)
            bar.set_postfix(loss=f"{totals['loss'] / items:.4g}", refresh=False)
    if items == 0:
        raise BadRolloutError("an epoch saw no data; the dataset split is empty (generate more rollouts)")
    return {name: total / items for name, total in totals.items()} | {"items": items}


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A log row as CSVLog writes it (floats to 6 significant digits), kept in last.pt."""
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


def _write_log(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """log.csv holding exactly `rows` (the committed epochs'), written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as handle:
        handle.write(text.getvalue().encode())


def _saved_epoch(path: Path) -> int | None:
    """The epoch a checkpoint holds, or None if it is missing or unreadable."""
    try:
        return int(load_checkpoint(path, map_location="cpu")["epoch"])
    except Exception:
        return None


def _roll_forward(state: dict[str, Any], last_path: Path, best_path: Path) -> None:
    """Redo the writes a kill may have cut short after last.pt (epoch k) was committed:
    best.pt when epoch k was the best. (log.csv is rewritten from `log_rows` by `fit`.)"""
    epoch = int(state["epoch"])
    if state.get("best_epoch") == epoch and _saved_epoch(best_path) != epoch:
        with atomic_write(best_path) as out, open(last_path, "rb") as source:
            shutil.copyfileobj(source, out)  # same payload as the interrupted best.pt write
        print(
            f"restored {best_path} from {last_path} (epoch {epoch}, the best; the previous run "
            "stopped before writing it)"
        )


@dataclass
class _Progress:
    """Where a run stands: the last committed epoch and what last.pt keeps beside the weights."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int | None = None
    rows: list[dict[str, Any]] | None = field(default_factory=list)  # log.csv's rows of the committed epochs


def _resume(run: TrainingRun, early: EarlyStopping, last_path: Path, best_path: Path) -> _Progress:
    """Restore model, optimizer, scheduler, early stopping and the torch RNG from last.pt, then
    redo the writes a kill may have cut short after it (best.pt)."""
    try:  # a truncated, foreign or damaged last.pt: one line, not a traceback
        state = load_checkpoint(last_path, map_location="cpu")
        check_config(dict(state["config"]), run.config, last_path, run.config_keys)
        run.model.load_state_dict(state["state_dict"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        early.load_state_dict(state["early_stopping"])
        torch.set_rng_state(state["torch_rng"])
        best_epoch = (
            state["best_epoch"] if "best_epoch" in state else _saved_epoch(best_path)
        )  # an older last.pt
        rows = (
            list(state["log_rows"]) if "log_rows" in state else None
        )  # None: an older last.pt (log.csv has them)
        progress = _Progress(int(state["epoch"]), float(state["best_loss"]), best_epoch, rows)
    except BadCheckpointError:
        raise
    except Exception as error:
        raise BadCheckpointError(
            f"cannot resume from {last_path} ({error_line(error)}); use --noreload to start afresh"
        ) from None
    _roll_forward(state, last_path, best_path)
    print(f"resuming {last_path} after epoch {progress.epoch} (best test loss {progress.best_loss:.6g})")
    return progress


def _train_and_test(run: TrainingRun, epoch: int, epochs: int, names: list[str]) -> tuple[dict, dict, float]:
    """One epoch of training (with a progress bar), then the test pass: (train, test, train seconds)."""
    t0 = time.perf_counter()
    for data in (run.train_data, run.test_data):
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
    run.model.train()
    desc = f"epoch {epoch}/{epochs}"
    with tqdm(total=run.train_items, unit=run.unit, unit_scale=True, desc=desc, dynamic_ncols=True) as bar:
        train = _run_epoch(run.train_step, run.train_data, names, bar)
    train_time = time.perf_counter() - t0
    run.model.eval()
    with torch.no_grad():
        test = _run_epoch(run.test_step, run.test_data, names, None)
    return train, test, train_time


def _checkpoint(
    run: TrainingRun, early: EarlyStopping, progress: _Progress, test_loss: float
) -> dict[str, Any]:
    """last.pt's payload after epoch `progress.epoch` (and best.pt's when it improved)."""
    return {
        "state_dict": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "early_stopping": early.state_dict(),
        "epoch": progress.epoch,
        "best_loss": progress.best_loss,
        "best_epoch": progress.best_epoch,
        "test_loss": test_loss,
        "config": run.config,
        "torch_rng": torch.get_rng_state(),
        **run.extra_state,
    }


def fit(run: TrainingRun, epochs: int, noreload: bool = False) -> dict[str, Any]:
    """Train for up to `epochs` epochs (counted across resumes); returns the final summary.

    Write order and resume protocol: see the module docstring."""
    last_path, best_path, log_path = run.stage_dir / LAST, run.stage_dir / BEST, run.stage_dir / "log.csv"
    names = ["loss", *run.metrics]
    fields = ["epoch", *(f"{part}_{n}" for part in ("train", "test") for n in names)]
    fields += ["lr", f"{run.unit}s_per_s", "epoch_time_s"]
    remove_orphaned_temps(run.stage_dir)  # what a kill inside a write left behind
    early = EarlyStopping(run.patience)
    if noreload or not last_path.exists():  # a fresh start: best.pt must only hold this run's best
        for stale in (last_path, best_path):
            stale.unlink(missing_ok=True)
        progress = _Progress()
    else:
        progress = _resume(run, early, last_path, best_path)
    log = CSVLog(log_path, fields, keep_before=progress.epoch + 1)
    if progress.rows is None:  # a last.pt from before log_rows: from now on they are kept there too
        progress.rows = [{k: v for k, v in row.items() if k in fields} for row in log.read()]
    elif progress.rows:  # exactly the committed epochs' rows, whatever a kill left in the file
        _write_log(log_path, fields, progress.rows)
        _plot(run, log_path)
    if early.triggered():
        print("early stopping had already triggered; nothing to do (use --noreload to start afresh)")
        return {"epoch": progress.epoch, "best_loss": progress.best_loss, "stopped_early": True}

    stopped_early = False
    for epoch in range(progress.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        train, test, train_time = _train_and_test(run, epoch, epochs, names)
        run.scheduler.step(test["loss"])
        stopped_early = early.step(test["loss"])
        improved = test["loss"] < progress.best_loss
        if improved:
            progress.best_loss, progress.best_epoch = test["loss"], epoch
        progress.epoch = epoch
        payload = _checkpoint(run, early, progress, test["loss"])
        if run.on_epoch_end is not None:  # pictures first: a committed epoch always has them
            run.on_epoch_end(epoch, {"train": train, "test": test})
        rate = train["items"] / train_time
        row = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], f"{run.unit}s_per_s": rate}
        row |= {f"train_{n}": train[n] for n in names} | {f"test_{n}": test[n] for n in names}
        progress.rows.append(_csv_row(row | {"epoch_time_s": time.perf_counter() - t0}))
        payload["log_rows"] = progress.rows
        save_checkpoint(last_path, payload)  # the commit point: epoch e is done from here on
        if improved:
            save_checkpoint(best_path, payload)
        log.append(progress.rows[-1])
        _plot(run, log_path)
        best = " (best)" if improved else ""
        print(
            f"epoch {epoch}: train loss {train['loss']:.5g}, test loss {test['loss']:.5g}{best}, "
            f"{rate:.0f} {run.unit}s/s"
        )
        if stopped_early:
            print(f"early stopping: no test-loss improvement in {early.patience} epochs")
            break
    return {"epoch": progress.epoch, "best_loss": progress.best_loss, "stopped_early": stopped_early}


def _plot(run: TrainingRun, log_path: Path) -> None:
    panels = {"loss": ["train_loss", "test_loss"]} | {n: [f"train_{n}", f"test_{n}"] for n in run.metrics}
    plot_columns(log_path, run.stage_dir / "curves.png", "epoch", panels, title=run.stage_dir.name)
