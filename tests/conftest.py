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
