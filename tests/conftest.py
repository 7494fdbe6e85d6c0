"""Shared fixtures: the repo root on sys.path, a small real rollout dataset, a watchdog for pool tests."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # no window ever opens in tests
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N test processes share the cores, so
    os.environ["OMP_NUM_THREADS"] = "1"  # torch here, and the V/M scripts a test runs, use one thread each


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """6 real Brownian rollouts of 40 steps (4 short ones end at 25), made once per session."""
    from data.carracing import generate_rollout
    from data.rollouts import rollout_path, save_rollout
    from envs.carracing import make_env

    root = tmp_path_factory.mktemp("dataset")
    env = make_env()
    for index in range(6):
        arrays = generate_rollout(env, index, seed=123, policy="brown", max_steps=40 if index < 2 else 25)
        save_rollout(rollout_path(root, index, thread=index % 2), arrays)
    env.close()
    return root


@pytest.fixture(scope="session")
def tiny_world(tiny_dataset, tmp_path_factory) -> Path:
    """Random-init V (latent 8) and M (hidden 16) as their stages leave them, M at k = 1 (the
    tiny dataset's), and M's latent cache of the tiny dataset: read it, copy what you change."""
    import torch

    from data.latents import build_latent_cache
    from models.mdrnn import MDRNNCell
    from models.vae import VAE
    from utils.checkpoint import save_checkpoint

    logdir = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    for stage, model in (("vae", VAE(8)), ("mdrnn", MDRNNCell(8, 3, 16, 3))):
        extra = {"action_repeat": 1} if stage == "mdrnn" else {}
        save_checkpoint(
            logdir / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 1, "best_loss": 1.0},
        )
    build_latent_cache(logdir, tiny_dataset, verbose=False)
    return logdir


class Hung(Exception):
    """Raised by the `watchdog` fixture in a test that ran far too long (a pool map that would hang)."""


@pytest.fixture
def watchdog():
    """Fail, not hang, a test whose pool never returns: SIGALRM after 300 s raises Hung in it
    (the pools poll every half second, so the exception reaches the waiting map)."""

    def expire(signum, frame):
        raise Hung("the test ran over 300 s: a map that hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(300)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
