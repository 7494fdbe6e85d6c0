"""Benchmark M's training loop (trainmdrnn.py) on the CPU or GPU at hand.

    python bench/bench_mdrnn.py [--dataset DIR] [--logdir L] [--device auto]

1. Latent cache vs re-encoding: one epoch of M on the cached latents against one epoch that
   encodes observations and next observations with V inside the batch loop (the public
   PyTorch port's way: a sequence dataset over the rollout FILES). Same data, same M step,
   same run. Target: >= 10x per epoch (the one-off cache build is reported too).
2. Loop efficiency: the training loop's sequences/s (batching, z sampling, masks, clipping)
   against the bare model's forward + backward + step on random tensors of the same shape.
   Target: >= 80%.

Without --dataset it generates a small one (data/generation_script.py --max-steps); without
a V checkpoint in --logdir it uses a random-init V (the encoder's cost does not depend on
its weights).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data.latents import build_latent_cache, load_latent_cache, split_latents  # noqa: E402
from data.loaders import SequenceDataset  # noqa: E402
from models.mdrnn import MDRNN, mdrnn_loss  # noqa: E402
from models.vae import VAE  # noqa: E402
from trainmdrnn import make_steps  # noqa: E402
from utils.checkpoint import BEST, load_checkpoint, save_checkpoint  # noqa: E402
from utils.training import pick_device  # noqa: E402


def timed_epoch(step, batches) -> tuple[float, int]:
    """Seconds and sequences of one pass of `step` over `batches` (an iterable, consumed here)."""
    start, items = time.perf_counter(), 0
    for batch in batches:
        items += step(batch)["items"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, items


def reencoding_batches(paths: list[Path], vae: VAE, args, device: torch.device):
    """The port's data path: read frame windows from the files, encode obs and next obs with V
    each batch, and hand M's step the same (mu, logsigma, ...) batch the cache would give."""
    for batch in SequenceDataset(
        paths, args.seq_len, args.batch_size, shuffle=False, next_keys=("observations",)
    ):
        mu, logsigma = vae.encode_frames(batch.pop("observations").to(device))  # (B, S, L) each
        next_mu, next_logsigma = vae.encode_frames(batch.pop("next_observations").to(device))
        yield batch | {"mu": mu, "logsigma": logsigma, "next_mu": next_mu, "next_logsigma": next_logsigma}


