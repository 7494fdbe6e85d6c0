"""utils.pool.WorkerPool: crashed, hung and failing workers never hang or silently lose work.

Task functions live at module level (spawned workers import them by name); the module
imports nothing heavy, so workers start fast.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from utils.pool import WorkerError, WorkerPool


def square_after(x: int, delay: float) -> int:
    time.sleep(delay)
    return x * x


def die_once(x: int, marker: str) -> int:
    """Task 0 SIGKILLs its own worker the first time (as the OOM killer would), then succeeds.

    Only task 0: with two workers, two tasks racing on the marker could both die."""
    if x == 0 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 100


def hang_once(x: int, marker: str) -> int:
    """Hangs the first time (a stuck env), then succeeds."""
    if not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(3600)
    return -x


def hang_always(x: int) -> int:
    time.sleep(3600)
    return x


def boom(x: int) -> int:
    if x == 2:
        raise ValueError(f"boom on task {x}")
    return x


def test_map_returns_results_in_task_order():
    with WorkerPool(2) as pool:
        assert pool.map(square_after, [(x, 0.05 * (5 - x)) for x in range(6)]) == [x * x for x in range(6)]
        assert pool.map(square_after, [(7, 0.0)]) == [49]  # the same workers serve many maps
        assert pool.restarts == 0


def test_worker_killing_itself_is_replaced_and_task_rerun(tmp_path):
    logs: list[str] = []
    with WorkerPool(2, log=logs.append) as pool:
        results = pool.map(die_once, [(x, str(tmp_path / "died")) for x in range(5)])
        assert results == [x + 100 for x in range(5)]
        assert pool.restarts == 1
    assert any("died" in line and "rerunning" in line for line in logs)


def test_kill_9_from_outside_mid_map():
    """kill -9 a busy worker while map waits: the map completes with every result."""
    killed: list[int] = []
    with WorkerPool(2, log=lambda text: None) as pool:

        def on_result(index: int, result: int) -> None:
            if not killed:  # first result: the other worker is mid-task; shoot both current pids
                for pid in pool.pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

        start = time.monotonic()
        results = pool.map(square_after, [(x, 0.3) for x in range(6)], on_result=on_result)
        assert results == [x * x for x in range(6)]
        assert pool.restarts >= 1
        assert not set(killed) & set(pool.pids)
        assert time.monotonic() - start < 60


def test_hung_task_hits_timeout_and_is_rerun(tmp_path):
    logs: list[str] = []
    with WorkerPool(2, task_timeout=1.5, log=logs.append) as pool:
        start = time.monotonic()
        assert pool.map(hang_once, [(x, str(tmp_path / "hung")) for x in range(4)]) == [0, -1, -2, -3]
        assert time.monotonic() - start < 30
        assert pool.restarts == 1
    assert any("ran over" in line for line in logs)


def test_task_hanging_every_time_gives_up():
    with WorkerPool(1, task_timeout=0.5, max_retries=1, log=lambda text: None) as pool:
        with pytest.raises(WorkerError, match="giving up"):
            pool.map(hang_always, [(1,)])


def test_task_raising_gives_worker_error_with_traceback():
    start = time.monotonic()
    pool = WorkerPool(2)
    pids = pool.pids
    with pytest.raises(WorkerError) as info:
        pool.map(boom, [(x,) for x in range(5)])
    text = str(info.value)
    assert "Traceback" in text and "ValueError: boom on task 2" in text
    assert time.monotonic() - start < 30
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)  # the pool stopped its workers


def test_interrupt_stops_every_worker():
    pool = WorkerPool(2)

    def on_result(index: int, result: int) -> None:
        raise KeyboardInterrupt  # what Ctrl-C raises in the main process

    pids = pool.pids
    with pytest.raises(KeyboardInterrupt):
        pool.map(square_after, [(x, 0.2) for x in range(6)], on_result=on_result)
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """Whether a process exists (the pool joins the workers it stops, so none lingers as a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
