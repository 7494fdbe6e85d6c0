"""Stage 3 (trainmdrnn.py, data/latents.py): small real runs on the tiny dataset.

V is a random-init VAE written as L/vae/best.pt: M's stage only needs V's encoder and sizes.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from script_edge import exit_status

from agent.world import load_mdrnn
from data.latents import build_latent_cache, cache_path, load_latent_cache, read_meta, split_latents
from data.rollouts import dataset_paths, load_rollout, split_rollouts
from models.vae import VAE
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.files import is_temp_file

ROOT = Path(__file__).resolve().parents[1]
LATENT = 8
SMALL = [
    "--epochs",
    "1",
    "--seq-len",
    "8",
    "--batch-size",
    "4",
    "--hidden-size",
    "16",
    "--gaussians",
    "2",
    "--device",
    "cpu",
]


def write_vae(logdir: Path, weights_seed: int = 0, latent_size: int = LATENT, **config) -> None:
    """A random-init V as trainvae.py would save it (config: sizes, + its split's test_fraction/seed)."""
    torch.manual_seed(weights_seed)
    save_checkpoint(
        logdir / "vae" / "best.pt",
        {
            "state_dict": VAE(latent_size=latent_size).state_dict(),
            "config": {"latent_size": latent_size, "img_channels": 3} | config,
            "epoch": 1,
            "best_loss": 1.0,
        },
    )


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "trainmdrnn.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real run as a user would start it: V present, 1 epoch of a small M."""
    logdir = tmp_path_factory.mktemp("mdrnn_run")
    write_vae(logdir)
    result = run_script("--logdir", str(logdir), "--dataset", str(tiny_dataset), *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    return logdir, result


def test_small_run_writes_checkpoints_cache_log_and_plots(trained, tiny_dataset):
    logdir, result = trained
    stage = logdir / "mdrnn"
    for name in ("last.pt", "best.pt", "latents.npz", "log.csv", "curves.png", "prediction.png"):
        assert (stage / name).is_file(), name
    assert result.stdout.strip().splitlines()[-1].startswith("done: 1 epochs")
    with open(stage / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and {"train_gmm", "test_reward", "test_done"} <= set(rows[0])

    m = load_mdrnn(logdir)  # sizes come from the checkpoint's config
    assert (m.latent_size, m.action_size, m.hidden_size, m.gaussians) == (LATENT, 3, 16, 2)

    # the cache: every rollout, V's exact posterior, V's split
    rollouts = load_latent_cache(logdir)
    paths, _ = dataset_paths(tiny_dataset)
    assert sorted(r["file"] for r in rollouts) == sorted(
        p.relative_to(tiny_dataset).as_posix() for p in paths
    )
    _, test_paths = split_rollouts(paths)
    assert {r["file"] for r in rollouts if r["test"]} == {
        p.relative_to(tiny_dataset).as_posix() for p in test_paths
    }
    first = rollouts[0]
    arrays = load_rollout(tiny_dataset / first["file"])
    assert first["mu"].shape == first["logsigma"].shape == (len(arrays["actions"]), LATENT)
    assert first["mu"].dtype == np.float32
    vae = VAE(latent_size=LATENT)
    vae.load_state_dict(load_checkpoint(logdir / "vae" / "best.pt")["state_dict"])
    mu, logsigma = vae.eval().encode_frames(arrays["observations"])
    np.testing.assert_allclose(first["mu"], mu.numpy(), atol=1e-5)
    np.testing.assert_allclose(first["logsigma"], logsigma.numpy(), atol=1e-5)
    np.testing.assert_array_equal(first["rewards"], arrays["rewards"])
    np.testing.assert_array_equal(first["terminals"], arrays["terminals"])
    train, test = split_latents(rollouts)
    assert len(train) + len(test) == len(rollouts) and len(test) == len(test_paths)
    assert set(train[0]) == {"mu", "logsigma", "actions", "rewards", "terminals"}


def test_cache_rebuilt_only_when_v_or_dataset_changes(tiny_dataset, tmp_path):
    dataset = tmp_path / "data"
    shutil.copytree(tiny_dataset, dataset)
    write_vae(tmp_path)
    path = build_latent_cache(tmp_path, dataset, verbose=False)
    before = path.stat()
    assert build_latent_cache(tmp_path, dataset, verbose=False) == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not rewritten
    old_mu = load_latent_cache(tmp_path)[0]["mu"].copy()

    write_vae(tmp_path, weights_seed=1)  # V retrained: same sizes, other weights
    build_latent_cache(tmp_path, dataset, verbose=False)
    assert path.stat().st_ino != before.st_ino
    assert not np.allclose(load_latent_cache(tmp_path)[0]["mu"], old_mu)

    victim = sorted(dataset.rglob("rollout_*.npz"))[-1]
    victim.unlink()  # the dataset's file list changed
    fingerprint = read_meta(path)["dataset"]
    build_latent_cache(tmp_path, dataset, verbose=False)
    assert read_meta(path)["dataset"] != fingerprint
    assert len(load_latent_cache(tmp_path)) == 5
    # atomic writes left no temporary file (`.latents.npz.PID.tmp.npz`, utils.files.temp_name)
    assert [p.name for p in path.parent.iterdir() if is_temp_file(p)] == []


def test_long_sequences_partial_batches_and_exact_resume(tiny_dataset, tmp_path, capsys):
    """seq-len 30 > the 25-step episodes (padded windows), batch 3 leaves a partial batch;
    2 epochs in one go == 1 epoch + a resumed 1, weight for weight."""
    import trainmdrnn

    args = [
        "--dataset",
        str(tiny_dataset),
        "--seq-len",
        "30",
        "--batch-size",
        "3",
        "--hidden-size",
        "16",
        "--gaussians",
        "2",
        "--device",
        "cpu",
        "--seed",
        "3",
    ]
    one_go, resumed = tmp_path / "one_go", tmp_path / "resumed"
    for logdir in (one_go, resumed):
        write_vae(logdir, test_fraction=0.5, seed=1)  # V's split, which M must follow
    assert trainmdrnn.main(["--logdir", str(one_go), *args, "--epochs", "2"]) == 0
    assert "3 train / 3 test rollouts" in capsys.readouterr().out
    assert trainmdrnn.main(["--logdir", str(resumed), *args, "--epochs", "1"]) == 0
    assert load_checkpoint(resumed / "mdrnn" / "last.pt")["epoch"] == 1
    assert trainmdrnn.main(["--logdir", str(resumed), *args, "--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    a = load_checkpoint(one_go / "mdrnn" / "last.pt")
    b = load_checkpoint(resumed / "mdrnn" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["best_loss"] == b["best_loss"]

    # V retrained since: resuming M on latents of another V is refused in one line
    write_vae(resumed, weights_seed=7, test_fraction=0.5, seed=1)
    assert exit_status(trainmdrnn.main, ["--logdir", str(resumed), *args, "--epochs", "3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--noreload" in err[0]


def test_missing_v_names_trainvae(tiny_dataset, tmp_path):
    result = run_script("--logdir", str(tmp_path), "--dataset", str(tiny_dataset), *SMALL)
    assert_one_line_error(result, "trainvae.py")


def test_size_mismatch_suggests_noreload(trained, tiny_dataset):
    logdir, _ = trained
    result = run_script(
        "--logdir",
        str(logdir),
        "--dataset",
        str(tiny_dataset),
        *SMALL,
        "--hidden-size",
        "32",
        "--epochs",
        "2",
    )
    assert_one_line_error(result, "--noreload", "--hidden-size 16 (this run: 32)")


def test_no_dataset_names_generation_and_help(tmp_path, capsys):
    import trainmdrnn

    write_vae(tmp_path)
    argv = ["--logdir", str(tmp_path), "--dataset", str(tmp_path / "nowhere"), "--device", "cpu"]
    assert exit_status(trainmdrnn.main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "generation_script.py" in err[0]
    assert not cache_path(tmp_path).exists()
    with pytest.raises(SystemExit) as stop:
        trainmdrnn.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--logdir",
        "--noreload",
        "--seq-len",
        "--hidden-size",
        "--gaussians",
        "--reward-weight",
        "--grad-clip",
    ):
        assert flag in out
