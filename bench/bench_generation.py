"""Benchmark Stage 1: rollout generation with 1 and K workers against a plain env loop.

    python bench/bench_generation.py [--rollouts 8] [--steps 200] [--workers 2]

All rates come from this one run, so the ratios hold on a noisy machine:
- plain loop: the same episodes (env seeds and Brownian actions) stepped in this process,
  nothing resized or saved;
- generation: the real worker task (policy, frame resize, compressed atomic save) on a
  started WorkerPool, timed from first task to last result (steady state), and also
  end to end including worker start-up.
Targets: K=2 workers >= 1.8x one worker; one worker >= 90% of the plain loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from data.carracing import random_actions, rollout_seeds  # noqa: E402
from data.generation_script import EnvSpec, RolloutTask, init_worker, run_rollout  # noqa: E402
from data.rollouts import rollout_path  # noqa: E402
from envs.carracing import make_env  # noqa: E402
from pool.local import WorkerPool  # noqa: E402


def plain_loop(rollouts: int, steps: int, fast: bool) -> float:
    """Frames/s of the very episodes generation plays (same env seeds, same Brownian actions),
    stepped in this process with nothing else: no frame resize, no saving, no pool."""
    env = make_env(fast=fast)
    frames = 0
    start = time.perf_counter()
    for index in range(rollouts):
        env_seed, rng = rollout_seeds(0, index)
        actions = random_actions("brown", steps, env.action_space.low, env.action_space.high, rng)
        env.reset(seed=env_seed)
        for action in actions:
            frames += 1
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
    rate = frames / (time.perf_counter() - start)
    env.close()
    return rate


def generation(workers: int, rollouts: int, steps: int, fast: bool) -> tuple[float, float]:
    """(steady-state frames/s, end-to-end frames/s) of `rollouts` rollouts on `workers` workers."""
    with tempfile.TemporaryDirectory() as root:
        tasks = [
            (RolloutTask(i, str(rollout_path(root, i, i % workers)), 0, "brown", steps),)
            for i in range(rollouts)
        ]
        t0 = time.perf_counter()
        with WorkerPool(
            workers, init_worker, (EnvSpec(action_repeat=1, fast=fast),)
        ) as pool:  # a row is a frame
            pool.map(len, [((),)] * workers)  # wait until every worker has started
            t1 = time.perf_counter()
            frames = sum(pool.map(run_rollout, tasks))
            t2 = time.perf_counter()
    return frames / (t2 - t1), frames / (t2 - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per measurement (default 8)")
    parser.add_argument("--steps", type=int, default=200, help="steps per rollout (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="K, the parallel worker count (default 2)")
    parser.add_argument("--slow-env", action="store_true", help="measure with gymnasium's own renderer")
    args = parser.parse_args()
    fast = not args.slow_env

    plain = plain_loop(args.rollouts, args.steps, fast)
    one, one_e2e = generation(1, args.rollouts, args.steps, fast)
    many, many_e2e = generation(args.workers, args.rollouts, args.steps, fast)
    print(f"env: {'fast' if fast else 'upstream'} CarRacing, {args.rollouts} rollouts x {args.steps} steps")
    print(f"plain env loop (1 process, no saving): {plain:8.0f} frames/s")
    print(
        f"generation, 1 worker:                  {one:8.0f} frames/s  ({one_e2e:.0f} end to end with start-up)"
    )
    print(
        f"generation, {args.workers} workers:                 {many:8.0f} frames/s  ({many_e2e:.0f} "
        "end to end with start-up)"
    )
    scaling, overhead = many / one, one / plain
    print(f"{args.workers} workers / 1 worker: {scaling:.2f}x (target >= 1.8)")
    print(f"1 worker / plain loop: {overhead:.0%} (target >= 90%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
