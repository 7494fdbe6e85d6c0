"""FastCarRacing must be indistinguishable from gymnasium's CarRacing, pixel for pixel.

Every observation (reset frames and the first-second zoom-in included), reward, terminated,
truncated and info is compared with `np.array_equal` / `==` against upstream, run through
`gymnasium.make` for both (same wrapper stack as "CarRacing-v3"), over 10 seeds x 300 steps of
varied driving, plus domain randomisation, discrete actions, other render modes, the status
bar overflow path, and the version gate.
"""

from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pygame  # noqa: E402
import pytest  # noqa: E402
from gymnasium.envs.box2d.car_racing import CarRacing  # noqa: E402
from pygame import gfxdraw  # noqa: E402

import envs.fast_carracing as fc  # noqa: E402
from envs.fast_carracing import FastCarRacing, fast_env_supported  # noqa: E402

FAST_ID = "FastCarRacingUnderTest-v0"  # registered here, independent of envs/carracing.py
if FAST_ID not in gym.registry:
    gym.register(FAST_ID, entry_point=FastCarRacing, max_episode_steps=1000)

STEPS = 300
SEEDS = list(range(10))
POLICIES = [
    "follow_track",  # on the road: tiles visited (reward, tile colours change on contact)
    "straight_off",  # off the track, across the grass, out of the playfield (-100, terminated)
    "hard_left",
    "hard_right",
    "brake",
    "random",
    "zigzag_full_gas",
    "gas_and_brake",
    "sticky_random",
    "follow_then_off",
]


# --------------------------------------------------------------------------- helpers


def _follow(car_env, gas=0.3, ahead=6) -> np.ndarray:
    """A crude track follower (steers toward a track point a few tiles ahead)."""
    car = car_env.car
    x, y = car.hull.position
    a = car.hull.angle
    track = np.array([(t[2], t[3]) for t in car_env.track])
    i = int(np.argmin(((track - (x, y)) ** 2).sum(axis=1)))
    tx, ty = track[(i + ahead) % len(track)]
    fx, fy = -math.sin(a), math.cos(a)
    dx, dy = tx - x, ty - y
    err = math.atan2(fx * dy - fy * dx, fx * dx + fy * dy)
    speed = math.hypot(*car.hull.linearVelocity)
    return np.array([np.clip(-2.0 * err, -1, 1), gas if speed < 40 else 0.0, 0.0], dtype=np.float32)


