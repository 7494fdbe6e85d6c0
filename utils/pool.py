"""A process pool that never hangs and never loses work silently.

Workers build their expensive state once (`initializer`: load V and M, make an env) and
then run many small tasks (one rollout, one episode). The pool watches every worker:

- a task that raises stops the whole map and re-raises in the main process with the
  worker's traceback (a bug is not retried);
- a worker that dies (segfault, OOM kill, `kill -9`) or runs one task past `task_timeout`
  is reported, replaced by a fresh worker, and its task is run again, up to `max_retries`
  times per task;
- Ctrl-C in the main process stops every worker (they ignore SIGINT themselves, so the
  main process decides how to shut down).

Unlike `concurrent.futures.ProcessPoolExecutor`, one dead worker does not break the pool,
and a hung one is noticed. Workers are started with "spawn": no inherited locks or threads,
the same behaviour on Linux, macOS and Windows.

`make_pool(backend, ...)` picks the backend: this pool ("local"), or the same interface on
Ray actors ("ray", utils/ray_pool.py, imported only then: Ray is optional).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Sequence


class WorkerError(RuntimeError):
    """A task or initializer raised inside a worker; the message holds its traceback."""


def _worker_main(conn: Connection, initializer: Callable | None, initargs: tuple) -> None:
    """Worker process: initialise once, then run (task_id, fn, args) messages until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One compute thread per worker: the pool supplies the parallelism; oversubscribed
    # BLAS/OpenMP threads would only fight over the same cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        if initializer is not None:
            initializer(*initargs)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        conn.send(("ready", None, None))
    except BaseException:
        conn.send(("init_error", None, traceback.format_exc()))
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, fn, args = message
        try:
            conn.send(("ok", task_id, fn(*args)))
        except BaseException:
            conn.send(("error", task_id, traceback.format_exc()))


@dataclass
class _Worker:
    process: mp.Process
    conn: Connection
    ready: bool = False
    task_id: int | None = None
    started: float = 0.0


@dataclass
class _Progress:
    results: dict[int, Any] = field(default_factory=dict)
    retries: dict[int, int] = field(default_factory=dict)


class WorkerPool:
    """`workers` processes running `fn(*args)` tasks; see the module docstring for failures.

    Use as a context manager; `map` may be called many times (one CMA-ES generation each)
    and reuses the same initialised workers.
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable | None = None,
        initargs: tuple = (),
        task_timeout: float | None = None,
        max_retries: int = 2,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.n_workers = workers
        self.initializer = initializer
        self.initargs = initargs
        self.task_timeout = task_timeout
        self.max_retries = max_retries
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.restarts = 0  # workers replaced after a crash or a timeout, over the pool's life
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = [self._start_worker() for _ in range(workers)]

    # -- lifecycle -----------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, self.initializer, self.initargs), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def _stop_worker(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()

    def close(self) -> None:
        """Stop all workers now (idempotent)."""
        for worker in self._workers:
            try:
                if worker.process.is_alive() and worker.task_id is None and worker.ready:
                    worker.conn.send(None)
                    worker.process.join(timeout=1)
            except (OSError, BrokenPipeError):
                pass
            self._stop_worker(worker)
        self._workers = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (tests kill one to check recovery)."""
        return [worker.process.pid for worker in self._workers]

    # -- running tasks -------------------------------------------------------------------
    def map(self, fn: Callable, tasks: Iterable[tuple], on_result: Callable[[int, Any], None] | None = None) -> list:
        """Run `fn(*task)` for every task on the workers; results in task order.

        `on_result(index, result)` is called in the main process as each task finishes
        (progress bars). `fn` must be importable by name (a module-level function).
        """
        if not self._workers:
            raise RuntimeError("the pool is closed")
        pending: list[int] = list(range(len(tasks := list(tasks))))[::-1]  # stack, next task at the end
        progress = _Progress()
        try:
            while len(progress.results) < len(tasks):
                self._dispatch(fn, tasks, pending)
                self._collect(tasks, pending, progress, on_result)
        except BaseException:
            # Ctrl-C or a task error: nothing may keep running behind the caller's back.
            self.close()
            raise
        return [progress.results[i] for i in range(len(tasks))]

    def _dispatch(self, fn: Callable, tasks: Sequence[tuple], pending: list[int]) -> None:
        for worker in self._workers:
            if worker.ready and worker.task_id is None and pending:
                task_id = pending.pop()
                worker.conn.send((task_id, fn, tuple(tasks[task_id])))
                worker.task_id, worker.started = task_id, time.monotonic()

    def _collect(self, tasks: Sequence[tuple], pending: list[int], progress: _Progress, on_result) -> None:
        waitables = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
        wait(waitables, timeout=1.0)
        for index, worker in enumerate(self._workers):
            while worker.conn.poll():
                try:
                    kind, task_id, payload = worker.conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "ready":
                    worker.ready = True
                elif kind == "ok":
                    worker.task_id = None
                    progress.results[task_id] = payload
                    if on_result is not None:
                        on_result(task_id, payload)
                elif kind == "init_error":
                    raise WorkerError(f"a worker failed to start:\n{payload}")
                else:
                    raise WorkerError(f"task {task_id} {tasks[task_id]!r} failed in a worker:\n{payload}")
            timed_out = (
                worker.task_id is not None
                and self.task_timeout is not None
                and time.monotonic() - worker.started > self.task_timeout
            )
            if not worker.process.is_alive() or timed_out:
                self._replace(index, pending, progress, tasks, timed_out)

    def _replace(self, index: int, pending: list[int], progress: _Progress, tasks: Sequence[tuple], timed_out: bool) -> None:
        worker = self._workers[index]
        reason = f"ran over {self.task_timeout:.0f}s" if timed_out else f"died (exit code {worker.process.exitcode})"
        task_id = worker.task_id
        self._stop_worker(worker)
        if task_id is None and not worker.ready:
            raise WorkerError(f"a worker {reason} while starting up")
        self.restarts += 1
        if task_id is not None:
            progress.retries[task_id] = progress.retries.get(task_id, 0) + 1
            if progress.retries[task_id] > self.max_retries:
                raise WorkerError(f"task {task_id} {tasks[task_id]!r}: its worker {reason}, {self.max_retries + 1} times; giving up")
            pending.append(task_id)
            self.log(f"warning: worker pid {worker.process.pid} {reason} on task {task_id}; replacing it and rerunning the task")
        else:
            self.log(f"warning: idle worker pid {worker.process.pid} {reason}; replacing it")
        self._workers[index] = self._start_worker()


