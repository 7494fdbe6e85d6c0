"""Stage 4: train the controller C with CMA-ES in the real CarRacing env -> L/ctrl/.

    python traincontroller.py --logdir L [--pop-size 32 --n-samples 4 --max-workers N ...]

Each generation CMA-ES proposes --pop-size flat parameter vectors; each is scored by its mean
return over --n-samples episodes, on the same tracks for every candidate (common random
numbers: differences in fitness are then differences in driving, not in track luck). The
episodes run in a worker pool (pool.make_pool: local processes, or Ray actors with
--backend ray): a task is one candidate on --envs-per-worker tracks, driven side by side with
V, M and C batched, so a crashed or hung worker costs one rerun task.
Every --eval-every generations (and at the end) the CMA-ES mean is scored on
--eval-episodes fresh tracks; the best of those becomes best.pt.

Workers run on the CPU, one thread each: an agent encodes a handful of frames per step, which
a CPU core does in a few milliseconds, so a GPU would add latency and a CUDA context per
worker without speeding anything up (see agent/policy.py).

Checkpoints (torch.load(weights_only=True) safe):
  L/ctrl/last.pt  the search (agent/search.py): {"search": settings, "config", "generation",
                  "fitness" (generations, pop) tensor, "sigma", "best_eval_return",
                  "best_generation", "state_dict" (C at the CMA-ES mean)}; numbers only: cma's
                  state is rebuilt on resume by replaying the fitness history.
  L/ctrl/best.pt  the best evaluated C: {"state_dict" (loads into Controller(**config)),
                  "config": {latent_size, hidden_size, action_size}, "generation",
                  "eval_return", "eval_std", "eval_episodes", "search"}.
Without --noreload a rerun resumes from last.pt; --generations counts across resumes.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agent.display import display_problem, watch_best
from agent.dream import DreamEvaluator
from agent.population import evaluate_candidates, init_worker, task_count
from agent.search import Search
from agent.seeds import eval_seeds, train_seeds
from agent.world import load_world, world_action_repeat
from envs.carracing import MAX_EPISODE_STEPS
from pool import WorkerError, add_backend_args, check_backend, make_pool
from utils.checkpoint import BEST, LAST, check_config, load_checkpoint, save_checkpoint
from utils.cli import (
    ArgumentParser,
    error_line,
    fail,
    finite_float,
    int_in,
    positive_float,
    positive_int,
    seed_int,
    writable_dir,
)
from utils.files import atomic_write, remove_orphaned_temps
from utils.logs import CSVLog, plot_columns
from utils.params import count_params

LOG_FIELDS = [
    "generation",
    "best_fitness",
    "mean_fitness",
    "worst_fitness",
    "sigma",
    "eval_mean",
    "eval_std",
    "eval_dream_mean",
    "frames_per_s",
    "dream_steps_per_s",
    "time_s",
    "env_frames",
    "wall_min",
]
PLOT_PANELS = {
    "return": ["best_fitness", "mean_fitness", "worst_fitness", "eval_mean", "eval_dream_mean"],
    "CMA-ES step size": ["sigma"],
    "env frames/s": ["frames_per_s", "dream_steps_per_s"],
    "CMA-ES mean on fresh tracks, by env frames": ("env_frames", ["eval_mean"]),
    "... by wall minutes": ("wall_min", ["eval_mean"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Stage 4: train C with CMA-ES in CarRacing (reads L/vae, L/mdrnn; writes L/ctrl)."
    )
    parser.add_argument(
        "--logdir",
        type=writable_dir,
        required=True,
        help="folder holding vae/ and mdrnn/; ctrl/ is written there",
    )
    parser.add_argument(
        "--pop-size",
        type=int_in(2, 100_000),
        default=32,
        help="CMA-ES population per generation (default 32)",
    )
    parser.add_argument(
        "--n-samples",
        type=int_in(1, 10_000),
        default=4,
        help="episodes (tracks) per candidate; fitness is their mean return (default 4)",
    )
    parser.add_argument(
        "--target-return",
        type=finite_float,
        default=900.0,
        help="stop once an evaluation's mean return reaches this (default 900, 'solved')",
    )
    parser.add_argument(
        "--max-workers",
        type=int_in(1, 100_000),
        default=os.cpu_count() or 1,
        help="worker processes (default: all CPU cores)",
    )
    parser.add_argument(
        "--generations",
        type=positive_int,
        default=300,
        help="stop after this many generations, counted across resumes (default 300)",
    )
    parser.add_argument(
        "--sigma0", type=positive_float, default=0.1, help="initial CMA-ES step size (default 0.1)"
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        default=5,
        help="evaluate the CMA-ES mean every this many generations, and at the end (default 5)",
    )
    parser.add_argument(
        "--eval-episodes",
        type=int_in(1, 100_000),
        default=16,
        help="fresh tracks per evaluation (default 16)",
    )
    parser.add_argument(
        "--max-steps",
        type=int_in(1, MAX_EPISODE_STEPS),
        default=MAX_EPISODE_STEPS,
        help=f"env frames per episode at most (default and most: the env's {MAX_EPISODE_STEPS})",
    )
    parser.add_argument(
        "--action-repeat",
        type=int_in(1, 50),
        default=None,
        help="C acts every k env frames, the frames between not drawn (default and only choice: M's k, that of its rollouts)",
    )
    parser.add_argument(
        "--stall-frames",
        type=int_in(0, MAX_EPISODE_STEPS),
        default=100,
        help="end a training episode after this many frames without a new tile, charging -0.1 per frame left (default 100; 0: never; evaluations always play full episodes)",
    )
    parser.add_argument(
        "--display",
        action="store_true",
        help="watch the current best C drive in a window (separate low-priority process)",
    )
    parser.add_argument(
        "--noreload", action="store_true", help="start a new search instead of resuming L/ctrl/last.pt"
    )
    parser.add_argument(
        "--seed", type=seed_int, default=0, help="seeds CMA-ES, the initial C and the track seeds (default 0)"
    )
    parser.add_argument(
        "--envs-per-worker",
        type=int_in(1, 1024),
        default=4,
        help="episodes a worker drives side by side, V, M and C stepping them as one batch (default 4)",
    )
    parser.add_argument(
        "--task-timeout",
        type=positive_float,
        default=300.0,
        help="seconds one episode may take before its worker is presumed hung, replaced and its episodes rerun (default 300)",
    )
    parser.add_argument(
        "--slow-env", action="store_true", help="use gymnasium's own (slower) CarRacing renderer"
    )
    add_backend_args(parser)  # --backend local|ray, --ray-address: where the real-env episodes run
    parser.add_argument(
        "--dream",
        action="store_true",
        help="score candidates in M's dream (batched, no rendering); evaluations stay in the real env",
    )
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=1.15,
        help="dream temperature tau, with --dream (default 1.15)",
    )
    return parser.parse_args(argv)


def resume_or_start(
    args: argparse.Namespace, config: dict[str, int], last_path: Path, best_path: Path
) -> Search:
    """The saved search from last.pt (unless --noreload), else a new one; one line if it cannot resume."""
    if args.noreload or not last_path.exists():
        for stale in (last_path, best_path):  # best.pt must only hold this search's best
            stale.unlink(missing_ok=True)
        return Search(config, args.pop_size, args.sigma0, args.seed, args.action_repeat, args.stall_frames)
    try:
        state = load_checkpoint(last_path)
        check_config(dict(state["config"]), config, last_path)  # C for other V/M sizes: one line, --noreload
        fixed = {
            "pop_size": args.pop_size,
            "action_repeat": args.action_repeat,
            "stall_frames": args.stall_frames,
        }
        check_config(
            dict(state["search"]), fixed, last_path
        )  # what the saved fitness values were measured with
        search = Search.from_state(state)
    except SystemExit:
        raise
    except Exception as error:  # corrupt, foreign or from another version: one line
        fail(f"cannot resume from {last_path} ({error_line(error)}); use --noreload to start afresh")
    changed = [
        f"--{k} {search.settings[k]}" for k in ("seed", "sigma0") if search.settings[k] != getattr(args, k)
    ]
    if changed:
        print(
            f"note: resuming the saved search with {', '.join(changed)} (these apply only to a new search, --noreload)"
        )
    best = _read_best(best_path, config)
    if (
        best is None and search.best_generation
    ):  # deleted, damaged or foreign: let the next evaluation rewrite it
        print(
            f"warning: {best_path} does not hold this search's best controller; the next evaluation rewrites it",
            file=sys.stderr,
        )
        search.best_eval, search.best_generation = -math.inf, 0
    elif (
        best is not None
        and best["generation"] <= search.generation
        and best["eval_return"] > search.best_eval
    ):
        search.best_eval, search.best_generation = best["eval_return"], best["generation"]
    print(
        f"resuming {last_path} after generation {search.generation} (sigma {search.sigma:.4g}, best eval return {search.best_eval:.1f})"
    )
    return search


def _read_best(path: Path, config: dict[str, int]) -> dict | None:
    """best.pt's generation and eval_return if it holds a controller for `config`, else None."""
    try:
        best = load_checkpoint(path)
        if best.get("config") != config or "state_dict" not in best:
            return None
        return {"generation": int(best["generation"]), "eval_return": float(best["eval_return"])}
    except Exception:  # missing, damaged or foreign
        return None


