"""k belongs to the data: rollouts at k, their latent cache and M say so, and C follows M's k.

A rollout at k = 4 must be what an agent holding each action 4 frames sees: its rows equal
stepping the plain env by hand, a dataset never mixes two k, and every stage downstream
takes k from the files (docs/design.md, Action repeat).
"""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from script_edge import exit_status  # noqa: E402
from test_controller_stage import assert_one_line_error, make_world, run_script  # noqa: E402

from data.carracing import generate_rollout, random_actions, rollout_seeds  # noqa: E402
from data.generation_script import main as generate  # noqa: E402
from data.latents import build_latent_cache, read_meta  # noqa: E402
from data.rollouts import (
    dataset_action_repeat,
    find_rollouts,
    load_rollout,
    rollout_action_repeat,
    save_rollout,
)  # noqa: E402
from envs.carracing import make_env, to_model_frame  # noqa: E402
from models.controller import Controller  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.errors import BadRolloutError  # noqa: E402


def test_rollout_at_k_is_the_plain_env_stepped_by_hand():
    k, frames, index = 4, 40, 3
    rollout = generate_rollout(make_env(action_repeat=k), index, seed=5, max_steps=frames)
    assert len(rollout["actions"]) == frames // k and int(rollout["action_repeat"]) == k
    assert rollout["terminals"][-1] and not rollout["terminals"][:-1].any()

    env = make_env()  # every frame, the action held by hand
    env_seed, _ = rollout_seeds(5, index)
    obs, _ = env.reset(seed=env_seed)
    for row, action in enumerate(rollout["actions"]):
        np.testing.assert_array_equal(rollout["observations"][row], to_model_frame(obs))
        total = 0.0
        for _ in range(k):
            obs, reward, *_ = env.step(action)
            total += reward
        assert rollout["rewards"][row] == pytest.approx(total, abs=1e-5)


def test_brownian_walk_moves_per_frame_alike_at_any_k():
    """dt scales with k: the walk's spread after the same number of frames does not depend on k."""
    low, high = np.full(3, -1e3), np.full(3, 1e3)  # far enough apart: no clipping

    def spread(k: int) -> float:  # std of the steer's displacement over 400 frames
        walks = [
            random_actions("brown", 400 // k + 1, low, high, np.random.default_rng(s), k / 50)
            for s in range(300)
        ]
        return float(np.std([w[-1, 0] - w[0, 0] for w in walks]))

    assert spread(4) == pytest.approx(spread(1), rel=0.2) and spread(1) == pytest.approx(
        np.sqrt(400 / 50), rel=0.2
    )


def test_k_is_read_from_each_file_and_a_mix_is_refused(tmp_path):
    arrays = generate_rollout(make_env(action_repeat=2), 0, max_steps=8)
    save_rollout(tmp_path / "a" / "rollout_0.npz", arrays)
    old = {key: value for key, value in arrays.items() if key != "action_repeat"}  # written before k existed
    save_rollout(tmp_path / "b" / "rollout_1.npz", old)
    assert rollout_action_repeat(tmp_path / "a" / "rollout_0.npz") == 2
    assert rollout_action_repeat(tmp_path / "b" / "rollout_1.npz") == 1
    assert load_rollout(tmp_path / "b" / "rollout_1.npz") is not None  # still a valid k = 1 rollout
    paths = [p for _, p in find_rollouts(tmp_path)]
    with pytest.raises(BadRolloutError, match="mixes rollouts of different action repeats"):
        dataset_action_repeat(paths, tmp_path)
    assert dataset_action_repeat(paths[:1], tmp_path) == 2


def test_generation_refuses_another_k_in_the_same_folder(tmp_path, capsys):
    assert (
        generate(
            [
                "--rollouts",
                "1",
                "--rootdir",
                str(tmp_path),
                "--threads",
                "1",
                "--max-steps",
                "8",
                "--action-repeat",
                "4",
            ]
        )
        == 0
    )
    assert rollout_action_repeat(find_rollouts(tmp_path)[0][1]) == 4
    capsys.readouterr()
    argv = [
        "--rollouts",
        "2",
        "--rootdir",
        str(tmp_path),
        "--threads",
        "1",
        "--max-steps",
        "8",
        "--action-repeat",
        "1",
    ]
    assert exit_status(generate, argv) == 2
    assert "holds rollouts at --action-repeat 4, not 1" in capsys.readouterr().err
    assert len(find_rollouts(tmp_path)) == 1  # nothing generated at the other k


def test_latent_cache_carries_k(tmp_path):
    dataset = tmp_path / "data"
    assert (
        generate(
            [
                "--rollouts",
                "2",
                "--rootdir",
                str(dataset),
                "--threads",
                "1",
                "--max-steps",
                "12",
                "--action-repeat",
                "3",
            ]
        )
        == 0
    )
    make_world(tmp_path / "logdir")
    meta = read_meta(build_latent_cache(tmp_path / "logdir", dataset, verbose=False))
    assert meta["action_repeat"] == 3 and meta["frames"] == 2 * 4


def test_a_controller_of_another_k_than_ms_is_refused(tmp_path):
    """C takes its k from M (traincontroller.py has no flag for it); test_controller.py refuses a
    best.pt whose k is not M's, in one line naming the command that retrains C."""
    logdir = make_world(tmp_path, action_repeat=4)
    config = {"latent_size": 8, "hidden_size": 16, "action_size": 3}
    best = {
        "state_dict": Controller(**config).state_dict(),
        "config": config,
        "generation": 1,
        "action_repeat": 2,
    }
    save_checkpoint(logdir / "ctrl" / "best.pt", best)
    result = run_script("test_controller.py", "--logdir", str(logdir), "--episodes", "1")
    assert result.returncode == 2
    assert_one_line_error(result, "acts every 2 frames", "k=4", "traincontroller.py")
    assert not (logdir / "ctrl" / "eval").exists()
