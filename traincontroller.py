"""Stage 4: train the controller C with CMA-ES -> L/ctrl/.

    python traincontroller.py --logdir L [--pop-size 24 --n-samples 4 --generations 100 --dream]

Each generation CMA-ES proposes --pop-size flat parameter vectors; each is scored by its mean
return over --n-samples tracks, the same tracks for every candidate (common random numbers),
in the real env through a worker pool or, with --dream, inside M. Every --eval-every
generations (and at the end) the CMA-ES mean plays --eval-episodes fresh tracks of the real
env; the best of those evaluations is best.pt. last.pt is the search as numbers only
(agent/search.py): a rerun continues it exactly, and refuses, naming the flag, settings that
would change what its fitness values measured. The README has the checkpoint keys.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agent.display import DisplaySpec, display_problem, watch_best
from agent.dream import DreamEvaluator
from agent.imagine import (
    CANDIDATES,
    COLLECTED,
    KEEP_CANDIDATES,
    RESCORE_EPISODES,
    ImagineRun,
    ImagineSettings,
    StartStates,
    fine_tune_m,
    load_collected,
    one_step,
    predicted_returns,
    recent_weights,
    save_collected,
    save_dream_gif,
)
from agent.population import (
    CollectTask,
    RealEvaluator,
    Scores,
    add_agent_pool_args,
    collect_task,
    make_agent_pool,
    task_count,
)
from agent.refresh import COLLECTED as REFRESH_ROLLOUTS
from agent.refresh import WORLDS, RefreshSettings, WorldRefresh, saved_m, world_path
from agent.search import KEEP_MEANS, Search, tracks_per_candidate
from agent.seeds import collect_seeds, eval_seeds, rescore_seeds, train_seeds
from agent.world import load_mdrnn, load_world, world_action_repeat
from data.latents import load_latent_cache
from envs.carracing import MAX_EPISODE_STEPS
from models.controller import Controller
from pool import WorkerError, check_backend, worker_failure
from utils import profile
from utils.checkpoint import BEST, LAST, check_config, load_checkpoint, save_checkpoint
from utils.cli import (
    ArgumentParser,
    error_line,
    finite_float,
    int_in,
    positive_float,
    positive_int,
    run_script,
    seed_int,
    writable_dir,
)
from utils.errors import BadCheckpointError
from utils.files import remove_orphaned_temps
from utils.logs import CSVLog, plot_columns
from utils.params import count_params, get_flat_params

LOG_FIELDS = [
    "generation",
    "best_fitness",
    "mean_fitness",
    "worst_fitness",
    "sigma",
    "tracks",
    "eval_mean",
    "eval_std",
    "eval_dream_mean",
    "collect_mean",
    "m_loss",
    "frames_per_s",
    "dream_steps_per_s",
    "time_s",
    "env_frames",
    "wall_min",
]
RESCORE_FIELDS = ["eval_mean", "rescore_mean", "rescore_std", "rescore_frames", "chosen"]  # after the step
PLOT_PANELS = {
    "return": ["best_fitness", "mean_fitness", "worst_fitness", "eval_mean", "eval_dream_mean"],
    "CMA-ES step size": ["sigma"],
    "env frames/s": ["frames_per_s", "dream_steps_per_s"],
    "CMA-ES mean on fresh tracks, by env frames": ("env_frames", ["eval_mean"]),
    "... by wall minutes": ("wall_min", ["eval_mean"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Stage 4: train C with CMA-ES (reads L/vae, L/mdrnn; writes L/ctrl).")
    add = parser.add_argument
    add(
        "--logdir",
        type=writable_dir,
        required=True,
        help="folder holding vae/ and mdrnn/; ctrl/ is written there",
    )
    add(
        "--pop-size",
        type=int_in(2, 100_000),
        default=profile.POP_SIZE,
        help=f"CMA-ES population per generation (default {profile.POP_SIZE})",
    )
    add(
        "--n-samples",
        type=int_in(1, 10_000),
        default=profile.N_SAMPLES,
        help=f"tracks per candidate; its fitness is their mean return (default {profile.N_SAMPLES})",
    )
    add(
        "--samples-double-every",
        type=int_in(0, 100_000),
        default=profile.SAMPLES_DOUBLE_EVERY,
        help="double the tracks per candidate after every this many generations, up to --max-samples "
        f"(default {profile.SAMPLES_DOUBLE_EVERY}; 0: never)",
    )
    add(
        "--max-samples",
        type=int_in(1, 10_000),
        default=profile.MAX_SAMPLES,
        help=f"the most tracks per candidate that doubling reaches (default {profile.MAX_SAMPLES})",
    )
    add(
        "--generations",
        type=positive_int,
        default=profile.GENERATIONS,
        help=f"stop after this many generations, counted across resumes (default {profile.GENERATIONS})",
    )
    add(
        "--target-return",
        type=finite_float,
        default=900.0,
        help="stop once an evaluation's mean return reaches this (default 900, 'solved')",
    )
    add("--sigma0", type=positive_float, default=0.1, help="initial CMA-ES step size (default 0.1)")
    add(
        "--refresh-every",
        type=int_in(0, 100_000),
        default=profile.REFRESH_EVERY,
        help="every this many generations the CMA-ES mean plus noise plays --collect-episodes tracks and M is "
        f"fine-tuned on them for --m-updates batches (agent/refresh.py; default {profile.REFRESH_EVERY}: never)",
    )
    add(
        "--refresh-start",
        type=int_in(0, 100_000),
        default=profile.REFRESH_START,
        help=f"with --refresh-every: the generation of the first refresh (default {profile.REFRESH_START}: "
        "--refresh-every's)",
    )
    add(
        "--collect-noise",
        type=positive_float,
        default=RefreshSettings.collect_noise,
        help=f"with --refresh-every: noise std on C's pre-squash actions (default {RefreshSettings.collect_noise})",
    )
    add(
        "--eval-every",
        type=positive_int,
        default=profile.EVAL_EVERY,
        help=f"evaluate the CMA-ES mean every this many generations, and at the end (default {profile.EVAL_EVERY})",
    )
    add(
        "--eval-episodes",
        type=int_in(1, 100_000),
        default=profile.EVAL_EPISODES,
        help=f"fresh tracks per evaluation (default {profile.EVAL_EPISODES})",
    )
    add(
        "--max-steps",
        type=int_in(1, MAX_EPISODE_STEPS),
        default=MAX_EPISODE_STEPS,
        help=f"env frames per episode at most (default and most: the env's {MAX_EPISODE_STEPS})",
    )
    add(
        "--stall-frames",
        type=int_in(0, MAX_EPISODE_STEPS),
        default=profile.STALL_FRAMES,
        help=f"end a training episode after this many frames without a new tile, charging -0.1 per frame left "
        f"(default {profile.STALL_FRAMES}; 0: never; evaluations always play full episodes)",
    )
    add(
        "--dream",
        action="store_true",
        help="score candidates in M's dream (batched, no rendering); evaluations stay in the real env",
    )
    add(
        "--imagine",
        action="store_true",
        help="learn C in M's imagination: actor-critic through M, in rounds that collect real rollouts "
        "and fine-tune M (docs/imagination.md); evaluations stay in the real env",
    )
    add(
        "--rounds",
        type=positive_int,
        default=profile.IMAGINE_ROUNDS,
        help=f"with --imagine: stop after this many rounds, counted across resumes (default {profile.IMAGINE_ROUNDS})",
    )
    add(
        "--updates",
        type=positive_int,
        default=ImagineSettings.updates,
        help=f"with --imagine: actor-critic updates per round (default {ImagineSettings.updates})",
    )
    add(
        "--m-updates",
        type=int_in(0, 1_000_000),
        default=ImagineSettings.m_updates,
        help=f"with --imagine or --refresh-every: M's fine-tuning batches per round or refresh on all the real "
        f"data (default {ImagineSettings.m_updates}; 0: M stays as trained)",
    )
    add(
        "--collect-episodes",
        type=int_in(0, 100_000),
        default=ImagineSettings.collect_episodes,
        help="with --imagine or --refresh-every: real rollouts collected per round or refresh with C plus noise "
        f"(default {ImagineSettings.collect_episodes})",
    )
    add(
        "--rescore-episodes",
        type=int_in(0, 100_000),
        default=RESCORE_EPISODES,
        help=f"at the end, the {KEEP_MEANS} best-evaluated CMA-ES means (--imagine: {KEEP_CANDIDATES} rounds) each "
        f"play this many fresh tracks and the best of them becomes best.pt (default {RESCORE_EPISODES}; "
        "0: the best evaluation)",
    )
    add(
        "--horizon",
        type=int_in(1, 1000),
        default=ImagineSettings.horizon,
        help=f"with --imagine: imagined steps per start state (default {ImagineSettings.horizon})",
    )
    add(
        "--temperature",
        type=positive_float,
        default=profile.TEMPERATURE,
        help=f"dream temperature tau, with --dream (default {profile.TEMPERATURE})",
    )
    add(
        "--dream-starts",
        choices=("mid", "first"),
        default="mid",
        help="with --dream: start dream episodes anywhere in the real rollouts, with M's state there (mid, "
        "default), or at a rollout's first frame with M's state at zero (first)",
    )
    add(
        "--display",
        action="store_true",
        help="watch the current best C drive in a window (a low-priority process)",
    )
    add("--noreload", action="store_true", help="start a new search instead of resuming L/ctrl/last.pt")
    add("--seed", type=seed_int, default=0, help="seeds CMA-ES and the track seeds (default 0)")
    add_agent_pool_args(parser, workers_alias="--max-workers")
    args = parser.parse_args(argv)
    if args.refresh_every and (args.dream or args.imagine):
        parser.error(
            "--refresh-every refreshes M for CMA-ES in the real env: drop --dream / --imagine, or it"
        )
    return args


def refresh_settings(args: argparse.Namespace) -> RefreshSettings:
    """The flags' refresh settings (a resume must match them while refreshes are on)."""
    return RefreshSettings(
        refresh_every=args.refresh_every,
        refresh_start=args.refresh_start,
        collect_episodes=args.collect_episodes,
        collect_noise=args.collect_noise,
        m_updates=args.m_updates,
    )