def stop_reason(search: Search, args: argparse.Namespace) -> str | None:
    if search.best_eval >= args.target_return:
        return f"target return {args.target_return:g} reached"
    if search.generation >= args.generations:
        return f"--generations {args.generations} reached"
    if search.es.stop():
        return (
            "CMA-ES stop criterion met (" + ", ".join(f"{k}={v}" for k, v in search.es.stop().items()) + ")"
        )
    return None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill` (SIGTERM) stops the run as cleanly as Ctrl-C does


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_backend(args.backend, args.ray_address)  # one line now, before anything is loaded or deleted
    signal.signal(signal.SIGTERM, _interrupt)
    # A process started with SIGINT ignored (a background job) inherits that; Ctrl-C must still stop the search.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_dir = Path(args.logdir) / "ctrl"
    last_path, best_path = ctrl_dir / LAST, ctrl_dir / BEST
    remove_orphaned_temps(ctrl_dir)  # what a kill inside a write left behind
    _, _, config = load_world(args.logdir)  # sizes from V and M's checkpoints; one line if missing
    world_k = world_action_repeat(args.logdir)  # M models k-frame steps: C must act at that k
    if args.action_repeat not in (None, world_k):
        fail(
            f"--action-repeat {args.action_repeat}, but M in {args.logdir}/mdrnn was trained on rollouts at k={world_k}; "
            f"drop the flag, or make rollouts at k={args.action_repeat} and retrain V and M on them"
        )
    args.action_repeat = world_k
    search = resume_or_start(args, config, last_path, best_path)
    seed, k = (
        search.settings["seed"],
        search.settings["action_repeat"],
    )  # the track seeds continue the saved sequence
    stall = search.settings["stall_frames"] or None
    if search.generation == 0:
        save_checkpoint(last_path, search.state())  # from now on a valid last.pt exists

    # -- scorers, display, log: dream mode scores candidates here and uses the pool only for evaluations
    dream = (
        DreamEvaluator(args.logdir, args.temperature, -(-args.max_steps // k)) if args.dream else None
    )  # M steps of k frames
    tasks = task_count(1, args.eval_episodes, args.envs_per_worker)  # an evaluation's map
    if not dream:  # and a generation's
        tasks = max(tasks, task_count(args.pop_size, args.n_samples, args.envs_per_worker))
    workers = min(args.max_workers, tasks)  # no more workers than one map has tasks
    reason, pool, display = stop_reason(search, args), None, None
    if reason is not None:
        print(f"nothing to do: {reason} (raise --generations to go on, or --noreload to start afresh)")
    else:
        where = f"in the dream (tau {args.temperature:g}), real-env evaluations on" if dream else "on"
        print(
            f"C: {count_params(search.controller())} parameters, population {search.es.popsize} x {args.n_samples} tracks "
            f"{where} {workers} CPU workers, generations {search.generation + 1}..{args.generations}"
        )
    if args.display and reason is None:
        problem = display_problem()
        if problem:
            print(f"display: {problem}; training continues headless", flush=True)
        else:
            display = mp.get_context("spawn").Process(
                target=watch_best,
                args=(args.logdir, args.max_steps, seed, not args.slow_env, None, k),
                daemon=True,
            )
            display.start()
    log = CSVLog(ctrl_dir / "log.csv", LOG_FIELDS, step_field="generation", keep_before=search.generation + 1)
    if (
        reason is not None and log.path.is_file()
    ):  # a kill may have come between the last log row and its plot
        plot_columns(
            log.path, ctrl_dir / "curves.png", "generation", PLOT_PANELS, title="controller (CMA-ES)"
        )
    started, env_steps, dream_steps = time.perf_counter(), 0, 0  # totals over this run, for the summary line

    def score(
        candidates: list[np.ndarray], seeds: list[int], desc: str, in_dream: bool, stall: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with tqdm(
            total=len(candidates) * len(seeds),
            unit="ep",
            desc=desc,
            dynamic_ncols=True,
            leave=not desc.startswith("eval"),
        ) as bar:
            if in_dream:  # the whole population at once: one batched LSTM step per time step
                result = dream.evaluate(candidates, seeds)
                bar.update(len(candidates) * len(seeds))
                return result
            return evaluate_candidates(
                pool, candidates, seeds, args.max_steps, bar.update, stall, args.envs_per_worker
            )

    def evaluate_mean(generation: int) -> tuple[dict[str, float], int]:
        """Score the CMA-ES mean on fresh tracks, full episodes; best.pt if it is the best so far."""
        seeds = eval_seeds(seed, generation, args.eval_episodes)
        _, returns, steps = score([search.mean], seeds, f"evaluation {generation}", False)
        row = dict(eval_mean=float(returns.mean()), eval_std=float(returns.std()))
        if dream:  # the same tracks' seeds in the dream: how far dream and real returns agree
            row["eval_dream_mean"] = float(dream.evaluate([search.mean], seeds)[0][0])
        improved = search.record_eval(row["eval_mean"])
        if improved:
            save_checkpoint(
                best_path,
                {
                    "state_dict": search.controller().state_dict(),
                    "config": config,
                    "generation": generation,
                    "eval_return": search.best_eval,
                    "eval_std": row["eval_std"],
                    "eval_episodes": len(seeds),
                    "search": search.settings,
                    "action_repeat": k,
                },
            )
        print(
            f"generation {generation}: CMA-ES mean returns {row['eval_mean']:.1f} ± {row['eval_std']:.1f} "
            f"on {len(seeds)} fresh tracks{' (best so far -> best.pt)' if improved else ''}",
            flush=True,
        )
        return row, int(steps.sum())

    # -- generations: ask -> score -> tell -> evaluate -> save -> log --------------------------------
    repair = (
        reason is not None and search.generation > 0 and not search.best_generation
    )  # a finished search lost best.pt
    try:
        if reason is None or repair:  # workers load V, M and the env once, then run episodes until the end
            pool = make_pool(
                args.backend,
                workers,
                init_worker,
                (args.logdir, not args.slow_env, config, k, args.envs_per_worker),
                task_timeout=args.task_timeout * args.envs_per_worker,
                log=lambda text: tqdm.write(text, file=sys.stderr),
                ray_address=args.ray_address,
            )
        if repair:
            print(f"re-evaluating the CMA-ES mean of generation {search.generation} to rewrite {best_path}")
            search.frames += evaluate_mean(search.generation)[1]
            save_checkpoint(last_path, search.state())
        while reason is None:
            t0, generation = time.perf_counter(), search.generation + 1
            candidates = search.ask()  # pop_size arrays of (n_params,)
            fitness, _, steps = score(
                candidates,
                train_seeds(seed, generation, args.n_samples),
                f"generation {generation}/{args.generations}",
                dream is not None,
                stall,
            )
            search_time, search_steps = time.perf_counter() - t0, int(steps.sum())
            search.tell(candidates, fitness)
            row = dict(
                generation=generation,
                best_fitness=float(fitness.max()),
                mean_fitness=float(fitness.mean()),
                worst_fitness=float(fitness.min()),
                sigma=search.sigma,
            )

            eval_steps, reason = 0, stop_reason(search, args)
            if generation % args.eval_every == 0 or reason is not None:  # the CMA-ES mean on fresh tracks
                evaluation, eval_steps = evaluate_mean(generation)
                row |= evaluation
                reason = stop_reason(search, args)

            elapsed = time.perf_counter() - t0
            env_steps += eval_steps + (0 if dream else search_steps)
            dream_steps += search_steps if dream else 0
            search.frames += eval_steps + (0 if dream else search_steps)
            search.seconds += elapsed
            save_checkpoint(last_path, search.state())
            if dream:  # the search ran in the dream, the evaluation (if any) in the real env
                row["dream_steps_per_s"] = search_steps / search_time
                row["frames_per_s"] = eval_steps / (elapsed - search_time) if eval_steps else None
            else:
                row["frames_per_s"] = (search_steps + eval_steps) / elapsed
            log.append(row | dict(time_s=elapsed, env_frames=search.frames, wall_min=search.seconds / 60))
            plot_columns(
                log.path, ctrl_dir / "curves.png", "generation", PLOT_PANELS, title="controller (CMA-ES)"
            )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted in generation {search.generation + 1}; {last_path} holds generation {search.generation}: "
            f"rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except WorkerError as error:
        details = ctrl_dir / "worker_error.log"
        with atomic_write(details, "w") as handle:
            handle.write(str(error))
        last_line = next(
            (line for line in reversed(str(error).strip().splitlines()) if line.strip()), "unknown"
        )
        fail(f"a worker failed: {last_line.strip()} (full traceback in {details})")
    finally:
        if pool is not None:
            pool.close()
        if display is not None and display.is_alive():
            display.kill()  # nothing to save there; SIGTERM would reach SDL as a window-close event
            display.join(timeout=5)

    minutes = (time.perf_counter() - started) / 60
    best_text = (
        f"best eval return {search.best_eval:.1f} (generation {search.best_generation}) in {best_path}"
        if search.best_generation
        else "no evaluation yet"
    )
    rate = f", {env_steps / (minutes * 60):.0f} env frames/s" if env_steps and not dream else ""
    rate += f", {dream_steps} dream steps" if dream_steps else ""
    print(f"C: stopped after generation {search.generation}: {reason}; {best_text}; {minutes:.1f} min{rate}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading, before any work: nothing to save
        sys.exit(130)
