"""test_controller.py as a user runs it, on a trained logdir (a copy of pretrained/carracing-k4):
it plays held-out tracks, and `--slow-env` (gymnasium's own renderer) gives the fast env's returns.

One run, `--slow-env --seed 7`, 2 episodes of 40 frames; the envs its workers make are logged
through tests/worker_hooks.py. The same episodes are played here in the fast env.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from worker_hooks import hooked_env, made_envs

from agent.policy import Agent, run_episode
from agent.seeds import _SEED_RANGE, DISPLAY, EVAL, HOLDOUT, TRAIN, holdout_seeds
from agent.world import load_best_controller, load_world
from envs.carracing import make_env
from envs.fast_carracing import FastCarRacing

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "pretrained" / "carracing-k4"
SEED, EPISODES, FRAMES = 7, 2, 40


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluation")
    logdir = root / "logdir"
    for stage in ("vae", "mdrnn", "ctrl"):  # the checkpoints only: the run writes ctrl/eval/ here
        (logdir / stage).mkdir(parents=True)
        shutil.copyfile(PRETRAINED / stage / "best.pt", logdir / stage / "best.pt")
    log = root / "made_envs.txt"
    args = ["--logdir", str(logdir), "--slow-env", "--seed", str(SEED), "--episodes", str(EPISODES)]
    args += ["--max-steps", str(FRAMES), "--workers", "1"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "test_controller.py"), *args],
        cwd=ROOT,
        env=hooked_env(root / "hooks", WM_TEST_MAKE_LOG=str(log)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(logdir / "ctrl" / "eval" / "returns.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    fast = fast_returns(logdir, holdout_seeds(SEED, EPISODES))
    return dict(logdir=logdir, rows=rows, made=made_envs(log), result=result, fast=fast)


def fast_returns(logdir: Path, seeds: list[int]) -> list[tuple[float, int]]:
    """The same agent on the same tracks, played here in the fast env."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker runs it
    try:
        vae, mdrnn, config = load_world(logdir)
        controller, state = load_best_controller(logdir, config)
        env = make_env(action_repeat=int(state["action_repeat"]))
        assert isinstance(env.unwrapped, FastCarRacing)
        results = [run_episode(env, Agent(vae, mdrnn, controller), seed, FRAMES) for seed in seeds]
        env.close()
        return results
    finally:
        torch.set_num_threads(threads)


def test_plays_the_held_out_tracks(slow_run):
    """Episode i is holdout_seeds(--seed, n)[i], a track in the held-out range, never one of the
    training, evaluation or display ranges; and it is the track actually driven (the returns are
    those tracks', and differ between them)."""
    seeds = [int(row["seed"]) for row in slow_run["rows"]]
    assert [int(row["episode"]) for row in slow_run["rows"]] == list(range(EPISODES))
    assert seeds == holdout_seeds(SEED, EPISODES) and len(set(seeds)) == EPISODES
    assert all(seed // _SEED_RANGE == HOLDOUT for seed in seeds), seeds
    assert HOLDOUT not in (TRAIN, EVAL, DISPLAY) and seeds[0] != holdout_seeds(0, 1)[0]  # --seed matters
    played = slow_run["fast"]  # holdout_seeds(SEED, EPISODES), played here
    assert [row["return"] for row in slow_run["rows"]] == [f"{r:.6g}" for r, _ in played]
    assert played[0][0] != played[1][0]  # the returns tell the tracks apart


def test_slow_env_plays_gymnasiums_env_with_the_fast_envs_returns(slow_run):
    """README: `--slow-env` (gymnasium's own renderer) gives the same returns, to the digit.
    Its workers made gymnasium's CarRacing-v3, never the fast one, and the returns are those
    of the fast env here."""
    workers = [row for row in slow_run["made"] if row[1]]
    assert workers and all(env_id == "CarRacing-v3" and cls == "CarRacing" for _, _, env_id, cls in workers)
    assert not [row for row in slow_run["made"] if row[3] == "FastCarRacing"], slow_run["made"]
    played = slow_run["fast"]
    assert [row["return"] for row in slow_run["rows"]] == [f"{r:.6g}" for r, _ in played]
    assert [int(row["frames"]) for row in slow_run["rows"]] == [n for _, n in played] == [FRAMES] * EPISODES
    assert all(r > 0 for r, _ in played)  # it drives onto new tiles: the frames it saw mattered