def _action(policy: str, t: int, rng: np.random.Generator, car_env, seed: int = 0) -> np.ndarray:
    if policy == "follow_track":
        return _follow(car_env)
    if policy == "follow_then_off":
        return _follow(car_env) if t < 150 else np.array([0.7, 0.6, 0.0], dtype=np.float32)
    if policy == "straight_off":
        return np.array([0.0, 0.5, 0.0], dtype=np.float32)
    if policy == "hard_left":
        return np.array([-1.0, 0.6 if t % 60 < 40 else 0.0, 0.0], dtype=np.float32)
    if policy == "hard_right":
        return np.array([1.0, 0.6 if t % 60 < 40 else 0.0, 0.0], dtype=np.float32)
    if policy == "brake":
        if t % 60 < 40:
            return np.array([0.2, 0.8, 0.0], dtype=np.float32)
        return np.array([-0.3, 0.0, 0.8], dtype=np.float32)
    if policy == "random":
        return rng.uniform([-1, 0, 0], [1, 1, 1]).astype(np.float32)
    if policy == "zigzag_full_gas":
        return np.array([1.0 if (t // 25) % 2 else -1.0, 1.0, 0.0], dtype=np.float32)
    if policy == "gas_and_brake":
        return np.array([0.2, 1.0, 1.0 if t % 30 < 10 else 0.0], dtype=np.float32)
    if policy == "sticky_random":  # a new random action every 20 steps
        return np.random.default_rng([seed, t // 20]).uniform([-1, 0, 0], [1, 1, 0.5]).astype(np.float32)
    raise ValueError(policy)


def _assert_same_reset(up, fast, **kwargs):
    o_up, i_up = up.reset(**kwargs)
    o_fast, i_fast = fast.reset(**kwargs)
    assert o_fast.shape == (96, 96, 3) and o_fast.dtype == np.uint8
    assert np.array_equal(o_up, o_fast), f"reset frame differs ({kwargs})"
    assert i_up == i_fast


def _assert_same_step(up, fast, action, where: str):
    o_up, r_up, term_up, trunc_up, i_up = up.step(action)
    o_fast, r_fast, term_fast, trunc_fast, i_fast = fast.step(action)
    if not np.array_equal(o_up, o_fast):
        n = int((o_up != o_fast).any(axis=-1).sum())
        raise AssertionError(f"{where}: frame differs in {n} pixels")
    assert r_up == r_fast, f"{where}: reward {r_up} != {r_fast}"
    assert (term_up, trunc_up) == (term_fast, trunc_fast), where
    assert i_up == i_fast, where
    return term_up or trunc_up


@pytest.fixture(scope="module")
def env_pair():
    """One upstream/fast pair through gymnasium.make, reused across seeds (tests the caches
    are rebuilt on every reset)."""
    up = gym.make("CarRacing-v3")
    fast = gym.make(FAST_ID)
    assert isinstance(fast.unwrapped, FastCarRacing)
    assert type(up.unwrapped) is CarRacing
    yield up, fast
    up.close()
    fast.close()


# --------------------------------------------------------------------------- bit-exactness


@pytest.mark.parametrize("seed", SEEDS)
def test_same_as_upstream(env_pair, seed, monkeypatch):
    up, fast = env_pair
    policy = POLICIES[seed % len(POLICIES)]
    rng = np.random.default_rng(seed)

    bg_paths = []  # which background path each fast frame took (True: fill shortcut)
    original = fc._window_inside_field

    def spy(*args, **kwargs):
        bg_paths.append(original(*args, **kwargs))
        return bg_paths[-1]

    monkeypatch.setattr(fc, "_window_inside_field", spy)

    _assert_same_reset(up, fast, seed=seed)
    first_episode = None  # frames of the first episode (reset frame included)
    for t in range(STEPS):
        action = _action(policy, t, rng, up.unwrapped, seed)
        if _assert_same_step(up, fast, action, f"seed {seed} ({policy}) step {t}"):
            first_episode = first_episode or len(bg_paths)
            _assert_same_reset(up, fast, seed=seed + 1000)
    first_episode = first_episode or len(bg_paths)

    # both background paths ran: exact drawing during the zoom-in, the fill shortcut after
    assert not bg_paths[0] and any(bg_paths)
    if policy == "straight_off":  # drove off the playfield: the exact path near its edge
        assert first_episode < STEPS, "expected to leave the playfield (terminated, -100)"
        assert not all(bg_paths[60:first_episode]), "expected frames near the playfield edge"


@pytest.mark.parametrize("seed", [3, 11])
def test_domain_randomize(seed):
    up = gym.make("CarRacing-v3", domain_randomize=True)
    fast = gym.make(FAST_ID, domain_randomize=True)
    rng = np.random.default_rng(seed)
    _assert_same_reset(up, fast, seed=seed)
    for t in range(100):
        action = _action("sticky_random" if t > 30 else "follow_track", t, rng, up.unwrapped, seed)
        if _assert_same_step(up, fast, action, f"domain_randomize seed {seed} step {t}"):
            break
    # keep the colours, new track; then new colours again
    _assert_same_reset(up, fast, options={"randomize": False})
    for t in range(25):
        _assert_same_step(up, fast, _follow(up.unwrapped), f"randomize=False step {t}")
    _assert_same_reset(up, fast, options={"randomize": True})
    for t in range(25):
        _assert_same_step(up, fast, _follow(up.unwrapped), f"randomize=True step {t}")
    up.close()
    fast.close()


def test_discrete_actions_and_lap_percent():
    if fc._version_tuple(gym.__version__) < (1, 1):
        pytest.skip("gymnasium 1.0.0's CarRacing rejects every discrete action (upstream bug)")
    up = gym.make("CarRacing-v3", continuous=False, lap_complete_percent=0.5)
    fast = gym.make(FAST_ID, continuous=False, lap_complete_percent=0.5)
    assert fast.action_space == up.action_space
    rng = np.random.default_rng(0)
    _assert_same_reset(up, fast, seed=5)
    action = 3
    for t in range(150):
        if t % 15 == 0:
            action = np.int64(rng.choice([0, 1, 2, 3, 3, 3, 4]))  # gymnasium 1.0 needs .astype
        if _assert_same_step(up, fast, action, f"discrete step {t}"):
            break
    up.close()
    fast.close()


def test_truncation_matches():
    up = gym.make("CarRacing-v3", max_episode_steps=30)
    fast = gym.make(FAST_ID, max_episode_steps=30)
    _assert_same_reset(up, fast, seed=8)
    flags = [
        _assert_same_step(up, fast, np.array([0.0, 0.4, 0.0], np.float32), f"step {t}") for t in range(30)
    ]
    assert flags == [False] * 29 + [True]
    up.close()
    fast.close()


@pytest.mark.parametrize("omega", [900.0, -900.0])
def test_status_bar_overflow_path(omega, monkeypatch):
    """A wheel spinning fast enough draws its ABS bar above the status bar (over the road):
    the fast path must notice and still match upstream."""
    up, fast = CarRacing(), FastCarRacing()
    _assert_same_reset(up, fast, seed=2)
    for t in range(60):
        _assert_same_step(up, fast, _follow(up), f"step {t}")

    results = []
    original = FastCarRacing._state_pixels

    def spy(self, canvas):
        results.append(original(self, canvas))
        return results[-1]

    monkeypatch.setattr(FastCarRacing, "_state_pixels", spy)
    for env in (up, fast):
        env.car.wheels[2].omega = omega
    assert np.array_equal(up._render("state_pixels"), fast._render("state_pixels"))
    if omega > 0:
        assert results[-1] is None, "the overflow fallback was not taken"
    for t in range(10):  # and the physics carries on identically
        _assert_same_step(up, fast, np.array([0.0, 0.2, 0.0], np.float32), f"after omega, step {t}")
    up.close()
    fast.close()


def test_rgb_array_render_and_surviving_pygame_quit():
    up = CarRacing(render_mode="rgb_array")
    fast = FastCarRacing(render_mode="rgb_array")
    _assert_same_reset(up, fast, seed=4)
    assert np.array_equal(up.render(), fast.render())
    for t in range(70):
        _assert_same_step(up, fast, _follow(up), f"rgb_array step {t}")
        if t % 7 == 0:  # includes zoom-in frames (particles are drawn in this mode)
            frame_up, frame_fast = up.render(), fast.render()
            assert frame_fast.shape == (400, 600, 3)
            assert np.array_equal(frame_up, frame_fast), f"rgb_array render differs at step {t}"
        if t == 40:
            pygame.quit()  # kills the font module: cached font objects must be dropped
    up.close()
    fast.close()


def test_human_render_mode():
    up = CarRacing(render_mode="human")
    fast = FastCarRacing(render_mode="human")
    _assert_same_reset(up, fast, seed=6)
    for t in range(12):
        action = np.array([0.3, 0.5, 0.0], np.float32)
        up.step(action)
        screen_up = pygame.surfarray.array3d(pygame.display.get_surface())
        fast.step(action)
        screen_fast = pygame.surfarray.array3d(pygame.display.get_surface())
        assert np.array_equal(screen_up, screen_fast), f"human window differs at step {t}"
        assert np.array_equal(up.state, fast.state)
    fast.close()
    up.close()


# --------------------------------------------------------------------------- the premises


def test_vectorised_transform_is_bit_exact():
    assert fc._numpy_matches_vector2()
    scene = fc._GRASS[:50]
    for angle in [0.0, math.pi / 2, -math.pi, 3 * math.pi / 2, 0.1234, -7.5, 100.0]:
        for zoom in [0.6, 5.0, 16.2]:
            trans = (512.25, -90.5)
            assert np.array_equal(
                fc._transform_numpy(scene, angle, zoom, trans),
                fc._transform_vector2(scene, angle, zoom, trans),
            )


def test_split_smoothscale_premise_and_box2d_emulation():
    """The status-bar/flip folding relies on smoothscale shrinking X row by row before Y; the
    vectorised car relies on emulating Box2D's float32 `transform * v`. Both self-checks must
    hold here (otherwise the env silently takes slower exact paths)."""
    assert fc._split_scale_matches(pygame.Surface((1000, 800)))
    assert fc._box2d_mul_matches()


def test_polygons_beyond_the_margin_draw_nothing():
    """The premise of skipping culled-but-off-screen polygons: gfxdraw writes no pixel when
    all vertices lie more than _OFFSCREEN_MARGIN px beyond one side of the surface."""
    rng = np.random.default_rng(0)
    w, h = 200, 150
    surf = pygame.Surface((w, h))
    m = fc._OFFSCREEN_MARGIN + 1e-9
    for k in range(400):
        side = k % 4
        size = rng.uniform(2, 300)
        pts = rng.uniform(0, 1, size=(4, 2)) * [w + 2 * size, h + 2 * size] - size
        if side == 0:
            pts[:, 0] = -m - rng.uniform(0, size, 4)
        elif side == 1:
            pts[:, 0] = w - 1 + m + rng.uniform(0, size, 4)
        elif side == 2:
            pts[:, 1] = -m - rng.uniform(0, size, 4)
        else:
            pts[:, 1] = h - 1 + m + rng.uniform(0, size, 4)
        surf.fill((10, 20, 30))
        gfxdraw.aapolygon(surf, pts.tolist(), (250, 240, 230))
        gfxdraw.filled_polygon(surf, pts.tolist(), (250, 240, 230))
        assert (pygame.surfarray.pixels3d(surf) == (10, 20, 30)).all(), pts


# --------------------------------------------------------------------------- version gate


def test_version_parsing():
    assert fc._version_tuple("1.4.0") == (1, 4, 0)
    assert fc._version_tuple("1.5.0rc1") == (1, 5, 0)
    assert fc._version_tuple("1.0.0a2") == (1, 0, 0)
    inside = ["1.0", "1.0.0", "1.1.1", "1.2.2", "1.3.0", "1.4.0", "1.4.9"]
    outside = ["0.29.1", "0.99", "1.5", "1.5.0", "1.5.0rc1", "2.0.0", "garbage"]
    assert all(fc._version_in_range(v, (">=1.0", "<1.5")) for v in inside)
    assert not any(fc._version_in_range(v, (">=1.0", "<1.5")) for v in outside)
    assert isinstance(fc.VERIFIED_GYMNASIUM, tuple) and all(isinstance(s, str) for s in fc.VERIFIED_GYMNASIUM)


def test_fast_env_supported_warns_once(monkeypatch):
    monkeypatch.setattr(fc, "_warned_unsupported", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fast_env_supported() is fc._version_in_range(gym.__version__)
        assert fast_env_supported("1.4.0") is True
        assert not caught
        assert fast_env_supported("1.5.0") is False
        assert fast_env_supported("0.29.1") is False
        assert fast_env_supported("9.0") is False
    assert len(caught) == 1
    assert "upstream" in str(caught[0].message) and "1.5.0" in str(caught[0].message)
