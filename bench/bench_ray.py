"""Benchmark the Ray backend: controller episodes/s with 1 and K Ray workers, next to the local pool.

    python bench/bench_ray.py [--episodes 16 --max-steps 200 --workers 2] [--ray-address HOST:PORT]

The same episodes (4 candidates x episodes/4 tracks, random-init V and M at the paper's sizes,
latent 32 and hidden 256, in a temp dir) run through agent.population.RealEvaluator, the path
traincontroller.py takes, on each backend with 1 and with K workers. Rates are steady state:
timed from the first task to the last result on a started pool; pool start-up (a local Ray,
actors loading V, M and an env) is printed apart. Ray's own cost per task (scheduling, object
transfer, its raylet and GCS processes sharing the cores) is included, as it would be in a run.
Without --ray-address a local Ray with K CPUs is started once for all Ray measurements; with one,
the cluster there is used (K actors must fit in its free CPUs). Needs requirements-ray.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.population import RealEvaluator, WorkerSpec, init_worker  # noqa: E402
from agent.seeds import train_seeds  # noqa: E402
from models.controller import Controller  # noqa: E402
from models.mdrnn import MDRNNCell  # noqa: E402
from models.vae import VAE  # noqa: E402
from pool import check_backend, make_pool  # noqa: E402
from pool.local import WorkerPool  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.cli import positive_int  # noqa: E402
from utils.params import count_params  # noqa: E402

CANDIDATES = 4


def make_world(logdir: Path, latent: int = 32, hidden: int = 256) -> dict[str, int]:
    """Random-init V and M checkpoints as the training stages write them; C's sizes."""
    torch.manual_seed(0)
    for stage, model in (("vae", VAE(latent_size=latent)), ("mdrnn", MDRNNCell(latent, 3, hidden, 5))):
        save_checkpoint(
            logdir / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config, "epoch": 0, "best_loss": 0.0},
        )
    return dict(latent_size=latent, hidden_size=hidden, action_size=3)


def busy_loop(n: int) -> float:
    """Seconds a pure-Python loop of n iterations takes (no memory traffic, no I/O)."""
    start, total = time.perf_counter(), 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - start


def cpu_scaling(workers: int, n: int = 10_000_000) -> float:
    """Throughput of `workers` busy processes relative to one: the most any pool can scale here.

    On a VM whose vCPUs share a host, this is often well below `workers`.
    """
    import multiprocessing as mp

    one = busy_loop(n)
    with mp.get_context("spawn").Pool(workers) as procs:
        procs.map(busy_loop, [1000] * workers)  # started
        start = time.perf_counter()
        procs.map(busy_loop, [n] * workers)
        wall = time.perf_counter() - start
    return workers * one / wall


def wait_until_started(pool, workers: int) -> None:
    """Return once every worker has run its initializer (V, M and env loaded)."""
    if isinstance(pool, WorkerPool):
        pool.map(time.sleep, [(1.0,)] * workers)  # each local worker takes one once it is ready
    else:
        while None in pool.pids:  # a Ray actor's pid is known once it has started
            pool.map(time.sleep, [(0.1,)])


def measure(
    backend: str,
    workers: int,
    logdir: str,
    config: dict[str, int],
    candidates: list[np.ndarray],
    seeds: list[int],
    max_steps: int,
    address: str | None,
) -> dict[str, float]:
    """Start a pool, then time the episodes on it: start-up seconds, episodes/s, env steps/s."""
    t0 = time.perf_counter()
    with make_pool(
        backend,
        workers,
        init_worker,
        (WorkerSpec(logdir, config, action_repeat=1, envs_per_worker=1),),
        task_timeout=600,
        ray_address=address if backend == "ray" else None,
    ) as pool:
        wait_until_started(pool, workers)
        t1 = time.perf_counter()
        scores = RealEvaluator(pool, max_steps, envs_per_worker=1).evaluate(candidates, seeds)
        returns, steps = scores.returns, scores.frames
        wall = time.perf_counter() - t1
    return dict(
        startup=t1 - t0, episodes_per_s=returns.size / wall, steps_per_s=int(steps.sum()) / wall, wall=wall
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--episodes",
        type=positive_int,
        default=16,
        help=f"episodes per measurement, a multiple of {CANDIDATES} (default 16)",
    )
    parser.add_argument(
        "--max-steps", type=positive_int, default=200, help="steps per episode at most (default 200)"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=2, help="K, the parallel worker count (default 2)"
    )
    parser.add_argument(
        "--ray-address", metavar="HOST:PORT", help="measure on this Ray cluster (default: a local Ray)"
    )
    parser.add_argument("--skip-local", action="store_true", help="measure the Ray backend only")
    args = parser.parse_args()
    check_backend("ray", args.ray_address)
    import pool.ray_backend as ray_pool  # optional dependency: after check_backend

    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    print(
        f"{cores} cores, load average {load:.1f} before starting; {args.episodes} episodes x {args.max_steps} steps, "
        f"random-init V (latent 32) and M (hidden 256)"
    )
    if load > 0.5:
        print("warning: other processes are using the CPU; every figure below is pessimistic and noisy")
    print(
        f"CPU check: {args.workers} busy-loop processes run at {cpu_scaling(args.workers):.2f}x one process's "
        f"throughput (the ceiling for any {args.workers}-worker pool here)"
    )
    # One Ray session for every Ray measurement (pools then join it and leave it running).
    t0 = time.perf_counter()
    ray_pool.connect(args.ray_address, args.workers)
    ray_start = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        config = make_world(Path(tmp))
        rng = np.random.default_rng(0)
        n_params = count_params(Controller(**config))
        candidates = [rng.normal(scale=0.1, size=n_params) for _ in range(CANDIDATES)]
        seeds = train_seeds(0, 1, max(1, args.episodes // CANDIDATES))
        backends = ["ray"] if args.skip_local else ["local", "ray"]
        results = {
            (backend, n): measure(
                backend, n, tmp, config, candidates, seeds, args.max_steps, args.ray_address
            )
            for backend in backends
            for n in (1, args.workers)
        }

    where = args.ray_address or f"a local Ray with {args.workers} CPUs, started in {ray_start:.1f}s"
    print(f"Ray: {where}")
    print(f"{'backend':8} {'workers':>7} {'episodes/s':>11} {'env steps/s':>12} {'start-up s':>11}")
    for (backend, n), r in results.items():
        print(f"{backend:8} {n:7d} {r['episodes_per_s']:11.2f} {r['steps_per_s']:12.0f} {r['startup']:11.1f}")
    for backend in backends:
        one, many = results[(backend, 1)], results[(backend, args.workers)]
        print(
            f"{backend}: {args.workers} workers / 1 worker = {many['episodes_per_s'] / one['episodes_per_s']:.2f}x"
        )
    if not args.skip_local:
        for n in sorted({1, args.workers}):
            ratio = results[("ray", n)]["episodes_per_s"] / results[("local", n)]["episodes_per_s"]
            print(f"ray / local with {n} worker(s): {ratio:.0%} of the local pool's episodes/s")
    ray_pool.ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
