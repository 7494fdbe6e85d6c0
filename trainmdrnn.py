"""Stage 3: train M, the MDN-RNN (or a transformer with the same heads), on V's latents of the rollouts.

    python trainmdrnn.py --logdir logs [--dataset datasets/carracing-k4] [--epochs 10] [--arch transformer]

Every frame is encoded once by V's best checkpoint into a latent cache (`L/mdrnn/latents.npz`,
rebuilt when V or the dataset changes); each batch then draws z = mu + sigma * eps from it, for
the inputs z_t and the targets z_{t+1}, as the paper does. Loss: the mixture NLL of z_{t+1} +
reward MSE + done BCE. `--arch transformer` trains `models/transformer.py`'s causal transformer
instead of the LSTM, on the same windows with the same loss; its checkpoint's config names it
(`arch`), and every later stage builds the M that config names. Writes `L/mdrnn/{last,best}.pt`,
`log.csv`, `curves.png` and `prediction.png` (predicted vs true next latents and rewards on a
test rollout). Resumes from `last.pt` unless --noreload.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data.latents import build_latent_cache, cache_path, load_latent_cache, read_meta, split_latents
from data.loaders import SequenceDataset
from envs.carracing import ACTION_SIZE
from models.mdrnn import batch_loss
from models.transformer import ARCH as TRANSFORMER
from models.transformer import C_H_SCALE, TransformerM
from models.world_model import ARCHS, build_m, m_arch
from utils import profile
from utils.checkpoint import LAST, load_checkpoint, require_checkpoint
from utils.cli import (
    ArgumentParser,
    add_training_stage_args,
    device_name,
    error_line,
    int_in,
    non_negative_float,
    non_negative_int,
    positive_float,
    run_script,
    seed_int,
    stage_command,
)
from utils.errors import BadCheckpointError, BadRolloutError
from utils.files import atomic_write
from utils.logs import pyplot
from utils.training import TrainingRun, fit, pick_device, seed_everything

SIZE_KEYS = ["latent_size", "action_size", "hidden_size", "gaussians"]  # must match to resume
TRANSFORMER_KEYS = ["arch", "layers", "heads", "context"]  # ...and these, for a transformer M
TRANSFORMER_DEFAULTS = {k: v.default for k, v in inspect.signature(TransformerM).parameters.items()}


def describe_m(config: dict) -> str:
    """'LSTM 256' or 'transformer 2 x 256, 4 heads, context 32'."""
    if config.get("arch") == TRANSFORMER:
        return (
            f"transformer {config['layers']} x {config['hidden_size']}, {config['heads']} heads, "
            f"context {config['context']}, C reads h x {config['h_scale']:g}"
        )
    return f"LSTM {config['hidden_size']}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_training_stage_args(p, "mdrnn", reads="reads L/vae/best.pt, ", epochs=profile.MDRNN_EPOCHS)
    p.add_argument("--batch-size", type=int_in(1, 65_536), default=32, help="sequences per batch")
    p.add_argument(
        "--seq-len",
        type=int_in(1, 10_000),
        default=profile.SEQ_LEN,
        help="steps per training sequence (truncated BPTT)",
    )
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--arch", choices=ARCHS, default=profile.M_ARCH, help="M: the MDN-RNN's LSTM or a transformer"
    )
    p.add_argument(
        "--hidden-size", type=int_in(1, 8192), default=256, help="LSTM hidden size, or transformer width"
    )
    p.add_argument(
        "--layers", type=int_in(1, 64), default=TRANSFORMER_DEFAULTS["layers"], help="transformer blocks"
    )
    p.add_argument(
        "--heads", type=int_in(1, 64), default=TRANSFORMER_DEFAULTS["heads"], help="attention heads"
    )
    p.add_argument(
        "--context",
        type=int_in(1, 10_000),
        default=TRANSFORMER_DEFAULTS["context"],
        help="tokens a step sees",
    )
    p.add_argument(
        "--h-scale",
        type=positive_float,
        default=C_H_SCALE,
        help="transformer: the factor on the h C reads (about the LSTM h's scale; M's predictions unchanged)",
    )
    p.add_argument(
        "--gaussians", type=int_in(1, 256), default=5, help="mixture components per latent dimension"
    )
    p.add_argument(
        "--reward-weight", type=non_negative_float, default=1.0, help="weight of the reward MSE in the loss"
    )
    p.add_argument(
        "--done-weight", type=non_negative_float, default=1.0, help="weight of the done BCE in the loss"
    )
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="max gradient norm (0 disables)")
    p.add_argument(
        "--patience",
        type=non_negative_int,
        default=10,
        help="early stopping after this many epochs without test improvement (0 disables)",
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of weights, batch order and latent sampling"
    )
    return p.parse_args(argv)


def make_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, args: argparse.Namespace
) -> tuple[Callable, Callable]:
    """train_step / test_step for utils.training.fit. Training noise comes from the global
    torch RNG (saved in last.pt: exact resumes); the test pass redraws the same noise every
    epoch (generator reseeded when a pass starts, see FixedNoise) so test losses compare."""

    def train_step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        losses = batch_loss(model, batch, device, args.reward_weight, args.done_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        return {k: v.item() for k, v in losses.items()} | {"items": len(batch["mask"])}

    def test_step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        losses = batch_loss(
            model, batch, device, args.reward_weight, args.done_weight, batch.pop("generator")
        )
        return {k: v.item() for k, v in losses.items()} | {"items": len(batch["mask"])}

    return train_step, test_step


class FixedNoise:
    """Wraps the test SequenceDataset: every pass hands the same freshly seeded generator
    with its batches, so each epoch's test loss uses the same draws of z."""

    def __init__(self, data: SequenceDataset, device: torch.device, seed: int) -> None:
        self.data, self.device, self.seed = data, device, seed

    def __iter__(self):
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        for batch in self.data:
            yield batch | {"generator": generator}


