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
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import BEST, LAST, check_config, fail, load_checkpoint, save_checkpoint
from utils.logs import CSVLog, plot_columns


def pick_device(name: str = "auto") -> torch.device:
    """"auto" -> CUDA when present, else CPU. Asking for CUDA without one is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda asked but no CUDA GPU is visible to torch; use --device cpu or auto")
    device = torch.device(name)
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # every core for intra-op math
    return device


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
            fail(f"loss became {out['loss']} (non-finite); stopped, the last good checkpoints are kept. Try a lower --lr")
        n = out["items"]
        items += n
        for name in names:
            totals[name] += out[name] * n
        if bar is not None:
            bar.update(n)
            bar.set_postfix(loss=f"{totals['loss'] / items:.4g}", refresh=False)
    if items == 0:
        fail("an epoch saw no data; the dataset split is empty (generate more rollouts)")
    return {name: total / items for name, total in totals.items()} | {"items": items}


def fit(run: TrainingRun, epochs: int, noreload: bool = False) -> dict[str, Any]:
    """Train for up to `epochs` epochs (counted across resumes); returns the final summary."""
    last_path, best_path = run.stage_dir / LAST, run.stage_dir / BEST
    early = EarlyStopping(run.patience)
    start_epoch, best_loss = 1, math.inf
    if not noreload and last_path.exists():
        try:
            state = load_checkpoint(last_path, map_location="cpu")
        except Exception as error:  # truncated or foreign file: one line, not a traceback
            fail(f"cannot read {last_path} ({type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}); use --noreload to start afresh")
        check_config(state["config"], run.config, last_path, run.config_keys)
        run.model.load_state_dict(state["state_dict"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        early.load_state_dict(state["early_stopping"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_loss = int(state["epoch"]) + 1, float(state["best_loss"])
        print(f"resuming {last_path} after epoch {state['epoch']} (best test loss {best_loss:.6g})")
        if early.patience > 0 and early.bad_epochs >= early.patience:
            print("early stopping had already triggered; nothing to do (use --noreload to start afresh)")
            return {"epoch": start_epoch - 1, "best_loss": best_loss, "stopped_early": True}
    elif noreload:
        for stale in (last_path, best_path):  # best.pt must only hold this run's best
            stale.unlink(missing_ok=True)

    names = ["loss"] + run.metrics
    fields = ["epoch"] + [f"train_{n}" for n in names] + [f"test_{n}" for n in names] + ["lr", f"{run.unit}s_per_s", "epoch_time_s"]
    log = CSVLog(run.stage_dir / "log.csv", fields, keep_before=start_epoch)
    stopped_early, epoch = False, start_epoch - 1
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        for data in (run.train_data, run.test_data):
            if hasattr(data, "set_epoch"):
                data.set_epoch(epoch)
        run.model.train()
        with tqdm(total=run.train_items, unit=run.unit, unit_scale=True, desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True) as bar:
            train = _run_epoch(run.train_step, run.train_data, names, bar)
        train_time = time.perf_counter() - t0
        run.model.eval()
        with torch.no_grad():
            test = _run_epoch(run.test_step, run.test_data, names, None)
        run.scheduler.step(test["loss"])
        stop = early.step(test["loss"])
        improved = test["loss"] < best_loss
        best_loss = min(best_loss, test["loss"])
        payload = {
            "state_dict": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "early_stopping": early.state_dict(),
            "epoch": epoch,
            "best_loss": best_loss,
            "test_loss": test["loss"],
            "config": run.config,
            "torch_rng": torch.get_rng_state(),
            **run.extra_state,
        }
        save_checkpoint(last_path, payload)
        if improved:
            save_checkpoint(best_path, payload)
        row = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], f"{run.unit}s_per_s": train["items"] / train_time, "epoch_time_s": time.perf_counter() - t0}
        row |= {f"train_{n}": train[n] for n in names} | {f"test_{n}": test[n] for n in names}
        log.append(row)
        plot_columns(log.path, run.stage_dir / "curves.png", "epoch", {"loss": ["train_loss", "test_loss"]} | {n: [f"train_{n}", f"test_{n}"] for n in run.metrics}, title=run.stage_dir.name)
        print(f"epoch {epoch}: train loss {train['loss']:.5g}, test loss {test['loss']:.5g}{' (best)' if improved else ''}, {row[f'{run.unit}s_per_s']:.0f} {run.unit}s/s")
        if run.on_epoch_end is not None:
            run.on_epoch_end(epoch, {"train": train, "test": test})
        if stop:
            stopped_early = True
            print(f"early stopping: no test-loss improvement in {early.patience} epochs")
            break
    return {"epoch": epoch, "best_loss": best_loss, "stopped_early": stopped_early}
