"""Benchmark the dream: batched controller rollouts inside M, in dream steps per second.

    python bench/bench_dream.py [--pop-size 64] [--n-samples 16] [--steps 200]

A dream step is one controller acting once in one dreamed episode. The reference in the
same run is the single-env form (SimulatedCarRacing stepped by one controller), which is
what a per-env Python loop would give. Sizes are the paper's (z 32, LSTM 256, 5 Gaussians);
weights are random, which does not change the cost. Target: >= 100,000 dream steps/s on
2 CPU cores for a population of 64 x 16 episodes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agent.dream import dream_returns  # noqa: E402
from envs.simulated_carracing import SimulatedCarRacing  # noqa: E402
from models.controller import Controller  # noqa: E402
from models.mdrnn import MDRNNCell  # noqa: E402
from utils.params import get_flat_params  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pop-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="dream steps per episode (default 200)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latent, hidden = 32, 256
    mdrnn = MDRNNCell(latent, 3, hidden, 5).eval()
    with torch.no_grad():
        mdrnn.head.bias[-1] = -30.0  # never done: every episode runs all its steps
    starts = torch.randn(100, 2, latent) * 0.5
    params = torch.randn(args.pop_size, 3 * (latent + hidden) + 3) * 0.1
    seeds = list(range(args.n_samples))

    dream_returns(mdrnn, params[:2], seeds[:2], starts, 1.15, 5)  # warm-up
    start = time.perf_counter()
    _, steps = dream_returns(mdrnn, params, seeds, starts, 1.15, args.steps)
    batched = int(steps.sum()) / (time.perf_counter() - start)

    env = SimulatedCarRacing(mdrnn=mdrnn, starts=starts, temperature=1.15, max_steps=args.steps)
    controller = Controller(latent, hidden)
    obs, _ = env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(args.steps):
        with torch.no_grad():
            o = torch.from_numpy(obs)
            obs, *_ = env.step(controller(o[:latent], o[latent:]).numpy())
    single = args.steps / (time.perf_counter() - start)

    print(
        f"population {args.pop_size} x {args.n_samples} episodes x {args.steps} steps, {args.threads} torch threads"
    )
    print(f"batched dream:           {batched:10.0f} dream steps/s (target >= 100000)")
    print(f"single env, one by one:  {single:10.0f} dream steps/s")
    print(f"batched / single: {batched / single:.0f}x")
    assert get_flat_params(controller).shape[0] == params.shape[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
