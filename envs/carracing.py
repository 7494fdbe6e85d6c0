"""The one place that builds CarRacing and turns its frames into model input.

Every stage that touches the real environment (data generation, controller training,
evaluation) goes through `make_env` and `to_model_frame`, so the pixels a model was trained
on are exactly the pixels it later sees. `make_env(action_repeat=k)` acts every k env frames
(`ActionRepeat`), drawing only the frames the agent sees when the env is the fast one.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import gymnasium as gym
import numpy as np

# Headless by default: CarRacing draws with pygame onto an offscreen surface. Only
# render_mode="human" needs a real display, and callers ask for it explicitly.
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from envs.fast_carracing import FastCarRacing, fast_env_supported  # noqa: E402

ENV_ID = "CarRacing-v3"
FAST_ENV_ID = "FastCarRacing-v3"
MAX_EPISODE_STEPS = 1000
ENV_FPS = 50  # CarRacing's simulation rate: frames per second of a played episode
RAW_SIZE = 96  # CarRacing's observation is (96, 96, 3) uint8
MODEL_SIZE = 64  # the models see (64, 64, 3) frames
ACTION_SIZE = 3  # steer in [-1, 1], gas in [0, 1], brake in [0, 1]

if FAST_ENV_ID not in gym.registry:
    gym.register(
        id=FAST_ENV_ID,
        entry_point="envs.fast_carracing:FastCarRacing",
        max_episode_steps=MAX_EPISODE_STEPS,
    )


def make_env(fast: bool = True, action_repeat: int = 1, **kwargs) -> gym.Env:
    """A CarRacing-v3 env with gymnasium's API and a 1000-step TimeLimit.

    `fast=True` gives the vectorised renderer of `envs.fast_carracing` (bit-identical
    observations, several times faster) when the installed gymnasium is one it was verified
    against; otherwise, or with `fast=False`, gymnasium's own env. kwargs go to the env
    (`render_mode`, `domain_randomize`, ...). `action_repeat` k > 1 wraps it in
    `ActionRepeat(env, k)` (one step = k env frames); k = 1 returns the env unwrapped.
    """
    k = check_action_repeat(action_repeat)
    env = gym.make(FAST_ENV_ID if fast and fast_env_supported() else ENV_ID, **kwargs)
    return env if k == 1 else ActionRepeat(env, k)


def check_action_repeat(action_repeat: Any) -> int:
    """`action_repeat` as an int, or ValueError unless it is an integer >= 1."""
    try:
        k = operator.index(action_repeat)  # ints and numpy ints; floats refused
    except TypeError:
        raise ValueError(f"action_repeat must be an integer >= 1, got {action_repeat!r}") from None
    if isinstance(action_repeat, bool) or k < 1:
        raise ValueError(f"action_repeat must be an integer >= 1, got {action_repeat!r}")
    return k


def env_frames(info: dict) -> int:
    """How many env frames the step that returned `info` advanced (1 without ActionRepeat)."""
    return int(info.get("frames", 1))


# Wrappers gym.make puts around an env that pass its observations through untouched.
_PASS_THROUGH = (gym.wrappers.TimeLimit, gym.wrappers.OrderEnforcing, gym.wrappers.PassiveEnvChecker)


def _skippable(env: gym.Env) -> FastCarRacing | None:
    """The FastCarRacing under `env` if only pass-through wrappers lie between, else None."""
    while isinstance(env, _PASS_THROUGH):
        env = env.env
    return env if isinstance(env, FastCarRacing) else None


class ActionRepeat(gym.Wrapper):
    """Act every k env frames: one step repeats the action k times and sums the rewards.

    Stops early when a frame ends the episode (terminated or truncated); the returned flags
    and info are those of the last frame stepped, plus `info["frames"]`, the number of frames
    stepped. The observation is always the exact frame after the last frame stepped, as
    gymnasium's env draws it. On FastCarRacing (wrapped only by gym.make's pass-through
    wrappers) the frames in between are not drawn; if the episode ends on such a frame, it is
    drawn after the fact (`draw_skipped_frame`, exact). Any other env draws every frame.
    """

    def __init__(self, env: gym.Env, k: int):
        super().__init__(env)
        self.action_repeat = check_action_repeat(k)
        self._fast = _skippable(env)  # None: every frame is drawn

    def step(self, action):
        total = 0.0
        fast = self._fast
        try:
            for frame in range(1, self.action_repeat + 1):
                if fast is not None:
                    fast.skip_render = frame < self.action_repeat  # only the k-th frame is seen
                obs, reward, terminated, truncated, info = self.env.step(action)
                total += reward
                if terminated or truncated:
                    break
        finally:
            if fast is not None:
                fast.skip_render = False
        if fast is not None and fast.frame_skipped:  # ended on an undrawn frame: draw it now
            obs = fast.draw_skipped_frame()
        return obs, total, terminated, truncated, {**info, "frames": frame}


def _downscale_axis(x: np.ndarray, axis: int) -> np.ndarray:
    """Shrink one axis by 3:2 with exact area weights, in integers.

    Each group of 3 input pixels (p0, p1, p2) covers 2 output pixels: the first overlaps
    p0 fully and half of p1, the second the other half of p1 and p2, so their sums are
    2*p0 + p1 and p1 + 2*p2 (three times the area mean). Integer sums keep it exact and
    cheap; the caller divides once at the end.
    """
    x = np.moveaxis(x, axis, -1)
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // 3, 3)
    p0, p1, p2 = groups[..., 0], groups[..., 1], groups[..., 2]
    out = np.stack([2 * p0 + p1, p1 + 2 * p2], axis=-1).reshape(*x.shape[:-1], -1)
    return np.moveaxis(out, -1, axis)


def to_model_frame(obs: np.ndarray) -> np.ndarray:
    """Raw uint8 frame(s) (..., 96, 96, 3) -> model frame(s) (..., 64, 64, 3) uint8.

    Area-averaging downscale (anti-aliased: road edges and thin bars are blended, not
    dropped), rounded to nearest. The whole frame is kept, status bar included: its speed
    and steering bars are the only place a single frame shows the car's velocity.
    """
    obs = np.asarray(obs)
    if obs.shape[-3:] != (RAW_SIZE, RAW_SIZE, 3) or obs.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames of shape (..., 96, 96, 3), got {obs.dtype} {obs.shape}")
    sums = _downscale_axis(_downscale_axis(obs.astype(np.int32), -3), -2)  # 9x the mean
    return ((sums + 4) // 9).astype(np.uint8)