@torch.no_grad()
def plot_prediction(
    model: torch.nn.Module, rollout: dict[str, np.ndarray], path: Path, device: torch.device, dims: int = 4
) -> None:
    """Predicted (mixture mean) vs true next latent mu for a few dims, and predicted vs true
    reward, along one test rollout fed with z = mu (deterministic, so plots compare)."""
    mu = torch.from_numpy(rollout["mu"]).to(device)[None]  # (1, T, L)
    out = model(mu, torch.from_numpy(rollout["actions"]).to(device)[None])
    mean = (out.logpi.exp() * out.mu).sum(-1)[0].cpu().numpy()  # (T, L): E[z_{t+1}]
    true_next = rollout["mu"][1:]  # (T-1, L)
    dims = min(dims, mu.shape[-1])
    plt = pyplot()
    fig, axes = plt.subplots(dims + 1, 1, figsize=(9, 1.8 * (dims + 1)), sharex=True)
    steps = np.arange(len(rollout["rewards"]))  # output t predicts z_{t+1} and r_t
    for d, ax in enumerate(axes[:dims]):
        ax.plot(steps[:-1], true_next[:, d], label="true mu", lw=1)
        ax.plot(steps[:-1], mean[:-1, d], label="predicted (mixture mean)", lw=1)
        ax.set_ylabel(f"z[{d}] at t+1")
    axes[-1].plot(steps, rollout["rewards"], label="true", lw=1)
    axes[-1].plot(steps, out.reward[0].cpu().numpy(), label="predicted", lw=1)
    axes[-1].set_ylabel("reward r_t")
    axes[-1].set_xlabel("step t (M has seen z and actions up to t)")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"M on test rollout {rollout['file']}")
    fig.tight_layout()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    try:
        return train(parse_args(argv))
    except KeyboardInterrupt:  # checkpoints and the cache are written atomically: nothing is half-written
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def train(args: argparse.Namespace) -> int:
    """Build the cache, then M, then hand both to utils.training.fit."""
    device = pick_device(args.device)
    seed_everything(args.seed)
    stage = Path(args.logdir) / "mdrnn"

    # V first (its absence is the first thing to fix), then the cache of its latents
    vae_config = require_checkpoint(args.logdir, "vae")["config"]
    meta = read_meta(build_latent_cache(args.logdir, args.dataset, device))
    v_print = meta["vae"]  # the V the cache holds
    # V's own split (trainvae.py: split_rollouts(paths, test_fraction, seed)), so M never trains on V's test rollouts
    rollouts = load_latent_cache(args.logdir, vae_config.get("test_fraction", 0.1), vae_config.get("seed", 0))
    train_rollouts, test_rollouts = split_latents(rollouts)
    if not train_rollouts or not test_rollouts:
        raise BadRolloutError(
            f"need at least 2 usable rollouts under {args.dataset} for a train/test split, found {len(rollouts)}; "
            f"make more with: {stage_command('data', dataset=args.dataset)}"
        )
    if not args.noreload and (stage / LAST).exists():
        try:
            saved = load_checkpoint(stage / LAST)
            previous, saved_arch = saved.get("vae_fingerprint"), m_arch(dict(saved.get("config", {})))
        except Exception as error:  # damaged or foreign: one line, as the resume itself would say
            raise BadCheckpointError(
                f"cannot resume from {stage / LAST} ({error_line(error)}); use --noreload to start afresh"
            ) from None
        if saved_arch != args.arch:
            raise BadCheckpointError(
                f"{stage / LAST} is an M of --arch {saved_arch}; resume with --arch {saved_arch}, "
                "or use --noreload to start afresh"
            )
        if previous is not None and previous != v_print:
            raise BadCheckpointError(
                f"{stage / LAST} was trained on the latents of another V ({Path(args.logdir) / 'vae' / 'best.pt'} "
                "changed since); use --noreload to start afresh"
            )

    config = {
        "latent_size": int(vae_config["latent_size"]),
        "action_size": ACTION_SIZE,
        "hidden_size": args.hidden_size,
        "gaussians": args.gaussians,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "reward_weight": args.reward_weight,
        "done_weight": args.done_weight,
        "grad_clip": args.grad_clip,
        "seed": args.seed,
        "dataset": str(args.dataset),
        "action_repeat": int(meta.get("action_repeat", 1)),  # env frames per M step, from the rollouts
    }
    size_keys = SIZE_KEYS + (TRANSFORMER_KEYS if args.arch == TRANSFORMER else [])
    if args.arch == TRANSFORMER:  # the LSTM's configs stay as they were: no `arch` means the LSTM
        config |= dict(
            arch=TRANSFORMER, layers=args.layers, heads=args.heads, context=args.context, h_scale=args.h_scale
        )
    model = build_m(config, one_step=False).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=3)
    next_keys = ("mu", "logsigma")
    train_data = SequenceDataset(
        train_rollouts, args.seq_len, args.batch_size, shuffle=True, next_keys=next_keys, seed=args.seed
    )
    test_data = SequenceDataset(
        test_rollouts, args.seq_len, args.batch_size, shuffle=False, next_keys=next_keys
    )
    train_step, test_step = make_steps(model, optimizer, device, args)
    plot_rollout = next(r for r in rollouts if r["test"])

    run = TrainingRun(
        stage_dir=stage,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        config=config,
        train_data=train_data,
        test_data=FixedNoise(test_data, device, args.seed),
        train_step=train_step,
        test_step=test_step,
        metrics=["gmm", "reward", "done"],
        unit="sequence",
        patience=args.patience,
        config_keys=[*size_keys, "action_repeat"],
        on_epoch_end=lambda epoch, _: plot_prediction(model, plot_rollout, stage / "prediction.png", device),
        extra_state={"vae_fingerprint": v_print},
    )
    frames = sum(len(r["mu"]) for r in rollouts)
    print(
        f"M ({describe_m(config)}): latent {config['latent_size']}, {args.gaussians} gaussians, "
        f"{config['action_repeat']} env frame(s) per step; "
        f"{len(train_rollouts)} train / {len(test_rollouts)} test rollouts ({frames} frames) from "
        f"{cache_path(args.logdir)}; device {device}"
    )
    summary = fit(run, args.epochs, noreload=args.noreload)
    print(
        f"done: {summary['epoch']} epochs{' (stopped early)' if summary['stopped_early'] else ''}, "
        f"best test loss {summary['best_loss']:.5g}; M in {stage / 'best.pt'}, curves in {stage / 'curves.png'}, "
        f"prediction plot in {stage / 'prediction.png'}"
    )
    return 0


if __name__ == "__main__":
    run_script(main)
