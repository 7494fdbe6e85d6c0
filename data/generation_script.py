"""Stage 1: generate random-policy CarRacing rollouts with K worker processes.

    python data/generation_script.py --rollouts 1000 --rootdir datasets/carracing --threads 2

Rollout I goes to `rootdir/thread_{I mod K}/rollout_I.npz` and depends only on (seed, I), so
the dataset is the same whatever K. Re-running after a kill skips the rollouts already on
disk (files appear atomically, so any file present is complete). No display is needed.

With --backend ray the K workers are Ray actors (--ray-address or $RAY_ADDRESS, else a local
Ray). Each worker writes its rollouts into --rootdir itself, so on a multi-node cluster
--rootdir must be on a filesystem every node shares; a rollout this machine cannot see stops
the run with one line instead of leaving the dataset silently short.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from data.carracing import POLICIES, generate_rollout  # noqa: E402
from data.rollouts import (
    dataset_action_repeat,
    find_rollouts,
    remove_partial_files,
    rollout_path,
    save_rollout,
)  # noqa: E402
from envs.carracing import MAX_EPISODE_STEPS, make_env  # noqa: E402
from pool import WorkerError, add_backend_args, check_backend, make_pool  # noqa: E402
from utils.cli import ArgumentParser, fail, int_in, seed_int, writable_dir  # noqa: E402

_env = None  # one env per worker process, built once by `init_worker`


def init_worker(fast: bool, action_repeat: int = 1) -> None:
    global _env
    _env = make_env(fast=fast, action_repeat=action_repeat)


def run_rollout(index: int, thread: int, rootdir: str, seed: int, policy: str, max_steps: int) -> int:
    """Worker task: play rollout `index`, save it, return its number of frames."""
    arrays = generate_rollout(_env, index, seed, policy, max_steps)
    save_rollout(rollout_path(rootdir, index, thread), arrays)
    return len(arrays["actions"])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rollouts",
        type=int_in(1, 10_000_000),
        required=True,
        help="total number of rollouts to have on disk",
    )
    parser.add_argument(
        "--rootdir",
        type=writable_dir,
        default="datasets/carracing",
        help="output folder (default: datasets/carracing)",
    )
    parser.add_argument("--threads", type=int_in(1, 100_000), default=2, help="worker processes (default: 2)")
    parser.add_argument("--policy", choices=POLICIES, default="brown", help="random policy (default: brown)")
    parser.add_argument(
        "--seed", type=seed_int, default=0, help="base seed; rollout I is seeded from (seed, I) (default: 0)"
    )
    parser.add_argument(
        "--max-steps",
        type=int_in(1, MAX_EPISODE_STEPS),
        default=MAX_EPISODE_STEPS,
        help=f"env frames per rollout at most (default and most: the env's {MAX_EPISODE_STEPS})",
    )
    parser.add_argument(
        "--action-repeat",
        type=int_in(1, 50),
        default=1,
        help="hold each action this many frames, one row per k frames (default 1, the paper); one k per --rootdir",
    )
    parser.add_argument(
        "--slow-env", action="store_true", help="use gymnasium's own (slower) CarRacing renderer"
    )
    add_backend_args(parser)
    args = parser.parse_args(argv)
    check_backend(args.backend, args.ray_address)

    rootdir = Path(args.rootdir)
    rootdir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(rootdir)  # hidden temporaries left by a killed run; never read by loaders
    found = find_rollouts(rootdir)  # complete files, in any thread folder
    done = {index for index, _ in found}
    try:
        k_found = dataset_action_repeat([path for _, path in found], rootdir) if found else args.action_repeat
    except ValueError as error:
        fail(str(error))
    if k_found != args.action_repeat:
        fail(
            f"{rootdir} holds rollouts at --action-repeat {k_found}, not {args.action_repeat}: use another --rootdir for k={args.action_repeat}"
        )
    todo = [i for i in range(args.rollouts) if i not in done]
    if not todo:
        print(f"all {args.rollouts} rollouts already in {rootdir}; nothing to do")
        return 0

    tasks = [
        (i, i % args.threads, str(rootdir.resolve()), args.seed, args.policy, args.max_steps) for i in todo
    ]
    start, frames = time.perf_counter(), 0
    bar = tqdm(total=len(tasks), unit="rollout", desc="rollouts", initial=0, dynamic_ncols=True)

    def on_result(position: int, n_frames: int) -> None:
        nonlocal frames
        index, thread = tasks[position][:2]
        if not rollout_path(rootdir, index, thread).is_file():  # written by a Ray worker on another machine
            raise WorkerError(
                f"rollout {index} was written on another machine and is not in {rootdir} here: "
                f"with --backend ray on several nodes, --rootdir must be on a filesystem they share"
            )
        frames += n_frames
        bar.update(1)
        bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}")

    try:
        with make_pool(
            args.backend,
            min(args.threads, len(tasks)),
            init_worker,
            (not args.slow_env, args.action_repeat),
            ray_address=args.ray_address,
        ) as pool:
            pool.map(run_rollout, tasks, on_result=on_result)
    except WorkerError as error:
        bar.close()
        print(f"error: rollout generation failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: complete rollouts are kept; rerun the same command to finish", file=sys.stderr)
        return 130
    bar.close()
    elapsed = time.perf_counter() - start
    print(
        f"generated {len(tasks)} rollouts ({frames} frames) in {elapsed:.1f}s: "
        f"{len(tasks) / elapsed:.2f} rollouts/s, {frames / elapsed:.0f} frames/s, "
        f"{args.rollouts} in {rootdir} with {args.threads} worker(s), action repeat {args.action_repeat}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
