"""Action repeat: `make_env(action_repeat=k)` must equal stepping gymnasium's CarRacing k times.

Each reference is one recording of gymnasium's own `CarRacing-v3` (every frame drawn), with
actions held constant over blocks of 12 frames, so that stepping it k times by hand with the
same action (k in 1, 2, 3, 4) is a slice of the recording. The fast env, which skips drawing
the frames in between, must give the same observations, summed rewards and end flags.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gymnasium.envs.box2d.car_racing import CarRacing  # noqa: E402
from test_fast_carracing import _follow  # noqa: E402  (the fast-env tests' track follower)

from envs.carracing import ActionRepeat, env_frames, make_env  # noqa: E402
from envs.fast_carracing import FastCarRacing  # noqa: E402

BLOCK = 12  # actions change only every 12 frames: a multiple of every k tested


def _policy(name: str, frame: int, car_env, rng: np.random.Generator) -> np.ndarray:
    if name == "follow":
        return _follow(car_env)
    if name == "straight_off":  # straight across the grass and out of the playfield
        return np.array([0.0, 0.5, 0.0], dtype=np.float32)
    if name == "random":
        return rng.uniform([-1, 0, 0], [1, 1, 0.5]).astype(np.float32)
    raise ValueError(name)


_RECORDINGS: dict = {}


def _reference(seed: int, policy: str, max_frames: int) -> dict:
    """gymnasium's CarRacing-v3 (TimeLimit 1000) played frame by frame, every frame recorded."""
    key = (seed, policy, max_frames)
    if key not in _RECORDINGS:
        env = gym.make("CarRacing-v3")
        assert type(env.unwrapped) is CarRacing
        rng = np.random.default_rng(seed)
        obs, _ = env.reset(seed=seed)
        rec = {
            "reset": obs,
            "actions": [],
            "obs": [],
            "rewards": [],
            "terminated": [],
            "truncated": [],
            "infos": [],
        }
        for frame in range(max_frames):
            if frame % BLOCK == 0:
                action = _policy(policy, frame, env.unwrapped, rng)
            obs, reward, terminated, truncated, info = env.step(action)
            rec["actions"].append(action)
            rec["obs"].append(obs)
            rec["rewards"].append(reward)
            rec["terminated"].append(terminated)
            rec["truncated"].append(truncated)
            rec["infos"].append(info)
            if terminated or truncated:
                break
        env.close()
        _RECORDINGS[key] = rec
    return _RECORDINGS[key]


def _replay(env: gym.Env, rec: dict, k: int, seed: int, ended: bool = True) -> int:
    """Play `rec`'s actions on `env` (acting every k frames), asserting that each agent step
    equals stepping the reference k times by hand; returns the number of agent steps."""
    obs, _ = env.reset(seed=seed)
    assert np.array_equal(obs, rec["reset"])
    frame, steps, n = 0, 0, len(rec["obs"])
    while frame < n:
        obs, reward, terminated, truncated, info = env.step(rec["actions"][frame])
        last = min(frame + k, n) - 1  # by hand: k frames, or up to the episode's end
        expected = 0.0
        for r in rec["rewards"][frame : last + 1]:
            expected += r
        where = f"k={k} agent step {steps} (frames {frame}..{last})"
        assert np.array_equal(obs, rec["obs"][last]), f"{where}: observation differs"
        assert reward == expected, f"{where}: reward {reward} != {expected}"
        assert (terminated, truncated) == (rec["terminated"][last], rec["truncated"][last]), where
        if k > 1:
            assert env_frames(info) == last + 1 - frame, where
            info = {key: v for key, v in info.items() if key != "frames"}
        assert info == rec["infos"][last], where
        frame, steps = last + 1, steps + 1
    assert (terminated or truncated) == ended
    return steps


# --------------------------------------------------------------------------- (a) equal to upstream


@pytest.mark.parametrize("k", [1, 2, 4])
def test_same_as_upstream_by_hand(k, monkeypatch):
    """300 frames of random actions (not an episode's end): every agent step matches, and the
    fast env drew only the reset frame and one frame per agent step."""
    rec = _reference(seed=1, policy="random", max_frames=300)
    assert len(rec["obs"]) == 300 and not (rec["terminated"][-1] or rec["truncated"][-1])
    drawn = []
    render_road = FastCarRacing._render_road
    monkeypatch.setattr(
        FastCarRacing, "_render_road", lambda self, *a: drawn.append(1) or render_road(self, *a)
    )
    env = make_env(action_repeat=k)
    assert isinstance(env.unwrapped, FastCarRacing)
    assert _replay(env, rec, k, seed=1, ended=False) == 300 // k
    assert len(drawn) == 1 + 300 // k
    env.close()


