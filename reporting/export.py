"""Strip a trained logdir to what evaluation needs: V, M and C's best weights and configs.

    python -m reporting.export --logdir runs/p1/logdir --out pretrained/carracing-k4
    python -m reporting.export --logdir runs/im2 --out pretrained/carracing-k4-imagine --share pretrained/carracing-k4

The result is a logdir `test_controller.py --logdir OUT` reads like the original (same
returns, bit for bit): `vae/best.pt`, `mdrnn/best.pt` and `ctrl/best.pt` keep their weights,
configs and the few facts a reader wants (epochs, losses, generation, evaluated return,
action repeat); optimizer states, RNG states, logs and the latent cache are left behind.
The test's `ctrl/eval/returns.csv` and GIF come along when present, as `OUT/test_returns.csv`
and `OUT/episode.gif` (outside `ctrl/eval/`, which a new test run rewrites), and an --imagine
run's `ctrl/dream_vs_real.gif` as `OUT/dream_vs_real.gif`. With `--share DIR`
a stage whose weights equal DIR's (a C trained in imagination on the shipped V and M) becomes a
relative symlink to DIR's file instead of a second copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from agent.world import load_best_controller, load_world
from utils.checkpoint import BEST, load_checkpoint, require_checkpoint, save_checkpoint, stage_dir
from utils.cli import ArgumentParser, writable_dir
from utils.files import atomic_write

KEEP = {  # stage -> the checkpoint entries evaluation and a curious reader need
    "vae": ("state_dict", "config", "epoch", "best_loss"),
    "mdrnn": ("state_dict", "config", "epoch", "best_loss"),
    "ctrl": (
        "state_dict",
        "config",
        "generation",
        "eval_return",
        "eval_std",
        "eval_episodes",
        "search",
        "action_repeat",
        "round",  # trained in imagination (--imagine): the round, its settings, its real frames
        "imagine",
        "frames",
        "mdrnn",  # ... and the fine-tuned M it plays with
        "rescored",  # ... and the re-scoring of its best rounds that picked it
    ),
}
EVAL_FILES = {
    "eval/returns.csv": "test_returns.csv",
    "eval/episode.gif": "episode.gif",
    "dream_vs_real.gif": "dream_vs_real.gif",
}  # name under ctrl/ -> name in OUT


def _same_weights(a: dict, b: dict) -> bool:
    x, y = a.get("state_dict", {}), b.get("state_dict", {})
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def export(logdir: str | Path, out: str | Path, share: str | Path | None = None) -> list[Path]:
    """Write the stripped checkpoints (and the test's files) under `out`; returns the files written
    (a stage whose weights equal `share`'s is a relative symlink to that file instead)."""
    _, _, config = load_world(logdir)  # one line if V or M is missing or they disagree
    load_best_controller(logdir, config)  # one line if C is missing or does not fit them
    written = []
    for stage, keys in KEEP.items():
        state = require_checkpoint(logdir, stage)
        path = stage_dir(out, stage) / BEST
        shared = stage_dir(share, stage) / BEST if share is not None else None
        if shared is not None and shared.is_file() and _same_weights(state, load_checkpoint(shared)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.symlink_to(os.path.relpath(shared.resolve(), path.parent.resolve()))
            continue
        save_checkpoint(path, {key: state[key] for key in keys if key in state})
        written.append(path)
    for name, exported in EVAL_FILES.items():
        source = stage_dir(logdir, "ctrl") / name
        if source.is_file():
            target = Path(out) / exported
            with atomic_write(target) as handle:
                handle.write(source.read_bytes())
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        description="Copy V, M and C's best checkpoints, stripped to what evaluation needs, to a new logdir."
    )
    parser.add_argument("--logdir", required=True, help="the trained run folder (vae/, mdrnn/, ctrl/)")
    parser.add_argument(
        "--out", type=writable_dir, required=True, help="the folder to write (e.g. pretrained/carracing-k4)"
    )
    parser.add_argument(
        "--share",
        help="a shipped folder whose V or M this run used as is: link to its files instead of copying",
    )
    args = parser.parse_args(argv)
    written = export(args.logdir, args.out, args.share)
    size = sum(p.stat().st_size for p in written) / 2**20
    print(
        f"exported {len(written)} files ({size:.1f} MB) to {args.out}; try: python test_controller.py "
        f"--logdir {args.out} --display"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
