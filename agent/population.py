"""Scoring CMA-ES candidates in the real env through a worker pool, one episode per task.

A pool worker (local process or Ray actor) runs `init_worker` once (load V and M, make the
env) and then `episode_task`s; a lost worker costs one rerun episode.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from agent.policy import Agent, run_episode
from agent.world import load_world
from envs.carracing import make_env
from models.controller import Controller
from utils.params import set_flat_params

_WORKER: dict[str, Any] = {}  # this worker process's agent and env


def init_worker(logdir: str, fast: bool, expected_config: dict[str, int], action_repeat: int = 1) -> None:
    """Pool initializer: load V and M and make the env (acting every `action_repeat` frames) once per worker."""
    torch.set_num_threads(1)
    vae, mdrnn, config = load_world(logdir)
    if config != expected_config:
        raise RuntimeError(f"V/M in {logdir} changed during the run: sizes {config}, expected {expected_config}")
    _WORKER["agent"] = Agent(vae, mdrnn, Controller(**config))
    _WORKER["env"] = make_env(fast=fast, action_repeat=action_repeat)


def episode_task(params: np.ndarray, seed: int, max_frames: int, stall_frames: int | None = None) -> tuple[float, int]:
    """Pool task: one episode of the controller with flat parameters `params` on track `seed`."""
    agent = _WORKER["agent"]
    set_flat_params(agent.controller, params)
    return run_episode(_WORKER["env"], agent, seed, max_frames, stall_frames=stall_frames)


def evaluate_candidates(pool, candidates: Sequence[np.ndarray], seeds: Sequence[int], max_frames: int,
                        on_episode: Callable[[int, tuple[float, int]], None] | None = None,
                        stall_frames: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate on every seed: fitness (P,) = mean return over the seeds, returns (P, S), frames (P, S).

    `stall_frames` cuts hopeless episodes short (training only; evaluations play full episodes).
    """
    tasks = [(np.asarray(c, dtype=np.float64), int(s), int(max_frames), stall_frames) for c in candidates for s in seeds]
    results = pool.map(episode_task, tasks, on_result=on_episode)
    shape = (len(candidates), len(seeds))
    returns = np.array([r for r, _ in results], dtype=np.float64).reshape(shape)
    steps = np.array([n for _, n in results], dtype=np.int64).reshape(shape)
    return returns.mean(axis=1), returns, steps
