"""The worker pool: many small tasks on workers that each build their expensive state once.

    from pool import make_pool
    with make_pool("local", 4, init_worker, (logdir, True, config), task_timeout=600) as pool:
        returns = pool.map(episodes_task, tasks, on_result=lambda index, result: bar.update())

A pool never hangs and never loses work silently: a task that raises stops the map with
the worker's traceback (WorkerError); a worker that dies or runs past `task_timeout` is
replaced and its task rerun, up to `max_retries` times; Ctrl-C stops every worker. The rules
are written once, in pool/base.py, for both backends.

`make_pool(backend, ...)` picks the backend: spawned processes on this machine ("local",
pool/local.py), or the same interface on Ray actors ("ray", pool/ray_backend.py, imported
only then: Ray is optional).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pool.base import BasePool, WorkerError
from pool.local import WorkerPool
from utils import profile
from utils.cli import int_in
from utils.errors import BadInputError, StageError
from utils.files import atomic_write

__all__ = ["BACKENDS", "WorkerError", "add_pool_args", "check_backend", "make_pool", "worker_failure"]

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install -r requirements-ray.txt"


def add_pool_args(parser, workers_alias: str | None = None) -> None:
    """--workers (with ctallec/world-models' name for it as an alias), --backend and --ray-address,
    worded alike in every script that runs a pool."""
    names = ["--workers", *([workers_alias] if workers_alias else [])]
    also = f"; {workers_alias} is the same flag" if workers_alias else ""
    parser.add_argument(
        *names,
        dest="workers",
        type=int_in(1, 100_000),
        default=profile.WORKERS,
        help=f"worker processes (default: all CPU cores, {profile.WORKERS} here){also}",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local: worker processes on this machine (default); ray: Ray actors, on a cluster "
        f"or a local Ray (needs `{RAY_INSTALL}`)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        default=None,
        help="Ray cluster to join with --backend ray (default: $RAY_ADDRESS, else a local Ray "
        "started for this run)",
    )


def worker_failure(error: WorkerError, details_path: Path) -> StageError:
    """The one line a script stops with when its pool failed; the whole traceback goes to `details_path`."""
    last = next((line.strip() for line in reversed(str(error).splitlines()) if line.strip()), "unknown")
    with atomic_write(details_path, "w") as handle:
        handle.write(str(error))
    return StageError(f"a worker failed: {last} (full traceback in {details_path})")


def check_backend(backend: str, ray_address: str | None = None) -> None:
    """Stop with one line now, before any work, if `backend` cannot run here.

    Scripts call this right after parsing, so a missing Ray or an unreachable cluster is
    reported before anything is loaded, deleted or written.
    """
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "local":
        if ray_address:
            raise BadInputError("--ray-address needs --backend ray")
        return
    try:
        from pool import ray_backend  # optional dependency: only when asked for
    except ImportError as error:
        raise BadInputError(
            f"--backend ray needs Ray, which this Python cannot import ({error}); install it with: {RAY_INSTALL}"
        ) from None
    ray_backend.check_address(ray_address)


def make_pool(
    backend: str,
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
    task_timeout: float | None = None,
    max_retries: int = 2,
    log: Callable[[str], None] | None = None,
    ray_address: str | None = None,
) -> BasePool:
    """A started pool of the chosen backend: pool.local.WorkerPool or pool.ray_backend.RayPool.

    Both have `map(fn, tasks, on_result)`, `close()`, `pids`, `restarts`, `n_workers` and work
    as context managers, with the same failure semantics. Ray is imported only here (and in
    check_backend), so the local backend never needs it.
    """
    if backend == "local":
        if ray_address:
            raise ValueError("ray_address needs backend='ray'")
        return WorkerPool(
            workers, initializer, initargs, task_timeout=task_timeout, max_retries=max_retries, log=log
        )
    check_backend(backend, ray_address)
    from pool.ray_backend import RayPool  # optional dependency: only when asked for

    return RayPool(
        workers,
        initializer,
        initargs,
        task_timeout=task_timeout,
        max_retries=max_retries,
        log=log,
        address=ray_address,
    )
