"""The controller stage's speed: env frames per second, today's default against the old path and the ceiling.

    python bench/bench_controller.py [--workers 2 --pop-size 8 --n-samples 2 --action-repeat 4]

All three are measured in the same run, alternating, so a change in the machine's load shows
in each alike:

1. **old path**: k = 1 (the agent acts, and the env draws, every frame), one env per worker:
   a generation of `pop x n-samples` full-length episodes through the real pool
   (agent.population.evaluate_candidates on a WorkerPool).
2. **default**: the same generation at the default k (C acts every k frames, the frames in
   between are not drawn). Target: >= 5x the old path's env frames/s.
3. **ceiling**: the bare fast env at the same k on one core per worker (physics plus one
   render per k frames, no agent): env frames/s x workers. Target: default >= 80% of it.

Then full 1000-frame episodes per hour on the workers at the default, and the per-step split
of one agent (frame resize, V encode, M step and C, env.step) in this process.

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

from agent.policy import Agent  # noqa: E402
from agent.population import evaluate_candidates, init_worker  # noqa: E402
from agent.seeds import train_seeds  # noqa: E402
from agent.world import load_world  # noqa: E402
from envs.carracing import MAX_EPISODE_STEPS, env_frames, make_env, to_model_frame  # noqa: E402
from models.controller import Controller  # noqa: E402
from models.mdrnn import MDRNNCell  # noqa: E402
from models.vae import VAE  # noqa: E402
from pool.local import WorkerPool  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.cli import ArgumentParser, int_in, positive_int  # noqa: E402
from utils.params import count_params  # noqa: E402


def make_world(logdir: Path, latent: int, hidden: int, action_repeat: int) -> None:
    torch.manual_seed(0)
    for stage, model, extra in (("vae", VAE(latent_size=latent), {}), ("mdrnn", MDRNNCell(latent, 3, hidden, 5), {"action_repeat": action_repeat})):
        save_checkpoint(logdir / stage / "best.pt", {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 0, "best_loss": 0.0})


def generation(logdir: str, config: dict, k: int, workers: int, candidates: list, seeds: list, max_frames: int) -> float:
    """Env frames/s of one generation through the real pool, acting every k frames."""
    with WorkerPool(workers, init_worker, (logdir, True, config, k), task_timeout=600) as pool:
        pool.map(time.sleep, [(0.5,)] * workers)  # every worker has loaded V, M and the env
        start = time.perf_counter()
        _, _, frames = evaluate_candidates(pool, candidates, seeds, max_frames)
        return int(frames.sum()) / (time.perf_counter() - start)


def bare_env(k: int, frames: int, seed: int) -> float:
    """Env frames/s of the fast env alone at k (constant gas, a gentle random steer), on this core."""
    env, rng = make_env(action_repeat=k), np.random.default_rng(seed)
    env.reset(seed=seed)
    done, start = 0, time.perf_counter()
    while done < frames:
        _, _, terminated, truncated, info = env.step(np.array([rng.uniform(-0.3, 0.3), 0.3, 0.0], dtype=np.float32))
        done += env_frames(info)
        if terminated or truncated:
            env.reset(seed=seed + done)
    env.close()
    return done / (time.perf_counter() - start)


def agent_split(agent: Agent, k: int, steps: int) -> dict[str, float]:
    """Milliseconds per agent step: resize, V encode, M step and C, env.step (k frames)."""
    env = make_env(action_repeat=k)
    parts = dict(resize=0.0, encode=0.0, mdrnn_ctrl=0.0, env=0.0)
    obs, _ = env.reset(seed=0)
    agent.reset()
    with torch.no_grad():
        for _ in range(steps):
            t0 = time.perf_counter()
            frame = to_model_frame(obs)[None]  # (1, 64, 64, 3)
            t1 = time.perf_counter()
            z, _ = agent.vae.encode_frames(frame)  # (1, L)
            t2 = time.perf_counter()
            action = agent.controller(z, agent.hidden[0])  # (1, 3)
            agent.hidden = agent.mdrnn(z, action, agent.hidden).hidden
            t3 = time.perf_counter()
            obs, _, terminated, truncated, _ = env.step(action[0].numpy())
            t4 = time.perf_counter()
            for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name] += dt
            if terminated or truncated:
                obs, _ = env.reset(seed=1)
                agent.reset()
    env.close()
    return {name: 1000 * total / steps for name, total in parts.items()}


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
    parser.add_argument("--pop-size", type=positive_int, default=4, help="candidates per generation (default 4)")
    parser.add_argument("--n-samples", type=positive_int, default=1, help="tracks per candidate (default 1)")
    parser.add_argument("--action-repeat", type=int_in(2, 50), default=4, help="the default k (default 4)")
    parser.add_argument("--max-frames", type=int_in(1, MAX_EPISODE_STEPS), default=MAX_EPISODE_STEPS, help="env frames per episode (default 1000)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="alternations of the three measurements (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # like each worker
    k, workers = args.action_repeat, args.workers
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before starting"
          + (" (other processes are using the CPU: every figure is pessimistic)" if os.getloadavg()[0] > 0.5 else ""))

    rates = {"old path (k=1)": [], f"default (k={k})": [], f"ceiling (bare env, k={k})": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_world(Path(tmp) / "k1", 32, 256, 1)
        make_world(Path(tmp) / "kk", 32, 256, k)
        _, _, config = load_world(Path(tmp) / "k1")
        rng = np.random.default_rng(0)
        candidates = [rng.normal(scale=0.1, size=count_params(Controller(**config))) for _ in range(args.pop_size)]
        for r in range(args.rounds):
            seeds = train_seeds(0, r + 1, args.n_samples)
            rates["old path (k=1)"].append(generation(str(Path(tmp) / "k1"), config, 1, workers, candidates, seeds, args.max_frames))
            rates[f"default (k={k})"].append(generation(str(Path(tmp) / "kk"), config, k, workers, candidates, seeds, args.max_frames))
            rates[f"ceiling (bare env, k={k})"].append(workers * bare_env(k, 4000, r))
        vae, mdrnn, _ = load_world(Path(tmp) / "kk")
        split = agent_split(Agent(vae, mdrnn, Controller(**config)), k, 300)
        batched = {batch: encode_ms(vae, batch) for batch in (1, 4)}

    mean = {name: float(np.mean(values)) for name, values in rates.items()}
    old, default, ceiling = mean.values()
    print(f"env frames/s on {workers} workers (pop {args.pop_size} x {args.n_samples} episodes of {args.max_frames} frames, "
          f"mean of {args.rounds} alternated rounds):")
    for name, values in rates.items():
        print(f"  {name:28s} {mean[name]:7.0f}   ({', '.join(f'{v:.0f}' for v in values)})")
    print(f"default vs old path: {default / old:.2f}x (target >= 5x); default vs ceiling: {100 * default / ceiling:.0f}% (target >= 80%)")
    print(f"full {MAX_EPISODE_STEPS}-frame episodes per hour on {workers} workers: {3600 * default / MAX_EPISODE_STEPS:.0f} "
          f"at k={k}, {3600 * old / MAX_EPISODE_STEPS:.0f} at k=1")
    agent_ms = split["resize"] + split["encode"] + split["mdrnn_ctrl"]
    print(f"one agent step (k={k} frames) in this process: env.step {split['env']:.2f} ms, agent {agent_ms:.2f} ms "
          f"(resize {split['resize']:.2f} + V encode {split['encode']:.2f} + M step & C {split['mdrnn_ctrl']:.2f})")
    print(f"V encode per frame, one thread: {batched[1]:.2f} ms one frame at a time, {batched[4]:.2f} ms in batches of 4 "
          f"({batched[1] / batched[4]:.1f}x; not used yet: batched floats differ from single ones by ~1e-8)")


if __name__ == "__main__":
    main()
