"""Atomic file writes: the one place the temp-name + fsync + rename dance is written.

Every file the project writes (rollouts, checkpoints, caches, logs' plots, GIFs, reports)
goes through `atomic_write`, so a kill at any moment leaves either the previous complete
file or the new complete one, never a half file under the real name.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator


def temp_name(path: Path) -> Path:
    """The hidden temporary name `path` is written under (same folder, so rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it to `path`.

    On any error (Ctrl-C included) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_temp_file(path: Path) -> bool:
    """Whether `path` is a leftover of an interrupted `atomic_write`."""
    return path.name.startswith(".") and ".tmp" in path.name
