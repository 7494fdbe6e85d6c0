"""Evaluate the trained controller (with V and M) in the real CarRacing env -> L/ctrl/eval/.

    python test_controller.py --logdir L [--episodes 100] [--display] [--record run.gif] [--record-worst 5]

The tracks are fixed by --seed and disjoint from every track used in training or in its
evaluations (agent.seeds.holdout_seeds), so the returns are held-out returns; episode i is
the same track whatever --episodes is. Episodes run in parallel on a worker pool; with
--display they run one at a time in a window (closing it sends the rest to the pool).
--record replays episode 0 as a GIF (the agent is deterministic: the same return);
--record-worst N replays the N lowest-return episodes into L/ctrl/eval/worst/.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from agent.display import WindowClosed, check_window_open, open_window_env
from agent.policy import Agent, run_episode
from agent.population import RealEvaluator, add_agent_pool_args, make_agent_pool, task_count
from agent.seeds import holdout_seeds
from agent.world import load_best_controller, load_world, mdrnn_from_state, world_action_repeat
from envs.carracing import ENV_FPS, MAX_EPISODE_STEPS, make_env
from pool import WorkerError, check_backend, worker_failure
from utils import profile
from utils.cli import ArgumentParser, int_in, run_script, seed_int, stage_command, writable_dir, writable_file
from utils.errors import BadCheckpointError
from utils.files import atomic_write, remove_orphaned_temps
from utils.logs import CSVLog, pyplot, save_gif
from utils.params import get_flat_params

GIF_FPS, GIF_SCALE = 25, 0.5  # at most 25 fps of the 50 fps env, at half of its 600x400 size
WORST = "worst"  # L/ctrl/eval/worst/RANK_episodeIII.gif: --record-worst's replays, the lowest return first


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Evaluate C (L/ctrl/best.pt) with V and M in CarRacing; writes L/ctrl/eval/."
    )
    add = parser.add_argument
    add("--logdir", type=writable_dir, required=True, help="folder holding vae/, mdrnn/ and ctrl/")
    add(
        "--episodes",
        type=int_in(1, 1_000_000),
        default=profile.TEST_EPISODES,
        help=f"held-out tracks to run (default {profile.TEST_EPISODES})",
    )
    add("--seed", type=seed_int, default=0, help="picks the held-out tracks (default 0)")
    add("--display", action="store_true", help="watch the episodes in a window (one at a time)")
    add("--record", metavar="FILE", type=writable_file, help="write episode 0 as an animated GIF to FILE")
    add(
        "--record-worst",
        metavar="N",
        type=int_in(0, 1000),
        default=0,
        help=f"write the N lowest-return episodes as GIFs to L/ctrl/eval/{WORST}/ (default 0)",
    )
    add(
        "--max-steps",
        type=int_in(1, MAX_EPISODE_STEPS),
        default=MAX_EPISODE_STEPS,
        help=f"env frames per episode at most (default and most: the env's {MAX_EPISODE_STEPS})",
    )
    add_agent_pool_args(parser)
    return parser.parse_args(argv)


def load_agent(logdir: str) -> tuple[Agent, dict, int]:
    """V, M and best.pt's C as one Agent, best.pt's checkpoint, and k (C's and M's, which must agree)."""
    vae, mdrnn, config = load_world(logdir)
    controller, state = load_best_controller(logdir, config)
    if "mdrnn" in state:  # imagination or --refresh-every: C plays with its own M
        mdrnn = mdrnn_from_state(state["mdrnn"])
    k, world_k = int(state.get("action_repeat", 1)), world_action_repeat(logdir)
    if k != world_k:
        raise BadCheckpointError(
            f"{Path(logdir) / 'ctrl' / 'best.pt'} acts every {k} frames but M was trained at "
            f"k={world_k}; retrain C: {stage_command('ctrl', logdir)} --noreload"
        )
    return Agent(vae, mdrnn, controller), state, k


def watch(agent: Agent, seeds: list[int], args: argparse.Namespace, k: int) -> list[tuple[float, int]]:
    """--display: play the episodes one by one in a window until it is closed; [(return, frames)]."""
    env, problem = open_window_env(not args.slow_env, seeds[0], k)
    if env is None:
        print(f"display: {problem}; running headless", flush=True)
        return []
    results: list[tuple[float, int]] = []
    try:
        for index, seed in enumerate(seeds):
            results.append(run_episode(env, agent, seed, args.max_steps, on_step=check_window_open))
            print(f"episode {index}: return {results[-1][0]:.1f} in {results[-1][1]} frames", flush=True)
    except WindowClosed:
        print("display: window closed; the remaining episodes run headless", flush=True)
    finally:
        env.close()
    return results


def play_in_pool(
    agent: Agent, seeds: list[int], args: argparse.Namespace, k: int, mdrnn_state: dict | None
) -> list[tuple[float, int]]:
    """The episodes in parallel on a worker pool; [(return, frames)] in the order of `seeds`."""
    workers = min(args.workers, task_count(1, len(seeds), args.envs_per_worker))
    with (
        make_agent_pool(args, agent.controller.config, k, workers, mdrnn_state) as pool,
        tqdm(total=len(seeds), unit="ep", desc=f"evaluating ({workers} workers)", dynamic_ncols=True) as bar,
    ):
        evaluator = RealEvaluator(pool, args.max_steps, args.envs_per_worker)  # full episodes
        scores = evaluator.evaluate([get_flat_params(agent.controller)], seeds, bar.update)
    return list(zip(scores.returns[0].tolist(), scores.frames[0].tolist()))


def report(results: list[tuple[float, int]], seeds: list[int], eval_dir: Path) -> None:
    """returns.csv (one row per track), the histogram returns.png, and the one-line summary."""
    returns = np.array([r for r, _ in results])  # (episodes,)
    remove_orphaned_temps(eval_dir)  # what a kill inside a write left behind
    log = CSVLog(eval_dir / "returns.csv", ["episode", "seed", "return", "frames"], step_field="episode")
    for index, (seed, (ret, n)) in enumerate(zip(seeds, results)):
        log.append({"episode": index, "seed": seed, "return": float(ret), "frames": n})
    summary = f"{returns.mean():.1f} ± {returns.std():.1f} (min {returns.min():.1f}, max {returns.max():.1f})"
    plt = pyplot()
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
    frames = sum(n for _, n in results)
    print(
        f"return over {len(returns)} episodes: {summary}, {int((returns < 500).sum())} below 500; "
        f"{frames} real env frames; per-episode returns in {eval_dir / 'returns.csv'}"
    )


def record(agent: Agent, seed: int, path: Path, args: argparse.Namespace, k: int) -> tuple[float, int]:
    """Replay the episode on track `seed` and write it as a GIF to `path`; (return, frames), the
    test's own (the agent is deterministic)."""
    frames: list = []
    counter, stride = (
        itertools.count(),
        max(1, ENV_FPS // (GIF_FPS * k)),
    )  # <= 25 fps of the frames the agent sees
    env = make_env(fast=not args.slow_env, action_repeat=k, render_mode="rgb_array")

    def keep() -> None:
        if next(counter) % stride == 0:
            image = Image.fromarray(env.render())  # (400, 600, 3) uint8
            frames.append(
                image.resize(
                    (round(image.width * GIF_SCALE), round(image.height * GIF_SCALE)), Image.BILINEAR
                )
            )

    ret, n = run_episode(env, agent, seed, args.max_steps, on_step=keep)
    env.close()
    save_gif(path, frames, round(1000 * k * stride / ENV_FPS))
    return ret, n


def record_worst(
    agent: Agent, results: list[tuple[float, int]], seeds: list[int], args: argparse.Namespace, k: int
) -> None:
    """--record-worst: the lowest-return episodes replayed as GIFs, worst first (stale ones removed)."""
    folder = Path(args.logdir) / "ctrl" / "eval" / WORST
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.gif"):
        stale.unlink()
    order = np.argsort([r for r, _ in results], kind="stable")[: args.record_worst]
    for rank, episode in enumerate(order.tolist(), start=1):
        path = folder / f"{rank}_episode{episode:03d}.gif"
        ret, n = record(agent, seeds[episode], path, args, k)
        print(f"recorded worst #{rank}, episode {episode} (return {ret:.1f}, {n} frames) to {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_backend(args.backend, args.ray_address)
    agent, state, k = load_agent(args.logdir)
    seeds = holdout_seeds(args.seed, args.episodes)  # tracks no training or evaluation ever used
    print(
        f"C from generation {state.get('generation')} (eval return {state.get('eval_return', float('nan')):.1f} "
        f"in training), acting every {k} frame(s), on {len(seeds)} held-out tracks of {args.max_steps} frames"
    )
    try:
        results = watch(agent, seeds, args, k) if args.display else []
        if len(results) < len(seeds):  # the rest (all, without --display) in parallel
            results += play_in_pool(agent, seeds[len(results) :], args, k, state.get("mdrnn"))
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    except WorkerError as error:
        raise worker_failure(error, Path(args.logdir) / "ctrl" / "eval" / "worker_error.log") from None
    report(results, seeds, Path(args.logdir) / "ctrl" / "eval")
    if args.record:
        ret, n = record(agent, seeds[0], Path(args.record), args, k)
        print(f"recorded episode 0 (return {ret:.1f}, {n} frames) to {args.record}")
    if args.record_worst:
        record_worst(agent, results, seeds, args, k)
    return 0


if __name__ == "__main__":
    run_script(main)
