"""The controller stage's speed: env frames per second, today's default against the old path and the ceiling.

    python bench/bench_controller.py [--workers 2 --pop-size 8 --n-samples 4 --action-repeat 4]

All are measured in the same run, alternating, so a change in the machine's load shows in
each alike:

1. **old path**: k = 1 (the agent acts, and the env draws, every frame), one env per worker,
   V, M and C on one frame at a time: a generation of `pop x n-samples` full-length episodes
   through the real pool (agent.population.RealEvaluator on a WorkerPool).
2. **k only**: the same generation at the default k (C acts every k frames, the frames in
   between are not drawn), still one env per worker, one frame at a time (lever 1 alone).
3. **default**: k and `--envs-per-worker` episodes per worker stepped as one batch (levers 1
   and 2). Target: >= 5x the old path's env frames/s.
4. **ceiling**: the bare fast env at the same k on one core per worker (physics plus one
   render per k frames, no agent): env frames/s x workers. Target: default >= 80% of it.

Then full 1000-frame episodes per hour on the workers at the default, and where one worker's
time goes per episode-step (env.step against V, M and C), one env against a batch.

V and M are random-init at the paper's sizes (latent 32, hidden 256) in a temp dir: speed
does not depend on what they learned. The candidates are C = N(0, 0.1^2) around zero, the
search's start: the car drives (badly) for whole episodes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.policy import BLOCK, Agent  # noqa: E402
from agent.population import RealEvaluator, WorkerSpec, init_worker  # noqa: E402
from agent.seeds import train_seeds  # noqa: E402
from agent.world import load_world  # noqa: E402
from envs.carracing import MAX_EPISODE_STEPS, env_frames, make_env  # noqa: E402
from models.controller import Controller  # noqa: E402
from models.mdrnn import MDRNNCell  # noqa: E402
from models.vae import VAE  # noqa: E402
from pool.local import WorkerPool  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.cli import ArgumentParser, int_in, positive_int  # noqa: E402
from utils.params import count_params  # noqa: E402


def make_world(logdir: Path, latent: int, hidden: int, action_repeat: int) -> None:
    torch.manual_seed(0)
    for stage, model, extra in (
        ("vae", VAE(latent_size=latent), {}),
        ("mdrnn", MDRNNCell(latent, 3, hidden, 5), {"action_repeat": action_repeat}),
    ):
        save_checkpoint(
            logdir / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 0, "best_loss": 0.0},
        )


def generation(
    logdir: str,
    config: dict,
    k: int,
    workers: int,
    candidates: list,
    seeds: list,
    max_frames: int,
    envs_per_worker: int,
) -> float:
    """Env frames/s of one generation through the real pool at k, envs_per_worker episodes per task."""
    block = (
        1 if envs_per_worker == 1 else BLOCK
    )  # the old path: V, M and C on one frame at a time, no padding
    spec = WorkerSpec(logdir, config, k, envs_per_worker, block=block)
    with WorkerPool(workers, init_worker, (spec,), task_timeout=600) as pool:
        pool.map(time.sleep, [(0.5,)] * workers)  # every worker has loaded V, M and the envs
        scores = RealEvaluator(pool, max_frames, envs_per_worker).evaluate(candidates, seeds)
        return scores.real_frames / scores.seconds


def bare_env(k: int, frames: int, seed: int) -> float:
    """Env frames/s of the fast env alone at k (constant gas, a gentle random steer), on this core."""
    env, rng = make_env(action_repeat=k), np.random.default_rng(seed)
    env.reset(seed=seed)
    done, start = 0, time.perf_counter()
    while done < frames:
        _, _, terminated, truncated, info = env.step(
            np.array([rng.uniform(-0.3, 0.3), 0.3, 0.0], dtype=np.float32)
        )
        done += env_frames(info)
        if terminated or truncated:
            env.reset(seed=seed + done)
    env.close()
    return done / (time.perf_counter() - start)


def agent_split(agent: Agent, k: int, batch: int, steps: int) -> dict[str, float]:
    """Milliseconds per episode-step (k frames of one episode): env.step, and V, M and C, with `batch` envs."""
    envs = [make_env(action_repeat=k) for _ in range(batch)]
    obs = [env.reset(seed=i)[0] for i, env in enumerate(envs)]
    agent.reset(batch)
    env_s = agent_s = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        actions = agent.act(np.stack(obs))  # (batch, 3)
        t1 = time.perf_counter()
        for i, env in enumerate(envs):
            obs[i], _, terminated, truncated, _ = env.step(actions[i])
            if terminated or truncated:
                obs[i], _ = env.reset(seed=i + 100)
        agent_s, env_s = agent_s + t1 - t0, env_s + time.perf_counter() - t1
    for env in envs:
        env.close()
    return {"env": 1000 * env_s / (steps * batch), "agent": 1000 * agent_s / (steps * batch)}


def encode_ms(vae: VAE, batch: int, calls: int = 100) -> float:
    """Milliseconds per frame for V's encode of `batch` frames at once (lever 2: batching the agent)."""
    frames = np.random.default_rng(0).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        vae.encode_frames(frames)  # warm-up
        start = time.perf_counter()
        for _ in range(calls):
            vae.encode_frames(frames)
    return 1000 * (time.perf_counter() - start) / (calls * batch)


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=positive_int, default=2, help="pool workers (default 2)")
    parser.add_argument(
        "--pop-size",
        type=positive_int,
        default=8,
        help="candidates per generation (default 8: 8 tasks, 4 per worker)",
    )
    parser.add_argument(
        "--n-samples",
        type=positive_int,
        default=4,
        help="tracks per candidate (default 4, as traincontroller's)",
    )
    parser.add_argument(
        "--envs-per-worker",
        type=positive_int,
        default=4,
        help="the default's episodes per worker batch (default 4)",
    )
    parser.add_argument("--action-repeat", type=int_in(2, 50), default=4, help="the default k (default 4)")
    parser.add_argument(
        "--max-frames",
        type=int_in(1, MAX_EPISODE_STEPS),
        default=MAX_EPISODE_STEPS,
        help="env frames per episode (default 1000)",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=2, help="alternations of the three measurements (default 2)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # like each worker
    k, workers = args.action_repeat, args.workers
    print(
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before starting"
        + (
            " (other processes are using the CPU: every figure is pessimistic)"
            if os.getloadavg()[0] > 0.5
            else ""
        )
    )

    e = args.envs_per_worker
    paths = {"old path (k=1)": (1, 1), f"k only (k={k})": (k, 1), f"default (k={k}, batch {e})": (k, e)}
    rates = {name: [] for name in [*paths, f"ceiling (bare env, k={k})"]}
    with tempfile.TemporaryDirectory() as tmp:
        for kk in {1, k}:
            make_world(Path(tmp) / f"k{kk}", 32, 256, kk)
        _, _, config = load_world(Path(tmp) / "k1")
        rng = np.random.default_rng(0)
        candidates = [
            rng.normal(scale=0.1, size=count_params(Controller(**config))) for _ in range(args.pop_size)
        ]
        for r in range(args.rounds):
            seeds = train_seeds(0, r + 1, args.n_samples)
            for name, (kk, batch) in paths.items():
                rates[name].append(
                    generation(
                        str(Path(tmp) / f"k{kk}"),
                        config,
                        kk,
                        workers,
                        candidates,
                        seeds,
                        args.max_frames,
                        batch,
                    )
                )
            rates[f"ceiling (bare env, k={k})"].append(workers * bare_env(k, 4000, r))
        vae, mdrnn, _ = load_world(Path(tmp) / f"k{k}")
        single = agent_split(Agent(vae, mdrnn, Controller(**config), block=1), k, 1, 300)
        batched = agent_split(Agent(vae, mdrnn, Controller(**config)), k, e, 300)
        encode = {batch: encode_ms(vae, batch) for batch in (1, BLOCK)}

    mean = {name: float(np.mean(values)) for name, values in rates.items()}
    old, _, default, ceiling = mean.values()
    print(
        f"env frames/s on {workers} workers (pop {args.pop_size} x {args.n_samples} episodes of "
        f"{args.max_frames} frames, "
        f"mean of {args.rounds} alternated rounds):"
    )
    for name, values in rates.items():
        print(f"  {name:28s} {mean[name]:7.0f}   ({', '.join(f'{v:.0f}' for v in values)})")
    print(
        f"default vs old path: {default / old:.2f}x (target >= 5x); default vs ceiling: "
        f"{100 * default / ceiling:.0f}% (target >= 80%)"
    )
    print(
        f"full {MAX_EPISODE_STEPS}-frame episodes per hour on {workers} workers: "
        f"{3600 * default / MAX_EPISODE_STEPS:.0f} "
        f"at the default, {3600 * old / MAX_EPISODE_STEPS:.0f} on the old path"
    )
    for name, split in (("one env, one frame per call", single), (f"{e} envs as one batch", batched)):
        print(
            f"per episode-step of {k} frames, {name}: env.step {split['env']:.2f} ms, V + M + C {split['agent']:.2f} ms"
        )
    print(
        f"V encode per frame, one thread: {encode[1]:.2f} ms one frame at a time, {encode[BLOCK]:.2f} "
        f"ms in blocks of {BLOCK} "
        f"({encode[1] / encode[BLOCK]:.1f}x)"
    )


if __name__ == "__main__":
    main()
