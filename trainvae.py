"""Stage 2: train V, the convolutional VAE, on the frames of the rollouts.

    python trainvae.py --logdir logs [--dataset datasets/carracing-k4] [--epochs 1]

Writes `L/vae/last.pt` (to resume), `L/vae/best.pt` (lowest test loss, read by M),
`log.csv`, `curves.png`, and each epoch `images/recon_EEE.png` (fixed test frames, each row
above its reconstruction) and `images/samples_EEE.png` (fixed draws from the prior N(0, I),
decoded), so epochs compare at a glance. Resumes from `last.pt` unless --noreload.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data.loaders import DEFAULT_BUFFER_SIZE, FrameDataset
from data.rollouts import dataset_paths, load_rollout, split_rollouts
from models.vae import VAE, frames_to_tensor, vae_loss
from utils import profile
from utils.cli import (
    ArgumentParser,
    add_training_stage_args,
    device_name,
    fraction,
    int_in,
    non_negative_float,
    non_negative_int,
    positive_float,
    run_script,
    seed_int,
    stage_command,
)
from utils.errors import BadInputError, BadRolloutError
from utils.logs import save_image
from utils.training import TrainingRun, fit, pick_device, seed_everything

IMG_CHANNELS = 3  # rollouts hold RGB frames
SIZE_KEYS = ["latent_size", "img_channels"]  # must match to resume
GRID_COLUMNS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_training_stage_args(p, "vae", reads="", epochs=profile.VAE_EPOCHS)
    p.add_argument("--batch-size", type=int_in(1, 65_536), default=32, help="frames per batch")
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="Adam learning rate (halved by ReduceLROnPlateau)"
    )
    p.add_argument("--latent-size", type=int_in(1, 1024), default=32, help="size of z")
    p.add_argument(
        "--kl-tolerance",
        type=non_negative_float,
        default=0.5,
        help="free bits per latent dimension: no KL gradient below kl_tolerance * latent_size",
    )
    p.add_argument(
        "--patience",
        type=non_negative_int,
        default=10,
        help="early stopping after this many epochs without test improvement (0 disables)",
    )
    p.add_argument(
        "--lr-patience",
        type=non_negative_int,
        default=3,
        help="epochs without test improvement before the lr is halved",
    )
    p.add_argument(
        "--test-fraction",
        type=fraction,
        default=0.1,
        help="share of the rollouts held out as the fixed test set",
    )
    p.add_argument(
        "--buffer-size",
        type=int_in(1, 100_000),
        default=DEFAULT_BUFFER_SIZE,
        help="rollouts held in memory at once (bounds RAM; frames are shuffled within it)",
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of weights, split, batch order and sample noise"
    )
    return p.parse_args(argv)


def make_step(
    model: VAE, optimizer: torch.optim.Optimizer, device: torch.device, kl_tolerance: float, train: bool
) -> Callable[[torch.Tensor], dict[str, float]]:
    """One batch of V, for `fit` (and the benchmark): uint8 frames in, float metrics out.

    Frames travel to the device as uint8 (4x fewer bytes than floats) and become floats
    there, in one vectorised op: no per-image transform in the hot path.
    """

    def step(frames: torch.Tensor) -> dict[str, float]:
        x = frames_to_tensor(
            frames.to(device, non_blocking=True)
        )  # (B, 64, 64, 3) uint8 -> (B, 3, 64, 64) float in [0, 1]
        recon, mu, logsigma = model(x)  # (B, 3, 64, 64), (B, latent), (B, latent)
        loss, recon_loss, kl = vae_loss(recon, x, mu, logsigma, kl_tolerance)
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        values = torch.stack(
            [loss.detach(), recon_loss.detach(), kl.detach()]
        ).tolist()  # one device sync per batch
        return {"loss": values[0], "recon": values[1], "kl": values[2], "items": len(frames)}

    return step


def fixed_test_frames(paths: list[Path], n: int = 4 * GRID_COLUMNS) -> np.ndarray:
    """Up to `n` uint8 frames (n, 64, 64, 3): one row of GRID_COLUMNS frames spread evenly over
    each of the first test rollouts. Test frames, the same every epoch and across resumes, so
    the reconstruction grids compare from one epoch to the next."""
    rows = []
    for path in paths[: math.ceil(n / GRID_COLUMNS)]:
        arrays = load_rollout(path, ("observations",))
        if arrays is None:
            continue
        obs = arrays["observations"]  # (T, 64, 64, 3)
        rows.append(obs[np.linspace(0, len(obs) - 1, GRID_COLUMNS).round().astype(int)])
    return np.concatenate(rows) if rows else np.empty((0, 64, 64, 3), np.uint8)


def image_grid(images: torch.Tensor, columns: int = GRID_COLUMNS, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> one uint8 (H', W', C) image, tiles separated by white."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, pad + rows * (h + pad), pad + columns * (w + pad))
    for i, image in enumerate(images.float().cpu()):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[:, top : top + h, left : left + w] = image
    return grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def save_epoch_images(model: VAE, frames: np.ndarray, noise: torch.Tensor, folder: Path, epoch: int) -> None:
    """recon_EEE.png: rows of test frames, each followed by its reconstruction (z = mu);
    samples_EEE.png: decoded draws from the prior. Touches no global RNG, so resumes stay exact."""
    model.eval()
    device = next(model.parameters()).device
    folder.mkdir(parents=True, exist_ok=True)
    if len(frames):
        x = frames_to_tensor(torch.from_numpy(frames).to(device))  # (N, 3, 64, 64)
        recon = model(x)[0]  # eval mode: deterministic, z = mu
        pairs = torch.stack(
            [x.unflatten(0, (-1, GRID_COLUMNS)), recon.unflatten(0, (-1, GRID_COLUMNS))], 1
        )  # (rows, 2, 8, 3, 64, 64)
        save_image(folder / f"recon_{epoch:03d}.png", image_grid(pairs.flatten(0, 2)))
    samples = model.decode(noise.to(device))  # (64, 3, 64, 64)
    save_image(folder / f"samples_{epoch:03d}.png", image_grid(samples))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 64x64 inputs: let cuDNN pick its fastest kernels
    seed_everything(args.seed)

    paths, lengths = dataset_paths(args.dataset)  # or one line naming the command that makes them
    train_paths, test_paths = split_rollouts(paths, args.test_fraction, args.seed)
    if not test_paths:
        raise BadRolloutError(
            f"only {len(paths)} rollout under {args.dataset}; need 2 or more (some are held out for testing): "
            f"{stage_command('data', dataset=args.dataset)}"
        )
    train_data = FrameDataset(
        train_paths, args.batch_size, shuffle=True, buffer_size=args.buffer_size, seed=args.seed
    )
    test_data = FrameDataset(
        test_paths, 4 * args.batch_size, shuffle=False, buffer_size=args.buffer_size
    )  # no gradients: bigger batches

    model = VAE(args.latent_size, IMG_CHANNELS).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=args.lr_patience
    )
    config = model.config | {
        k: getattr(args, k) for k in ("lr", "batch_size", "kl_tolerance", "test_fraction", "seed")
    }
    stage = Path(args.logdir) / "vae"
    frames = fixed_test_frames(test_paths)  # (<=32, 64, 64, 3) uint8
    noise = torch.randn(
        GRID_COLUMNS**2, args.latent_size, generator=torch.Generator().manual_seed(args.seed)
    )  # fixed prior draws
    frame_counts = dict(zip(paths, lengths))
    n_train = sum(frame_counts[p] for p in train_paths)  # for the progress bar's total
    print(
        f"V: {len(train_paths)} train rollouts ({n_train} frames), {len(test_paths)} test rollouts, on {device}"
    )

    run = TrainingRun(
        stage_dir=stage,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        config=config,
        train_data=train_data,
        test_data=test_data,
        train_step=make_step(model, optimizer, device, args.kl_tolerance, train=True),
        test_step=make_step(model, optimizer, device, args.kl_tolerance, train=False),
        metrics=["recon", "kl"],
        unit="frame",
        patience=args.patience,
        train_items=n_train,
        config_keys=SIZE_KEYS,
        on_epoch_end=lambda epoch, _: save_epoch_images(model, frames, noise, stage / "images", epoch),
        extra_state={"test_rollouts": [str(p) for p in test_paths]},
    )
    try:
        summary = fit(run, args.epochs, args.noreload)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {stage / 'last.pt'} holds the last finished epoch; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except torch.cuda.OutOfMemoryError:
        raise BadInputError(
            f"out of GPU memory at --batch-size {args.batch_size}; use a smaller one"
        ) from None
    seconds = time.perf_counter() - started
    print(
        f"done: best test loss {summary['best_loss']:.6g} after {summary['epoch']} epochs in {seconds:.0f}s; "
        f"checkpoints in {stage / 'best.pt'} and {stage / 'last.pt'}"
    )
    return 0


if __name__ == "__main__":
    run_script(main)
