"""The Ray backend (pool/ray_backend.py): the local pool's results, lost workers rerun, one-line errors.

One Ray cluster is started for the module like a user's head node (`ray start --head`), bound
to 127.0.0.1 only, and the scripts join it by address as they would a cluster's. Task
functions live at module level: the actors import this module by name (tests/ is on their
PYTHONPATH because it is on this process's sys.path), so it imports nothing heavy at the top.

The tests that need Ray skip without it (through the `cluster` fixture); the ones checking
what `--backend ray` says when Ray is missing run everywhere.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pool import WorkerError, make_pool

ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = Path(sys.executable).with_name("ray")
# This module's cluster: loopback only (Ray's single-machine mode keeps 127.0.0.1, see
# pool/ray_backend.py), no token authentication (nothing but this machine can reach it), and
# the same settings for every driver that joins it.
CLUSTER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


# ----------------------------------------------------------------------------- tasks (run in actors)


def square_after(x: int, delay: float) -> int:
    time.sleep(delay)
    return x * x


def hang_once(x: int, marker: str) -> int:
    """Hangs the first time (a stuck env), then succeeds; creating the marker is the test and the
    claim at once, so only one task of the map hangs, and the marker says which."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return -x
    Path(marker).write_text(str(x))
    time.sleep(3600)
    return -x


def boom(x: int) -> int:
    if x == 2:
        raise ValueError(f"boom on task {x}")
    return x


# ----------------------------------------------------------------------------- the cluster


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_processes_naming(path: str) -> None:
    """SIGKILL every process whose command line contains `path` (Linux; elsewhere they exit on their own)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if path.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            pass


@pytest.fixture(scope="module")
def cluster():
    """Address of a 2-CPU Ray head on 127.0.0.1, stopped (all of its processes) at the end.

    Its session files go to a short temporary folder (Ray's unix socket paths must stay under
    ~107 characters). The teardown kills its process group, then its worker processes (Ray
    starts those in sessions of their own; their command lines name the folder): `ray stop`
    would also stop any other Ray of this user on the machine.
    """
    pytest.importorskip("ray")
    saved = {key: os.environ.get(key) for key in CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)  # for this process's drivers and the scripts it runs
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp" if os.path.isdir("/tmp") else None)
    port = free_port()
    command = [
        str(RAY_CLI),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--include-dashboard=false",
        "--temp-dir",
        temp,
        "--disable-usage-stats",
    ]
    starter = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0, output
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the GCS server ignores SIGTERM
            try:
                os.killpg(starter.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 2  # a grace period to exit (the GCS never does), then SIGKILL
            while _group_alive(starter.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        kill_processes_naming(temp)
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    """A top-level script run like a user would, from the repo root."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )


