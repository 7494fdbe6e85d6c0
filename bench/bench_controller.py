"""How well controller training uses the CPU: one CMA-ES generation against the ideal.

    python bench/bench_controller.py [--workers 2 --pop-size 8 --n-samples 2 --max-steps 500]

1. In this process, with the same Agent the workers use (one torch thread): env steps/s of
   a single env driven by V+M+C, with the per-step time split into the agent (V encode,
   M step, C; and the 96->64 frame resize they need) and env.step. Measured before and
   after step 2; the ideal uses their mean, so a change in the machine's load shows.
2. One generation through the real path (agent.population.evaluate_candidates on a WorkerPool):
   wall time against ideal = total steps / (single-env steps/s x workers).
   efficiency = ideal / wall; the target is >= 85% with 2 workers.

V and M are random-init at the paper's sizes (latent 32, hidden 256) in a temp dir: speed
does not depend on what they learned. Timings include other load on the machine.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import positive_int  # noqa: E402
from envs.carracing import make_env, to_model_frame  # noqa: E402
from models.controller import Controller  # noqa: E402
from models.mdrnn import MDRNNCell  # noqa: E402
from models.vae import VAE  # noqa: E402
from agent.policy import Agent  # noqa: E402
from agent.population import evaluate_candidates, init_worker  # noqa: E402
from agent.seeds import train_seeds  # noqa: E402
from agent.world import load_world  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.params import count_params  # noqa: E402
from pool.local import WorkerPool  # noqa: E402


def make_world(logdir: Path, latent: int, hidden: int) -> None:
    torch.manual_seed(0)
    for stage, model in (("vae", VAE(latent_size=latent)), ("mdrnn", MDRNNCell(latent, 3, hidden, 5))):
        save_checkpoint(logdir / stage / "best.pt", {"state_dict": model.state_dict(), "config": model.config, "epoch": 0, "best_loss": 0.0})


def schedstat(pids: list[int]) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one), summed over pids (Linux; else nan).

    Unlike wall time, these do not grow when other programs load the machine: a process's
    wall time = on-CPU + waiting for a CPU + blocked (for a worker: idle, with no task).
    """
    try:
        fields = [Path(f"/proc/{pid}/schedstat").read_text().split() for pid in pids]
    except OSError:
        return math.nan, math.nan
    return sum(int(f[0]) for f in fields) / 1e9, sum(int(f[1]) for f in fields) / 1e9


