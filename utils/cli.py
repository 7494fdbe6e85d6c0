"""Command-line helpers every script shares: argparse value types, the script's edge, hints.

A bad value is argparse's own error ("argument --rollouts: must be >= 1, got 0"), exit
status 2. Library code raises the errors of utils/errors.py; `run_script` is every script's
edge: it prints such an error as one line and exits with its status (2 bad input, 1 failed),
and turns SIGTERM into the same clean stop as Ctrl-C (status 130). `stage_command` spells the
command that makes a stage's output, for every "run this first" hint.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from utils import profile
from utils.errors import StageError

MAX_COUNT = 10**9  # a bound on counts and sizes: larger values are typos (and would overflow or hang)

# The command that makes each stage's output, for "missing input" messages.
STAGE_COMMANDS = {
    "data": "python data/generation_script.py --rootdir {dataset}",
    "vae": "python trainvae.py --logdir {logdir}",
    "mdrnn": "python trainmdrnn.py --logdir {logdir}",
    "ctrl": "python traincontroller.py --logdir {logdir}",
}


def stage_command(stage: str, logdir: object = "L", dataset: object = profile.DATASET) -> str:
    """The command that (re)makes `stage`'s output, e.g. `python trainvae.py --logdir L`."""
    return STAGE_COMMANDS.get(stage, "the previous stage").format(logdir=logdir, dataset=dataset)


def error_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill` (SIGTERM) stops a stage as cleanly as Ctrl-C does


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Every script's edge: run `main`, print a StageError as one line, exit with its status.

    SIGTERM and Ctrl-C raise KeyboardInterrupt (also in a process started with SIGINT
    ignored, as background jobs are); a script catches it where it can say what was kept, and
    one that escapes is exit status 130 without a traceback.
    """
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    one_line_warnings()
    try:
        status = main()
    except StageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        status = error.exit_status
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        status = 130
    sys.exit(status or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`prog: error: ... (see --help)`), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (high=None: no upper bound)."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


positive_int = int_in(1, MAX_COUNT)  # counts and sizes
non_negative_int = int_in(0, MAX_COUNT)  # patiences where 0 disables
seed_int = int_in(0, 2**32 - 1)  # seeds (numpy's SeedSequence takes any, env seeds are < 2**32)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, step sizes, timeouts, temperatures)."""
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (loss weights, tolerances, clips where 0 disables)."""
    value = _number(float, text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (targets)."""
    return _number(float, text)


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N, mps: a device torch knows (availability is checked when used)."""
    import torch  # torch is heavy: only the scripts that take --device pay for it

    if text == "auto":
        return text
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r} (auto, cpu, cuda, cuda:N or mps)"
        ) from None
    return text


def writable_dir(text: str) -> str:
    """A folder that exists or can be made, and is not a file."""
    path = Path(text)
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if existing == path and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    if existing != path and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, so {text} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{existing} is not writable")
    return text


def writable_file(text: str) -> str:
    """A file path whose folder exists or can be made and that is not a folder itself."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    writable_dir(str(path.parent))
    return text


def add_training_stage_args(parser: argparse.ArgumentParser, stage: str, reads: str, epochs: int) -> None:
    """--logdir, --dataset, --noreload and --epochs, worded alike for V's and M's training scripts."""
    parser.add_argument(
        "--logdir", type=writable_dir, required=True, help=f"run folder: {reads}writes L/{stage}/"
    )
    parser.add_argument(
        "--dataset", default=profile.DATASET, help="rollout folder (data/generation_script.py --rootdir)"
    )
    parser.add_argument(
        "--noreload", action="store_true", help=f"start afresh instead of resuming from L/{stage}/last.pt"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=epochs, help="epochs in all, counted across resumes"
    )


def one_line_warnings() -> None:
    """Print warnings as `warning: message` (e.g. a skipped rollout file), without the
    source line Python adds by default: the user needs the file name, not our code."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
