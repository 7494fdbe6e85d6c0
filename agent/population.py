"""Scoring CMA-ES candidates in the real env through a worker pool, a few episodes per task.

A pool worker (local process or Ray actor) runs `init_worker` once (load V and M, make its
envs) and then `episodes_task`s: one candidate on up to `envs_per_worker` tracks, driven side
by side as one batch (agent.policy.run_episodes). The tasks are cut the same way whatever the
number of workers, so the returns depend on the seeds and `envs_per_worker`, never on how many
workers ran them. A lost worker costs one rerun task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from agent.policy import Agent, run_episodes
from agent.world import load_world
from envs.carracing import make_env
from models.controller import Controller
from utils.params import set_flat_params

_WORKER: dict[str, Any] = {}  # this worker process's agent and env


def init_worker(
    logdir: str, fast: bool, expected_config: dict[str, int], action_repeat: int = 1, envs_per_worker: int = 1
) -> None:
    """Pool initializer: load V and M and make the envs (acting every `action_repeat` frames) once per worker."""
    torch.set_num_threads(1)
    vae, mdrnn, config = load_world(logdir)
    if config != expected_config:
        raise RuntimeError(
            f"V/M in {logdir} changed during the run: sizes {config}, expected {expected_config}"
        )
    _WORKER["agent"] = Agent(vae, mdrnn, Controller(**config))
    _WORKER["envs"] = [make_env(fast=fast, action_repeat=action_repeat) for _ in range(envs_per_worker)]


def episodes_task(
    params: np.ndarray, seeds: list[int], max_frames: int, stall_frames: int | None = None
) -> list[tuple[float, int]]:
    """Pool task: the controller with flat parameters `params` on each track of `seeds`, as one batch."""
    agent = _WORKER["agent"]
    set_flat_params(agent.controller, params)
    return run_episodes(_WORKER["envs"][: len(seeds)], agent, seeds, max_frames, stall_frames)


def task_count(candidates: int, episodes: int, envs_per_worker: int) -> int:
    """Tasks in one `evaluate_candidates` map: each candidate's episodes cut in runs of envs_per_worker."""
    return candidates * -(-episodes // envs_per_worker)


def evaluate_candidates(
    pool,
    candidates: Sequence[np.ndarray],
    seeds: Sequence[int],
    max_frames: int,
    on_episodes: Callable[[int], None] | None = None,
    stall_frames: int | None = None,
    envs_per_worker: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate on every seed: fitness (P,) = mean return over the seeds, returns (P, S), frames (P, S).

    A task is one candidate on `envs_per_worker` consecutive seeds (the pool's workers must hold
    that many envs); `on_episodes(n)` hears of each finished task's n episodes. `stall_frames`
    cuts hopeless episodes short (training only; evaluations play full episodes).
    """
    seeds = [int(s) for s in seeds]
    chunks = [seeds[i : i + envs_per_worker] for i in range(0, len(seeds), envs_per_worker)]
    tasks = [
        (np.asarray(c, dtype=np.float64), chunk, int(max_frames), stall_frames)
        for c in candidates
        for chunk in chunks
    ]
    results = pool.map(
        episodes_task, tasks, on_result=None if on_episodes is None else lambda i, r: on_episodes(len(r))
    )
    shape = (len(candidates), len(seeds))
    returns = np.array([r for task in results for r, _ in task], dtype=np.float64).reshape(shape)
    steps = np.array([n for task in results for _, n in task], dtype=np.int64).reshape(shape)
    return returns.mean(axis=1), returns, steps
