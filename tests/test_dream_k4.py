"""The dream on an M trained at action repeat k = 4 (the default profile's): one dream step is
one agent step of 4 env frames, as M learned them from its k = 4 rollouts.

A tiny world: random-init V (latent 8), M (hidden 16) saved with action_repeat 4 and a done
head that never fires (every dream episode runs to its step limit, so step counts are exact),
and the latent cache of two real k = 4 rollouts (the dream's starts).
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.dream import dream_returns, make_dream_env
from agent.world import load_dream_starts, load_mdrnn, world_action_repeat
from data.carracing import generate_rollout
from data.latents import build_latent_cache, read_meta
from data.rollouts import rollout_path, save_rollout
from envs.carracing import MAX_EPISODE_STEPS, make_env
from models.controller import Controller
from models.mdrnn import MDRNNCell
from models.vae import VAE
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.params import get_flat_params

LATENT, HIDDEN, K = 8, 16, 4


@pytest.fixture(autouse=True)
def one_thread():
    """M steps a handful of rows at a time: one torch thread is faster on the 2 shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dream_k4")
    dataset, logdir = root / "dataset", root / "logdir"
    env = make_env(action_repeat=K)
    for index in range(2):  # 12 agent steps = 48 env frames each
        save_rollout(rollout_path(dataset, index, 0), generate_rollout(env, index, 5, "brown", 48))
    env.close()
    torch.manual_seed(0)
    mdrnn = MDRNNCell(LATENT, 3, HIDDEN, 3)
    with torch.no_grad():
        mdrnn.head.bias[-1] = -50.0  # the done logit: never done
    for stage, model, extra in (("vae", VAE(LATENT), {}), ("mdrnn", mdrnn, {"action_repeat": K})):
        save_checkpoint(
            logdir / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 1, "best_loss": 1.0},
        )
    assert read_meta(build_latent_cache(logdir, dataset, verbose=False))["action_repeat"] == K
    assert world_action_repeat(logdir) == K
    return logdir


def test_dream_env_and_batched_dream_agree_at_k4(world):
    """The dream env built from a k = 4 logdir plays, and the batched dream that scores a
    population gives the same episodes, step for step."""
    env = make_dream_env(world, temperature=1.15, max_steps=30)
    controller = Controller(LATENT, HIDDEN)
    params = torch.from_numpy(get_flat_params(controller)).float()[None]  # (1, n)
    seeds = [3, 4]
    one_by_one = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        total, steps, done = 0.0, 0, False
        while not done:
            with torch.no_grad():
                o = torch.from_numpy(obs)
                action = controller(o[:LATENT], o[LATENT:]).numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total, steps, done = total + reward, steps + 1, terminated or truncated
        one_by_one.append((total, steps))
    returns, steps = dream_returns(load_mdrnn(world), params, seeds, load_dream_starts(world), 1.15, 30)
    assert steps[0].tolist() == [30, 30] == [n for _, n in one_by_one]
    np.testing.assert_allclose(returns[0].numpy(), [r for r, _ in one_by_one], rtol=1e-5, atol=1e-5)


def test_traincontroller_dream_counts_k4_agent_steps(world, capsys):
    """--dream on the k = 4 M: an episode of --max-steps 40 env frames is 10 dream steps; the
    CMA-ES mean's real-env evaluations and best.pt are at k = 4 too. (main() in this process:
    the interpreter's start-up is most of a subprocess's cost on 2 shared cores.)"""
    import traincontroller

    frames, generations, pop, samples = 40, 2, 4, 2
    args = ["--logdir", str(world), "--dream", "--pop-size", str(pop), "--n-samples", str(samples)]
    args += ["--generations", str(generations), "--eval-every", "1", "--eval-episodes", "1"]
    args += ["--max-steps", str(frames), "--max-workers", "1", "--rescore-episodes", "0", "--noreload"]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        traincontroller.main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = capsys.readouterr().out
    dream_steps = generations * pop * samples * (frames // K)  # 160; at k = 1 it would be 640
    assert f", {dream_steps} dream steps" in out, out
    with open(world / "ctrl" / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # real env frames: only the evaluations' (1 episode of 40 frames per generation), played at k = 4
    assert [int(r["env_frames"]) for r in rows] == [frames * g for g in range(1, generations + 1)]
    best = load_checkpoint(world / "ctrl" / "best.pt")
    assert best["action_repeat"] == K and best["search"]["action_repeat"] == K


def test_dream_env_episode_is_as_long_as_a_real_one_at_k4(world):
    """The dream env from a k = 4 logdir (the `python -m agent.dream` demo's) ends its episodes
    where the real env's time limit would: 1000 frames, 250 steps of 4 frames."""
    env = make_dream_env(world)
    env.reset(seed=0)
    action = np.zeros(3, np.float32)
    steps, ended = 0, False
    while not ended and steps <= MAX_EPISODE_STEPS // K:  # one step past 250 at most: enough to fail
        _, _, terminated, truncated, _ = env.step(action)
        steps, ended = steps + 1, terminated or truncated
    assert truncated and not terminated and steps == MAX_EPISODE_STEPS // K
