"""pool.local.WorkerPool: crashed, hung and failing workers never hang or silently lose work.

Task functions live at module level (spawned workers import them by name); the module
imports nothing heavy, so workers start fast.

Nothing here waits a fixed time for something to happen: tests wait on a file a worker
writes or on a process state, with minutes of slack (`wait_until`), and a watchdog fails a
test whose map would hang. Task timeouts stay short only where the timed-out task hangs for
an hour, so that a busy machine cannot make a correct task look hung: a healthy task that
still runs over its timeout is rerun by the pool, and the assertions allow for that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pool import WorkerError
from pool.local import WorkerPool

ROOT = Path(__file__).resolve().parents[1]


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


def first_to_claim(marker: str) -> bool:
    """True for exactly one caller, in any process: creating the file is the test and the claim at once."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def hang_once(x: int, marker: str) -> int:
    """Hangs the first time (a stuck env), then succeeds; only one task of the map hangs, and
    the marker says which."""
    if first_to_claim(marker):
        Path(marker).write_text(str(x))
        time.sleep(3600)
    return -x


def start_then_sleep(marker: str, seconds: float) -> None:
    """Says it is running (creates the marker), then works for `seconds`."""
    Path(marker).touch()
    time.sleep(seconds)


def wait_for_file(path: str) -> None:
    """An initializer that cannot finish before `path` exists (a worker held in its start-up)."""
    while not os.path.exists(path):
        time.sleep(0.05)


def hang_always(x: int) -> int:
    time.sleep(3600)
    return x


def boom(x: int) -> int:
    if x == 2:
        raise ValueError(f"boom on task {x}")
    return x


def slow_start(seconds: float) -> None:
    """An initializer as slow as loading V and M."""
    time.sleep(seconds)


def die_at_start() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def raise_at_start() -> None:
    raise ValueError("bad config")


def wait_until(condition, timeout: float = 120.0, what: str = "the condition") -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds (slack for a busy machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f}s for {what}"
        time.sleep(0.05)


pytestmark = pytest.mark.usefixtures("watchdog")  # (conftest.py) a map that would hang fails the test


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
    logs: list[str] = []
    with WorkerPool(2, log=logs.append) as pool:

        def on_result(index: int, result: int) -> None:
            if not killed:  # first result: the other worker is mid-task; shoot both current pids
                for pid in pool.pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

        start = time.monotonic()
        results = pool.map(square_after, [(x, 0.3) for x in range(6)], on_result=on_result)
        assert results == [x * x for x in range(6)]
        assert killed and any("died (exit code -9)" in line for line in logs), logs  # the kills happened
        assert pool.restarts >= 1
        assert not set(killed) & set(pool.pids)
        assert time.monotonic() - start < 60


def test_hung_task_hits_timeout_and_is_rerun(tmp_path):
    """The task that hangs for an hour is killed after its 1.5 s and rerun. (A healthy task,
    microseconds of work, that a busy machine still holds past 1.5 s is rerun too: every
    restart must be a logged timeout, the hung one among them.)"""
    logs: list[str] = []
    marker = tmp_path / "hung"
    with WorkerPool(2, task_timeout=1.5, log=logs.append) as pool:
        start = time.monotonic()
        assert pool.map(hang_once, [(x, str(marker)) for x in range(4)]) == [0, -1, -2, -3]
        assert time.monotonic() - start < 120  # not the hour the hung task sleeps
        timeouts = [line for line in logs if "ran over" in line]
        assert pool.restarts == len(timeouts) == len(logs) >= 1, logs
    assert any(f"on task {marker.read_text()};" in line for line in timeouts), logs


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
    assert time.monotonic() - start < 120
    wait_until(lambda: not any(_alive(pid) for pid in pids), what="the pool to stop its workers")


def test_interrupt_stops_every_worker():
    pool = WorkerPool(2)

    def on_result(index: int, result: int) -> None:
        raise KeyboardInterrupt  # what Ctrl-C raises in the main process

    pids = pool.pids
    with pytest.raises(KeyboardInterrupt):
        pool.map(square_after, [(x, 0.2) for x in range(6)], on_result=on_result)
    wait_until(lambda: not any(_alive(pid) for pid in pids), what="the workers to stop")


