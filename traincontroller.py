"""Stage 4: train the controller C with CMA-ES in the real CarRacing env -> L/ctrl/.

    python traincontroller.py --logdir L [--pop-size 32 --n-samples 4 --max-workers N ...]

Each generation CMA-ES proposes --pop-size flat parameter vectors; each is scored by its mean
return over --n-samples episodes, on the same tracks for every candidate (common random
numbers: differences in fitness are then differences in driving, not in track luck). The
episodes run in a worker pool (utils.pool.make_pool: local processes, or Ray actors with
--backend ray), one episode per task, so a crashed or hung worker costs one rerun episode.
Every --eval-every generations (and at the end) the CMA-ES mean is scored on
--eval-episodes fresh tracks; the best of those becomes best.pt.

Workers run on the CPU, one thread each: an agent encodes one frame per step, which a CPU
core does in about a millisecond, so a GPU would add latency and a CUDA context per worker
without speeding anything up (see utils/agent.py).

Checkpoints (torch.load(weights_only=True) safe):
  L/ctrl/last.pt  the search: {"es": pickle.dumps(CMAEvolutionStrategy), "generation", "sigma",
                  "best_eval_return", "best_generation", "config", "search", "state_dict"
                  (C at the CMA-ES mean)}. cma's state (mean, sigma, covariance, paths and its
                  private RandomState) has no tensor form, but the es object pickles whole, and
                  bytes pass the weights_only loader, which only refuses to run pickled code;
                  the inner pickle.loads runs cma's classes, so only resume from a last.pt you made.
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
import pickle
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from envs.simulated_carracing import DreamEvaluator
from models.controller import Controller
from utils.agent import (display_problem, eval_seeds, evaluate_candidates, init_worker, load_world,
                         train_seeds, watch_best)
from utils.checkpoint import BEST, LAST, check_config, fail, load_checkpoint, save_checkpoint
from utils.cli import non_negative_int, positive_float, positive_int
from utils.logs import CSVLog, plot_columns
from utils.params import count_params, get_flat_params, set_flat_params
from utils.pool import WorkerError, add_backend_args, check_backend, make_pool

LOG_FIELDS = ["generation", "best_fitness", "mean_fitness", "worst_fitness", "sigma",
              "eval_mean", "eval_std", "eval_dream_mean", "steps_per_s", "dream_steps_per_s", "time_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stage 4: train C with CMA-ES in CarRacing (reads L/vae, L/mdrnn; writes L/ctrl).")
    parser.add_argument("--logdir", required=True, help="folder holding vae/ and mdrnn/; ctrl/ is written there")
    parser.add_argument("--pop-size", type=positive_int, default=32, help="CMA-ES population per generation (default 32)")
    parser.add_argument("--n-samples", type=positive_int, default=4, help="episodes (tracks) per candidate; fitness is their mean return (default 4)")
    parser.add_argument("--target-return", type=float, default=900.0, help="stop once an evaluation's mean return reaches this (default 900, 'solved')")
    parser.add_argument("--max-workers", type=positive_int, default=os.cpu_count() or 1, help="worker processes (default: all CPU cores)")
    parser.add_argument("--generations", type=positive_int, default=300, help="stop after this many generations, counted across resumes (default 300)")
    parser.add_argument("--sigma0", type=positive_float, default=0.1, help="initial CMA-ES step size (default 0.1)")
    parser.add_argument("--eval-every", type=positive_int, default=5, help="evaluate the CMA-ES mean every this many generations, and at the end (default 5)")
    parser.add_argument("--eval-episodes", type=positive_int, default=16, help="fresh tracks per evaluation (default 16)")
    parser.add_argument("--max-steps", type=positive_int, default=1000, help="steps per episode at most (default 1000)")
    parser.add_argument("--display", action="store_true", help="watch the current best C drive in a window (separate low-priority process)")
    parser.add_argument("--noreload", action="store_true", help="start a new search instead of resuming L/ctrl/last.pt")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seeds CMA-ES, the initial C and the track seeds (default 0)")
    parser.add_argument("--task-timeout", type=positive_float, default=300.0, help="seconds one episode may take before its worker is presumed hung, replaced and the episode rerun (default 300)")
    parser.add_argument("--slow-env", action="store_true", help="use gymnasium's own (slower) CarRacing renderer")
    add_backend_args(parser)  # --backend local|ray, --ray-address: where the real-env episodes run
    parser.add_argument("--dream", action="store_true", help="score candidates in M's dream (batched, no rendering); evaluations stay in the real env")
    parser.add_argument("--temperature", type=positive_float, default=1.15, help="dream temperature tau, with --dream (default 1.15)")
    args = parser.parse_args(argv)
    if args.pop_size < 2:
        parser.error("--pop-size must be >= 2 for CMA-ES")
    return args


def new_search(config: dict[str, int], pop_size: int, sigma0: float, seed: int):
    """A fresh CMA-ES around a default-initialised C (seeded), silent and file-less.

    cma draws its samples from options["randn"]; by default that is numpy's *global* RNG,
    which anything else in the process may advance and which a pickled es does not own. A
    private RandomState makes the search a function of --seed alone and travels inside
    pickle.dumps(es), so a resumed search draws exactly what an uninterrupted one would.
    """
    import cma

    torch.manual_seed(seed)
    x0 = get_flat_params(Controller(**config))
    rng = np.random.RandomState(np.random.SeedSequence([seed, 0xC3A]).generate_state(1)[0])
    options = {
        "popsize": pop_size,
        "randn": rng.randn,
        "seed": np.nan,  # do not (re)seed numpy's global RNG; ours is private
        # Early generations may score all alike (no candidate moves the car yet): by default one
        # such generation ends the search (tolfun). Stop only after 10 flat ones (tolfunhist).
        "tolfun": 0.0, "tolflatfitness": 10,
        "verbose": -9, "verb_disp": 0, "verb_log": 0,  # no console spam, no outcmaes/ files
    }
    return cma.CMAEvolutionStrategy(x0, sigma0, options)


def controller_at(params: np.ndarray, config: dict[str, int]) -> Controller:
    return set_flat_params(Controller(**config), params)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill` (SIGTERM) stops the run as cleanly as Ctrl-C does


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_backend(args.backend, args.ray_address)  # one line now, before anything is loaded or deleted
    signal.signal(signal.SIGTERM, _interrupt)
    # A process started with SIGINT ignored (a background job, or a parent that imported a
    # library ignoring it) inherits that; Ctrl-C must still stop the search cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_dir = Path(args.logdir) / "ctrl"
    last_path, best_path = ctrl_dir / LAST, ctrl_dir / BEST
    _, _, config = load_world(args.logdir)  # sizes from V and M's checkpoints; one line if missing
    search = dict(pop_size=args.pop_size, sigma0=args.sigma0, seed=args.seed)

    # -- the search: resumed or new -----------------------------------------------------------
    best_eval, best_generation, generation = -math.inf, 0, 0
    if not args.noreload and last_path.exists():
        try:
            state = load_checkpoint(last_path)
            es = pickle.loads(state["es"])
            saved_config, saved_search = dict(state["config"]), dict(state["search"])
            generation = int(state["generation"])
            best_eval, best_generation = float(state["best_eval_return"]), int(state["best_generation"])
        except Exception as error:  # corrupt, foreign or from another version: one line
            fail(f"cannot resume from {last_path} ({type(error).__name__}: {error}); use --noreload to start afresh")
        check_config(saved_config, config, last_path)  # C for other V/M sizes: one line, --noreload
        check_config(saved_search, search, last_path, keys=["pop_size"])  # fixed inside the es
        changed = [f"--{k} {saved_search[k]}" for k in ("seed", "sigma0") if saved_search.get(k) != search[k]]
        if changed:
            print(f"note: resuming the saved search with {', '.join(changed)} (these apply only to a new search, --noreload)")
        search = saved_search
        args.seed = int(search["seed"])  # the track seeds continue the saved sequence
        if best_path.exists():  # a kill between saving best.pt and last.pt: best.pt is newer
            best = load_checkpoint(best_path)
            if best.get("config") == config and float(best["eval_return"]) > best_eval:
                best_eval, best_generation = float(best["eval_return"]), int(best["generation"])
        print(f"resuming {last_path} after generation {generation} (sigma {es.sigma:.4g}, best eval return {best_eval:.1f})")
    else:
        for stale in (last_path, best_path):  # best.pt must only hold this search's best
            stale.unlink(missing_ok=True)
        es = new_search(config, args.pop_size, args.sigma0, args.seed)

    def save_last() -> None:
        save_checkpoint(last_path, {
            "es": pickle.dumps(es), "generation": generation, "sigma": float(es.sigma), "best_eval_return": best_eval,
            "best_generation": best_generation, "config": config, "search": search,
            "state_dict": controller_at(es.mean, config).state_dict(),
        })

    if generation == 0:
        save_last()  # from now on a valid last.pt exists, whenever the run is stopped

    def stop_reason() -> str | None:
        if best_eval >= args.target_return:
            return f"target return {args.target_return:g} reached"
        if generation >= args.generations:
            return f"--generations {args.generations} reached"
        if es.stop():
            return "CMA-ES stop criterion met (" + ", ".join(f"{k}={v}" for k, v in es.stop().items()) + ")"
        return None

    # -- workers, display, log -----------------------------------------------------------------
    # Dream mode scores candidates in this process (batched tensors); the pool then only runs
    # the real-env evaluations of the CMA-ES mean, so it needs no more workers than those.
    dream = DreamEvaluator(args.logdir, args.temperature, args.max_steps) if args.dream else None
    workers = min(args.max_workers, args.eval_episodes if dream else args.pop_size * args.n_samples)
    started, reason, pool, display = time.perf_counter(), stop_reason(), None, None
    env_steps, dream_steps = 0, 0  # totals over this run, for the summary line
    if reason is None:
        where = f"in the dream (tau {args.temperature:g}), real-env evaluations on" if dream else "on"
        print(f"C: {count_params(Controller(**config))} parameters, population {es.popsize} x {args.n_samples} tracks {where} "
              f"{workers} CPU workers, generations {generation + 1}..{args.generations}")
    else:
        print(f"nothing to do: {reason} (raise --generations to go on, or --noreload to start afresh)")
    if args.display and reason is None:
        problem = display_problem()
        if problem:
            print(f"display: {problem}; training continues headless", flush=True)
        else:
            display = mp.get_context("spawn").Process(target=watch_best, args=(args.logdir, args.max_steps, args.seed, not args.slow_env), daemon=True)
            display.start()
    log = CSVLog(ctrl_dir / "log.csv", LOG_FIELDS, step_field="generation", keep_before=generation + 1)

    # -- generations ------------------------------------------------------------------------
    try:
        if reason is None:  # workers load V, M and the env once, then run episodes until the end
            pool = make_pool(args.backend, workers, init_worker, (args.logdir, not args.slow_env, config),
                             task_timeout=args.task_timeout, log=lambda text: tqdm.write(text, file=sys.stderr),
                             ray_address=args.ray_address)
        while reason is None:
            generation += 1
            t0 = time.perf_counter()
            solutions = es.ask()  # pop_size arrays of (n_params,)
            seeds = train_seeds(args.seed, generation, args.n_samples)
            with tqdm(total=len(solutions) * len(seeds), unit="ep", desc=f"generation {generation}/{args.generations}", dynamic_ncols=True) as bar:
                if dream:  # the whole population at once: one batched LSTM step per time step
                    fitness, _, steps = dream.evaluate(solutions, seeds)
                    bar.update(len(solutions) * len(seeds))
                else:
                    fitness, _, steps = evaluate_candidates(pool, solutions, seeds, args.max_steps, lambda i, r: bar.update())
                bar.set_postfix(best=f"{fitness.max():.1f}", mean=f"{fitness.mean():.1f}", sigma=f"{es.sigma:.3g}")
            search_time, search_steps, eval_steps = time.perf_counter() - t0, int(steps.sum()), 0
            if dream:
                dream_steps += search_steps
            else:
                env_steps += search_steps
            es.tell(solutions, (-fitness).tolist())  # cma minimises
            row = dict(generation=generation, best_fitness=float(fitness.max()), mean_fitness=float(fitness.mean()),
                       worst_fitness=float(fitness.min()), sigma=float(es.sigma))

            reason = stop_reason()
            if generation % args.eval_every == 0 or reason is not None:
                mean = np.array(es.mean, dtype=np.float64)  # (n_params,): the search's current estimate
                seeds = eval_seeds(args.seed, generation, args.eval_episodes)
                with tqdm(total=len(seeds), unit="ep", desc=f"evaluation {generation}", dynamic_ncols=True, leave=False) as bar:
                    _, returns, steps = evaluate_candidates(pool, [mean], seeds, args.max_steps, lambda i, r: bar.update())
                eval_steps = int(steps.sum())
                env_steps += eval_steps
                row |= dict(eval_mean=float(returns.mean()), eval_std=float(returns.std()))
                if dream:  # the same tracks' seeds in the dream: how far dream and real returns agree
                    row["eval_dream_mean"] = float(dream.evaluate([mean], seeds)[0][0])
                improved = row["eval_mean"] > best_eval
                if improved:
                    best_eval, best_generation = row["eval_mean"], generation
                    save_checkpoint(best_path, {
                        "state_dict": controller_at(mean, config).state_dict(), "config": config,
                        "generation": generation, "eval_return": best_eval, "eval_std": row["eval_std"],
                        "eval_episodes": len(seeds), "search": search,
                    })
                print(f"generation {generation}: CMA-ES mean returns {row['eval_mean']:.1f} ± {row['eval_std']:.1f} "
                      f"on {len(seeds)} fresh tracks{' (best so far -> best.pt)' if improved else ''}", flush=True)
                reason = stop_reason()
            save_last()

            elapsed = time.perf_counter() - t0
            if dream:  # the search ran in the dream, the evaluation (if any) in the real env
                row["dream_steps_per_s"] = search_steps / search_time
                if eval_steps:
                    row["steps_per_s"] = eval_steps / (elapsed - search_time)
            else:
                row["steps_per_s"] = (search_steps + eval_steps) / elapsed
            log.append(row | dict(time_s=elapsed))
            plot_columns(log.path, ctrl_dir / "curves.png", "generation",
                         {"return": ["best_fitness", "mean_fitness", "worst_fitness", "eval_mean", "eval_dream_mean"],
                          "CMA-ES step size": ["sigma"], "steps/s": ["steps_per_s", "dream_steps_per_s"]}, title="controller (CMA-ES)")
    except KeyboardInterrupt:
        print(f"\ninterrupted in generation {generation}; {last_path} holds generation {generation - 1}: "
              f"rerun the same command to resume", file=sys.stderr, flush=True)
        sys.exit(130)
    except WorkerError as error:
        details = ctrl_dir / "worker_error.log"
        details.write_text(str(error))
        last_line = next((line for line in reversed(str(error).strip().splitlines()) if line.strip()), "unknown")
        fail(f"a worker failed: {last_line.strip()} (full traceback in {details})")
    finally:
        if pool is not None:
            pool.close()
        if display is not None and display.is_alive():
            display.kill()  # nothing to save there; SIGTERM would reach SDL as a window-close event
            display.join(timeout=5)

    minutes = (time.perf_counter() - started) / 60
    best_text = f"best eval return {best_eval:.1f} (generation {best_generation}) in {best_path}" if best_generation else "no evaluation yet"
    rate = f", {env_steps / (minutes * 60):.0f} env steps/s" if env_steps and not dream else ""
    rate += f", {dream_steps} dream steps" if dream_steps else ""
    print(f"C: stopped after generation {generation}: {reason}; {best_text}; {minutes:.1f} min{rate}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading, before any work: nothing to save
        sys.exit(130)
