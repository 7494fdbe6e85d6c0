"""The rollout file format, owned here alone: name, write, find, read, validate, split.

One compressed `.npz` per episode (exactly `numpy.savez_compressed`'s format: a zip of
`.npy` members), named `rollout_I.npz` for rollout index I, under `root/thread_K/` as
data/generation_script.py writes them, or flat under `root/`; readers search the root
recursively, so both work.

| key | shape | dtype | meaning |
|---|---|---|---|
| `observations` | (T, 64, 64, 3) | uint8 | frame seen *before* action t, already at model size |
| `actions` | (T, 3) | float32 | steer in [-1, 1], gas in [0, 1], brake in [0, 1] |
| `rewards` | (T,) | float32 | reward after action t |
| `terminals` | (T,) | bool | episode ended (terminated or truncated) after action t |

`action_repeat` (a scalar k) says how many env frames one row spans: the agent held each
action k frames, `rewards` sums them (docs/design.md, Action repeat); a file without it is k = 1.
One dataset holds one k (`dataset_action_repeat`). Extra keys (`seed`, `policy`, `env_id`)
are written too; readers ignore keys they do not know. A file is written under a hidden
temporary name and renamed when complete (utils.files.atomic_write), so a killed run leaves
no `rollout_I.npz` half written, only hidden temporaries, which `remove_partial_files` deletes;
a file damaged later (a full disk, a cut copy) fails `check_rollout`. Train/test split is by
rollout, never by frame.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from envs.carracing import ACTION_SIZE, MODEL_SIZE
from utils.cli import stage_command
from utils.errors import BadRolloutError, MissingInputError
from utils.files import atomic_write, is_temp_file

ROLLOUT_KEYS = ("observations", "actions", "rewards", "terminals")
ROLLOUT_SHAPES = {  # key -> (shape after T, dtype)
    "observations": ((MODEL_SIZE, MODEL_SIZE, 3), np.uint8),
    "actions": ((ACTION_SIZE,), np.float32),
    "rewards": ((), np.float32),
    "terminals": ((), np.bool_),
}
# zlib's fastest level: generation is CPU-bound, and slightly larger files cost only disk.
COMPRESS_LEVEL = 1
_NAME = re.compile(r"rollout_(\d+)\.npz")

# What a damaged file raises while being read: a bad zip, a bad deflate stream, a bad .npy.
BAD_FILE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class NoRolloutsError(MissingInputError):
    """No usable rollout under the dataset root; the message names the command that makes them."""


# -- naming ---------------------------------------------------------------------------------
def rollout_path(root: str | os.PathLike, index: int, thread: int | None = None) -> Path:
    """`root/thread_K/rollout_I.npz`, or `root/rollout_I.npz` without a thread."""
    folder = Path(root) if thread is None else Path(root) / f"thread_{thread}"
    return folder / f"rollout_{index}.npz"


def rollout_index(path: str | os.PathLike) -> int | None:
    """I of a `rollout_I.npz` path, or None for any other name."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


# -- write ----------------------------------------------------------------------------------
def save_rollout(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as a compressed .npz, atomically and byte-for-byte reproducibly.

    The format is exactly `numpy.savez_compressed`'s (a zip of `.npy` members), but every
    member gets a fixed timestamp so equal arrays give equal bytes (zip entries otherwise
    carry the time of writing, and the same rollout made twice would differ). The file is
    written under a hidden temporary name, fsynced, then renamed: a killed run never leaves
    a partial file that matches `rollout_*.npz`.
    """
    with atomic_write(path) as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for key, value in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asanyarray(value), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, buffer.getvalue(), compresslevel=COMPRESS_LEVEL)


def remove_partial_files(root: str | os.PathLike) -> int:
    """Delete the hidden temporaries a killed writer left under `root`; returns how many."""
    root = Path(root)
    stale = [p for p in root.rglob(".rollout_*") if is_temp_file(p)] if root.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# -- find -----------------------------------------------------------------------------------
def find_rollouts(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(index, path) of every complete `rollout_I.npz` under `root`, searched recursively
    (thread_K/ folders or flat), sorted by index (then path): the order, like the dataset, does
    not depend on how many workers made them. A missing root has none."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(rollout_index(p), p) for p in root.rglob("rollout_*.npz")]
    return sorted(((i, p) for i, p in found if i is not None), key=lambda item: (item[0], str(item[1])))


# -- read and validate ----------------------------------------------------------------------
def load_rollout(path: str | os.PathLike, keys: Sequence[str] = ROLLOUT_KEYS) -> dict[str, np.ndarray] | None:
    """The arrays of one rollout, or None (with one warning naming the file) if it is unusable.

    Unusable: not a readable zip/npz, a key missing, a wrong shape or dtype, or arrays whose
    lengths disagree. Readers ignore extra keys.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in keys}
    except BAD_FILE_ERRORS as error:
        warnings.warn(f"skipping unreadable rollout {path}: {type(error).__name__}: {error}", stacklevel=2)
        return None
    length = None
    for key, value in arrays.items():
        shape, dtype = ROLLOUT_SHAPES[key]
        if value.ndim != 1 + len(shape) or value.shape[1:] != shape or value.dtype != dtype:
            warnings.warn(
                f"skipping rollout {path}: {key} has shape {value.shape} {value.dtype}, expected (T, "
                f"{', '.join(map(str, shape))}) {np.dtype(dtype)}",
                stacklevel=2,
            )
            return None
        if length is None:
            length = len(value)
        elif len(value) != length or length == 0:
            warnings.warn(f"skipping rollout {path}: arrays have different or zero lengths", stacklevel=2)
            return None
    return arrays


