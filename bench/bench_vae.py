"""Benchmark V's training (trainvae.py): data-pipeline overhead and what one epoch buys.

    python bench/bench_vae.py [--dataset DIR] [--rollouts 50] [--max-steps 500] [--device auto]

1. Throughput: frames/s of one real training epoch (trainvae.py's FrameDataset and its
   train step, imported, data loading included) against the bare model's forward + backward
   + Adam step on random float tensors of the same batch size, in the same process. The two
   alternate step by step (real batch, bare batch, real batch, ...), so that the load of a
   shared machine, which drifts, weighs on both alike. Target: ratio >= 0.90.
2. Quality: after that one epoch (the very batches and weights of `trainvae.py --epochs 1`),
   the test split's mean squared error per pixel value (in [0, 1]) of V's reconstructions
   (z = mu) against that of predicting the training set's mean frame for every test frame.
   Target: >= 3x lower.

Without --dataset it generates --rollouts Brownian rollouts of at most --max-steps steps
with data/generation_script.py into a cache folder (reused by later runs); the short
episodes keep generation and the epoch within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import trainvae  # noqa: E402
from data.loaders import FrameDataset  # noqa: E402
from data.rollouts import dataset_paths, split_rollouts  # noqa: E402
from models.vae import VAE, frames_to_tensor, vae_loss  # noqa: E402
from utils.training import pick_device, seed_everything  # noqa: E402


class BareStep:
    """The model alone: forward + loss + backward + Adam step on one random batch already on
    the device, as floats (no data loading, no uint8 conversion). It has its own model and
    leaves the global RNG as it found it, so the model being trained follows exactly the
    trajectory it would in trainvae.py."""

    def __init__(self, batch_size: int, latent_size: int, device: torch.device) -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.model = VAE(latent_size).to(device).train()
            self.x = torch.rand(batch_size, 3, 64, 64, device=device)  # (B, 3, 64, 64) in [0, 1]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.device = device
        for _ in range(3):  # warm-up: allocator, kernel selection
            self.timed_step()

    def timed_step(self) -> float:
        """Seconds of one step (the RNG save/restore around it is not timed)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            start = time.perf_counter()
            recon, mu, logsigma = self.model(self.x)
            loss = vae_loss(recon, self.x, mu, logsigma)[0]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss.item()  # the real step syncs once per batch too
            return time.perf_counter() - start


def ensure_dataset(args: argparse.Namespace) -> Path:
    if args.dataset:
        return Path(args.dataset)
    root = Path(tempfile.gettempdir()) / "worldmodels-bench" / f"vae_{args.rollouts}x{args.max_steps}"
    print(
        f"no --dataset: generating {args.rollouts} rollouts of at most {args.max_steps} steps into {root} "
        f"(--max-steps keeps this within a few minutes on 2 cores; reused next time)",
        flush=True,
    )
    command = [
        sys.executable,
        str(ROOT / "data/generation_script.py"),
        "--rollouts",
        str(args.rollouts),
        "--rootdir",
        str(root),
        "--max-steps",
        str(args.max_steps),
        "--threads",
        str(os.cpu_count() or 1),
    ]
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        sys.exit("error: rollout generation failed")
    return root


@torch.no_grad()
def test_errors(
    model: VAE, train_paths: list[Path], test_paths: list[Path], device: torch.device
) -> tuple[float, float]:
    """(V's test MSE per pixel value, that of the training set's mean frame)."""
    total, n_train = np.zeros((64, 64, 3)), 0
    for frames in FrameDataset(train_paths, 512, shuffle=False):  # (B, 64, 64, 3) uint8
        total += frames.numpy().sum(0, dtype=np.float64)
        n_train += len(frames)
    mean_frame = torch.from_numpy(total / n_train / 255.0).float().permute(2, 0, 1).to(device)  # (3, 64, 64)
    model.eval()
    vae_sq = mean_sq = values = 0.0
    for frames in FrameDataset(test_paths, 512, shuffle=False):
        x = frames_to_tensor(frames.to(device))  # (B, 3, 64, 64)
        vae_sq += (model(x)[0] - x).pow(2).sum().item()  # eval mode: z = mu
        mean_sq += (mean_frame - x).pow(2).sum().item()
        values += x.numel()
    return vae_sq / values, mean_sq / values


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", help="rollout folder; default: generate one into a cache folder")
    p.add_argument("--rollouts", type=int, default=50, help="rollouts to generate without --dataset")
    p.add_argument("--max-steps", type=int, default=500, help="steps per generated rollout at most")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    defaults = trainvae.parse_args(
        ["--logdir", "unused"]
    )  # trainvae's own defaults: batch, lr, latent, split, seed

    dataset = ensure_dataset(args)
    paths, lengths = dataset_paths(dataset)
    train_paths, test_paths = split_rollouts(paths, defaults.test_fraction, defaults.seed)
    device = pick_device(args.device)  # also sets torch's CPU threads, as trainvae does
    seed_everything(defaults.seed)
    model = VAE(defaults.latent_size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=defaults.lr)
    step = trainvae.make_step(model, optimizer, device, defaults.kl_tolerance, train=True)
    bare = BareStep(defaults.batch_size, defaults.latent_size, device)

    # trainvae's epoch 1: same data object, same step; the time to fetch each batch (reading,
    # decompressing, shuffling) counts on the real side. One bare step follows each real one.
    data = FrameDataset(
        train_paths, defaults.batch_size, shuffle=True, buffer_size=defaults.buffer_size, seed=defaults.seed
    )
    data.set_epoch(1)
    batches = iter(data)
    real_time = bare_time = 0.0
    real_frames = bare_frames = 0
    while True:
        start = time.perf_counter()
        frames = next(batches, None)  # (B, 64, 64, 3) uint8
        if frames is None:
            break
        real_frames += step(frames)["items"]  # syncs: loss.tolist()
        real_time += time.perf_counter() - start
        bare_time += bare.timed_step()
        bare_frames += defaults.batch_size
    real_rate, bare_rate = real_frames / real_time, bare_frames / bare_time
    vae_mse, mean_mse = test_errors(model, train_paths, test_paths, device)

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    load = (
        f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        if hasattr(os, "getloadavg")
        else ""
    )
    print()
    print(
        f"dataset: {dataset}: {len(paths)} rollouts, {sum(lengths)} frames ({len(train_paths)} train "
        f"rollouts / {len(test_paths)} test)"
    )
    print(f"throughput (batch {defaults.batch_size}, {device}{threads}{load}):")
    print(
        f"  bare model step, random tensors : {bare_rate:8.1f} frames/s ({bare_frames} frames in {bare_time:.0f}s)"
    )
    print(
        f"  real epoch, FrameDataset + step : {real_rate:8.1f} frames/s ({real_frames} frames in "
        f"{real_time:.0f}s, loading included)"
    )
    print(f"  ratio real / bare               : {real_rate / bare_rate:8.3f}   (target >= 0.90)")
    print("quality after that 1 epoch (test MSE per pixel value in [0, 1]):")
    print(f"  V reconstruction (z = mu)       : {vae_mse:.5f}")
    print(f"  training set's mean frame       : {mean_mse:.5f}")
    print(f"  ratio mean frame / V            : {mean_mse / vae_mse:8.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
