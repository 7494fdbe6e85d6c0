"""Stage 1: random-policy CarRacing rollouts, made by worker processes -> datasets/carracing-k4/.

    python data/generation_script.py [--rollouts 640 --rootdir datasets/carracing-k4 --workers 2]

Rollout I goes to `rootdir/thread_{I mod K}/rollout_I.npz` and depends only on (seed, I), so
the dataset is the same whatever the number of workers K. A rerun makes only what is missing:
files appear atomically, and a damaged file (cut short by a full disk or an interrupted copy)
is found by a cheap check and made again. With --backend ray the workers are Ray actors that
write into --rootdir themselves, so on several nodes it must be a filesystem they share.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from data.carracing import POLICIES, generate_rollout
from data.rollouts import (
    check_rollout,
    dataset_action_repeat,
    find_rollouts,
    remove_partial_files,
    rollout_path,
    save_rollout,
)
from envs.carracing import MAX_EPISODE_STEPS, make_env
from pool import WorkerError, add_pool_args, check_backend, make_pool, worker_failure
from utils import profile
from utils.cli import ArgumentParser, int_in, run_script, seed_int, writable_dir
from utils.errors import BadRolloutError, StageError

_env = None  # one env per worker process, built once by `init_worker`


@dataclass(frozen=True)
class RolloutTask:
    """One rollout to play and save, as sent to a worker."""

    index: int
    path: str  # where the worker writes it
    seed: int
    policy: str
    max_steps: int


@dataclass(frozen=True)
class EnvSpec:
    """The env a worker makes once: the fast renderer or gymnasium's, acting every k frames."""

    action_repeat: int
    fast: bool = True


def init_worker(spec: EnvSpec) -> None:
    global _env
    _env = make_env(fast=spec.fast, action_repeat=spec.action_repeat)


def run_rollout(task: RolloutTask) -> int:
    """Worker task: play rollout `task.index`, save it, return its number of rows."""
    arrays = generate_rollout(_env, task.index, task.seed, task.policy, task.max_steps)
    save_rollout(task.path, arrays)
    return len(arrays["actions"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--rollouts",
        type=int_in(1, 10_000_000),
        default=profile.ROLLOUTS,
        help=f"rollouts to have on disk in all (default {profile.ROLLOUTS})",
    )
    add(
        "--rootdir",
        type=writable_dir,
        default=None,
        help=f"output folder (default: {profile.dataset_folder('K')}, K the action repeat)",
    )
    add("--policy", choices=POLICIES, default="brown", help="random policy (default: brown)")
    add("--seed", type=seed_int, default=0, help="base seed; rollout I is seeded from (seed, I) (default: 0)")
    add(
        "--max-steps",
        type=int_in(1, MAX_EPISODE_STEPS),
        default=MAX_EPISODE_STEPS,
        help=f"env frames per rollout at most (default and most: the env's {MAX_EPISODE_STEPS})",
    )
    add(
        "--action-repeat",
        type=int_in(1, 50),
        default=profile.ACTION_REPEAT,
        help=f"hold each action k frames, one row per k frames (default {profile.ACTION_REPEAT}; 1 is the paper)",
    )
    add("--slow-env", action="store_true", help="use gymnasium's own (slower) CarRacing renderer")
    add_pool_args(parser, workers_alias="--threads")
    args = parser.parse_args(argv)
    args.rootdir = args.rootdir or profile.dataset_folder(args.action_repeat)
    return args


def rollouts_to_make(rootdir: Path, wanted: int, action_repeat: int) -> list[int]:
    """Indices below `wanted` with no readable rollout file in `rootdir`; damaged files are deleted."""
    remove_partial_files(rootdir)  # hidden temporaries left by a killed run; never read by loaders
    readable = {}
    for index, path in find_rollouts(rootdir):
        try:
            check_rollout(path)
            readable[index] = path
        except BadRolloutError as error:
            print(f"warning: {error}; making it again", file=sys.stderr)
            path.unlink()
    k_found = dataset_action_repeat(list(readable.values()), rootdir) if readable else action_repeat
    if k_found != action_repeat:
        raise BadRolloutError(
            f"{rootdir} holds rollouts at --action-repeat {k_found}, not {action_repeat}: "
            f"use another --rootdir for k={action_repeat}"
        )
    return [i for i in range(wanted) if i not in readable]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_backend(args.backend, args.ray_address)
    rootdir = Path(args.rootdir)
    rootdir.mkdir(parents=True, exist_ok=True)
    todo = rollouts_to_make(rootdir, args.rollouts, args.action_repeat)
    if not todo:
        print(f"all {args.rollouts} rollouts already in {rootdir}; nothing to do")
        return 0
    root = rootdir.resolve()
    tasks = [
        RolloutTask(i, str(rollout_path(root, i, i % args.workers)), args.seed, args.policy, args.max_steps)
        for i in todo
    ]
    workers = min(args.workers, len(tasks))
    start, frames = time.perf_counter(), 0
    bar = tqdm(total=len(tasks), unit="rollout", desc="rollouts", dynamic_ncols=True)

    def on_result(position: int, rows: int) -> None:
        nonlocal frames
        if not Path(tasks[position].path).is_file():  # written by a Ray worker on another machine
            raise StageError(
                f"rollout {tasks[position].index} was written on another machine and is not in "
                f"{rootdir} here: with --backend ray on several nodes, --rootdir must be shared"
            )
        frames += rows * args.action_repeat
        bar.update(1)
        bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}")

    try:
        with make_pool(
            args.backend,
            workers,
            init_worker,
            (EnvSpec(args.action_repeat, fast=not args.slow_env),),
            ray_address=args.ray_address,
        ) as pool:
            pool.map(run_rollout, [(task,) for task in tasks], on_result=on_result)
    except WorkerError as error:
        bar.close()
        raise worker_failure(error, rootdir / "worker_error.log") from None
    except KeyboardInterrupt:
        bar.close()  # before the line, so that it is the last one
        print("\ninterrupted: complete rollouts are kept; rerun the same command to finish", file=sys.stderr)
        return 130
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    print(
        f"generated {len(tasks)} rollouts ({frames} env frames) in {elapsed:.1f}s: {frames / elapsed:.0f} "
        f"env frames/s with {workers} worker(s); {args.rollouts} rollouts at k={args.action_repeat} in {rootdir}"
    )
    return 0


if __name__ == "__main__":
    run_script(main)
