"""The local backend: a process pool that never hangs and never loses work silently.

Workers build their expensive state once (`initializer`: load V and M, make an env) and
then run many small tasks (one rollout, one episode). The pool watches every worker, with
the failure semantics of pool/base.py (a task that raises stops the map with its traceback;
a worker that dies or runs past `task_timeout` is replaced and its task rerun, up to
`max_retries` times). Ctrl-C in the main process stops every worker (they ignore SIGINT
themselves, so the main process decides how to shut down).

Unlike `concurrent.futures.ProcessPoolExecutor`, one dead worker does not break the pool,
and a hung one is noticed. Workers are started with "spawn": no inherited locks or threads,
the same behaviour on Linux, macOS and Windows.

A worker says "started" when it has received a task, i.e. after unpickling it, which
imports the task's module: that import is not timed. A worker whose main process is gone
(killed with `kill -9`) leaves at once and quietly, without finishing its task.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from pool.base import BasePool, Event, Slot


# -- the worker process ------------------------------------------------------------------------
def _exit_with_parent() -> None:
    """Leave quietly as soon as the main process is gone: nobody is left to stop us or read results."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _reply(conn: Connection, message: tuple) -> bool:
    """Send `message` to the main process; False if it is gone (then the worker just leaves)."""
    try:
        conn.send(message)
        return True
    except OSError:  # BrokenPipeError among them
        return False


def _worker_main(conn: Connection, initializer: Callable | None, initargs: tuple) -> None:
    """Worker process: initialise once, then run (task_id, fn, args) messages until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    # One compute thread per worker: the pool supplies the parallelism; oversubscribed
    # BLAS/OpenMP threads would only fight over the same cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        if initializer is not None:
            initializer(*initargs)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        ready = ("ready", None, None)
    except BaseException:
        ready = ("init_error", None, traceback.format_exc())
    if not _reply(conn, ready) or ready[0] != "ready":
        return
    while True:
        try:
            message = conn.recv()  # unpickling it imports the task's module: before the clock starts
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, fn, args = message
        if not _reply(conn, ("started", task_id, None)):
            return
        try:
            result = ("ok", task_id, fn(*args))
        except BaseException:
            result = ("error", task_id, traceback.format_exc())
        if not _reply(conn, result):
            return


# -- the main process's side -------------------------------------------------------------------
@dataclass(eq=False)
class _Worker(Slot):
    process: mp.Process | None = None
    conn: Connection | None = None


class WorkerPool(BasePool):
    """`workers` spawned processes running `fn(*args)` tasks; see the module docstring."""

    def _open(self) -> None:
        self._ctx = mp.get_context("spawn")

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main, args=(child, self.initializer, self.initargs), daemon=True
        )
        process.start()
        child.close()
        return _Worker(process=process, conn=parent)

    def _stop(self, worker: _Worker) -> None:
        if worker.process.is_alive() and worker.ready and worker.task_id is None:
            if _reply(worker.conn, None):  # an idle worker may leave by itself
                worker.process.join(timeout=1)
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()

    def _send(self, worker: _Worker, fn: Callable, args: tuple) -> bool:
        # A worker that died just now cannot take it: _poll reports the death, the task is rerun.
        _reply(worker.conn, (worker.task_id, fn, args))
        return False  # the worker says "started" once it has the task in hand

    def _poll(self, timeout: float) -> list[Event]:
        wait([w.conn for w in self._slots] + [w.process.sentinel for w in self._slots], timeout=timeout)
        events: list[Event] = []
        for worker in self._slots:
            dead = not worker.process.is_alive()  # before reading, so nothing it sent is missed
            while worker.conn.poll():
                try:
                    kind, _task_id, payload = worker.conn.recv()
                except (EOFError, OSError):
                    break
                events.append((worker, kind, payload))
            if dead:
                events.append((worker, "died", f"died (exit code {worker.process.exitcode})"))
        return events

    def _name(self, worker: _Worker) -> str:
        return f"worker pid {worker.process.pid}"

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (tests kill one to check recovery)."""
        return [worker.process.pid for worker in self._slots]
