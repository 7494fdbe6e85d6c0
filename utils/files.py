"""Atomic file writes: the one place the temp-name + fsync + rename dance is written.

Every file the project writes (rollouts, checkpoints, caches, logs' plots, GIFs, reports)
goes through `atomic_write`, so a kill at any moment leaves either the previous complete
file or the new complete one, never a half file under the real name. The temporary a killed
writer leaves behind is deleted by `remove_orphaned_temps` when a stage starts (generation
has `data.rollouts.remove_partial_files` for its rollouts).

Fault injection (tests/test_faults.py): with WORLD_MODELS_KILL_AT_WRITE=N in the environment
the run is SIGKILLed inside its N-th atomic write, after the temporary file is written and
before the rename, the worst moment for a kill. "The run": the process writing and, when that
is a pool worker, its main process first, so the command dies as under `kill -9` instead of
the pool quietly replacing the worker. Writes are counted per process, or across every
process of the run (the main one and its workers) when WORLD_MODELS_KILL_COUNTER names a file:
each write appends one byte to it under a lock, so its size is the run's writes so far
(counted even when N is 0: tests read how many writes a stage makes).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import IO

KILL_AT_WRITE = int(os.environ.get("WORLD_MODELS_KILL_AT_WRITE", "0") or 0)  # fault injection only; 0: never
KILL_COUNTER = os.environ.get("WORLD_MODELS_KILL_COUNTER", "")  # a file: count writes across processes
_writes = 0  # atomic writes done by this process


def _count_write() -> int:
    """The number of this atomic write: in this process, or in the run (KILL_COUNTER, see the docstring)."""
    global _writes
    if not KILL_COUNTER:
        _writes += 1
        return _writes
    import fcntl  # fault injection only (POSIX)

    with open(KILL_COUNTER, "ab") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)  # released when the file is closed
        counter.write(b".")
        counter.flush()
        return os.fstat(counter.fileno()).st_size


def _kill_run() -> None:
    """SIGKILL the run: a pool worker's main process first, then this process."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid:
        os.kill(parent.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def temp_name(path: Path, pid: int | None = None) -> Path:
    """The hidden temporary name `path` is written under (same folder, so rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}.tmp{path.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _writer_pid(tmp: Path) -> int | None:
    """The writer's pid in a temporary's name (`.NAME.PID.tmpSUFFIX`), or None."""
    head = tmp.name.rsplit(".tmp", 1)[0].rsplit(".", 1)
    return int(head[1]) if len(head) == 2 and head[1].isdigit() else None


def _orphaned(tmp: Path) -> bool:
    pid = _writer_pid(tmp)
    return pid is not None and pid != os.getpid() and not _alive(pid)


def remove_orphaned_temps(folder: str | os.PathLike) -> int:
    """Delete the temporaries under `folder` whose writer was killed (its process is gone); returns how many.

    Stages call it when they start, so that a kill inside the write of a file the rerun does
    not write again still leaves no temporary behind.
    """
    folder = Path(folder)
    orphans = (
        [p for p in folder.rglob(".*.tmp*") if is_temp_file(p) and _orphaned(p)] if folder.is_dir() else []
    )
    for tmp in orphans:
        tmp.unlink(missing_ok=True)
    return len(orphans)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it to `path`.

    On any error (Ctrl-C included) the temporary file is removed and `path` is untouched.
    """
    global _writes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if (KILL_AT_WRITE or KILL_COUNTER) and _count_write() == KILL_AT_WRITE:
            _kill_run()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_temp_file(path: Path) -> bool:
    """Whether `path` is a leftover of an interrupted `atomic_write`."""
    return path.name.startswith(".") and ".tmp" in path.name