def search_settings(args: argparse.Namespace, action_repeat: int) -> dict:
    """The settings that decide what a generation's fitness values measure (a resume must match them)."""
    return dict(
        pop_size=args.pop_size,
        action_repeat=action_repeat,
        dream=args.dream,
        stall_frames=None if args.dream else args.stall_frames,
        temperature=args.temperature if args.dream else None,
        dream_starts=args.dream_starts if args.dream else None,
    )


def resume_or_start(
    args: argparse.Namespace, config: dict[str, int], ctrl_dir: Path
) -> tuple[Search, WorldRefresh]:
    """The saved search and M's refreshes from last.pt (unless --noreload), else new ones; one line
    if it cannot resume."""
    last_path, best_path = ctrl_dir / LAST, ctrl_dir / BEST
    fixed = search_settings(args, world_action_repeat(args.logdir))  # C acts at M's k
    refresh = WorldRefresh(refresh_settings(args), load_mdrnn(args.logdir, one_step=False))
    if args.noreload or not last_path.exists():
        for stale in (last_path, best_path):  # best.pt must only hold this search's best
            stale.unlink(missing_ok=True)
        for stale in (REFRESH_ROLLOUTS, WORLDS):  # a previous search's refreshes
            shutil.rmtree(ctrl_dir / stale, ignore_errors=True)
        search = Search(config, sigma0=args.sigma0, seed=args.seed, **fixed)
        search.world = refresh.state() if refresh.settings.refresh_every else None
        save_checkpoint(last_path, search.state())  # from now on a valid last.pt exists
        return search, refresh
    try:
        state = load_checkpoint(last_path)
        if "imagine" in state:
            raise BadCheckpointError(
                f"{last_path} is an --imagine run: add --imagine to resume it, or --noreload to start a search"
            )
        check_config(dict(state["config"]), config, last_path)  # C for other V/M sizes
        check_config(dict(state["search"]), fixed, last_path)  # what the saved fitness values measured
        saved, wanted = dict(state.get("refresh", RefreshSettings().as_dict())), refresh.settings.as_dict()
        turn_on = not saved["refresh_every"] and wanted["refresh_every"]  # allowed: from now on
        check_config(saved, wanted, last_path, None if saved["refresh_every"] else [])
        search = Search.from_state(state)
        if search.world is not None:
            refresh.load_state(search.world)
        elif turn_on:
            refresh.start = max(refresh.start, search.generation)
            search.world = refresh.state()
            print(
                f"note: M is refreshed from generation {refresh.start} on, every {refresh.settings.refresh_every}"
            )
    except BadCheckpointError:
        raise
    except Exception as error:  # corrupt, foreign or from another version
        raise BadCheckpointError(
            f"cannot resume from {last_path} ({error_line(error)}); use --noreload to start afresh"
        ) from None
    changed = [
        f"--{k} {search.settings[k]}" for k in ("seed", "sigma0") if search.settings[k] != getattr(args, k)
    ]
    if changed:
        print(
            f"note: resuming the saved search with {', '.join(changed)} (they apply to a new search, --noreload)"
        )
    best = _read_best(best_path, config)
    if (
        best is None and search.best_generation
    ):  # deleted, damaged or foreign: the next evaluation rewrites it
        print(
            f"warning: {best_path} does not hold this search's best controller; it will be rewritten",
            file=sys.stderr,
        )
        search.best_eval, search.best_generation = -math.inf, 0
        search.rescored = []  # re-score again at the end: best.pt must be the pick
    elif (
        best is not None
        and best["generation"] <= search.generation
        and best["eval_return"] > search.best_eval
    ):
        search.best_eval, search.best_generation = best["eval_return"], best["generation"]
    print(
        f"resuming {last_path} after generation {search.generation} "
        f"(sigma {search.sigma:.4g}, best eval return {search.best_eval:.1f})"
        + (f", M refreshed {refresh.version} times" if refresh.version else "")
    )
    return search, refresh


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