def read_rows(
    path: Path, drop: tuple[str, ...] = ("frames_per_s", "time_s", "wall_min")
) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(handle)]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "script, args",
    [
        ("data/generation_script.py", ["--rollouts", "1", "--rootdir", "{tmp}/data"]),
        ("traincontroller.py", ["--logdir", "{tmp}/logs"]),
        ("test_controller.py", ["--logdir", "{tmp}/logs"]),
    ],
)
def test_backend_ray_without_ray_says_how_to_install(script, args, tmp_path):
    """`import ray` failing (sys.modules['ray'] = None makes it raise ImportError): one line, exit 1,
    nothing written. Runs with Ray installed or not."""
    argv = [script, *[a.format(tmp=tmp_path) for a in args], "--backend", "ray"]
    code = (
        f"import runpy, sys; sys.modules['ray'] = None; sys.path.insert(0, {str(ROOT)!r}); "
        f"sys.argv = {argv!r}; runpy.run_path({str(ROOT / script)!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr  # bad input: --backend ray without Ray
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install -r requirements-ray.txt" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_generation_on_ray_writes_the_local_bytes(cluster, tmp_path):
    """2 rollouts x 20 steps joined by address: the very files the local backend writes."""
    common = ["--rollouts", "2", "--max-steps", "20", "--threads", "2", "--seed", "7"]
    local = run("data/generation_script.py", *common, "--rootdir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    remote = run(
        "data/generation_script.py",
        *common,
        "--rootdir",
        str(tmp_path / "ray"),
        "--backend",
        "ray",
        "--ray-address",
        cluster,
    )
    assert remote.returncode == 0, remote.stderr
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.npz"))
    assert [str(p) for p in files] == ["thread_0/rollout_0.npz", "thread_1/rollout_1.npz"]
    assert sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.npz")) == files
    for path in files:
        assert (tmp_path / "local" / path).read_bytes() == (tmp_path / "ray" / path).read_bytes(), path


def test_cmaes_generation_on_ray_matches_local(cluster, tmp_path):
    """One CMA-ES generation (pop 4, 30-step episodes, small random V/M): same fitness, CSV row and mean."""
    from test_controller_stage import make_world  # the random-init V/M of the stage tests

    from agent.search import Search
    from utils.checkpoint import load_checkpoint

    args = [
        "--pop-size",
        "4",
        "--n-samples",
        "2",
        "--max-steps",
        "30",
        "--generations",
        "1",
        "--eval-every",
        "1",
        "--eval-episodes",
        "1",
        "--rescore-episodes",
        "1",
        "--sigma0",
        "0.5",
        "--max-workers",
        "2",
        "--seed",
        "3",
    ]
    runs = {}
    for backend, extra in (("local", []), ("ray", ["--backend", "ray", "--ray-address", cluster])):
        logdir = make_world(tmp_path / backend)
        result = run("traincontroller.py", "--logdir", str(logdir), *args, *extra)
        assert result.returncode == 0, result.stderr
        es = Search.from_state(load_checkpoint(logdir / "ctrl" / "last.pt")).es
        runs[backend] = dict(
            rows=read_rows(logdir / "ctrl" / "log.csv"),
            mean=es.mean,
            fitness=sorted(es.fit.fit),
            best=load_checkpoint(logdir / "ctrl" / "best.pt")["eval_return"],
        )
    local, remote = runs["local"], runs["ray"]
    assert len(local["rows"]) == 1 and local["rows"] == remote["rows"]
    assert local["fitness"] == remote["fitness"]  # every candidate's fitness
    assert (local["mean"] == remote["mean"]).all()
    assert local["best"] == remote["best"]


def test_killed_hung_and_failing_workers(cluster, tmp_path, watchdog):
    """Through the pool API: kill -9 of busy actors mid-map, a hung task, a task that raises.

    No task timeout while actors are killed (a busy machine may hold a healthy 0.5 s task past
    any short one); then 3 s, for the task that hangs an hour among tasks of no work at all. A
    healthy task a busy machine still holds past 3 s is rerun: every new restart must be
    logged, the hung task's timeout among them.
    """
    logs: list[str] = []
    started = time.monotonic()
    with make_pool("ray", 2, log=logs.append, ray_address=cluster) as pool:
        assert pool.map(square_after, [(x, 0.0) for x in range(4)]) == [0, 1, 4, 9]  # both actors up
        killed: list[int] = []

        def on_result(index: int, result: int) -> None:
            if not killed:  # first result: the other actor is mid-task; shoot every current actor
                for pid in pool.pids:
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)

        assert pool.map(square_after, [(x, 0.5) for x in range(6)], on_result=on_result) == [
            x * x for x in range(6)
        ]
        assert killed and pool.restarts >= 1
        assert any("was lost" in line and "rerunning" in line for line in logs), logs

        restarts, logged, marker = pool.restarts, len(logs), tmp_path / "hung"
        pool.task_timeout = 3  # read by every map: from now on a task has 3 s
        assert pool.map(hang_once, [(x, str(marker)) for x in range(3)]) == [0, -1, -2]
        timeouts = [line for line in logs[logged:] if "ran over 3s" in line]
        assert pool.restarts - restarts == len(logs) - logged >= len(timeouts) >= 1, logs  # all logged
        assert any(f"on task {marker.read_text()};" in line for line in timeouts), logs

        with pytest.raises(WorkerError, match=r"(?s)failed in a worker.*ValueError: boom on task 2"):
            pool.map(boom, [(x,) for x in range(4)])
    assert time.monotonic() - started < 240  # never hangs (the hung task sleeps an hour)
