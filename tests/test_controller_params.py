"""A controller's own parameters reach the episodes that score it: in the pool's fitness, and
through reporting.export and test_controller.py.

Each case uses controllers that drive differently on the same tracks (full brake, full gas,
random weights), checked to give different returns first, so that scoring the wrong
controller (a worker ignoring the candidate's parameters, candidates mixed up, the export
writing another C than best.pt's) changes the numbers compared.

These supersede tests/test_controller_stage.py's `test_fitness_is_mean_of_episode_returns`
and `test_exported_logdir_plays_the_same_returns`, which pass for any controller (their
candidates' returns could all be equal).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.policy import Agent, run_episode
from agent.population import RealEvaluator, WorkerSpec, init_worker
from agent.search import Search
from agent.seeds import holdout_seeds, train_seeds
from agent.world import load_world
from envs.carracing import make_env
from models.controller import Controller
from models.mdrnn import MDRNNCell
from models.vae import VAE
from pool.local import WorkerPool
from reporting.export import export
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.params import count_params, set_flat_params

ROOT = Path(__file__).resolve().parents[1]
LATENT, HIDDEN, K = 8, 16, 4
STEPS = 48  # env frames: long enough for a braking, a speeding and a random C to score apart


@pytest.fixture
def one_thread():
    """The pool's workers run torch on one thread; the direct episodes here do too (and the
    2 cores are shared: more threads only contend)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_world(logdir: Path) -> Path:
    """Random-init V and M checkpoints as trainvae.py / trainmdrnn.py lay them out (M at k = 4)."""
    torch.manual_seed(0)
    vae, mdrnn = VAE(latent_size=LATENT), MDRNNCell(LATENT, 3, HIDDEN, 5)
    for stage, model, extra in (("vae", vae, {}), ("mdrnn", mdrnn, {"action_repeat": K})):
        save_checkpoint(
            logdir / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 1, "best_loss": 1.0},
        )
    return logdir


def controllers(config: dict[str, int]) -> dict[str, np.ndarray]:
    """Flat parameters of controllers that drive differently: biases (steer, gas, brake) before squashing."""
    n = count_params(Controller(**config))
    brake, gas = np.zeros(n), np.zeros(n)
    brake[-3:] = [0.0, -5.0, 5.0]  # no gas, full brake
    gas[-3:] = [0.0, 5.0, -5.0]  # full gas, no brake
    return {"brake": brake, "gas": gas, "random": np.random.default_rng(1).normal(0, 0.5, n)}


def direct_returns(world: Path, params: np.ndarray, seeds: list[int]) -> list[tuple[float, int]]:
    """The episodes played here, one at a time, with this controller."""
    vae, mdrnn, config = load_world(world)
    agent = Agent(vae, mdrnn, set_flat_params(Controller(**config), params))
    env = make_env(action_repeat=K)
    try:
        return [run_episode(env, agent, seed, STEPS) for seed in seeds]
    finally:
        env.close()


def test_fitness_is_each_candidates_own_mean_return(tmp_path, one_thread):
    """The pool's fitness of candidate p = mean return of candidate p's own episodes, on the
    generation's tracks, bit for bit; and the candidates' returns differ, so a worker that
    ignored the parameters it was sent, or scored them in another order, fails here."""
    world = make_world(tmp_path)
    _, _, config = load_world(world)
    named = controllers(config)
    candidates = list(named.values())
    seeds = train_seeds(0, 1, 2)
    direct = {name: direct_returns(world, params, seeds) for name, params in named.items()}
    returns_of = {name: tuple(r for r, _ in episodes) for name, episodes in direct.items()}
    assert len(set(returns_of.values())) == len(named), returns_of  # three controllers, three outcomes
    assert all(n == STEPS for episodes in direct.values() for _, n in episodes)

    with WorkerPool(
        2, init_worker, (WorkerSpec(str(world), config, K, envs_per_worker=2),), task_timeout=120
    ) as pool:
        scores = RealEvaluator(pool, STEPS, envs_per_worker=2).evaluate(candidates, seeds)
    fitness, returns, frames = scores.fitness, scores.returns, scores.frames
    assert fitness.shape == (3,) and returns.shape == frames.shape == (3, 2)
    for p, name in enumerate(named):
        assert returns[p].tolist() == list(returns_of[name]), name  # the same episodes, bit for bit
        assert frames[p].tolist() == [STEPS, STEPS]
        assert fitness[p] == np.mean(returns_of[name])
    assert fitness.argmax() == list(named).index("gas") and fitness.argmin() == list(named).index("brake")


def read_returns(logdir: Path) -> list[dict[str, str]]:
    with open(logdir / "ctrl" / "eval" / "returns.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_exported_logdir_plays_best_pts_controller(tmp_path, one_thread):
    """reporting.export keeps best.pt's controller (not the CMA-ES mean in last.pt beside it)
    with only what evaluation needs, and test_controller.py on the export plays exactly that
    controller's returns on the held-out tracks: returns that other controllers (the mean, best's
    biases without its weights) do not give."""
    run = make_world(tmp_path / "run")
    _, _, config = load_world(run)
    best_params = np.random.default_rng(3).normal(0, 0.5, count_params(Controller(**config)))
    best = set_flat_params(Controller(**config), best_params)  # its weights matter (biases_only below)
    save_checkpoint(
        run / "ctrl" / "best.pt",
        {
            "state_dict": best.state_dict(),
            "config": config,
            "generation": 2,
            "eval_return": 1.0,
            "action_repeat": K,
            "es_junk": torch.zeros(1000),
        },
    )
    search = Search(config, 4, 0.1, 0, K, 0)  # last.pt: the search, its mean at C = 0
    save_checkpoint(run / "ctrl" / "last.pt", search.state())

    seeds = holdout_seeds(0, 2)
    expected = [f"{r:.6g}" for r, _ in direct_returns(run, best_params, seeds)]
    biases_only = np.where(np.arange(len(best_params)) < len(best_params) - 3, 0.0, best_params)
    others = {"the CMA-ES mean (last.pt)": search.mean, "best's biases alone": biases_only}
    for name, params in others.items():
        assert [f"{r:.6g}" for r, _ in direct_returns(run, params, seeds)] != expected, name

    export(run, tmp_path / "pretrained")
    exported = load_checkpoint(tmp_path / "pretrained" / "ctrl" / "best.pt")
    assert "es_junk" not in exported and exported["action_repeat"] == K
    assert all(torch.equal(exported["state_dict"][k], v) for k, v in best.state_dict().items())

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "test_controller.py"), "--logdir", str(tmp_path / "pretrained")]
        + ["--episodes", "2", "--max-steps", str(STEPS), "--workers", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_returns(tmp_path / "pretrained")
    assert [int(r["seed"]) for r in rows] == seeds
    assert [r["return"] for r in rows] == expected