@pytest.mark.parametrize("k", [3, 4])
def test_truncation_at_1000_frames(k):
    """1000 = 250 * 4 (the last frame is an agent frame) = 333 * 3 + 1 (the last agent step is
    one frame, whose render was skipped and is drawn after the fact)."""
    rec = _reference(seed=0, policy="follow", max_frames=1000)
    assert len(rec["obs"]) == 1000 and rec["truncated"][-1] and not any(rec["terminated"])
    env = make_env(action_repeat=k)
    assert _replay(env, rec, k, seed=0) == math.ceil(1000 / k)
    env.close()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_termination_off_the_playfield(k):
    """Terminated with -100 on frame 271: mid-repeat for k = 2 and 4 (undrawn frame, drawn after)."""
    rec = _reference(seed=0, policy="straight_off", max_frames=1000)
    assert rec["terminated"][-1] and rec["rewards"][-1] == -100 and len(rec["obs"]) < 1000
    assert len(rec["obs"]) % 4 not in (0, 1), "the episode should end mid-repeat (frames < k)"
    env = make_env(action_repeat=k)
    _replay(env, rec, k, seed=0)
    env.close()


@pytest.mark.parametrize("k", [1, 4])
def test_slow_env_same_as_fast(k):
    """gymnasium's own env (every frame drawn) behind the same wrapper gives the same steps."""
    rec = _reference(seed=0, policy="straight_off", max_frames=1000)
    env = make_env(fast=False, action_repeat=k)
    assert type(env.unwrapped) is CarRacing
    _replay(env, rec, k, seed=0)
    env.close()


def test_k1_is_the_plain_env():
    plain, k1 = make_env(), make_env(action_repeat=1)
    assert type(k1) is type(plain) and not isinstance(k1, ActionRepeat)
    assert isinstance(make_env(action_repeat=2), ActionRepeat)
    assert env_frames({}) == 1 and env_frames({"frames": 3}) == 3


# --------------------------------------------------------------------------- (b) physics untouched


def test_skipping_changes_no_physics():
    """Two fast envs, same actions; one skips most renders. Physics, rewards, end flags, info
    and `t` stay identical, drawn frames equal the other's, skipped ones come back stale."""
    full, skip = FastCarRacing(), FastCarRacing()
    assert np.array_equal(full.reset(seed=2)[0], skip.reset(seed=2)[0])
    stale = skip.state
    n_skipped = n_drawn_late = 0
    for t in range(240):
        action = _follow(full, gas=0.5)
        skipping = t % 4 != 3 or 100 <= t < 160  # 3 of 4, then a long run of skipped frames
        skip.skip_render = skipping
        o_full, *rest_full = full.step(action)
        o_skip, *rest_skip = skip.step(action)
        assert rest_full == rest_skip, f"step {t}"
        assert skip.skip_render is False  # one-shot
        if skipping:
            n_skipped += 1
            assert skip.frame_skipped and np.array_equal(o_skip, stale), f"step {t}: skipped: the stale frame"
            if t % 11 == 0:  # drawn after the step: the exact frame
                n_drawn_late += 1
                assert np.array_equal(skip.draw_skipped_frame(), o_full), f"step {t}: late frame differs"
                assert not skip.frame_skipped
        else:
            assert not skip.frame_skipped
            assert np.array_equal(o_skip, o_full), f"step {t}: drawn frame differs after skipped ones"
        stale = skip.state

    assert n_skipped > 150 and n_drawn_late > 5
    assert full.tile_visited_count > 10  # tiles changed colour while frames were skipped
    assert (full.reward, full.prev_reward, full.t) == (skip.reward, skip.prev_reward, skip.t)
    assert full.tile_visited_count == skip.tile_visited_count
    for a, b in [(full.car.hull, skip.car.hull)] + list(zip(full.car.wheels, skip.car.wheels)):
        assert tuple(a.position) == tuple(b.position) and a.angle == b.angle
        assert tuple(a.linearVelocity) == tuple(b.linearVelocity) and a.angularVelocity == b.angularVelocity
    assert np.array_equal([c for _, c in full.road_poly], [c for _, c in skip.road_poly])

    skip.skip_render = True  # a reset frame is always drawn
    assert np.array_equal(skip.reset(seed=5)[0], full.reset(seed=5)[0])
    assert not skip.frame_skipped
    full.close()
    skip.close()


def test_rgb_array_render_never_skipped():
    up, fast = CarRacing(render_mode="rgb_array"), FastCarRacing(render_mode="rgb_array")
    up.reset(seed=4)
    fast.reset(seed=4)
    for _ in range(3):
        action = np.array([0.1, 0.5, 0.0], np.float32)
        up.step(action)
        fast.skip_render = True
        fast.step(action)
        assert fast.frame_skipped
        fast.skip_render = True  # only "state_pixels" renders consume the flag
        assert np.array_equal(fast.render(), up.render())
        assert fast.skip_render
        fast.skip_render = False
    assert np.array_equal(fast.draw_skipped_frame(), up.state)
    up.close()
    fast.close()


# --------------------------------------------------------------------------- (c) validation


@pytest.mark.parametrize("k", [0, -1, -4, 1.5, 2.0, True, "2", None])
def test_bad_action_repeat_raises(k):
    with pytest.raises(ValueError):
        make_env(action_repeat=k)
    with pytest.raises(ValueError):
        ActionRepeat(gym.make("CarRacing-v3"), k)
