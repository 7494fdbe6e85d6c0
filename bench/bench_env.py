"""Benchmark gymnasium's CarRacing against envs.fast_carracing.FastCarRacing, side by side.

Both envs get the same seeds and the same actions and are stepped alternately (so a busy
machine slows both alike); every observation, reward, terminated/truncated flag and info dict
is compared, and the script exits with status 1 on any difference. A third env, upstream with
rendering replaced by a constant frame, gives the physics-only rate (actions, Box2D, car
dynamics, reward bookkeeping; no drawing): the ceiling any renderer could approach.

Then the fast env acting every k frames (`ActionRepeat`, k = 4 by default), which draws only
the frames the agent sees, against physics-only over the same frames (same actions, stepped
alternately; summed rewards and terminations must agree, else exit status 1), and against
the fast env drawing every frame, which gives the cost of one render: the ceiling at k is
physics plus one render per k frames.

    python bench/bench_env.py                 # 1000 steps per env over 4 seeds
    python bench/bench_env.py --steps 3000 --seeds 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import numpy as np  # noqa: E402
from gymnasium.envs.box2d.car_racing import STATE_H, STATE_W, CarRacing  # noqa: E402

from envs.carracing import ActionRepeat, env_frames  # noqa: E402
from envs.fast_carracing import FastCarRacing  # noqa: E402


class PhysicsOnlyCarRacing(CarRacing):
    """Upstream CarRacing whose `_render` returns a constant frame: `step` still runs the
    action handling, `car.step`, `world.Step` and the reward/termination logic."""

    _blank = np.zeros((STATE_H, STATE_W, 3), dtype=np.uint8)

    def _render(self, mode):
        return self._blank


def make_actions(seed: int, n: int) -> np.ndarray:
    """A varied, reproducible action sequence: gas, hard turns, braking, random, off-track."""
    rng = np.random.default_rng(seed)
    actions = np.empty((n, 3), dtype=np.float32)
    t = 0
    while t < n:
        length = int(rng.integers(20, 80))
        kind = int(rng.integers(5))
        if kind == 0:  # straight
            seg = np.tile([0.0, rng.uniform(0.3, 1.0), 0.0], (length, 1))
        elif kind == 1:  # hard turn with gas
            seg = np.tile([rng.choice([-1.0, 1.0]), rng.uniform(0.2, 0.8), 0.0], (length, 1))
        elif kind == 2:  # braking
            seg = np.tile([rng.uniform(-0.3, 0.3), 0.0, rng.uniform(0.5, 1.0)], (length, 1))
        elif kind == 3:  # uniformly random
            seg = rng.uniform([-1, 0, 0], [1, 1, 1], size=(length, 3))
        else:  # steer off the track and keep going
            seg = np.tile([rng.uniform(-1, 1), 0.5, 0.0], (length, 1))
        seg = seg[: n - t]
        actions[t : t + len(seg)] = seg
        t += len(seg)
    return actions


def run_repeat(per_seed: list[int], k: int) -> tuple[int, float, float, float, int]:
    """Fast env with action repeat k vs physics-only and the fast env drawing every frame,
    all stepping the same frames with the same actions, alternately.

    Returns (frames, seconds fast k, seconds physics, seconds fast k=1, mismatches in summed
    reward/terminated against physics-only).
    """
    fast, physics, every = ActionRepeat(FastCarRacing(), k), PhysicsOnlyCarRacing(), FastCarRacing()
    t_fast = t_phys = t_every = 0.0
    frames = mismatches = 0

    def reset_all(seed):
        for env in (fast, physics, every):
            env.reset(seed=seed)

    for i, count in enumerate(per_seed):
        seed = 1000 + i
        reset_all(seed)
        actions = make_actions(seed, count)
        done = 0
        while done < count:
            action = actions[done]
            t0 = time.perf_counter()
            _, reward, terminated, _, info = fast.step(action)
            t1 = time.perf_counter()
            n = env_frames(info)
            total, ended = 0.0, False
            for _ in range(n):
                _, r, ended, _, _ = physics.step(action)
                total += r
            t2 = time.perf_counter()
            for _ in range(n):
                every.step(action)
            t3 = time.perf_counter()
            t_fast += t1 - t0
            t_phys += t2 - t1
            t_every += t3 - t2
            frames += n
            done += n
            if (reward, terminated) != (total, ended):
                mismatches += 1
            if terminated:
                seed += 100_000
                reset_all(seed)
    for env in (fast, physics, every):
        env.close()
    return frames, t_fast, t_phys, t_every, mismatches


def run(steps: int, seeds: int, action_repeat: int = 4) -> int:
    per_seed = [steps // seeds + (1 if i < steps % seeds else 0) for i in range(seeds)]
    upstream, fast, physics = CarRacing(), FastCarRacing(), PhysicsOnlyCarRacing()
    t_up = t_fast = t_phys = 0.0
    per_step_up, per_step_fast = [], []
    n_steps = 0
    mismatches = 0

    def reset_all(seed):
        nonlocal mismatches
        o_up, i_up = upstream.reset(seed=seed)
        o_fast, i_fast = fast.reset(seed=seed)
        physics.reset(seed=seed)
        if not (np.array_equal(o_up, o_fast) and i_up == i_fast):
            mismatches += 1

    for k, count in enumerate(per_seed):
        seed = 1000 + k
        reset_all(seed)
        for action in make_actions(seed, count):
            t0 = time.perf_counter()
            r_up = upstream.step(action)
            t1 = time.perf_counter()
            r_fast = fast.step(action)
            t2 = time.perf_counter()
            physics.step(action)
            t3 = time.perf_counter()
            t_up += t1 - t0
            t_fast += t2 - t1
            t_phys += t3 - t2
            per_step_up.append(t1 - t0)
            per_step_fast.append(t2 - t1)
            n_steps += 1
            if not (np.array_equal(r_up[0], r_fast[0]) and r_up[1:] == r_fast[1:]):
                mismatches += 1
            if r_up[2] or r_up[3]:
                seed += 100_000
                reset_all(seed)

    for env in (upstream, fast, physics):
        env.close()

    up_rate, fast_rate, phys_rate = n_steps / t_up, n_steps / t_fast, n_steps / t_phys
    print(f"steps per env       : {n_steps} over {seeds} seeds (stepped alternately)")
    print(f"upstream CarRacing  : {up_rate:8.1f} steps/s  ({1e3 / up_rate:.2f} ms/step)")
    print(f"FastCarRacing       : {fast_rate:8.1f} steps/s  ({1e3 / fast_rate:.2f} ms/step)")
    print(f"speed-up            : {fast_rate / up_rate:8.2f}x")
    med_up, med_fast = np.median(per_step_up), np.median(per_step_fast)
    print(
        f"median step         : {1e3 * med_up:.2f} ms vs {1e3 * med_fast:.2f} ms -> "
        f"{med_up / med_fast:.2f}x (less sensitive to a busy machine)"
    )
    print(
        f"physics only        : {phys_rate:8.1f} steps/s  ({1e3 / phys_rate:.2f} ms/step, no rendering: the ceiling)"
    )

    k = action_repeat
    frames, t_rep, t_phys_rep, t_every, rep_mismatches = run_repeat(per_seed, k)
    rep_rate, phys_rep_rate = frames / t_rep, frames / t_phys_rep
    render_s = max(t_every - t_phys_rep, 0.0) / frames  # one fast render, measured alongside
    ceiling = 1 / (1 / phys_rep_rate + render_s / k)  # physics + one render per k frames
    print(
        f"fast, act every {k:<3} : {rep_rate:8.1f} frames/s  ({k - 1} of {k} renders skipped; {frames} frames)"
    )
    print(
        f"  same frames       : physics only {phys_rep_rate:.1f} frames/s, fast drawing all "
        f"{frames / t_every:.1f} frames/s"
    )
    print(
        f"  fast k={k:<10} : {rep_rate / phys_rep_rate:.0%} of physics-only, {rep_rate / ceiling:.0%} of the ceiling "
        f"physics + 1 render per {k} frames ({ceiling:.1f} frames/s)"
    )
    if rep_mismatches:
        print(
            f"MISMATCH: {rep_mismatches} agent steps of fast k={k} differ from physics-only (reward/terminated)"
        )
    if mismatches:
        print(f"MISMATCH: {mismatches} steps/resets differ between upstream and fast env")
    if mismatches or rep_mismatches:
        return 1
    print("frames, rewards, terminated, truncated, info: identical on every step")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per env in total (default 1000)")
    parser.add_argument("--seeds", type=int, default=4, help="number of seeds/tracks (default 4)")
    parser.add_argument(
        "--action-repeat", type=int, default=4, help="k for the action-repeat figure (default 4)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1 or args.seeds > args.steps:
        parser.error("need 1 <= --seeds <= --steps")
    if args.action_repeat < 1:
        parser.error("need --action-repeat >= 1")
    return run(args.steps, args.seeds, args.action_repeat)


if __name__ == "__main__":
    sys.exit(main())