def score(scorer, candidates: list, seeds: list[int], desc: str, leave: bool = True) -> Scores:
    """`scorer.evaluate` under a progress bar counting episodes."""
    with tqdm(
        total=len(candidates) * len(seeds), unit="ep", desc=desc, dynamic_ncols=True, leave=leave
    ) as bar:
        return scorer.evaluate(candidates, seeds, bar.update)


def evaluate_mean(
    search: Search,
    real: RealEvaluator,
    dream: DreamEvaluator | None,
    args: argparse.Namespace,
    best_path: Path,
    refresh: WorldRefresh,
) -> tuple[dict, Scores]:
    """The CMA-ES mean on fresh tracks of the real env, full episodes; best.pt if it is the best so far."""
    seeds = eval_seeds(search.settings["seed"], search.generation, args.eval_episodes)
    scores = score(real, [search.mean], seeds, f"evaluation {search.generation}", leave=False)
    row = dict(eval_mean=float(scores.returns.mean()), eval_std=float(scores.returns.std()))
    if dream is not None:  # the same seeds in the dream: how far dream and real returns agree
        row["eval_dream_mean"] = float(dream.evaluate([search.mean], seeds).returns.mean())
    improved = search.record_eval(row["eval_mean"])
    if improved:
        own_m = refresh.mdrnn_state()  # a refreshed M goes with C: best.pt plays with it
        save_checkpoint(
            best_path,
            search.best_checkpoint(row["eval_std"], len(seeds)) | ({} if own_m is None else {"mdrnn": own_m}),
        )
    print(
        f"generation {search.generation}: CMA-ES mean returns {row['eval_mean']:.1f} ± {row['eval_std']:.1f} "
        f"on {len(seeds)} fresh tracks{' (best so far -> best.pt)' if improved else ''}",
        flush=True,
    )
    return row, scores


