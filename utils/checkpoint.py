"""Checkpoints every stage writes and reads: `L/<stage>/last.pt` and `L/<stage>/best.pt`.

Files are written atomically (temporary name, fsync, rename), so a kill at any moment
leaves the previous complete file. They hold only tensors, numbers, strings and containers
of those, so they load with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

LAST, BEST = "last.pt", "best.pt"

# The command that makes each stage's checkpoint, for "missing input" messages.
STAGE_COMMANDS = {
    "vae": "python trainvae.py --logdir {logdir}",
    "mdrnn": "python trainmdrnn.py --logdir {logdir}",
    "ctrl": "python traincontroller.py --logdir {logdir}",
}


class StageInputError(SystemExit):
    """A stage cannot start: its message is one line for the user (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> NoReturn:
    """Stop the script with one line on stderr and exit status 1, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise StageInputError(message)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save `payload` to `path` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (weights_only: no arbitrary code runs)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def stage_dir(logdir: str | os.PathLike, stage: str) -> Path:
    return Path(logdir) / stage


def require_checkpoint(logdir: str | os.PathLike, stage: str, which: str = BEST, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The previous stage's checkpoint, or one line naming the command that makes it."""
    path = stage_dir(logdir, stage) / which
    if not path.is_file():
        command = STAGE_COMMANDS.get(stage, "the previous stage").format(logdir=logdir)
        fail(f"{path} not found; run `{command}` first")
    try:
        return load_checkpoint(path, map_location)
    except Exception as error:  # corrupt or foreign file: one line, not a traceback
        fail(f"cannot read {path} ({type(error).__name__}: {error}); rerun `{STAGE_COMMANDS.get(stage, 'that stage').format(logdir=logdir)} --noreload`")


def check_config(saved: dict[str, Any], wanted: dict[str, Any], path: str | os.PathLike, keys: list[str] | None = None) -> None:
    """Stop with one line if a checkpoint was made with other sizes than asked for now."""
    keys = keys if keys is not None else list(wanted)
    diffs = [f"{k}={saved.get(k)!r} (asked {wanted[k]!r})" for k in keys if k in wanted and saved.get(k) != wanted[k]]
    if diffs:
        fail(f"{path} was made with {', '.join(diffs)}; use --noreload to start afresh, or the same flags to resume")


def load_model(cls: type, logdir: str | os.PathLike, stage: str, device: str | torch.device = "cpu", which: str = BEST) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a stage's model from its checkpoint: sizes from `config`, never from constants.

    Only the constructor arguments of `cls` are taken from the config (which also holds
    training hyper-parameters). Returns (model in eval mode on `device`, checkpoint).
    """
    import inspect

    state = require_checkpoint(logdir, stage, which, map_location=device)
    wanted = inspect.signature(cls).parameters
    model = cls(**{k: v for k, v in state["config"].items() if k in wanted}).to(device)
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


def load_vae(logdir: str | os.PathLike, device: str | torch.device = "cpu"):
    """V from `L/vae/best.pt`."""
    from models.vae import VAE

    return load_model(VAE, logdir, "vae", device)[0]


def load_mdrnn(logdir: str | os.PathLike, device: str | torch.device = "cpu", one_step: bool = True):
    """M from `L/mdrnn/best.pt`: the one-step `MDRNNCell` (default) or the multi-step `MDRNN`."""
    from models.mdrnn import MDRNN, MDRNNCell

    return load_model(MDRNNCell if one_step else MDRNN, logdir, "mdrnn", device)[0]
