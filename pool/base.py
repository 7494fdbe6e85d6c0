"""The pool's bookkeeping, written once for every backend.

A backend (pool/local.py: spawned processes; pool/ray_backend.py: Ray actors) only starts and
stops one worker, sends it a task and reports what happened since the last look, as events
(see `BasePool._poll`). Everything else is here, so both backends fail alike:

- a task that raises stops the whole map and re-raises in the main process as WorkerError
  with the worker's traceback (a bug is not retried); so does an initializer that raises;
- a worker that dies (segfault, OOM kill, `kill -9`, a lost node) or runs one task past
  `task_timeout` is reported, replaced by a fresh worker, and its task is run again, up to
  `max_retries` times per task; the next death is one WorkerError line ("giving up");
- a worker that dies while starting up (before its initializer has finished) is replaced
  too; `max_retries + 1` such deaths in a row, with no worker starting meanwhile, are one
  WorkerError line;
- a task's clock starts when it starts running on its worker (the backend says when), so
  the worker's start-up and the import of the task's module never count against it;
- any exception in `map` (Ctrl-C, a task error, `on_result` raising) stops every worker
  before it propagates: nothing keeps running behind the caller's back.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

_POLL_S = 0.5  # longest wait for news from the workers before checking timeouts again


class WorkerError(RuntimeError):
    """A task or initializer raised inside a worker, or workers kept dying; the message says which."""


@dataclass(eq=False)  # slots are compared by identity
class Slot:
    """One worker as the pool sees it; a backend subclasses it with its process or actor."""

    ready: bool = False  # its initializer has finished
    task_id: int | None = None  # the task it holds
    started: float | None = None  # when that task began running there; None until then


# What a backend's `_poll` reports: (slot, kind, payload), kind one of
#   "ready"       the initializer finished                      payload None
#   "init_error"  the initializer raised                        payload: traceback text
#   "started"     the slot's task began running                 payload None
#   "ok"          the slot's task returned                      payload: its result
#   "error"       the slot's task raised                        payload: traceback text
#   "died"        the worker is gone (killed, crashed, lost)    payload: why, e.g. "died (exit code -9)"
Event = tuple[Slot, str, Any]


@dataclass
class _Run:
    """One `map` call: its tasks and how far they got."""

    tasks: list[tuple]
    on_result: Callable[[int, Any], None] | None
    pending: list[int] = field(default_factory=list)  # a stack, next task at the end
    results: dict[int, Any] = field(default_factory=dict)
    retries: dict[int, int] = field(default_factory=dict)  # worker deaths and timeouts per task

    def describe(self, task_id: int) -> str:
        return f"task {task_id} {self.tasks[task_id]!r}"


class BasePool:
    """`workers` workers running `fn(*args)` tasks; see the module docstring for failures.

    Use as a context manager; `map` may be called many times (one CMA-ES generation each)
    and reuses the same initialised workers.
    """

    startup_hint = ""  # appended to "died while starting up ... giving up" (what to check)

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
        self.initargs = tuple(initargs)
        self.task_timeout = task_timeout
        self.max_retries = max_retries
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.restarts = 0  # workers replaced after a death or a timeout, over the pool's life
        self._startup_deaths = 0  # workers that died starting up since one last became ready
        self._slots: list[Slot] = []
        try:
            self._open()
            self._slots = [self._start() for _ in range(self.n_workers)]
        except BaseException:
            self.close()
            raise

    # -- what a backend implements -------------------------------------------------------
    def _open(self) -> None:
        """Prepare to start workers (may lower `n_workers` to what can run)."""

    def _start(self) -> Slot:
        """Start one worker running the initializer; it reports "ready" or "init_error"."""
        raise NotImplementedError

    def _stop(self, slot: Slot) -> None:
        """Stop this worker now, whatever it is doing (it may be dead already)."""
        raise NotImplementedError

    def _send(self, slot: Slot, fn: Callable, args: tuple) -> bool:
        """Hand `fn(*args)` (task `slot.task_id`) to the worker.

        True if the task's clock starts now; False if the backend reports "started" later.
        """
        raise NotImplementedError

    def _poll(self, timeout: float) -> list[Event]:
        """What happened since the last call, waiting up to `timeout` seconds for something."""
        raise NotImplementedError

    def _name(self, slot: Slot) -> str:
        """The worker as log lines name it, e.g. "worker pid 123"."""
        raise NotImplementedError

    def _portable(self, fn: Callable) -> Any:
        """`fn` in the form sent to workers."""
        return fn

    def _shutdown(self) -> None:
        """After every worker has stopped: release what `_open` acquired."""

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop all workers now (idempotent)."""
        slots, self._slots = self._slots, []
        for slot in slots:
            self._stop(slot)
        self._shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running tasks -------------------------------------------------------------------
    def map(
        self, fn: Callable, tasks: Iterable[tuple], on_result: Callable[[int, Any], None] | None = None
    ) -> list:
        """Run `fn(*task)` for every task on the workers; results in task order.

        `on_result(index, result)` is called in the main process as each task finishes
        (progress bars). `fn` must be importable by name (a module-level function).
        """
        if not self._slots:
            raise RuntimeError("the pool is closed")
        run = _Run(list(tasks), on_result)
        run.pending = list(range(len(run.tasks)))[::-1]
        portable = self._portable(fn)
        try:
            while len(run.results) < len(run.tasks):
                self._dispatch(run, portable)
                for slot, kind, payload in self._poll(_POLL_S):
                    self._handle(run, slot, kind, payload)
                self._check_timeouts(run)
        except BaseException:
            # Ctrl-C or a task error: nothing may keep running behind the caller's back.
            self.close()
            raise
        return [run.results[i] for i in range(len(run.tasks))]

    def _dispatch(self, run: _Run, fn: Any) -> None:
        """Give every idle, started worker the next pending task."""
        for slot in self._slots:
            if slot.ready and slot.task_id is None and run.pending:
                slot.task_id, slot.started = run.pending.pop(), None
                if self._send(slot, fn, tuple(run.tasks[slot.task_id])):
                    slot.started = time.monotonic()

    def _handle(self, run: _Run, slot: Slot, kind: str, payload: Any) -> None:
        if slot not in self._slots:  # news from a worker replaced meanwhile
            return
        if kind == "ready":
            slot.ready, self._startup_deaths = True, 0
        elif kind == "init_error":
            raise WorkerError(f"a worker failed to start:\n{payload}")
        elif kind == "started":
            if slot.task_id is not None and slot.started is None:
                slot.started = time.monotonic()
        elif kind == "ok":
            task_id, slot.task_id, slot.started = slot.task_id, None, None
            run.results[task_id] = payload
            if run.on_result is not None:
                run.on_result(task_id, payload)
        elif kind == "error":
            raise WorkerError(f"{run.describe(slot.task_id)} failed in a worker:\n{payload}")
        elif kind == "died":
            self._replace(run, slot, payload)
        else:
            raise AssertionError(f"unknown event {kind!r} from a pool backend")

    def _check_timeouts(self, run: _Run) -> None:
        if self.task_timeout is None:
            return
        now = time.monotonic()
        for slot in list(self._slots):
            if slot.started is not None and now - slot.started > self.task_timeout:
                self._replace(run, slot, f"ran over {self.task_timeout:.0f}s")

    def _replace(self, run: _Run, slot: Slot, reason: str) -> None:
        """Stop `slot`'s worker and start another; rerun its task, or give up with one line."""
        self._stop(slot)
        task_id = slot.task_id
        if task_id is not None:
            run.retries[task_id] = run.retries.get(task_id, 0) + 1
            if run.retries[task_id] > self.max_retries:
                raise WorkerError(
                    f"{run.describe(task_id)}: its worker {reason}, {self.max_retries + 1} times; giving up"
                )
            run.pending.append(task_id)
            news = f"on task {task_id}; replacing it and rerunning the task"
        elif not slot.ready:
            self._startup_deaths += 1
            if self._startup_deaths > self.max_retries:
                raise WorkerError(
                    f"a worker {reason} while starting up, {self.max_retries + 1} times in a row; "
                    f"giving up{self.startup_hint}"
                )
            news = "while starting up; replacing it"
        else:
            news = "while idle; replacing it"
        self.restarts += 1
        self._slots[self._slots.index(slot)] = self._start()
        self.log(f"warning: {self._name(slot)} {reason} {news}")
