"""Scoring CMA-ES candidates in the real env through a worker pool, a few episodes per task.

A pool worker (local process or Ray actor) runs `init_worker` once (load V and M, make its
envs) and then `episodes_task`s: one candidate on up to `envs_per_worker` tracks, driven side
by side as one batch (agent.policy.run_episodes). The tasks are cut the same way whatever the
number of workers, so the returns depend on the seeds and `envs_per_worker`, never on how many
workers ran them. A lost worker costs one rerun task. What crosses to a worker is a keyword
dataclass (`WorkerSpec`, `EpisodesTask`), never a positional tuple.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from agent.policy import BLOCK, Agent, record_episode, run_episodes
from agent.world import load_world
from envs.carracing import make_env
from models.controller import Controller
from pool import add_pool_args, make_pool
from utils import profile
from utils.cli import int_in, positive_float
from utils.params import set_flat_params

_WORKER: dict[str, Any] = {}  # this worker process's agent and envs


@dataclass(frozen=True)
class WorkerSpec:
    """What a pool worker loads once: V and M from `logdir`, and `envs_per_worker` envs at k."""

    logdir: str
    config: dict[str, int]  # the controller sizes the main process expects of V and M
    action_repeat: int
    envs_per_worker: int
    fast: bool = True  # the fast renderer (False: gymnasium's own)
    block: int = BLOCK  # rows per V, M and C call; only the benchmark's old path changes it
    mdrnn_state: dict | None = None  # M's {"state_dict", "config"} instead of L/mdrnn/best.pt's


@dataclass(frozen=True)
class EpisodesTask:
    """One candidate (flat parameters) on a few tracks, driven side by side by one worker."""

    params: np.ndarray
    seeds: list[int]
    max_frames: int
    stall_frames: int | None = None  # cut hopeless training episodes (evaluations: None)


@dataclass
class Scores:
    """Candidates' returns on a set of tracks, and what playing them cost."""

    returns: np.ndarray  # (P, S) candidate p's return on track s
    frames: np.ndarray  # (P, S) real env frames each episode played (zeros in the dream)
    dream_steps: int = 0  # steps of M's dream the episodes took
    seconds: float = 0.0

    @property
    def fitness(self) -> np.ndarray:
        """(P,) each candidate's mean return over the tracks."""
        return self.returns.mean(axis=1)

    @property
    def real_frames(self) -> int:
        return int(self.frames.sum())


def add_agent_pool_args(parser, workers_alias: str | None = None) -> None:
    """The flags of every script that plays the agent through a pool, worded alike."""
    add = parser.add_argument
    add(
        "--envs-per-worker",
        type=int_in(1, 1024),
        default=profile.ENVS_PER_WORKER,
        help=f"episodes a worker drives side by side as one batch (default {profile.ENVS_PER_WORKER})",
    )
    add(
        "--task-timeout",
        type=positive_float,
        default=300.0,
        help="seconds one episode may take before its worker is presumed hung, replaced and its episodes rerun "
        "(default 300)",
    )
    add("--slow-env", action="store_true", help="use gymnasium's own (slower) CarRacing renderer")
    add_pool_args(parser, workers_alias)


def make_agent_pool(
    args, config: dict[str, int], action_repeat: int, workers: int, mdrnn_state: dict | None = None
):
    """A started pool of `init_worker` workers, from the flags of `add_agent_pool_args` (and --logdir);
    `mdrnn_state`: the M they play with instead of L/mdrnn/best.pt's."""
    spec = WorkerSpec(
        args.logdir,
        config,
        action_repeat,
        args.envs_per_worker,
        fast=not args.slow_env,
        mdrnn_state=mdrnn_state,
    )
    return make_pool(
        args.backend,
        workers,
        init_worker,
        (spec,),
        task_timeout=args.task_timeout * args.envs_per_worker,
        log=lambda text: tqdm.write(text, file=sys.stderr),
        ray_address=args.ray_address,
    )


