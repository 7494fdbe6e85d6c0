"""Benchmark the two Ms side by side: the MDN-RNN's LSTM and the transformer (models/transformer.py).

    python bench/bench_m.py [--repeats 20]

For each, at the default sizes (z 32, width 256, 5 Gaussians; the transformer 2 blocks of 4
heads, context 32): parameters; training sequences per second (forward and backward of M's loss
on batches of 32 windows of 32 steps, as trainmdrnn.py trains); one-step inference steps per
second at batch 1 (the agent acting) and 256 (a batch of imagination); imagined steps per
second of actor-critic training (`Learner.update`, 256 x 15), with the start-state recomputation
the transformer needs. Weights are random, which does not change the cost. Last line: the
transformer's speed over the LSTM's, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from agent.imagine import ImagineSettings, Learner, StartStates  # noqa: E402
from models.mdrnn import mdrnn_loss  # noqa: E402
from models.world_model import ARCHS, build_m  # noqa: E402
from utils.params import count_params  # noqa: E402

LATENT, WIDTH, BATCH, SEQ = 32, 256, 32, 32


def rate(work: int, repeats: int, run) -> float:
    """work units per second of `run()`, after one warm-up call."""
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return work * repeats / (time.perf_counter() - start)


def measure(arch: str, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    config = dict(latent_size=LATENT, action_size=3, hidden_size=WIDTH, gaussians=5)
    config |= {"arch": arch} if arch != "lstm" else {}
    model, cell = build_m(config, one_step=False), build_m(config, one_step=True).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    z, actions = torch.randn(BATCH, SEQ + 1, LATENT), torch.rand(BATCH, SEQ, 3)
    rewards, terminals = torch.randn(BATCH, SEQ), torch.zeros(BATCH, SEQ)

    def train_step() -> None:
        loss = mdrnn_loss(model(z[:, :-1], actions), z[:, 1:], rewards, terminals)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def stepper(batch: int):
        state, zs, acts = cell.initial_state(batch), torch.randn(batch, LATENT), torch.rand(batch, 3)

        def step() -> None:
            nonlocal state
            with torch.no_grad():
                state = cell(zs, acts, state).hidden

        return step

    rng = np.random.default_rng(0)
    rollouts = [
        {
            "mu": rng.normal(size=(250, LATENT)).astype(np.float32),
            "actions": rng.random((250, 3)).astype(np.float32),
        }
        for _ in range(8)
    ]
    starts, settings = StartStates(cell, rollouts), ImagineSettings()
    learner = Learner(dict(latent_size=LATENT, hidden_size=WIDTH, action_size=3), settings)
    picks = torch.randint(len(starts), (settings.batch,))
    return dict(
        params=count_params(model),
        train_seq_per_s=rate(BATCH, repeats, train_step),
        step1_per_s=rate(1, 10 * repeats, stepper(1)),
        step256_per_s=rate(256, repeats, stepper(256)),
        imagined_per_s=rate(
            settings.batch * settings.horizon,
            max(2, repeats // 5),
            lambda: learner.update(cell, *starts.pick(picks)),
        ),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {arch: measure(arch, args.repeats) for arch in ARCHS}
    names = dict(
        params="parameters",
        train_seq_per_s="training sequences/s (32 x 32 steps)",
        step1_per_s="one-step, batch 1: steps/s",
        step256_per_s="one-step, batch 256: steps/s",
        imagined_per_s="imagination training: imagined steps/s",
    )
    print(f"{'':42s} {'lstm':>12s} {'transformer':>12s} {'ratio':>7s}")
    for key, name in names.items():
        lstm, transformer = results["lstm"][key], results["transformer"][key]
        print(f"{name:42s} {lstm:12.0f} {transformer:12.0f} {transformer / lstm:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
