"""Evaluate the trained controller (with V and M) in the real CarRacing env -> L/ctrl/eval/.

    python test_controller.py --logdir L [--episodes 100] [--display] [--record run.gif]

The tracks are fixed by --seed and disjoint from every track used in training or in its
evaluations (agent.seeds.holdout_seeds), so the numbers printed are held-out returns;
episode i is the same track whatever --episodes is. Episodes run in parallel in a worker
pool (local processes, or Ray actors with --backend ray); with --display they run one at
a time in a window instead (closing the window sends the rest back to the workers). --record replays episode 0 and writes it as
a GIF; the agent is deterministic, so its return is episode 0's.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agent.display import WindowClosed, check_window_open, open_window_env
from agent.policy import Agent, run_episode
from agent.population import evaluate_candidates, init_worker, task_count
from agent.seeds import holdout_seeds
from agent.world import load_best_controller, load_world
from envs.carracing import MAX_EPISODE_STEPS, make_env
from pool import WorkerError, add_backend_args, check_backend, make_pool
from utils.cli import ArgumentParser, fail, int_in, positive_float, seed_int, writable_dir, writable_file
from utils.files import atomic_write, remove_orphaned_temps
from utils.logs import CSVLog, plt  # plt: matplotlib on the headless Agg backend
from utils.params import get_flat_params

ENV_FPS, GIF_FPS, GIF_SCALE = 50, 25, 0.5  # at most 25 fps of the 50 fps env, at half of its 600x400 size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Evaluate C (L/ctrl/best.pt) with V and M in CarRacing; writes L/ctrl/eval/."
    )
    parser.add_argument(
        "--logdir", type=writable_dir, required=True, help="folder holding vae/, mdrnn/ and ctrl/"
    )
    parser.add_argument(
        "--episodes", type=int_in(1, 1_000_000), default=100, help="held-out tracks to run (default 100)"
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="picks the held-out tracks (default 0)")
    parser.add_argument(
        "--display", action="store_true", help="watch the episodes in a window (one at a time)"
    )
    parser.add_argument(
        "--record", metavar="FILE", type=writable_file, help="write episode 0 as an animated GIF to FILE"
    )
    parser.add_argument(
        "--max-steps",
        type=int_in(1, MAX_EPISODE_STEPS),
        default=MAX_EPISODE_STEPS,
        help=f"steps per episode at most (default and most: the env's {MAX_EPISODE_STEPS})",
    )
    parser.add_argument(
        "--workers",
        type=int_in(1, 100_000),
        default=os.cpu_count() or 1,
        help="worker processes (default: all CPU cores)",
    )
    parser.add_argument(
        "--envs-per-worker",
        type=int_in(1, 1024),
        default=4,
        help="episodes a worker drives side by side as one batch (default 4)",
    )
    parser.add_argument(
        "--task-timeout",
        type=positive_float,
        default=300.0,
        help="seconds one episode may take before its worker is replaced (default 300)",
    )
    parser.add_argument(
        "--slow-env", action="store_true", help="use gymnasium's own (slower) CarRacing renderer"
    )
    add_backend_args(parser)
    args = parser.parse_args(argv)
    check_backend(args.backend, args.ray_address)
    return args


def write_gif(frames: list, path: Path, fps: float) -> None:
    """PIL images -> looping animated GIF, written under a temporary name then renamed."""
    with atomic_write(path) as handle:
        frames[0].save(
            handle, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fast = not args.slow_env
    vae, mdrnn, config = load_world(args.logdir)
    controller, state = load_best_controller(args.logdir, config)
    k = int(state.get("action_repeat", 1))  # C acts every k frames, as it was trained
    seeds = holdout_seeds(args.seed, args.episodes)
    print(
        f"C from generation {state.get('generation')} (eval return {state.get('eval_return', float('nan')):.1f} in training), "
        f"acting every {k} frame(s), on {len(seeds)} held-out tracks of {args.max_steps} frames"
    )

    # -- watched episodes, in this process ---------------------------------------------------------
    results: list[tuple[float, int]] = []
    if args.display:
        env, problem = open_window_env(fast, seeds[0], k)
        if env is None:
            print(f"display: {problem}; running headless", flush=True)
        else:
            agent = Agent(vae, mdrnn, controller)
            try:
                for index, seed in enumerate(seeds):
                    results.append(run_episode(env, agent, seed, args.max_steps, on_step=check_window_open))
                    print(
                        f"episode {index}: return {results[-1][0]:.1f} in {results[-1][1]} steps", flush=True
                    )
            except WindowClosed:
                print("display: window closed; the remaining episodes run headless", flush=True)
            finally:
                env.close()

    # -- the rest, in parallel -------------------------------------------------------------------
    remaining = seeds[len(results) :]
    if remaining:
        workers = min(args.workers, task_count(1, len(remaining), args.envs_per_worker))
        try:
            with (
                make_pool(
                    args.backend,
                    workers,
                    init_worker,
                    (args.logdir, fast, config, k, args.envs_per_worker),
                    task_timeout=args.task_timeout * args.envs_per_worker,
                    log=lambda text: tqdm.write(text, file=sys.stderr),
                    ray_address=args.ray_address,
                ) as pool,
                tqdm(
                    total=len(remaining),
                    unit="ep",
                    desc=f"evaluating ({workers} workers)",
                    dynamic_ncols=True,
                ) as bar,
            ):
                _, returns, steps = evaluate_candidates(
                    pool,
                    [get_flat_params(controller)],
                    remaining,
                    args.max_steps,
                    bar.update,
                    envs_per_worker=args.envs_per_worker,
                )
        except KeyboardInterrupt:
            print("\ninterrupted; nothing written", file=sys.stderr)
            sys.exit(130)
        except WorkerError as error:
            last_line = next(
                (line for line in reversed(str(error).strip().splitlines()) if line.strip()), "unknown"
            )
            fail(f"a worker failed: {last_line.strip()}")
        results += list(zip(returns[0].tolist(), steps[0].tolist()))

    # -- report -------------------------------------------------------------------------------------
    returns = np.array([r for r, _ in results])  # (episodes,)
    eval_dir = Path(args.logdir) / "ctrl" / "eval"
    remove_orphaned_temps(eval_dir)  # what a kill inside a write left behind
    log = CSVLog(eval_dir / "returns.csv", ["episode", "seed", "return", "frames"], step_field="episode")
    for index, (seed, (ret, n)) in enumerate(zip(seeds, results)):
        log.append(dict(episode=index, seed=seed, **{"return": float(ret)}, frames=n))
    summary = f"{returns.mean():.1f} ± {returns.std():.1f} (min {returns.min():.1f}, max {returns.max():.1f})"
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(returns, bins=min(30, max(5, len(returns) // 3)))
    ax.axvline(returns.mean(), color="k", linestyle="--", label="mean")
    ax.set(
        xlabel="episode return", ylabel="episodes", title=f"C on {len(returns)} held-out tracks: {summary}"
    )
    ax.legend()
    fig.tight_layout()
    with atomic_write(eval_dir / "returns.png") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    print(
        f"return over {len(returns)} episodes: {summary}, {int((returns < 500).sum())} below 500; "
        f"per-episode returns in {eval_dir / 'returns.csv'}"
    )

    if args.record:
        from PIL import Image

        frames: list = []
        counter, stride = itertools.count(), max(1, ENV_FPS // (GIF_FPS * k))

        def keep(frame: np.ndarray) -> None:  # frame (400, 600, 3) uint8
            if next(counter) % stride == 0:  # the agent sees every k-th frame; keep <= 25 fps
                image = Image.fromarray(frame)
                frames.append(
                    image.resize(
                        (round(image.width * GIF_SCALE), round(image.height * GIF_SCALE)), Image.BILINEAR
                    )
                )

        env = make_env(fast=fast, action_repeat=k, render_mode="rgb_array")
        ret, n = run_episode(
            env, Agent(vae, mdrnn, controller), seeds[0], args.max_steps, on_step=lambda: keep(env.render())
        )
        env.close()
        write_gif(frames, Path(args.record), ENV_FPS / (k * stride))
        print(f"recorded episode 0 (return {ret:.1f}, {n} frames) to {args.record}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading, before any work: nothing to save
        sys.exit(130)
