"""--noreload on a finished run of M (trainmdrnn.py) and C (traincontroller.py) starts afresh:
the epoch or generation count restarts at 1, the run repeats the first epoch or generation of a
fresh run to the digit (not a continuation of the old weights or search), and best.pt is this
run's, whatever the old one held. (V's --noreload: test_vae_stage.py.)

main() runs in this process (same argv as the command line): the interpreter's start-up is most
of a subprocess's cost on 2 shared cores.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from script_edge import exit_status

from models.mdrnn import MDRNNCell
from models.vae import VAE
from utils.checkpoint import load_checkpoint, save_checkpoint

LATENT, HIDDEN, K = 8, 16, 4
CLOCK = {"time_s", "wall_min", "frames_per_s", "dream_steps_per_s", "epoch_time_s", "sequences_per_s"}


@pytest.fixture(autouse=True)
def quiet_main(monkeypatch):
    """What the scripts' main() changes in the process, put back afterwards; one torch thread
    (main() would take both shared cores, where one contends less)."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    previous_threads, previous_term = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    torch.set_num_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    yield
    monkeypatch.undo()
    torch.set_num_threads(previous_threads)
    signal.signal(signal.SIGTERM, previous_term)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k not in CLOCK} for row in csv.DictReader(handle)]


def save_model(logdir: Path, stage: str, model: torch.nn.Module, **extra) -> None:
    save_checkpoint(
        logdir / stage / "best.pt",
        {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 1, "best_loss": 1.0},
    )


def test_mdrnn_noreload_starts_afresh(tiny_dataset, tmp_path, capsys):
    import trainmdrnn

    torch.manual_seed(0)
    save_model(tmp_path, "vae", VAE(latent_size=LATENT))
    stage = tmp_path / "mdrnn"
    args = ["--logdir", str(tmp_path), "--dataset", str(tiny_dataset), "--seq-len", "8", "--batch-size", "4"]
    args += ["--hidden-size", str(HIDDEN), "--gaussians", "2", "--device", "cpu"]
    assert trainmdrnn.main([*args, "--epochs", "2"]) == 0
    first = rows(stage / "log.csv")
    assert [r["epoch"] for r in first] == ["1", "2"]
    shutil.copyfile(stage / "last.pt", stage / "best.pt")  # say the old run's best was its epoch 2
    capsys.readouterr()

    assert trainmdrnn.main([*args, "--epochs", "1", "--noreload"]) == 0
    out = capsys.readouterr().out
    assert "resuming" not in out and "epoch 1:" in out
    last, best = load_checkpoint(stage / "last.pt"), load_checkpoint(stage / "best.pt")
    assert last["epoch"] == 1 and [r["epoch"] for r in last["log_rows"]] == [1]
    assert rows(stage / "log.csv") == first[:1]  # a fresh run's epoch 1, not epoch 3 of the old weights
    assert best["epoch"] == 1 and all(
        torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items()
    )


def test_controller_noreload_starts_a_new_search(tmp_path, capsys):
    import traincontroller

    torch.manual_seed(0)
    save_model(tmp_path, "vae", VAE(latent_size=LATENT))
    save_model(tmp_path, "mdrnn", MDRNNCell(LATENT, 3, HIDDEN, 5), action_repeat=K)
    ctrl = tmp_path / "ctrl"
    args = ["--logdir", str(tmp_path), "--pop-size", "4", "--n-samples", "1", "--eval-every", "1"]
    args += ["--eval-episodes", "1", "--max-steps", "16", "--max-workers", "1", "--stall-frames", "0"]
    args += ["--rescore-episodes", "0"]
    traincontroller.main([*args, "--generations", "2"])
    first, old_last = rows(ctrl / "log.csv"), load_checkpoint(ctrl / "last.pt")
    assert [r["generation"] for r in first] == ["1", "2"] and old_last["generation"] == 2
    stale = load_checkpoint(ctrl / "best.pt") | {"generation": 2, "eval_return": 1e9}  # unbeatable
    save_checkpoint(ctrl / "best.pt", stale)
    capsys.readouterr()

    traincontroller.main([*args, "--generations", "1", "--noreload"])
    out = capsys.readouterr().out
    assert "resuming" not in out and "generations 1..1" in out
    last, best = load_checkpoint(ctrl / "last.pt"), load_checkpoint(ctrl / "best.pt")
    assert last["generation"] == 1 and torch.equal(last["fitness"], old_last["fitness"][:1])
    assert rows(ctrl / "log.csv") == first[:1]  # the new search's generation 1 is a fresh search's
    assert best["generation"] == 1
    assert best["eval_return"] == pytest.approx(float(first[0]["eval_mean"]), rel=1e-5)

    # a --noreload run stopped before its first evaluation leaves no best.pt of the old search
    save_checkpoint(ctrl / "best.pt", stale)
    watcher = threading.Thread(target=_interrupt_when_search_restarts, args=(ctrl / "last.pt",), daemon=True)
    watcher.start()
    # at the script's edge, as a user runs it: the Ctrl-C may land just after last.pt's rename,
    # before the search loop's own handler, where run_script makes it the same status 130
    status = exit_status(traincontroller.main, [*args, "--generations", "3", "--noreload"])
    watcher.join(timeout=60)
    assert not watcher.is_alive()
    assert status == 130  # Ctrl-C: the clean stop
    assert load_checkpoint(ctrl / "last.pt")["generation"] == 0
    assert not (ctrl / "best.pt").exists()


def _interrupt_when_search_restarts(last_path: Path, timeout: float = 60.0) -> None:
    """Ctrl-C (SIGINT to this process) as soon as last.pt holds a new search at generation 0."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if load_checkpoint(last_path)["generation"] == 0:
                break
        except Exception:  # not there yet, or from the previous search
            pass
        time.sleep(0.01)  # polling interval, not a synchronisation: the file is the signal
    os.kill(os.getpid(), signal.SIGINT)