def check_rollout(path: str | os.PathLike) -> int:
    """Cheap validity check: the number of steps of a rollout file; BadRolloutError if it is unusable.

    Opens the zip (a file cut short has no central directory and fails here), checks every
    key is present, and reads only the small arrays and the observations' .npy header, so
    scanning thousands of rollouts costs milliseconds each.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [k for k in ROLLOUT_KEYS if f"{k}.npy" not in set(archive.namelist())]
            if missing:
                raise ValueError(f"missing keys {missing}")
            with archive.open("observations.npy") as member:
                version = np.lib.format.read_magic(member)
                header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = header(member)
            with archive.open("rewards.npy") as member:
                rewards = np.lib.format.read_array(member)
    except BAD_FILE_ERRORS as error:
        raise BadRolloutError(f"unreadable rollout {path}: {type(error).__name__}: {error}") from None
    expected = (len(rewards), MODEL_SIZE, MODEL_SIZE, 3)
    if tuple(shape) != expected or dtype != np.uint8 or len(rewards) == 0:
        raise BadRolloutError(
            f"rollout {path}: observations {tuple(shape)} {dtype}, expected {expected} uint8"
        )
    return len(rewards)


def rollout_length(path: str | os.PathLike) -> int | None:
    """`check_rollout`'s length, or None with one warning naming the file (readers skip it)."""
    try:
        return check_rollout(path)
    except BadRolloutError as error:
        warnings.warn(f"skipping {error}", stacklevel=2)
        return None


def rollout_action_repeat(path: str | os.PathLike) -> int:
    """k of a rollout file: env frames per row (1 if the file does not say); BadRolloutError if unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "action_repeat.npy" not in archive.namelist():
                return 1
            with archive.open("action_repeat.npy") as member:
                k = np.lib.format.read_array(member, allow_pickle=False)
        if k.shape != () or k.dtype.kind not in "iu" or int(k) < 1:
            raise ValueError(f"action_repeat {k!r}")
        return int(k)
    except BAD_FILE_ERRORS as error:
        raise BadRolloutError(
            f"cannot read action_repeat of {path}: {type(error).__name__}: {error}"
        ) from None


def dataset_action_repeat(paths: Sequence[str | os.PathLike], root: str | os.PathLike) -> int:
    """The one k of `paths` (unreadable files skipped with a warning: no loader uses them);
    BadRolloutError (one line naming a file of each k) if they mix several."""
    found: dict[int, Path] = {}
    for path in paths:
        try:
            found.setdefault(rollout_action_repeat(path), Path(path))
        except BadRolloutError as error:
            warnings.warn(f"skipping rollout: {error}", stacklevel=2)
    if len(found) > 1:
        which = ", ".join(f"k={k} ({p})" for k, p in sorted(found.items()))
        raise BadRolloutError(
            f"{root} mixes rollouts of different action repeats: {which}; keep one k per dataset folder"
        )
    return next(iter(found), 1)


def dataset_paths(root: str | os.PathLike) -> tuple[list[Path], list[int]]:
    """The usable rollouts under `root` and their lengths.

    Unusable files are skipped with one warning each; none usable raises NoRolloutsError
    whose message is one line naming the command that makes a dataset in `root`.
    """
    paths = [path for _, path in find_rollouts(root)]
    if not paths:
        raise NoRolloutsError(
            f"no rollouts found under {root}; make them with: {stage_command('data', dataset=root)}"
        )
    lengths = [rollout_length(p) for p in paths]
    usable = [(p, n) for p, n in zip(paths, lengths) if n is not None]
    if not usable:
        raise NoRolloutsError(
            f"none of the {len(paths)} rollout files under {root} is usable; "
            f"regenerate them with: {stage_command('data', dataset=root)}"
        )
    return [p for p, _ in usable], [n for _, n in usable]


# -- split ----------------------------------------------------------------------------------
def split_rollouts(
    paths: Sequence[Path], test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """Deterministic train/test split by rollout: a seeded shuffle of the paths in rollout-index order.

    Ordered by index, not by path, so the split (and every later stage) is the same whatever
    number of workers spread the rollouts over `thread_K/` folders. At least one rollout goes
    to each side when there are two or more.
    """
    paths = sorted(paths, key=_index_order)
    if len(paths) < 2:
        return list(paths), []
    order = np.random.default_rng(seed).permutation(len(paths))
    n_test = min(max(1, round(len(paths) * test_fraction)), len(paths) - 1)
    test = sorted((paths[i] for i in order[:n_test]), key=_index_order)
    train = sorted((paths[i] for i in order[n_test:]), key=_index_order)
    return train, test


def _index_order(path: Path) -> tuple[int, str]:
    index = rollout_index(path)
    return (-1 if index is None else index, str(path))