# -- backends ----------------------------------------------------------------------------------
BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install -r requirements-ray.txt"


def add_backend_args(parser) -> None:
    """--backend and --ray-address, worded alike in every script that runs a pool."""
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help="local: worker processes on this machine (default); ray: Ray actors, on a cluster "
                             f"or a local Ray (needs `{RAY_INSTALL}`)")
    parser.add_argument("--ray-address", metavar="HOST:PORT", default=None,
                        help="Ray cluster to join with --backend ray (default: $RAY_ADDRESS, else a local Ray "
                             "started for this run)")


def check_backend(backend: str, ray_address: str | None = None) -> None:
    """Stop with one line now, before any work, if `backend` cannot run here.

    Scripts call this right after parsing, so a missing Ray or an unreachable cluster is
    reported before anything is loaded, deleted or written.
    """
    from utils.checkpoint import fail  # torch: keep this module light for spawned workers

    if backend not in BACKENDS:
        fail(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "local":
        if ray_address:
            fail("--ray-address needs --backend ray")
        return
    try:
        from utils import ray_pool
    except ImportError as error:
        fail(f"--backend ray needs Ray, which this Python cannot import ({error}); install it with: {RAY_INSTALL}")
    ray_pool.check_address(ray_address)


def make_pool(
    backend: str,
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
    task_timeout: float | None = None,
    max_retries: int = 2,
    log: Callable[[str], None] | None = None,
    ray_address: str | None = None,
):
    """A started pool of the chosen backend: WorkerPool ("local") or utils.ray_pool.RayPool ("ray").

    Both have `map(fn, tasks, on_result)`, `close()`, `restarts`, `n_workers` and work as
    context managers, with the same failure semantics. Ray is imported only here, so the
    local backend never needs it.
    """
    if backend == "local":
        if ray_address:
            raise ValueError("ray_address needs backend='ray'")
        return WorkerPool(workers, initializer, initargs, task_timeout=task_timeout, max_retries=max_retries, log=log)
    check_backend(backend, ray_address)
    from utils.ray_pool import RayPool

    return RayPool(workers, initializer, initargs, task_timeout=task_timeout, max_retries=max_retries, log=log,
                   address=ray_address)