def init_worker(spec: WorkerSpec) -> None:
    """Pool initializer: load V and M and make the envs once per worker."""
    torch.set_num_threads(1)
    vae, mdrnn, config = load_world(spec.logdir, mdrnn_state=spec.mdrnn_state)
    if config != spec.config:
        raise RuntimeError(
            f"V/M in {spec.logdir} changed during the run: sizes {config}, expected {spec.config}"
        )
    _WORKER["agent"] = Agent(vae, mdrnn, Controller(**config), block=spec.block)
    _WORKER["envs"] = [
        make_env(fast=spec.fast, action_repeat=spec.action_repeat) for _ in range(spec.envs_per_worker)
    ]


def episodes_task(task: EpisodesTask) -> list[tuple[float, int]]:
    """Pool task: the candidate on each of its tracks as one batch; [(return, env frames)]."""
    agent = _WORKER["agent"]
    set_flat_params(agent.controller, task.params)
    return run_episodes(
        _WORKER["envs"][: len(task.seeds)], agent, task.seeds, task.max_frames, task.stall_frames
    )


@dataclass(frozen=True)
class CollectTask:
    """One episode of C plus exploration noise, recorded as a rollout (iterative data)."""

    params: np.ndarray  # C's flat parameters
    noise_std: np.ndarray  # (A,) std of the Gaussian added to C's pre-squash output
    seed: int  # the track
    noise_seed: int
    max_frames: int


def collect_task(task: CollectTask) -> dict[str, np.ndarray]:
    """Pool task: play C with noise on one track and return its rollout's arrays (data/rollouts.py)."""
    agent, env = _WORKER["agent"], _WORKER["envs"][0]
    set_flat_params(agent.controller, task.params)
    return record_episode(env, agent, task.seed, task.noise_seed, task.noise_std, task.max_frames)


def task_count(candidates: int, episodes: int, envs_per_worker: int) -> int:
    """Tasks in one `RealEvaluator.evaluate`: each candidate's episodes cut in runs of envs_per_worker."""
    return candidates * -(-episodes // envs_per_worker)


class RealEvaluator:
    """Scores candidates by playing them in the real env on a pool of `init_worker` workers.

    `evaluate(candidates, seeds)` -> Scores, as `agent.dream.DreamEvaluator` does in M's dream,
    so the controller loop swaps one for the other. `stall_frames` cuts hopeless training
    episodes short; evaluations and the test play full episodes (None).
    """

    def __init__(self, pool, max_frames: int, envs_per_worker: int, stall_frames: int | None = None) -> None:
        self.pool, self.max_frames, self.envs_per_worker = pool, int(max_frames), envs_per_worker
        self.stall_frames = stall_frames

    def evaluate(
        self,
        candidates: Sequence[np.ndarray],
        seeds: Sequence[int],
        on_episodes: Callable[[int], None] | None = None,
    ) -> Scores:
        """Every candidate on every seed; `on_episodes(n)` hears of each finished task's n episodes."""
        started, seeds = time.perf_counter(), [int(s) for s in seeds]
        chunks = [seeds[i : i + self.envs_per_worker] for i in range(0, len(seeds), self.envs_per_worker)]
        tasks = [
            (EpisodesTask(np.asarray(c, dtype=np.float64), chunk, self.max_frames, self.stall_frames),)
            for c in candidates
            for chunk in chunks
        ]
        report = None if on_episodes is None else lambda index, result: on_episodes(len(result))
        results = self.pool.map(episodes_task, tasks, on_result=report)
        episodes = [episode for task in results for episode in task]  # candidate-major, seeds in order
        shape = (len(candidates), len(seeds))
        returns = np.array([r for r, _ in episodes], dtype=np.float64).reshape(shape)
        frames = np.array([n for _, n in episodes], dtype=np.int64).reshape(shape)
        return Scores(returns, frames, seconds=time.perf_counter() - started)
