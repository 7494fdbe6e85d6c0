"""Benchmark learning in imagination: imagined steps per second of actor-critic training
(forward through M and backward into the actor, plus the critic's step), against the batched
dream's forward-only steps per second in the same run.

    python bench/bench_imagine.py [--batch 256] [--horizon 15] [--updates 20]

An imagined step is one start state advanced one step by the actor and M. Sizes are the
paper's (z 32, LSTM 256, 5 Gaussians); weights are random, which does not change the cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agent.dream import dream_returns  # noqa: E402
from agent.imagine import ImagineSettings, Learner  # noqa: E402
from models.mdrnn import MDRNNCell  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=ImagineSettings.batch, help="start states per update")
    parser.add_argument("--horizon", type=int, default=ImagineSettings.horizon)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    latent, hidden = 32, 256
    mdrnn = MDRNNCell(latent, 3, hidden, 5).eval().requires_grad_(False)
    config = dict(latent_size=latent, hidden_size=hidden, action_size=3)
    learner = Learner(config, ImagineSettings(horizon=args.horizon, batch=args.batch))
    z, h, c = (
        torch.randn(args.batch, latent),
        torch.zeros(args.batch, hidden),
        torch.zeros(args.batch, hidden),
    )

    learner.update(mdrnn, z, (h, c))  # warm-up
    start = time.perf_counter()
    for _ in range(args.updates):
        learner.update(mdrnn, z, (h, c))
    seconds = time.perf_counter() - start
    trained = args.updates * args.batch * args.horizon / seconds

    with torch.no_grad():
        mdrnn.head.bias[-1] = -30.0  # never done: every dream episode runs all its steps
    params = torch.randn(64, 3 * (latent + hidden) + 3) * 0.1
    starts = torch.randn(100, 2, latent) * 0.5
    dream_returns(mdrnn, params[:2], [0, 1], starts, 1.15, 5)  # warm-up
    start = time.perf_counter()
    _, steps = dream_returns(mdrnn, params, list(range(16)), starts, 1.15, 200)
    dreamed = int(steps.sum()) / (time.perf_counter() - start)

    print(
        f"{args.updates} updates of {args.batch} x {args.horizon} imagined steps, {args.threads} torch threads"
    )
    print(
        f"imagination, forward + backward: {trained:10.0f} imagined steps/s ({seconds / args.updates:.3f} s/update)"
    )
    print(f"batched dream, forward only:     {dreamed:10.0f} dream steps/s (64 x 16 controllers)")
    print(f"imagination / dream: {trained / dreamed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