def refresh_world(
    search: Search, refresh: WorldRefresh, real: RealEvaluator, vae, args: argparse.Namespace, ctrl_dir: Path
) -> dict:
    """One refresh of M (agent/refresh.py): the CMA-ES mean plus noise plays fresh tracks with the
    current M, M is fine-tuned on them and its training rollouts, and saved as the next version;
    every frame counts. The log row's refresh columns."""
    t0, s, seed = time.perf_counter(), refresh.settings, search.settings["seed"]
    version = refresh.version + 1
    noise = np.random.SeedSequence([seed, 0x5EF, version]).generate_state(s.collect_episodes)
    std = np.full(search.config["action_size"], s.collect_noise)
    tasks = [
        (CollectTask(search.mean, std, track, int(n), args.max_steps),)
        for track, n in zip(collect_seeds(seed, version, s.collect_episodes), noise)
    ]
    with tqdm(
        total=len(tasks), unit="ep", desc=f"refresh {version}: C plus noise", dynamic_ncols=True
    ) as bar:
        played = real.pool.map(collect_task, tasks, on_result=lambda index, result: bar.update())
    names = refresh.rollout_names(len(played))
    for name, arrays in zip(names, played):
        save_collected(ctrl_dir / name, arrays, vae)
    m_loss = refresh.fine_tune(ctrl_dir, load_latent_cache(args.logdir), names, seed)
    save_checkpoint(world_path(ctrl_dir, refresh.version), refresh.mdrnn_state())
    returns = [float(a["rewards"].sum()) for a in played]
    search.frames += sum(int(a["seed"][2]) for a in played)
    search.seconds += time.perf_counter() - t0
    search.world = refresh.state()
    save_checkpoint(ctrl_dir / LAST, search.state())
    print(
        f"refresh {refresh.version} after generation {search.generation}: C plus noise returned "
        f"{np.mean(returns):.1f} on {len(played)} fresh tracks; M fine-tuned on them ({s.m_updates} batches, "
        f"loss {m_loss:.3f}); {search.frames} real env frames in all",
        flush=True,
    )
    return dict(collect_mean=float(np.mean(returns)), m_loss=m_loss)


def rescore_pending(search: Search, args: argparse.Namespace) -> bool:
    """Whether the finished search's kept means still await their re-scoring on --rescore-episodes tracks."""
    done = stop_reason(search, args) is not None
    return bool(done and args.rescore_episodes and search.kept) and search.rescored != [
        search.generation,
        args.rescore_episodes,
    ]


def rescore_means(
    search: Search,
    real: RealEvaluator,
    args: argparse.Namespace,
    ctrl_dir: Path,
    refresh: WorldRefresh,
    workers: int,
) -> None:
    """best.pt becomes the kept mean that returns most on --rescore-episodes fresh tracks (the same
    for each, never the held-out ones): a pick no single evaluation's luck decides. Each mean plays
    with the M it was evaluated with (`real`'s, or an older refresh's on a pool of its own)."""
    t0 = time.perf_counter()
    tracks = rescore_seeds(search.settings["seed"], search.generation, args.rescore_episodes)
    versions = [refresh.version_at(generation) for _, generation, _ in search.kept]
    returns, frames, spent = [np.zeros(0)] * len(versions), [0] * len(versions), []
    for version in sorted(set(versions)):
        kept = [i for i, v in enumerate(versions) if v == version]
        with contextlib.ExitStack() as stack:
            scorer = real
            if version != refresh.version:  # an older M: workers of its own
                pool = make_agent_pool(
                    args, search.config, search.settings["action_repeat"], workers, saved_m(ctrl_dir, version)
                )
                scorer = RealEvaluator(stack.enter_context(pool), args.max_steps, args.envs_per_worker)
            scores = score(
                scorer, [search.kept[i][2] for i in kept], tracks, f"re-scoring {len(kept)} of the best means"
            )
        spent.append(scores)
        for row, i in enumerate(kept):
            returns[i], frames[i] = scores.returns[row], int(scores.frames[row].sum())
    rows = [
        rescored_row("generation", generation, eval_mean, returns[i], frames[i])
        for i, (eval_mean, generation, _) in enumerate(search.kept)
    ]
    chosen = choose_rescored(ctrl_dir, rows, "generation")
    index = rows.index(chosen)
    best = search.best_checkpoint(
        chosen["rescore_std"],
        len(tracks),
        search.kept[index][2],
        chosen["generation"],
        chosen["rescore_mean"],
    )
    chosen_m = saved_m(ctrl_dir, versions[index])
    save_checkpoint(
        ctrl_dir / BEST, best | dict(rescored=rows) | ({} if chosen_m is None else {"mdrnn": chosen_m})
    )
    search.account(spent, time.perf_counter() - t0)
    search.rescored = [search.generation, len(tracks)]
    save_checkpoint(ctrl_dir / LAST, search.state())
    print(
        f"re-scored: best.pt is generation {chosen['generation']}'s mean, {chosen['rescore_mean']:.1f} ± "
        f"{chosen['rescore_std']:.1f} on {len(tracks)} fresh tracks; {search.frames} real env frames in all",
        flush=True,
    )


def rescored_row(step_field: str, step: int, eval_mean: float, returns: np.ndarray, frames: int) -> dict:
    """One re-scored candidate's row of rescore.csv, and its line on the console."""
    print(
        f"{step_field} {step} (evaluated {eval_mean:.1f}): {returns.mean():.1f} ± {returns.std():.1f} "
        f"on {len(returns)} fresh tracks",
        flush=True,
    )
    return {
        step_field: step,
        "eval_mean": eval_mean,
        "rescore_mean": float(returns.mean()),
        "rescore_std": float(returns.std()),
        "rescore_frames": frames,
    }


