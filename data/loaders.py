"""Datasets over rollout files, with bounded memory.

- `FrameDataset`: shuffled batches of single frames, for V.
- `SequenceDataset`: windows of `seq_len` steps with the next step's values, for M.

Both read rollouts through `RolloutBuffer`, which holds at most `buffer_size` rollouts in
memory at a time (loading the next buffer in a background thread while the current one is
consumed), so memory is bounded however many rollouts the folder holds: about
`2 x buffer_size x 12.3 MB` for 1000-step rollouts of 64x64x3 uint8 frames (default
buffer_size=32: ~0.8 GB). Train/test split is by rollout, never by frame.

The file format itself (finding, reading, validating and splitting rollouts) is
data/rollouts.py's; this module only batches what it reads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from data.rollouts import ROLLOUT_KEYS, load_rollout
from envs.carracing import MODEL_SIZE

DEFAULT_BUFFER_SIZE = 32


class RolloutBuffer:
    """Iterates over rollouts in chunks of `buffer_size`, prefetching the next chunk.

    Unusable files are skipped with a warning (once per file per process). The first
    pass notes which files are usable.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        keys: Sequence[str] = ROLLOUT_KEYS,
    ) -> None:
        self.paths = list(paths)
        self.buffer_size = max(1, buffer_size)
        self.keys = tuple(keys)
        self._bad: set[Path] = set()

    def _load_chunk(self, chunk: Sequence[Path]) -> list[dict[str, np.ndarray]]:
        loaded = []
        for path in chunk:
            if path in self._bad:
                continue
            arrays = load_rollout(path, self.keys)
            if arrays is None:
                self._bad.add(path)
            else:
                loaded.append(arrays)
        return loaded

    def chunks(self, order: Sequence[int] | None = None) -> Iterator[list[dict[str, np.ndarray]]]:
        """Yield lists of at most `buffer_size` loaded rollouts, in `order` (default: sorted)."""
        order = range(len(self.paths)) if order is None else order
        groups = [
            [self.paths[i] for i in order[s : s + self.buffer_size]]
            for s in range(0, len(order), self.buffer_size)
        ]
        if not groups:
            return
        result: dict[int, list] = {}

        def load(k: int) -> None:
            result[k] = self._load_chunk(groups[k])

        thread = threading.Thread(target=load, args=(0,))
        thread.start()
        for k in range(len(groups)):
            thread.join()
            current = result.pop(k)
            if k + 1 < len(groups):  # decompress the next chunk while this one is consumed
                thread = threading.Thread(target=load, args=(k + 1,))
                thread.start()
            yield current

    def usable_count(self) -> int:
        """Number of usable rollouts (reads every file once; cheap relative to training)."""
        return sum(len(chunk) for chunk in self.chunks())