def test_worker_killed_while_starting_up_is_replaced(tmp_path):
    """Workers cannot finish starting up before the gate file exists: the kill lands in start-up."""
    logs: list[str] = []
    gate = tmp_path / "gate"
    with WorkerPool(2, wait_for_file, (str(gate),), log=logs.append) as pool:
        os.kill(pool.pids[0], signal.SIGKILL)  # still booting or in its initializer
        gate.touch()
        assert pool.map(square_after, [(x, 0.0) for x in range(4)]) == [0, 1, 4, 9]
        assert pool.restarts == 1
    assert any("died (exit code -9) while starting up; replacing it" in line for line in logs), logs


def test_workers_dying_at_every_start_give_up():
    with WorkerPool(1, die_at_start, max_retries=1, log=lambda text: None) as pool:
        with pytest.raises(WorkerError, match="while starting up, 2 times in a row; giving up"):
            pool.map(square_after, [(1, 0.0)])


def test_initializer_raising_stops_at_once():
    with WorkerPool(1, raise_at_start) as pool:
        with pytest.raises(WorkerError, match=r"(?s)failed to start.*ValueError: bad config"):
            pool.map(square_after, [(1, 0.0)])
        assert pool.restarts == 0  # a bug is not retried


def test_timeout_clock_starts_with_the_task(tmp_path, monkeypatch):
    """Neither a slow initializer nor a slow import of the task's module counts against the task.

    Both take 3 s, longer than the 2 s timeout whatever the machine's load (a sleep only gets
    longer), so a clock that counted either would time out every attempt of the first task,
    each on a fresh worker, and the map would give up. The tasks themselves are microseconds
    of work; a busy machine would have to hold one past 2 s three times in a row to fail it.
    """
    (tmp_path / "slow_import.py").write_text(
        textwrap.dedent("""
        import multiprocessing
        import time

        if multiprocessing.parent_process() is not None:  # in a worker: an import as slow as torch's
            time.sleep(3.0)


        def double(x):
            return 2 * x
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get this sys.path
    import slow_import

    logs: list[str] = []
    try:
        with WorkerPool(1, slow_start, (3.0,), task_timeout=2.0, max_retries=2, log=logs.append) as pool:
            assert pool.map(slow_import.double, [(1,), (2,)]) == [2, 4]
            assert pool.restarts == len(logs) <= 2, logs  # every restart logged, none that gave up
    finally:
        sys.modules.pop("slow_import", None)


def test_orphaned_worker_leaves_quietly(tmp_path):
    """kill -9 of the main process mid-task: its worker exits at once, without a traceback."""
    started = tmp_path / "started"
    main = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from pool.local import WorkerPool
        from test_pool import start_then_sleep

        pool = WorkerPool(1)
        print(pool.pids[0], flush=True)
        pool.map(start_then_sleep, [({str(started)!r}, 600.0)])  # ten minutes of work
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", main], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )  # the worker inherits both
    worker = None
    try:
        line = process.stdout.readline()
        assert line.strip().isdigit(), process.communicate(timeout=60)[1]
        worker = int(line)
        wait_until(started.exists, what="the worker to start its task")  # the worker is in its task
        process.kill()
        _, stderr = process.communicate(timeout=120)  # end of file once the worker has gone too
        assert process.returncode == -signal.SIGKILL  # the main process was killed
    finally:
        process.kill()
        if worker is not None and _alive(worker):  # it did not leave: do not let it sleep on
            os.kill(worker, signal.SIGKILL)
    assert "Traceback" not in stderr, stderr
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether a process exists (the pool joins the workers it stops, so none lingers as a zombie)."""
    try:
        os.kill(pid, 0)
        return (
            Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        )  # an orphan awaiting init
    except (ProcessLookupError, FileNotFoundError):
        return False
    except OSError:  # no /proc: existing is alive enough
        return True