def choose_rescored(ctrl_dir: Path, rows: list[dict], step_field: str) -> dict:
    """The row that played best on the re-scoring tracks (a tie: the earlier); all rows to ctrl/rescore.csv."""
    chosen = max(rows, key=lambda row: (row["rescore_mean"], -row[step_field]))
    log = CSVLog(
        ctrl_dir / "rescore.csv", [step_field, *RESCORE_FIELDS], step_field=step_field, keep_before=0
    )
    for row in rows:
        log.append(row | dict(chosen=int(row is chosen)))
    return chosen


def start_display(args: argparse.Namespace, search: Search) -> mp.Process | None:
    """The --display window's process (best.pt driving on its own tracks), or None with one line why not."""
    problem = display_problem()
    if problem:
        print(f"display: {problem}; training continues headless", flush=True)
        return None
    spec = DisplaySpec(
        args.logdir,
        args.max_steps,
        search.settings["seed"],
        search.settings["action_repeat"],
        fast=not args.slow_env,
    )
    display = mp.get_context("spawn").Process(target=watch_best, args=(spec,), daemon=True)
    display.start()
    return display


def stop_display(display: mp.Process | None) -> None:
    if display is not None and display.is_alive():
        display.kill()  # nothing to save there; SIGTERM would reach SDL as a window-close event
        display.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_backend(args.backend, args.ray_address)  # one line now, before anything is loaded or deleted
    if args.imagine:
        return train_in_imagination(args)
    ctrl_dir = Path(args.logdir) / "ctrl"
    last_path, best_path = ctrl_dir / LAST, ctrl_dir / BEST
    remove_orphaned_temps(ctrl_dir)  # what a kill inside a write left behind
    vae, _, config = load_world(args.logdir)  # sizes from V and M's checkpoints
    search, refresh = resume_or_start(args, config, ctrl_dir)
    settings = search.settings
    log = CSVLog(ctrl_dir / "log.csv", LOG_FIELDS, step_field="generation", keep_before=search.generation + 1)
    reason = stop_reason(search, args)
    lost_best = reason is not None and search.generation > 0 and not search.best_generation
    if reason is not None and not lost_best and not rescore_pending(search, args):
        if log.path.is_file():  # a kill may have come between the last log row and its plot
            plot_columns(
                log.path, ctrl_dir / "curves.png", "generation", PLOT_PANELS, title="controller (CMA-ES)"
            )
        print(f"nothing to do: {reason} (raise --generations to go on, or --noreload to start afresh)")
        return 0

    k, started, frames_before, dream_steps = settings["action_repeat"], time.perf_counter(), search.frames, 0
    dream = (
        DreamEvaluator(
            args.logdir,
            settings["temperature"],
            -(-args.max_steps // k),
            mid_episode=settings["dream_starts"] == "mid",
        )
        if settings["dream"]
        else None
    )
    most_tracks = tracks_per_candidate(
        args.generations, args.n_samples, args.samples_double_every, args.max_samples
    )
    maps = [(1, args.eval_episodes), (KEEP_MEANS, args.rescore_episodes)] + (
        [] if dream else [(args.pop_size, most_tracks)]
    )  # what the pool plays; a refresh's rollouts are one task each
    tasks = [task_count(*m, args.envs_per_worker) for m in maps] + [
        args.collect_episodes * bool(args.refresh_every)
    ]
    workers = min(args.workers, max(tasks))  # no idle workers
    growth = (
        f" (doubling every {args.samples_double_every} generations, up to {most_tracks})"
        if most_tracks > args.n_samples
        else ""
    )
    where = f"in M's dream (tau {settings['temperature']:g}), evaluated on" if dream else "on"
    try:
        with contextlib.ExitStack() as stack:
            pools = stack.enter_context(contextlib.ExitStack())  # the pool of the current M

            def start_pool() -> tuple[RealEvaluator, RealEvaluator | DreamEvaluator]:
                """The workers, with M as the refreshes left it: evaluations' and candidates' scorers."""
                pool = pools.enter_context(make_agent_pool(args, config, k, workers, refresh.mdrnn_state()))
                stall = settings["stall_frames"] or None
                real = RealEvaluator(pool, args.max_steps, args.envs_per_worker)  # evaluations: full episodes
                return real, dream or RealEvaluator(pool, args.max_steps, args.envs_per_worker, stall)

            real, scorer = start_pool()
            if args.display:
                stack.callback(stop_display, start_display(args, search))
            if lost_best:  # a finished search whose best.pt was lost: re-evaluate its mean to rewrite it
                print(
                    f"re-evaluating the CMA-ES mean of generation {search.generation} to rewrite {best_path}"
                )
                search.account([evaluate_mean(search, real, dream, args, best_path, refresh)[1]], 0.0)
                save_checkpoint(last_path, search.state())
            else:
                print(
                    f"C: {count_params(search.controller())} parameters, population {args.pop_size} x "
                    f"{args.n_samples} tracks{growth} {where} {workers} CPU workers, "
                    f"generations {search.generation + 1}..{args.generations}"
                )
            # -- the search: ask -> score -> tell -> evaluate -> save -> log
            while reason is None:
                refreshed = {}
                if refresh.due(search.generation):  # M learns from the current C's driving, then new workers
                    refreshed = refresh_world(search, refresh, real, vae, args, ctrl_dir)
                    pools.close()
                    real, scorer = start_pool()
                t0, generation = time.perf_counter(), search.generation + 1
                candidates = search.ask()  # pop_size flat parameter vectors
                tracks = tracks_per_candidate(
                    generation, args.n_samples, args.samples_double_every, args.max_samples
                )
                seeds = train_seeds(settings["seed"], generation, tracks)  # the same for every candidate
                spent = [score(scorer, candidates, seeds, f"generation {generation}/{args.generations}")]
                search.tell(candidates, spent[0].fitness)
                row = dict(
                    generation=generation,
                    best_fitness=float(spent[0].fitness.max()),
                    mean_fitness=float(spent[0].fitness.mean()),
                    worst_fitness=float(spent[0].fitness.min()),
                    sigma=search.sigma,
                    tracks=tracks,
                    **refreshed,
                )
                reason = stop_reason(search, args)
                if generation % args.eval_every == 0 or reason is not None:
                    evaluation, eval_scores = evaluate_mean(search, real, dream, args, best_path, refresh)
                    row |= evaluation
                    spent.append(eval_scores)
                    reason = stop_reason(search, args)
                search.account(spent, time.perf_counter() - t0)
                dream_steps += sum(s.dream_steps for s in spent)
                save_checkpoint(last_path, search.state())
                log.append(
                    row
                    | rates(spent)
                    | dict(
                        time_s=time.perf_counter() - t0,
                        env_frames=search.frames,
                        wall_min=search.seconds / 60,
                    )
                )
                plot_columns(
                    log.path, ctrl_dir / "curves.png", "generation", PLOT_PANELS, title="controller (CMA-ES)"
                )
            if rescore_pending(search, args):
                rescore_means(search, real, args, ctrl_dir, refresh, workers)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted in generation {search.generation + 1}; {last_path} holds generation "
            f"{search.generation}: rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except WorkerError as error:
        raise worker_failure(error, ctrl_dir / "worker_error.log") from None

    minutes = (time.perf_counter() - started) / 60
    best = (
        f"best eval return {search.best_eval:.1f} (generation {search.best_generation}); {best_path}: "
        + ("the best re-scored mean" if search.rescored else "the best evaluated mean")
        if search.best_generation
        else "no evaluation yet"
    )
    print(
        f"C: stopped after generation {search.generation}: {reason}; {best}; {minutes:.1f} min, "
        f"{search.frames - frames_before} real env frames ({search.frames} in all)"
        + (f", {dream_steps} dream steps" if dream_steps else "")
    )
    return 0


# ----------------------------------------------------------------------------- --imagine

IMAGINE_FIELDS = [
    "round",
    "m_loss",
    "actor_loss",
    "critic_loss",
    "imagined_return",
    "value",
    "action_std",
    "imagined_steps_per_s",
    "eval_mean",
    "eval_std",
    "eval_dream_mean",
    "collect_mean",
    "time_s",
    "env_frames",
    "wall_min",
]
IMAGINE_PANELS = {
    "return (real; M's prediction for the same tracks)": ["eval_mean", "collect_mean", "eval_dream_mean"],
    "imagination": ["imagined_return", "value"],
    "losses": ["m_loss", "critic_loss"],
    "exploration std": ["action_std"],
    "actor on fresh tracks, by env frames": ("env_frames", ["eval_mean"]),
    "... by wall minutes": ("wall_min", ["eval_mean"]),
}


def imagine_settings(args: argparse.Namespace) -> ImagineSettings:
    """The flags' settings of an --imagine run (a resume must match them)."""
    return ImagineSettings(
        horizon=args.horizon,
        updates=args.updates,
        m_updates=args.m_updates,
        collect_episodes=args.collect_episodes,
        eval_episodes=args.eval_episodes,
        seed=args.seed,
    )


def resume_or_start_imagining(
    args: argparse.Namespace, config: dict[str, int], ctrl_dir: Path, initial_frames: int
) -> ImagineRun:
    """The saved run from last.pt (unless --noreload), else a new one from L/mdrnn's M."""
    last_path, best_path = ctrl_dir / LAST, ctrl_dir / BEST
    settings = imagine_settings(args)
    if args.noreload or not last_path.exists():
        for stale in (last_path, best_path):
            stale.unlink(missing_ok=True)
        shutil.rmtree(ctrl_dir / COLLECTED, ignore_errors=True)
        shutil.rmtree(ctrl_dir / CANDIDATES, ignore_errors=True)
        run = ImagineRun(
            config, settings, load_mdrnn(args.logdir, one_step=False), world_action_repeat(args.logdir)
        )
        run.frames = initial_frames  # M learned from them: they count
        save_checkpoint(last_path, run.state())
        return run
    try:
        state = load_checkpoint(last_path)
        if "imagine" not in state:
            raise BadCheckpointError(
                f"{last_path} is a CMA-ES search: drop --imagine to resume it, or add --noreload to start afresh"
            )
        check_config(dict(state["config"]), config, last_path)
        check_config(dict(state["imagine"]), settings.as_dict(), last_path)
        run = ImagineRun.from_state(state)
    except BadCheckpointError:
        raise
    except Exception as error:  # corrupt, foreign or from another version
        raise BadCheckpointError(
            f"cannot resume from {last_path} ({error_line(error)}); use --noreload to start afresh"
        ) from None
    print(f"resuming {last_path} after round {run.round} (best eval return {run.best_eval:.1f})")
    return run


def candidate_path(ctrl_dir: Path, round_: int) -> Path:
    """Where round `round_`'s C and M are kept while it is among the best-evaluated rounds."""
    return ctrl_dir / CANDIDATES / f"round_{round_:03d}.pt"


def learn_in_imagination(
    run: ImagineRun, cell, starts: StartStates, weights: torch.Tensor, round_: int
) -> dict[str, float]:
    """The round's actor-critic updates from real start states drawn by `weights`; the mean of their stats."""
    s, sums, t0 = run.settings, {}, time.perf_counter()
    for _ in tqdm(range(s.updates), unit="update", desc=f"round {round_} imagination", dynamic_ncols=True):
        picks = torch.multinomial(weights, s.batch, replacement=True)
        for key, value in run.learner.update(cell, *starts.pick(picks)).items():
            sums[key] = sums.get(key, 0.0) + value / s.updates
    return sums | dict(imagined_steps_per_s=s.updates * s.batch * s.horizon / (time.perf_counter() - t0))


def play_round(pool, run: ImagineRun, round_: int, max_frames: int) -> list[dict]:
    """The round's real rollouts: first C alone on fresh evaluation tracks (its evaluation, kept
    as data too), then C plus the actor's exploration noise on fresh collection tracks."""
    s = run.settings
    params = get_flat_params(run.learner.actor.controller)
    std = run.learner.actor.log_std.detach().exp().double().numpy()
    noise = np.random.SeedSequence([s.seed, round_]).generate_state(s.collect_episodes)
    tasks = [
        (CollectTask(params, np.zeros_like(std), track, 0, max_frames),)
        for track in eval_seeds(s.seed, round_, s.eval_episodes)
    ] + [
        (CollectTask(params, std, track, int(n), max_frames),)
        for track, n in zip(collect_seeds(s.seed, round_, s.collect_episodes), noise)
    ]
    with tqdm(total=len(tasks), unit="ep", desc=f"round {round_} real episodes", dynamic_ncols=True) as bar:
        return pool.map(collect_task, tasks, on_result=lambda index, result: bar.update())


DREAM_GIF = "dream_vs_real.gif"  # the last round's first evaluation episode beside M's imagination of it


def rescore_candidates(args: argparse.Namespace, run: ImagineRun, ctrl_dir: Path, workers: int) -> None:
    """best.pt becomes the kept round whose C (with its M) returns most on --rescore-episodes fresh
    tracks, the same tracks for each: a pick that no single evaluation's luck decides. Every
    frame is counted; log in ctrl/rescore.csv."""
    tracks = rescore_seeds(run.settings.seed, run.round, args.rescore_episodes)
    rows = []
    for eval_mean, round_ in run.candidates:
        candidate = load_checkpoint(candidate_path(ctrl_dir, round_))
        controller = Controller(**run.config)
        controller.load_state_dict(candidate["state_dict"])
        with make_agent_pool(args, run.config, run.action_repeat, workers, candidate["mdrnn"]) as pool:
            real = RealEvaluator(pool, args.max_steps, args.envs_per_worker)
            scores = score(real, [get_flat_params(controller)], tracks, f"re-scoring round {round_}")
        rows.append(rescored_row("round", round_, eval_mean, scores.returns[0], scores.real_frames))
    chosen = choose_rescored(ctrl_dir, rows, "round")
    best = load_checkpoint(candidate_path(ctrl_dir, chosen["round"]))
    best |= dict(
        eval_return=chosen["rescore_mean"], eval_std=chosen["rescore_std"], eval_episodes=len(tracks)
    )
    save_checkpoint(ctrl_dir / BEST, best | dict(rescored=rows))
    run.frames += sum(row["rescore_frames"] for row in rows)
    run.rescored = [run.round, len(tracks)]
    save_checkpoint(ctrl_dir / LAST, run.state())
    print(
        f"re-scored: best.pt is round {chosen['round']}'s C, {chosen['rescore_mean']:.1f} ± "
        f"{chosen['rescore_std']:.1f} on {len(tracks)} fresh tracks; {run.frames} real env frames in all",
        flush=True,
    )


def train_in_imagination(args: argparse.Namespace) -> int:
    """--imagine: rounds of (fine-tune M on all data, learn in imagination, evaluate, collect)."""
    ctrl_dir = Path(args.logdir) / "ctrl"
    last_path, best_path = ctrl_dir / LAST, ctrl_dir / BEST
    remove_orphaned_temps(ctrl_dir)
    vae, _, config = load_world(args.logdir)
    initial = load_latent_cache(args.logdir)  # the rollouts M was trained on (trainmdrnn.py's cache)
    k = world_action_repeat(args.logdir)
    run = resume_or_start_imagining(args, config, ctrl_dir, sum(len(r["actions"]) for r in initial) * k)
    s = run.settings
    kept = {candidate_path(ctrl_dir, r) for _, r in run.candidates}
    for stale in (ctrl_dir / CANDIDATES).glob("*.pt"):  # of a round redone, or pushed out before a kill
        if stale not in kept:
            stale.unlink()
    log = CSVLog(ctrl_dir / "log.csv", IMAGINE_FIELDS, step_field="round", keep_before=run.round + 1)
    final_round = max(run.round, args.rounds)
    rescore = bool(args.rescore_episodes and run.rescored != [final_round, args.rescore_episodes])
    if run.round >= args.rounds and not rescore:
        print(
            f"nothing to do: --rounds {args.rounds} reached (raise it to go on, or --noreload to start afresh)"
        )
        return 0
    workers = min(args.workers, s.eval_episodes + s.collect_episodes)
    print(
        f"C in imagination: rounds {run.round + 1}..{args.rounds} of {s.updates} updates of {s.batch} x "
        f"{s.horizon} imagined steps, {s.eval_episodes} evaluation and {s.collect_episodes} collected "
        f"episodes each on {workers} CPU workers; {run.frames} real env frames so far"
    )
    started, frames_before = time.perf_counter(), run.frames
    try:
        while run.round < args.rounds:
            t0, round_ = time.perf_counter(), run.round + 1
            torch.manual_seed(int(np.random.SeedSequence([s.seed, round_]).generate_state(1)[0]))
            collected = load_collected([ctrl_dir / name for name in run.collected])
            rollouts, recent = initial + collected, np.arange(len(initial) + len(collected)) >= len(initial)
            row: dict = dict(round=round_)
            if collected and s.m_updates:  # new real data since M last learned: fine-tune on all of it
                rng = np.random.default_rng([s.seed, round_])
                row["m_loss"] = fine_tune_m(
                    run.mdrnn, run.m_opt, rollouts, s.m_updates, s.m_batch, s.seq_len, rng, recent, s.recent
                )
            cell = one_step(run.mdrnn)
            states = np.array([len(r["actions"]) - 1 for r in rollouts])  # start states per rollout
            weights = torch.from_numpy(np.repeat(recent_weights(states, recent, s.recent), states))
            row |= learn_in_imagination(run, cell, StartStates(cell, rollouts), weights, round_)
            with make_agent_pool(args, config, k, workers, run.mdrnn_state()) as pool:
                played = play_round(pool, run, round_, args.max_steps)
            names = [f"{COLLECTED}/round_{round_:03d}/rollout_{i}.npz" for i in range(len(played))]
            for name, arrays in zip(names, played):
                save_collected(ctrl_dir / name, arrays, vae)
            run.round, run.collected = round_, run.collected + names
            run.frames += sum(int(a["seed"][2]) for a in played)  # every real frame, evaluations included
            run.seconds += time.perf_counter() - t0
            returns = np.array([float(a["rewards"].sum()) for a in played])
            evaluation, noisy = returns[: s.eval_episodes], returns[s.eval_episodes :]
            row |= dict(eval_mean=float(evaluation.mean()), eval_std=float(evaluation.std()))
            # the gap: what M predicts for C from the same first frames, over as many steps
            firsts = torch.cat(
                [vae.encode_frames(a["observations"][:1])[0] for a in played[: s.eval_episodes]]
            )
            predicted = predicted_returns(cell, run.learner.actor, firsts, -(-args.max_steps // k))
            row["eval_dream_mean"] = float(predicted.mean())
            save_dream_gif(ctrl_dir / DREAM_GIF, vae, cell, run.learner.actor, played[0]["observations"], k)
            row["collect_mean"] = float(noisy.mean()) if len(noisy) else None
            improved = run.record_eval(row["eval_mean"])
            if improved:
                save_checkpoint(best_path, run.best_checkpoint(row["eval_std"], s.eval_episodes))
            kept, dropped = run.keep_candidate(row["eval_mean"])
            if kept:
                candidate = run.checkpoint(row["eval_mean"], row["eval_std"], s.eval_episodes)
                save_checkpoint(candidate_path(ctrl_dir, round_), candidate)
            save_checkpoint(last_path, run.state())
            for old_round in dropped:
                candidate_path(ctrl_dir, old_round).unlink(missing_ok=True)
            log.append(
                row | dict(time_s=time.perf_counter() - t0, env_frames=run.frames, wall_min=run.seconds / 60)
            )
            plot_columns(
                log.path, ctrl_dir / "curves.png", "round", IMAGINE_PANELS, title="controller (imagination)"
            )
            print(
                f"round {round_}: C returns {row['eval_mean']:.1f} ± {row['eval_std']:.1f} on {s.eval_episodes} fresh "
                f"tracks{' (best so far -> best.pt)' if improved else ''}; {run.frames} real env frames",
                flush=True,
            )
        if rescore and run.candidates:
            rescore_candidates(args, run, ctrl_dir, max(1, min(args.workers, args.rescore_episodes)))
    except KeyboardInterrupt:
        print(
            f"\ninterrupted in round {run.round + 1}; {last_path} holds round {run.round}: "
            "rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except WorkerError as error:
        raise worker_failure(error, ctrl_dir / "worker_error.log") from None
    print(
        f"C: stopped after round {run.round}: --rounds {args.rounds} reached; best eval return "
        f"{run.best_eval:.1f} (round {run.best_round}) in {best_path}; "
        f"{(time.perf_counter() - started) / 60:.1f} min, {run.frames - frames_before} real env frames "
        f"({run.frames} in all)"
    )
    return 0


def rates(spent: list[Scores]) -> dict[str, float | None]:
    """Real env frames per second of real-env play, and dream steps per second of dreaming."""
    real = [s for s in spent if s.real_frames]
    dreamt = [s for s in spent if s.dream_steps]
    return dict(
        frames_per_s=sum(s.real_frames for s in real) / sum(s.seconds for s in real) if real else None,
        dream_steps_per_s=sum(s.dream_steps for s in dreamt) / sum(s.seconds for s in dreamt)
        if dreamt
        else None,
    )


if __name__ == "__main__":
    run_script(main)
