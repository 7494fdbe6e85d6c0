"""Checkpoints every stage writes and reads: `L/<stage>/last.pt` and `L/<stage>/best.pt`.

Files are written atomically (utils.files.atomic_write), so a kill at any moment leaves the
previous complete file. They hold only tensors, numbers, strings and containers of those, so
they load with `torch.load(..., weights_only=True)`: nothing read from a logdir runs code.
"""

from __future__ import annotations

import inspect
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from utils.cli import error_line, stage_command
from utils.errors import BadCheckpointError, MissingInputError
from utils.files import atomic_write

LAST, BEST = "last.pt", "best.pt"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save `payload` to `path` atomically.

    The payload is serialised in memory first: torch's zip writer calls back into Python for
    every write to a file object, and a Ctrl-C landing in that callback comes out as a
    RuntimeError; into a BytesIO it cannot land, so Ctrl-C stays a KeyboardInterrupt.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path) as handle:
        handle.write(buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (weights_only: no arbitrary code runs)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def stage_dir(logdir: str | os.PathLike, stage: str) -> Path:
    return Path(logdir) / stage


def require_checkpoint(
    logdir: str | os.PathLike,
    stage: str,
    which: str = BEST,
    map_location: str | torch.device = "cpu",
    keys: tuple[str, ...] = ("state_dict", "config"),
) -> dict[str, Any]:
    """The previous stage's checkpoint with `keys`, or one line naming the command that makes it."""
    path = stage_dir(logdir, stage) / which
    command = stage_command(stage, logdir)
    if not path.is_file():
        raise MissingInputError(f"{path} not found; run `{command}` first")
    try:
        state = load_checkpoint(path, map_location)
    except Exception as error:  # corrupt or foreign file: one line, not a traceback
        raise BadCheckpointError(
            f"cannot read {path} ({error_line(error)}); rerun `{command} --noreload`"
        ) from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise BadCheckpointError(
            f"{path} is not a {stage} checkpoint (no {', '.join(missing)}); rerun `{command} --noreload`"
        )
    return state


def check_config(
    saved: dict[str, Any], wanted: dict[str, Any], path: str | os.PathLike, keys: list[str] | None = None
) -> None:
    """Raise BadCheckpointError (one line naming the flags) if `path` was made with other settings."""
    keys = keys if keys is not None else list(wanted)
    diffs = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} (this run: {wanted[k]!r})"
        for k in keys
        if k in wanted and saved.get(k) != wanted[k]
    ]
    if diffs:
        raise BadCheckpointError(
            f"{path} was made with {', '.join(diffs)}; resume with the same flags, or --noreload to start afresh"
        )


def load_model(
    cls: type | Callable[[dict[str, Any]], type],
    logdir: str | os.PathLike,
    stage: str,
    device: str | torch.device = "cpu",
    which: str = BEST,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a stage's model from its checkpoint: sizes from `config`, never from constants.

    `cls` is the model's class, or a function of the config that picks it (M's architecture).
    Only the constructor arguments of the class are taken from the config (which also holds
    training hyper-parameters). Returns (model in eval mode on `device`, checkpoint). Weights
    that do not fit the config give one line naming the file.
    """
    state = require_checkpoint(logdir, stage, which, map_location=device)
    name = getattr(cls, "__name__", stage) if isinstance(cls, type) else f"{stage} model"
    try:
        config = dict(state["config"])
        model_cls = cls if isinstance(cls, type) else cls(config)
        wanted = inspect.signature(model_cls).parameters
        model = model_cls(**{k: v for k, v in config.items() if k in wanted}).to(device)
        model.load_state_dict(state["state_dict"])
    except Exception as error:
        path = stage_dir(logdir, stage) / which
        raise BadCheckpointError(
            f"{path} does not hold a {name} ({type(error).__name__}); "
            f"rerun `{stage_command(stage, logdir)} --noreload`"
        ) from None
    return model.eval(), state