def single_env(agent: Agent, fast: bool, steps: int, seed: int) -> dict[str, float]:
    """Drive one env for `steps` steps (resetting on episode end), timing each part per step."""
    env = make_env(fast=fast)
    parts = dict(resize=0.0, encode=0.0, mdrnn_ctrl=0.0, env=0.0)
    obs, _ = env.reset(seed=seed)
    agent.reset()
    cpu0, _ = schedstat([os.getpid()])
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            t0 = time.perf_counter()
            frame = to_model_frame(obs)[None]  # (1, 64, 64, 3)
            t1 = time.perf_counter()
            z, _ = agent.vae.encode_frames(frame)  # (1, L)
            t2 = time.perf_counter()
            action = agent.controller(z, agent.hidden[0])  # (1, 3)
            agent.hidden = agent.mdrnn(z, action, agent.hidden).hidden
            action = action[0].numpy()
            t3 = time.perf_counter()
            obs, _, terminated, truncated, _ = env.step(action)
            t4 = time.perf_counter()
            parts["resize"] += t1 - t0
            parts["encode"] += t2 - t1
            parts["mdrnn_ctrl"] += t3 - t2
            parts["env"] += t4 - t3
            if terminated or truncated:
                obs, _ = env.reset(seed=seed + 1)
                agent.reset()
    total = time.perf_counter() - start
    cpu = schedstat([os.getpid()])[0] - cpu0
    env.close()
    return {k: 1000 * v / steps for k, v in parts.items()} | {"steps_per_s": steps / total, "cpu_ms": 1000 * cpu / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=positive_int, default=2)
    parser.add_argument("--pop-size", type=positive_int, default=8)
    parser.add_argument("--n-samples", type=positive_int, default=2)
    parser.add_argument("--max-steps", type=positive_int, default=500)
    parser.add_argument("--single-steps", type=positive_int, default=600, help="steps for the single-env measurement")
    parser.add_argument("--latent", type=positive_int, default=32)
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--slow-env", action="store_true")
    args = parser.parse_args()
    fast = not args.slow_env
    torch.set_num_threads(1)  # like each worker
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    print(f"{cores} cores, load average {load:.1f} before starting")
    if load > 0.5:
        print("warning: other processes are using the CPU; every figure below is pessimistic and noisy")

    with tempfile.TemporaryDirectory() as tmp:
        make_world(Path(tmp), args.latent, args.hidden)
        vae, mdrnn, config = load_world(tmp)
        n_params = count_params(Controller(**config))
        rng = np.random.default_rng(0)
        # sigma ~ CMA-ES's 0.1 around a typical init: candidates drive (badly) without leaving the map at once
        candidates = [rng.normal(scale=0.1, size=n_params) for _ in range(args.pop_size)]
        agent = Agent(vae, mdrnn, Controller(**config))
        single_env(agent, fast, 50, 0)  # warm-up (allocator, first-call overheads)
        single = single_env(agent, fast, args.single_steps, 0)
        agent_ms = single["resize"] + single["encode"] + single["mdrnn_ctrl"]
        print(f"single env ({'fast' if fast else 'gymnasium'} renderer, 1 torch thread, latent {args.latent}, hidden {args.hidden}, C {n_params} params):")
        print(f"  {single['steps_per_s']:.0f} steps/s; per step: env.step {single['env']:.2f} ms, agent {agent_ms:.2f} ms "
              f"(resize {single['resize']:.2f} + V encode {single['encode']:.2f} + M step & C {single['mdrnn_ctrl']:.2f})")

        with WorkerPool(args.workers, init_worker, (tmp, fast, config), task_timeout=600) as pool:
            pool.map(time.sleep, [(0.5,)] * args.workers)  # wait until every worker has loaded V, M, env
            seeds = train_seeds(0, 1, args.n_samples)
            pids = pool.pids
            cpu0, wait0 = schedstat(pids)
            start = time.perf_counter()
            _, _, steps = evaluate_candidates(pool, candidates, seeds, args.max_steps)
            wall = time.perf_counter() - start
            cpu, wait = (b - a for a, b in zip((cpu0, wait0), schedstat(pids)))
        after = single_env(agent, fast, args.single_steps, 0)  # again: did the machine's load change meanwhile?
    print(f"load average {os.getloadavg()[0]:.1f} at the end; single env again: {after['steps_per_s']:.0f} steps/s")
    rate = (single["steps_per_s"] + after["steps_per_s"]) / 2  # single-env steps/s around the generation
    total = int(steps.sum())
    ideal = total / (rate * args.workers)
    print(f"generation: pop {args.pop_size} x {args.n_samples} episodes of <= {args.max_steps} steps = {total} steps, "
          f"{args.workers} workers")
    print(f"  wall {wall:.1f} s vs ideal {ideal:.1f} s (= steps / ({rate:.0f} steps/s x {args.workers})): "
          f"efficiency {100 * ideal / wall:.0f}%, {total / wall:.0f} env steps/s")
    # Load-independent view: the pool's own loss is the time workers sat with no task; running
    # side by side costs the rest (CPU per step in a worker vs alone: caches, memory bandwidth).
    idle = 1 - (cpu + wait) / (wall * args.workers)
    cpu_ms, alone_ms = 1000 * cpu / total, (single["cpu_ms"] + after["cpu_ms"]) / 2
    print(f"  workers idle (no task) {100 * idle:.1f}% of the time, waiting for a CPU {100 * wait / (wall * args.workers):.0f}%; "
          f"CPU per step {cpu_ms:.2f} ms in a worker vs {alone_ms:.2f} ms alone")
    print(f"  => efficiency on an otherwise idle machine ~ (1 - idle) x alone/worker = {100 * (1 - idle) * alone_ms / cpu_ms:.0f}%")


if __name__ == "__main__":
    main()
