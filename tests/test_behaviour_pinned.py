"""Behaviour pinned across refactors: the same commands must give the same bytes and numbers.

The values in tests/pinned_behaviour.json were recorded by `python tests/test_behaviour_pinned.py
--record` before the relayout of issue 12; a refactor that moves code must not change them.
A change that is *meant* to change behaviour re-records them and says so in its commit.

- rollout bytes: `data/generation_script.py` for a fixed seed, hashed file by file;
- a two-generation CMA-ES run of `traincontroller.py` on a fixed random-init V and M: each
  generation's best/mean/worst fitness and the CMA-ES mean after generation 2.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PINNED = Path(__file__).with_name("pinned_behaviour.json")

from models.mdrnn import MDRNNCell  # noqa: E402
from models.vae import VAE  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def _run(*args: str) -> None:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def measure(tmp: Path) -> dict:
    rootdir = tmp / "rollouts"
    _run(
        "data/generation_script.py",
        "--rollouts",
        "2",
        "--rootdir",
        str(rootdir),
        "--threads",
        "1",
        "--max-steps",
        "40",
        "--action-repeat",
        "1",
        "--seed",
        "5",
    )
    hashes = {
        p.relative_to(rootdir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(rootdir.rglob("*.npz"))
    }

    logdir = tmp / "logdir"
    torch.manual_seed(0)
    vae, mdrnn = VAE(latent_size=8), MDRNNCell(8, 3, 16, 5)
    for stage, model, extra in (
        ("vae", vae, {}),
        ("mdrnn", mdrnn, {"action_repeat": 4}),
    ):  # M at k = 4, C acts at M's k
        save_checkpoint(
            logdir / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 1, "best_loss": 1.0},
        )
    _run(
        "traincontroller.py",
        "--logdir",
        str(logdir),
        "--pop-size",
        "4",
        "--n-samples",
        "1",
        "--max-steps",
        "80",
        "--generations",
        "2",
        "--eval-every",
        "1",
        "--eval-episodes",
        "1",
        "--rescore-episodes",
        "2",
        "--sigma0",
        "0.5",
        "--max-workers",
        "1",
    )
    with open(logdir / "ctrl" / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    fitness = [
        [float(r[k]) for k in ("best_fitness", "mean_fitness", "worst_fitness", "eval_mean")] for r in rows
    ]
    state = load_checkpoint(logdir / "ctrl" / "last.pt")["state_dict"]
    mean = torch.cat([v.flatten() for v in state.values()]).tolist()
    return {"rollout_sha256": hashes, "fitness": fitness, "cma_mean": mean}


def test_rollouts_and_search_unchanged(tmp_path):
    pinned, now = json.loads(PINNED.read_text()), measure(tmp_path)
    assert now["rollout_sha256"] == pinned["rollout_sha256"]
    assert len(now["fitness"]) == 2
    np.testing.assert_allclose(now["fitness"], pinned["fitness"], rtol=1e-5)
    np.testing.assert_allclose(now["cma_mean"], pinned["cma_mean"], rtol=1e-6, atol=1e-7)


if __name__ == "__main__":  # --record: write the current behaviour as the pinned one
    import tempfile

    assert sys.argv[1:] == ["--record"], "usage: python tests/test_behaviour_pinned.py --record"
    with tempfile.TemporaryDirectory() as tmp:
        PINNED.write_text(json.dumps(measure(Path(tmp)), indent=1) + "\n")
    print(f"recorded {PINNED}")
