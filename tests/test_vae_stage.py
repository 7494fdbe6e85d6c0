"""Stage 2 end to end: `trainvae.py` run as a user runs it, on a few tiny real rollouts.

Model-level checks (shapes, loss values) live in test_models.py; here: the files a run
leaves, exact resume, best/last semantics, and one-line errors.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

ROOT = Path(__file__).resolve().parents[1]
LOSS_COLUMNS = ["train_loss", "train_recon", "train_kl", "test_loss", "test_recon", "test_kl", "lr"]


def trainvae(logdir: Path, dataset: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "trainvae.py",
        "--logdir",
        str(logdir),
        "--dataset",
        str(dataset),
        "--batch-size",
        "8",
        "--device",
        "cpu",
        *flags,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The run failed cleanly: exit status != 0, no traceback, a last stderr line 'error: ...'."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rows(logdir: Path) -> list[dict[str, str]]:
    with open(logdir / "vae" / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def one_epoch(tiny_dataset, tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("one_epoch")
    ok(trainvae(logdir, tiny_dataset, "--epochs", "1"))
    return logdir


@pytest.fixture(scope="module")
def two_epochs(tiny_dataset, tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("two_epochs")
    ok(trainvae(logdir, tiny_dataset, "--epochs", "2"))
    return logdir


def test_one_epoch_writes_everything(one_epoch):
    stage = one_epoch / "vae"
    for name in (
        "last.pt",
        "best.pt",
        "log.csv",
        "curves.png",
        "images/recon_001.png",
        "images/samples_001.png",
    ):
        assert (stage / name).is_file(), name
    (row,) = rows(one_epoch)
    assert row["epoch"] == "1"
    assert all(math.isfinite(float(row[c])) for c in LOSS_COLUMNS + ["frames_per_s", "epoch_time_s"])
    last = load(stage / "last.pt")
    assert last["epoch"] == 1 and last["config"]["latent_size"] == 32 and last["config"]["img_channels"] == 3
    assert {"lr", "batch_size", "kl_tolerance"} <= set(last["config"])
    assert last["best_loss"] == pytest.approx(float(row["test_loss"]), rel=1e-5)
    recon = imread(stage / "images/recon_001.png")
    assert (
        recon.shape[0] == 2 + 2 * 66 and recon.shape[1] == 2 + 8 * 66
    )  # one test rollout: its frames above their reconstructions


def test_resume_is_exact(one_epoch, two_epochs, tiny_dataset, tmp_path):
    """1 epoch, then a rerun to 2 epochs == 2 epochs straight: weights, Adam, scheduler, log."""
    logdir = copy_run(one_epoch, tmp_path)
    result = ok(trainvae(logdir, tiny_dataset, "--epochs", "2"))
    assert "resuming" in result.stdout
    resumed, straight = load(logdir / "vae/last.pt"), load(two_epochs / "vae/last.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    for key, state in straight["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][key][name], value), (key, name)
    assert resumed["scheduler"] == straight["scheduler"]
    assert resumed["early_stopping"] == straight["early_stopping"]
    assert resumed["best_loss"] == straight["best_loss"]
    assert [[r[c] for c in ["epoch"] + LOSS_COLUMNS] for r in rows(logdir)] == [
        [r[c] for c in ["epoch"] + LOSS_COLUMNS] for r in rows(two_epochs)
    ]
    assert (logdir / "vae/images/recon_002.png").is_file()


def test_best_holds_the_lowest_test_loss(two_epochs):
    losses = [float(r["test_loss"]) for r in rows(two_epochs)]
    best, last = load(two_epochs / "vae/best.pt"), load(two_epochs / "vae/last.pt")
    assert best["test_loss"] == best["best_loss"] == last["best_loss"]
    assert best["test_loss"] == pytest.approx(min(losses), rel=1e-5)
    assert best["epoch"] == 1 + losses.index(min(losses))


def test_worse_epoch_leaves_best_alone(one_epoch, tiny_dataset, tmp_path):
    """Pretend an earlier epoch reached a loss no epoch can beat (the KL floor keeps every loss
    > 0): epoch 2 is then worse, so it updates last.pt but must not touch best.pt."""
    logdir = copy_run(one_epoch, tmp_path)
    last = load(logdir / "vae/last.pt")
    last["best_loss"] = 0.0
    torch.save(last, logdir / "vae/last.pt")
    best_bytes = (logdir / "vae/best.pt").read_bytes()
    ok(trainvae(logdir, tiny_dataset, "--epochs", "2"))
    assert (logdir / "vae/best.pt").read_bytes() == best_bytes
    assert load(logdir / "vae/last.pt")["epoch"] == 2


def test_nan_loss_stops_and_keeps_checkpoints(one_epoch, tiny_dataset, tmp_path):
    logdir = copy_run(one_epoch, tmp_path)
    last = load(logdir / "vae/last.pt")
    last["state_dict"]["fc_mu.bias"][0] = float("nan")
    torch.save(last, logdir / "vae/last.pt")
    best_bytes = (logdir / "vae/best.pt").read_bytes()
    line = one_line_error(trainvae(logdir, tiny_dataset, "--epochs", "2"))
    assert "non-finite" in line
    assert (logdir / "vae/best.pt").read_bytes() == best_bytes
    assert load(logdir / "vae/last.pt")["epoch"] == 1
    assert len(rows(logdir)) == 1


def test_no_dataset_names_the_generation_command(tmp_path):
    result = trainvae(tmp_path / "logs", tmp_path / "nowhere", "--epochs", "1")
    assert one_line_error(result) == result.stderr.strip()  # the only line
    assert "generation_script.py" in result.stderr
    assert not (tmp_path / "logs/vae/last.pt").exists()


def test_latent_size_mismatch_suggests_noreload(one_epoch, tiny_dataset, tmp_path):
    logdir = copy_run(one_epoch, tmp_path)
    result = trainvae(logdir, tiny_dataset, "--epochs", "2", "--latent-size", "16")
    assert one_line_error(result) == result.stderr.strip()
    assert "--noreload" in result.stderr and "latent_size" in result.stderr


def test_noreload_starts_afresh(one_epoch, two_epochs, tiny_dataset, tmp_path):
    """--noreload over a 2-epoch run gives exactly a fresh 1-epoch run (same seed)."""
    logdir = copy_run(two_epochs, tmp_path)
    result = ok(trainvae(logdir, tiny_dataset, "--epochs", "1", "--noreload"))
    assert "resuming" not in result.stdout
    fresh, reference = load(logdir / "vae/last.pt"), load(one_epoch / "vae/last.pt")
    assert fresh["epoch"] == 1 and load(logdir / "vae/best.pt")["epoch"] == 1
    assert all(torch.equal(fresh["state_dict"][k], v) for k, v in reference["state_dict"].items())
    assert len(rows(logdir)) == 1


def test_help(capsys):
    import trainvae  # in-process: --help needs no subprocess of its own

    with pytest.raises(SystemExit) as exit_info:
        trainvae.parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--noreload" in out and "--latent-size" in out
