"""The dream: SimulatedCarRacing (gymnasium API) and the batched evaluator agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from agent.dream import dream_returns
from envs.simulated_carracing import SimulatedCarRacing, episode_noise
from models.controller import Controller
from models.mdrnn import MDRNNCell, sample_gmm
from models.transformer import TransformerMCell
from models.vae import VAE
from utils.params import get_flat_params

LATENT, HIDDEN = 8, 16


def make_world(arch: str = "lstm"):
    torch.manual_seed(0)
    if arch == "lstm":
        cell = MDRNNCell(LATENT, 3, HIDDEN, 3).eval()
    else:  # a window of 4 and 2 blocks: the 40-step episodes run far past the cache's edge
        cell = TransformerMCell(LATENT, 3, HIDDEN, 3, layers=2, heads=2, context=4).eval()
    with torch.no_grad():  # make episodes end at different times: a done logit swinging with h
        cell.head.bias[-1] = -2.0
        cell.head.weight[-1] = torch.randn(HIDDEN) * 2.0
    starts = torch.randn(5, 2, LATENT) * 0.5
    return cell, starts


@pytest.fixture(scope="module")
def world():
    return make_world()


def play(env: SimulatedCarRacing, controller: Controller, seed: int) -> tuple[float, int]:
    obs, _ = env.reset(seed=seed)
    total, steps, done = 0.0, 0, False
    while not done:
        o = torch.from_numpy(obs)
        with torch.no_grad():
            action = controller(o[:LATENT], o[LATENT:]).numpy()
        obs, reward, terminated, truncated, _ = env.step(action)
        total, steps, done = total + reward, steps + 1, terminated or truncated
    return total, steps


@torch.no_grad()
def stepped_start_states(cell: torch.nn.Module, n_starts: int, steps: int = 6):
    """A StartState: M's state (either M's) after `steps` random steps, one per start."""
    state = cell.initial_state(n_starts)
    for _ in range(steps):
        state = cell(torch.randn(n_starts, LATENT), torch.rand(n_starts, 3), state).hidden
    return lambda picked: tuple(s[picked] for s in state)


def test_env_passes_gymnasium_checker(world):
    cell, starts = world
    env = SimulatedCarRacing(
        mdrnn=cell, starts=starts, max_steps=30, vae=VAE(LATENT), render_mode="rgb_array"
    )
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8


def test_same_seed_same_episode_and_truncation(world):
    cell, starts = world
    env = SimulatedCarRacing(mdrnn=cell, starts=starts, max_steps=25)
    controller = Controller(LATENT, HIDDEN)
    first, second = play(env, controller, 4), play(env, controller, 4)
    assert first == second
    assert play(env, controller, 5) != first
    with torch.no_grad():
        cell_never_done = MDRNNCell(LATENT, 3, HIDDEN, 3).eval()
        cell_never_done.head.bias[-1] = -50.0
    env = SimulatedCarRacing(mdrnn=cell_never_done, starts=starts, max_steps=25)
    env.reset(seed=1)
    for _ in range(24):
        assert not any(env.step(env.action_space.sample())[2:4])
    _, _, terminated, truncated, _ = env.step(env.action_space.sample())
    assert truncated and not terminated


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("mid_episode", [False, True])
def test_batched_returns_equal_one_by_one_episodes(arch, mid_episode):
    """Same episode lengths exactly (from first frames with M's state at zero, or mid-episode
    starts with M's state there); the same returns to float32 rounding, not bit for bit.

    Measured (these 12 episodes of up to 40 steps): |batched - single| <= 9.6e-7 on returns of
    3.4..6.4, i.e. about 2 float32 ulps. Two causes: (1) the batched LSTM step
    (agent.dream._BatchedDreamStep) adds the gate inputs in another order than nn.LSTMCell
    (input weights split into z and a columns, the two biases summed first), so from the first
    step the cell state differs in its last bit (3.7e-8) and z, h and the actions drift at
    1e-7 from then on; (2) the batch sums rewards in float32, `play` in Python floats. So the
    bound is 1e-5, ten times what is seen, a hundred times tighter than a real divergence (a
    wrong temperature, noise or done mask moves returns by 1e-3 and more).
    """
    cell, starts = make_world(arch)
    torch.manual_seed(1)
    controllers = [Controller(LATENT, HIDDEN) for _ in range(3)]
    for c in controllers:
        torch.nn.init.normal_(c.fc.weight, std=0.5)
    flat = torch.from_numpy(np.stack([get_flat_params(c) for c in controllers]))
    seeds = [10, 11, 12, 13]
    start_state = stepped_start_states(cell, len(starts)) if mid_episode else None
    batched, batched_steps = dream_returns(cell, flat, seeds, starts, 1.15, 40, start_state=start_state)
    assert batched.shape == batched_steps.shape == (3, 4)
    env = SimulatedCarRacing(
        mdrnn=cell, starts=starts, temperature=1.15, max_steps=40, start_state=start_state
    )
    lengths = set()
    for p, controller in enumerate(controllers):
        for j, seed in enumerate(seeds):
            total, steps = play(env, controller, seed)
            lengths.add(steps)
            assert abs(total - float(batched[p, j])) <= 1e-5, (p, seed, total, float(batched[p, j]))
            assert steps == int(batched_steps[p, j])
    assert len(lengths) > 1, "episodes of different lengths exercise the done mask"
    assert not torch.allclose(batched[0], batched[1]), "different controllers, different returns"
    if mid_episode:  # the starting state counts: from zero it is another dream
        from_zero, _ = dream_returns(cell, flat, seeds, starts, 1.15, 40)
        assert not torch.allclose(from_zero, batched, atol=1e-3)


def test_temperature_widens_the_sampled_latents(world):
    cell, _ = world
    torch.manual_seed(2)
    z, a = torch.randn(1, LATENT), torch.rand(1, 3)
    with torch.no_grad():
        out = cell(z.expand(4000, -1), a.expand(4000, -1))
    spreads = []
    for tau in (0.5, 1.0, 1.5):
        gen = torch.Generator().manual_seed(0)
        samples = sample_gmm(out.mu, out.logsigma, out.logpi, tau, generator=gen)  # (4000, L)
        spreads.append(samples.std(dim=0).mean().item())
    assert spreads[0] < spreads[1] < spreads[2]
    # noise-driven draws follow the same law: same spread order with explicit noise
    u, n = torch.rand(4000, LATENT), torch.randn(4000, LATENT)
    noisy = [
        sample_gmm(out.mu, out.logsigma, out.logpi, tau, noise=(u, n)).std(0).mean().item()
        for tau in (0.5, 1.5)
    ]
    assert noisy[0] < noisy[1]


def test_episode_noise_is_a_function_of_the_seed():
    a, b = episode_noise(7, 5, 10, LATENT), episode_noise(7, 5, 10, LATENT)
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    assert not torch.equal(episode_noise(8, 5, 10, LATENT)[2], a[2])


def test_traincontroller_dream_mode_end_to_end(tiny_dataset, tmp_path):
    """--dream: candidates scored in M's dream, the CMA mean evaluated in the real env,
    both returns logged side by side; the means kept for re-scoring are ranked by the real return."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    from data.latents import build_latent_cache
    from utils.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    for stage, model in (("vae", VAE(LATENT)), ("mdrnn", MDRNNCell(LATENT, 3, HIDDEN, 3))):
        save_checkpoint(
            tmp_path / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config, "epoch": 1, "best_loss": 1.0},
        )
    build_latent_cache(tmp_path, tiny_dataset, verbose=False)
    root = Path(__file__).resolve().parents[1]
    args = [
        "--logdir",
        str(tmp_path),
        "--dream",
        "--temperature",
        "1.15",
        "--pop-size",
        "4",
        "--n-samples",
        "2",
        "--generations",
        "2",
        "--eval-every",
        "1",
        "--eval-episodes",
        "1",
        "--rescore-episodes",
        "1",
        "--max-steps",
        "30",
        "--max-workers",
        "1",
    ]
    result = subprocess.run(
        [sys.executable, str(root / "traincontroller.py"), *args], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr
    assert "in M's dream (tau 1.15)" in result.stdout and "dream steps" in result.stdout
    with open(tmp_path / "ctrl" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["generation"] for r in rows] == ["1", "2"]
    for row in rows:
        assert float(row["dream_steps_per_s"]) > 0 and float(row["frames_per_s"]) > 0
        assert row["eval_mean"] and row["eval_dream_mean"]
    # the kept means are those with the best real (not dream) evaluations; best.pt is the re-scored pick
    with open(tmp_path / "ctrl" / "rescore.csv") as handle:
        rescored = list(csv.DictReader(handle))
    real_eval = {r["generation"]: float(r["eval_mean"]) for r in rows}
    assert {r["generation"] for r in rescored} == set(real_eval)
    for row in rescored:
        assert float(row["eval_mean"]) == pytest.approx(real_eval[row["generation"]], abs=1e-3)
    chosen = [r for r in rescored if r["chosen"] == "1"]
    best = load_checkpoint(tmp_path / "ctrl" / "best.pt")
    assert len(chosen) == 1 and best["generation"] == int(chosen[0]["generation"])
    assert best["eval_return"] == pytest.approx(max(float(r["rescore_mean"]) for r in rescored), abs=1e-3)