def fresh_model(args, latent_size: int, device: torch.device) -> tuple[MDRNN, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MDRNN(latent_size, 3, args.hidden_size, args.gaussians).to(device).train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", help="rollout folder (default: generate a small one in a temp folder)")
    p.add_argument("--rollouts", type=int, default=10, help="rollouts to generate without --dataset")
    p.add_argument("--max-steps", type=int, default=300, help="steps per generated rollout")
    p.add_argument("--logdir", help="run folder holding vae/best.pt (default: a random-init V)")
    p.add_argument("--latent-size", type=int, default=32, help="latent size of the random-init V")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--gaussians", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="best of this many cached/bare epochs")
    p.add_argument(
        "--loop-batches", type=int, default=40, help="batches per epoch in the loop-efficiency part"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: every core, as the stages use)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_mdrnn_"))
    try:
        dataset = Path(args.dataset) if args.dataset else work / "dataset"
        if not args.dataset:
            print(
                f"generating {args.rollouts} rollouts of {args.max_steps} steps in {dataset} ...", flush=True
            )
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "data/generation_script.py"),
                    "--rollouts",
                    str(args.rollouts),
                    "--max-steps",
                    str(args.max_steps),
                    "--rootdir",
                    str(dataset),
                ],
                check=True,
                capture_output=True,
            )
        logdir = work / "logs"  # a private logdir: the bench never touches the user's cache
        (logdir / "vae").mkdir(parents=True)
        if args.logdir:
            shutil.copy(Path(args.logdir) / "vae" / BEST, logdir / "vae" / BEST)
        else:
            save_checkpoint(
                logdir / "vae" / BEST,
                {
                    "state_dict": VAE(args.latent_size).state_dict(),
                    "config": {"latent_size": args.latent_size, "img_channels": 3},
                    "epoch": 0,
                    "best_loss": 0.0,
                },
            )
        state = load_checkpoint(logdir / "vae" / BEST)
        config = state["config"]
        vae = VAE(config["latent_size"], config.get("img_channels", 3))
        vae.load_state_dict(state["state_dict"])
        vae = vae.to(device).eval()

        start = time.perf_counter()
        build_latent_cache(logdir, dataset, device, verbose=False)
        build_s = time.perf_counter() - start
        rollouts = load_latent_cache(logdir)
        train, _ = split_latents(rollouts)
        train_files = [dataset / r["file"] for r in rollouts if not r["test"]]
        frames = sum(len(r["mu"]) for r in train)
        print(
            f"device {device}, torch threads {torch.get_num_threads()}; {len(train_files)} train "
            f"rollouts ({frames} frames), "
            f"batch {args.batch_size} x seq {args.seq_len}, hidden {args.hidden_size}, latent {config['latent_size']}"
        )
        step_args = SimpleNamespace(reward_weight=1.0, done_weight=1.0, grad_clip=1.0)

        # 1. cache vs re-encode, with the very same M step, on the same unshuffled windows
        B, S, L = args.batch_size, args.seq_len, config["latent_size"]
        cached_times = []
        for _ in range(args.repeats):
            model, opt = fresh_model(args, L, device)
            train_step, _ = make_steps(model, opt, device, step_args)
            cached_times.append(
                timed_epoch(
                    train_step, SequenceDataset(train, S, B, shuffle=False, next_keys=("mu", "logsigma"))
                )
            )
        model, opt = fresh_model(args, L, device)
        train_step, _ = make_steps(model, opt, device, step_args)
        reenc_s, reenc_items = timed_epoch(train_step, reencoding_batches(train_files, vae, args, device))
        cached_s, items = min(cached_times)
        assert items == reenc_items, (items, reenc_items)
        print(
            f"epoch on the latent cache:     {cached_s:8.2f} s  ({items} sequences; best of {args.repeats})"
        )
        print(f"epoch re-encoding with V:      {reenc_s:8.2f} s")
        print(f"speedup per epoch:             {reenc_s / cached_s:8.1f}x  (target >= 10x)")
        print(
            f"one-off cache build:           {build_s:8.2f} s  ({sum(len(r['mu']) for r in rollouts)} frames); "
            f"first epoch incl. build: {reenc_s / (cached_s + build_s):.1f}x"
        )

        # 2. the loop (shuffled, as trainmdrnn.py runs it) against the bare model on random tensors
        # of the same shape. The train rollouts are tiled to >= --loop-batches batches, so the
        # epoch's one partial batch weighs as little as in a real dataset. Interleaved, best of
        # --repeats, so that load changes on a shared machine hit both alike.
        tiled = train * max(1, -(-args.loop_batches * B * S // frames))
        z, nz = torch.randn(B, S, L, device=device), torch.randn(B, S, L, device=device)
        a, r, d = (
            torch.randn(B, S, 3, device=device),
            torch.randn(B, S, device=device),
            torch.zeros(B, S, device=device),
        )
        loop_times, bare_times = [], []
        for _ in range(args.repeats):
            model, opt = fresh_model(args, L, device)
            train_step, _ = make_steps(model, opt, device, step_args)
            loop_times.append(
                timed_epoch(
                    train_step, SequenceDataset(tiled, S, B, shuffle=True, next_keys=("mu", "logsigma"))
                )
            )
            model, opt = fresh_model(args, L, device)

            def bare_step(_: int, model=model, opt=opt) -> dict[str, float]:
                loss = mdrnn_loss(model(z, a), nz, r, d)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return {"items": B}

            bare_times.append(timed_epoch(bare_step, range(args.loop_batches)))
        loop_rate = max(n / t for t, n in loop_times)
        bare_rate = max(n / t for t, n in bare_times)
        print(
            f"training loop:                 {loop_rate:8.1f} sequences/s  ({loop_times[0][1]} "
            f"sequences, train set tiled x{len(tiled) // len(train)})"
        )
        print(
            f"bare model fwd+bwd+step:       {bare_rate:8.1f} sequences/s  ({args.loop_batches} "
            "batches of random tensors)"
        )
        print(f"loop efficiency:               {100 * loop_rate / bare_rate:8.1f} %  (target >= 80%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
