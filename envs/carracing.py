"""The one place that builds CarRacing and turns its frames into model input.

Every stage that touches the real environment (data generation, controller training,
evaluation) goes through `make_env` and `to_model_frame`, so the pixels a model was trained
on are exactly the pixels it later sees.
"""
from __future__ import annotations

import os

import gymnasium as gym
import numpy as np

# Headless by default: CarRacing draws with pygame onto an offscreen surface. Only
# render_mode="human" needs a real display, and callers ask for it explicitly.
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

ENV_ID = "CarRacing-v3"
FAST_ENV_ID = "FastCarRacing-v3"
MAX_EPISODE_STEPS = 1000
RAW_SIZE = 96  # CarRacing's observation is (96, 96, 3) uint8
MODEL_SIZE = 64  # the models see (64, 64, 3) frames
ACTION_SIZE = 3  # steer in [-1, 1], gas in [0, 1], brake in [0, 1]

if FAST_ENV_ID not in gym.registry:
    gym.register(
        id=FAST_ENV_ID,
        entry_point="envs.fast_carracing:FastCarRacing",
        max_episode_steps=MAX_EPISODE_STEPS,
    )


def make_env(fast: bool = True, **kwargs) -> gym.Env:
    """A CarRacing-v3 env with gymnasium's API and a 1000-step TimeLimit.

    `fast=True` gives the vectorised renderer of `envs.fast_carracing` (bit-identical
    observations, several times faster) when the installed gymnasium is one it was verified
    against; otherwise, or with `fast=False`, gymnasium's own env. kwargs go to the env
    (`render_mode`, `domain_randomize`, ...).
    """
    if fast:
        from envs.fast_carracing import fast_env_supported

        if fast_env_supported():
            return gym.make(FAST_ENV_ID, **kwargs)
    return gym.make(ENV_ID, **kwargs)


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