class FrameDataset:
    """Batches of single frames, uint8 (B, 64, 64, 3) torch tensors.

    `shuffle=True`: rollouts in a new random order each epoch, frames shuffled within each
    buffer (the best shuffle bounded memory allows). `shuffle=False`: a fixed order, e.g. the
    same test set every epoch. Conversion to float happens on the model's device.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        batch_size: int = 32,
        shuffle: bool = True,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        seed: int = 0,
    ) -> None:
        self.buffer = RolloutBuffer(paths, buffer_size, keys=("observations",))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the shuffle of the next pass depend on `epoch` (reproducible resumes)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.buffer.paths)) if self.shuffle else None
        leftover = np.empty((0, MODEL_SIZE, MODEL_SIZE, 3), dtype=np.uint8)
        for chunk in self.buffer.chunks(order):
            if not chunk:
                continue
            frames = np.concatenate([leftover] + [r["observations"] for r in chunk])
            if self.shuffle:
                frames = frames[rng.permutation(len(frames))]
            n_full = len(frames) // self.batch_size * self.batch_size
            for start in range(0, n_full, self.batch_size):
                yield torch.from_numpy(frames[start : start + self.batch_size])
            leftover = frames[n_full:]
        if len(leftover):
            yield torch.from_numpy(np.ascontiguousarray(leftover))


def sequence_windows(
    lengths: Sequence[int], seq_len: int, rng: np.random.Generator | None = None
) -> list[tuple[int, int]]:
    """(rollout, start) of `seq_len` windows covering every step of every rollout.

    Windows are full length whenever the rollout is long enough: they tile the rollout from
    an offset (random in [0, seq_len) with `rng`, so successive epochs see different cuts;
    0 without, a fixed test set), plus one window at the start and one ending at the last
    step if the tiling left steps uncovered (those overlap their neighbour a little). A
    rollout shorter than `seq_len` gives one window, padded and masked.
    """
    windows = []
    for rollout, length in enumerate(lengths):
        if length <= seq_len:
            windows.append((rollout, 0))
            continue
        offset = int(rng.integers(seq_len)) if rng is not None else 0
        starts = list(range(offset, length - seq_len + 1, seq_len))
        if offset > 0:
            starts.insert(0, 0)
        if starts[-1] + seq_len < length:
            starts.append(length - seq_len)
        windows.extend((rollout, start) for start in starts)
    return windows


def collate_windows(
    rollouts: Sequence[dict[str, np.ndarray]],
    windows: Sequence[tuple[int, int]],
    seq_len: int,
    next_keys: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Stack windows into (B, seq_len, ...) tensors, zero-padded, with masks.

    For every key X in a rollout: `X` holds steps t..t+seq_len-1. For keys in `next_keys`,
    `next_X` holds steps t+1..t+seq_len. `mask` (B, seq_len) marks real steps; `next_mask`
    marks steps whose next value exists (a rollout stores no frame after its last action,
    so its last step has reward and terminal but no next frame).
    """
    batch: dict[str, np.ndarray] = {}
    size = len(windows)
    mask = np.zeros((size, seq_len), dtype=bool)
    next_mask = np.zeros((size, seq_len), dtype=bool)
    for b, (r, start) in enumerate(windows):
        rollout = rollouts[r]
        length = len(next(iter(rollout.values())))
        n = min(seq_len, length - start)
        mask[b, :n] = True
        n_next = max(0, min(seq_len, length - start - 1))
        next_mask[b, :n_next] = True
        for key, value in rollout.items():
            if key not in batch:
                batch[key] = np.zeros((size, seq_len) + value.shape[1:], dtype=value.dtype)
            batch[key][b, :n] = value[start : start + n]
            if key in next_keys:
                name = f"next_{key}"
                if name not in batch:
                    batch[name] = np.zeros((size, seq_len) + value.shape[1:], dtype=value.dtype)
                batch[name][b, :n_next] = value[start + 1 : start + 1 + n_next]
    out = {key: torch.from_numpy(value) for key, value in batch.items()}
    out["mask"], out["next_mask"] = torch.from_numpy(mask), torch.from_numpy(next_mask)
    return out


class SequenceDataset:
    """Batches of `seq_len`-step windows with the next step's values, for M.

    `source` is either rollout file paths (read through a bounded `RolloutBuffer`; windows
    are shuffled within each buffer) or a list of in-memory rollout dicts (e.g. the latent
    cache: per-step arrays of equal length). Yields dicts of (B, seq_len, ...) tensors, see
    `collate_windows`; `next_keys` names the keys whose next step is wanted.
    """

    def __init__(
        self,
        source: Sequence[Path] | Sequence[dict[str, np.ndarray]],
        seq_len: int,
        batch_size: int = 16,
        shuffle: bool = True,
        next_keys: Sequence[str] = ("observations",),
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        seed: int = 0,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        in_memory = len(source) > 0 and isinstance(source[0], dict)
        self.rollouts = list(source) if in_memory else None
        self.buffer = None if in_memory else RolloutBuffer(source, buffer_size)
        self.seq_len, self.batch_size, self.shuffle = seq_len, batch_size, shuffle
        self.next_keys = tuple(next_keys)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunks(self, rng: np.random.Generator | None) -> Iterator[list[dict[str, np.ndarray]]]:
        if self.rollouts is not None:
            yield self.rollouts
        else:
            order = rng.permutation(len(self.buffer.paths)) if rng is not None else None
            yield from self.buffer.chunks(order)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        for chunk in self._chunks(rng):
            lengths = [len(next(iter(r.values()))) for r in chunk]
            windows = sequence_windows(lengths, self.seq_len, rng)
            if rng is not None:
                windows = [windows[i] for i in rng.permutation(len(windows))]
            for start in range(0, len(windows), self.batch_size):
                yield collate_windows(
                    chunk, windows[start : start + self.batch_size], self.seq_len, self.next_keys
                )

    def __len__(self) -> int:
        """Batches per pass for in-memory sources: exact unshuffled; shuffled passes, whose
        random offsets may add a window per rollout, can yield a few more."""
        if self.rollouts is None:
            raise TypeError("len() is only known for in-memory sources")
        lengths = [len(next(iter(r.values()))) for r in self.rollouts]
        return math.ceil(len(sequence_windows(lengths, self.seq_len)) / self.batch_size)
