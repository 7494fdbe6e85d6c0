"""Fault injection: every stage, killed with SIGKILL at its N-th file write or fed a damaged file.

A tiny but real pipeline (4 rollouts of 12 agent steps at k = 4, 2 epochs of V and M, 2
CMA-ES generations, 2 test episodes) runs once uninterrupted: the reference. It also counts
each stage's atomic writes (WORLD_MODELS_KILL_COUNTER, utils/files.py): WRITES must match,
so "every write" below is every write. Then, per stage:

- **kill -9 inside every write.** `WORLD_MODELS_KILL_AT_WRITE=N` (utils/files.py) SIGKILLs
  the run inside its N-th atomic write (counted across the main process and its pool workers),
  after the temporary file is written and before the rename; when the writer is a pool worker
  (the data stage) its main process is killed first, so the command dies as under `kill -9`.
  The test first checks that the kill happened (the command died by SIGKILL and left the
  hidden temporary of the write it was killed in), then that the same command rerun finishes,
  leaves no temporary file, every file loads, and the stage's results equal the reference
  (checkpoint tensors, logs without their clock columns, rollout bytes, test returns).
- **damaged inputs.** Each file the stage reads is replaced in turn by random bytes, a
  truncated copy, a valid file of the wrong kind and a pickle that would run code: one line
  on stderr naming the file, no traceback, no code run, and a non-zero exit where the stage
  cannot go on (a bad rollout among good ones, or a bad best.pt beside a good last.pt, is
  skipped or repaired with a warning instead).

Every case here is marked `faults`: `make faults` (`pytest -m faults tests/test_faults.py`)
runs them all. `make test` (pytest.ini deselects `faults_extra`) runs every damaged input a
stage refuses, the cut and the pickled ones of the files it skips, rebuilds or rewrites, the
write count check and a sample of the kill points (KILL_SAMPLE: a pool worker's kill in data,
a kill inside M's epoch loop, one in the test episodes).

The stages run as a user runs them, `python SCRIPT ARGS` in a process of their own, but
forked from a helper that has imported torch and the project once (`Stages`), so that the
~60 runs do not each pay seconds of interpreter start-up; see `ZYGOTE`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.rollouts import load_rollout
from utils.checkpoint import load_checkpoint
from utils.files import is_temp_file, temp_name

pytestmark = pytest.mark.faults  # `make faults` runs every case of this file

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "vae", "mdrnn", "ctrl", "test")
COMMANDS = {  # the tiny profile, as `make pipeline` would run it ({D}: dataset, {L}: logdir)
    "data": [
        "data/generation_script.py",
        "--rollouts",
        "4",
        "--rootdir",
        "{D}",
        "--threads",
        "2",
        "--max-steps",
        "48",
        "--action-repeat",
        "4",
    ],
    "vae": ["trainvae.py", "--logdir", "{L}", "--dataset", "{D}", "--epochs", "2", "--batch-size", "16"],
    "mdrnn": [
        "trainmdrnn.py",
        "--logdir",
        "{L}",
        "--dataset",
        "{D}",
        "--epochs",
        "2",
        "--seq-len",
        "4",
        "--batch-size",
        "2",
        "--hidden-size",
        "16",
    ],
    "ctrl": [
        "traincontroller.py",
        "--logdir",
        "{L}",
        "--pop-size",
        "4",
        "--n-samples",
        "1",
        "--generations",
        "2",
        "--eval-every",
        "1",
        "--eval-episodes",
        "1",
        "--rescore-episodes",
        "2",
        "--max-steps",
        "24",
        "--max-workers",
        "2",
        "--stall-frames",
        "0",
    ],
    "test": [
        "test_controller.py",
        "--logdir",
        "{L}",
        "--episodes",
        "2",
        "--max-steps",
        "24",
        "--workers",
        "2",
    ],
}
OUTPUTS = {
    "data": "dataset",
    "vae": "logdir/vae",
    "mdrnn": "logdir/mdrnn",
    "ctrl": "logdir/ctrl",
    "test": "logdir/ctrl/eval",
}
CLOCK_COLUMNS = {"time_s", "wall_min", "frames_per_s", "dream_steps_per_s", "epoch_time_s", "sequences_per_s"}
CLOCK_KEYS = {
    "seconds",
    "log_rows",
}  # checkpoint entries that hold wall time (log_rows: compared via log.csv)
WRITES = {"data": 4, "vae": 10, "mdrnn": 10, "ctrl": 11, "test": 2}  # atomic writes per stage, uninterrupted
KILL_SAMPLE = {("data", 2), ("mdrnn", 4), ("test", 1)}  # the kill points `make test` runs (cheap stages)
KILL_COUNTER = "write_count"  # in the run root: its atomic writes, one byte each (WORLD_MODELS_KILL_COUNTER)

# The helper the stages are forked from: it imports what the scripts import, once, then for
# each request (one JSON line on stdin) forks a child that becomes `python SCRIPT ARGS`: the
# request's cwd, environment and stdout/stderr files, stdin from /dev/null, sys.argv and
# sys.path[0] as the interpreter sets them, utils.files re-read from the environment (the
# kill hook), the script run as __main__, an uncaught exception printed as a traceback with
# exit status 1, SystemExit codes as the interpreter maps them, atexit handlers run. It
# answers {"pid": ...} at once and {"status": ...} (-N: killed by signal N) when the child ends.
ZYGOTE = textwrap.dedent(
    """
    import atexit, importlib, json, os, runpy, sys, threading
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing of the helper's own on the reply pipe
    sys.path.insert(0, sys.argv[1])
    before = dict(os.environ)
    import numpy, torch, matplotlib.pyplot, gymnasium, cma, tqdm
    import agent.dream, agent.display, agent.population, agent.search, agent.world
    import data.carracing, data.latents, data.loaders, data.rollouts, envs.carracing
    import models.controller, models.mdrnn, models.vae, pool, pool.local
    import utils.checkpoint, utils.cli, utils.files, utils.logs, utils.params, utils.training
    added = {k: v for k, v in os.environ.items() if before.get(k) != v}  # what those imports set

    def case(request):
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for key, value in added.items():
            os.environ.setdefault(key, value)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        importlib.reload(utils.files)  # module constants read from this environment
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        threading._shutdown()
        atexit._run_exitfuncs()
        return code

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush(), sys.stderr.flush(), reply.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reply.close()
                code = case(request)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(code & 0xFF)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        print(json.dumps({"status": status}), file=reply, flush=True)
    """
)


class Stages:
    """Runs the stages' scripts, one at a time, as children of a ZYGOTE helper."""

    def __init__(self, scratch: Path) -> None:
        self.scratch, self.count = scratch, 0
        self.helper = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def _answer(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.helper.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.helper.stdout.readline()
        assert line, f"the helper the stages fork from has gone (exit {self.helper.poll()})"
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
        """`python ARGV` in `cwd` with `env`: its CompletedProcess (returncode -N: killed by signal N)."""
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        request = dict(argv=argv, cwd=str(cwd), env=env, out=str(out), err=str(err))
        self.helper.stdin.write(json.dumps(request) + "\n")
        self.helper.stdin.flush()
        pid = self._answer(120)["pid"]
        answer = self._answer(timeout)
        if answer is None:  # hung: kill it, then fail with what it wrote
            os.kill(pid, signal.SIGKILL)
            self._answer(120)
            raise AssertionError(f"{argv} ran over {timeout}s: {err.read_text()[-3000:]}")
        return subprocess.CompletedProcess(argv, answer["status"], out.read_text(), err.read_text())

    def close(self) -> None:
        self.helper.stdin.close()
        self.helper.wait(timeout=120)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    runner = Stages(tmp_path_factory.mktemp("stage_output"))
    yield runner
    runner.close()


def run(stages: Stages, stage: str, root: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    """Run `stage` as a user would, in `root` (dataset/ and logdir/ under it), counting its writes."""
    args = [a.format(D=root / "dataset", L=root / "logdir") for a in COMMANDS[stage]]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")} | {
        "SDL_VIDEODRIVER": "dummy"
    }
    (root / KILL_COUNTER).unlink(missing_ok=True)
    env["WORLD_MODELS_KILL_AT_WRITE"] = str(kill_at)
    env["WORLD_MODELS_KILL_COUNTER"] = str(root / KILL_COUNTER)
    return stages.run([str(ROOT / args[0]), *args[1:]], root, env)


def writes_counted(root: Path) -> int:
    """The atomic writes the last run in `root` made (all its processes)."""
    path = root / KILL_COUNTER
    return path.stat().st_size if path.exists() else 0


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(stages, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """The tiny pipeline, uninterrupted, and the atomic writes of each stage."""
    root = tmp_path_factory.mktemp("reference")
    writes = {}
    for stage in STAGES:
        ok(run(stages, stage, root))
        writes[stage] = writes_counted(root)
    (root / KILL_COUNTER).unlink()
    return root, writes


def inputs_of(stage: str, reference: Path, root: Path) -> None:
    """Copy the reference's outputs of the stages before `stage` into `root`."""
    for before in STAGES[: STAGES.index(stage)]:
        source = reference / OUTPUTS[before]
        for path in source.rglob("*"):
            if path.is_file() and not (before == "ctrl" and "eval" in path.relative_to(source).parts):
                target = root / OUTPUTS[before] / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)


# ----------------------------------------------------------------------------- comparing runs


def _same(a, b, where: str, roots: tuple[str, str]) -> None:
    """a (the reference's) equals b (ours), up to the run folders' paths and the clock entries."""
    if isinstance(a, str) and isinstance(b, str):
        assert a.replace(roots[0], "<run>") == b.replace(roots[1], "<run>"), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) - CLOCK_KEYS == set(b) - CLOCK_KEYS, where
        for key in set(a) - CLOCK_KEYS:
            _same(a[key], b[key], f"{where}[{key!r}]", roots)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", roots)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == b or (a != a and b != b), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k not in CLOCK_COLUMNS} for row in csv.DictReader(handle)]


def assert_loads(path: Path) -> None:
    """Every file a stage leaves is complete and readable."""
    if path.suffix == ".pt":
        load_checkpoint(path)
    elif path.name.startswith("rollout_"):
        assert load_rollout(path) is not None, path
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            [archive[key] for key in archive.files]
    elif path.suffix == ".csv":
        _csv_rows(path)
    elif path.suffix in (".png", ".gif"):
        with Image.open(path) as image:
            image.load()


def assert_same_outputs(stage: str, reference: Path, root: Path) -> None:
    """The stage's files in `root` load, no temporary is left, and they equal the reference's."""
    ours, theirs = root / OUTPUTS[stage], reference / OUTPUTS[stage]
    left = [p for p in root.rglob("*") if is_temp_file(p)]
    assert not left, f"temporary files left: {left}"
    for path in ours.rglob("*"):
        if path.is_file():
            assert_loads(path)
    names = lambda folder: sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file()  # noqa: E731
        and not (stage == "ctrl" and p.relative_to(folder).parts[0] == "eval")
    )
    assert names(ours) == names(theirs)
    for name in names(theirs):
        a, b = theirs / name, ours / name
        if a.suffix == ".pt":
            _same(load_checkpoint(a), load_checkpoint(b), name, (str(reference), str(root)))
        elif a.suffix == ".csv":
            assert _csv_rows(a) == _csv_rows(b), name
        elif a.suffix == ".npz":  # rollouts and the latent cache: the same arrays
            with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
                assert sorted(x.files) == sorted(y.files), name
                for key in x.files:
                    assert np.array_equal(x[key], y[key]), f"{name}:{key}"


# ----------------------------------------------------------------------------- kill -9 at every write


TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>.*)")  # utils.files.temp_name's


def assert_left_by_a_killed_writer(temp: Path) -> None:
    """`temp` is an atomic write's temporary (`.NAME.PID.tmpSUFFIX`) whose writer is gone."""
    match = TEMP_NAME.fullmatch(temp.name)
    assert match and is_temp_file(temp), temp
    assert temp == temp_name(temp.with_name(match["name"]), int(match["pid"])), temp
    # a worker leaves within moments of its main process (pool/local.py); under load it may take a while
    deadline = time.monotonic() + 30
    while _state(int(match["pid"])) not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(int(match["pid"])) in ("gone", "Z"), temp


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_kill_points_cover_every_write(reference):
    """The uninterrupted stages make exactly WRITES atomic writes: the kill points below are all of them."""
    _, writes = reference
    assert writes == WRITES


def _kill_points():
    for stage in STAGES:
        for n in range(1, WRITES[stage] + 1):
            marks = () if (stage, n) in KILL_SAMPLE else (pytest.mark.faults_extra,)
            yield pytest.param(stage, n, marks=marks, id=f"{stage}-write{n}")


@pytest.mark.parametrize("stage,kill_at", list(_kill_points()))
def test_kill_inside_a_write_then_rerun_equals_uninterrupted(stages, reference, tmp_path, stage, kill_at):
    reference, _ = reference
    inputs_of(stage, reference, tmp_path)
    killed = run(stages, stage, tmp_path, kill_at)
    # first, the kill happened: the command died by SIGKILL inside its kill_at-th write, which
    # left that write's temporary behind (a worker's kill in data kills its main process too)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert writes_counted(tmp_path) >= kill_at  # (in data the other worker may finish a write meanwhile)
    left = [p for p in tmp_path.rglob("*") if is_temp_file(p)]
    assert left, "killed inside a write, but no temporary file is left"
    for temp in left:
        assert_left_by_a_killed_writer(temp)
    assert "Traceback" not in killed.stderr, killed.stderr[-2000:]
    # then the same command again, as a user would, ends as if never interrupted
    ok(run(stages, stage, tmp_path))
    assert_same_outputs(stage, reference, tmp_path)


# ----------------------------------------------------------------------------- damaged inputs


class RunsCode:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _damage(kind: str, path: Path, marker: Path) -> None:
    data = path.read_bytes()
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(max(len(data), 64)))
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":  # a valid file of another kind than the reader expects
        if path.suffix == ".pt":
            torch.save({"weights": torch.zeros(3), "config": "other"}, path)
        else:
            buffer = io.BytesIO()
            np.savez(buffer, something=np.arange(3))
            path.write_bytes(buffer.getvalue())
    elif kind == "pickle":
        if path.suffix == ".pt":
            torch.save({"state_dict": RunsCode(marker), "config": RunsCode(marker)}, path)
        else:
            with zipfile.ZipFile(path, "w") as archive:  # an .npz whose member is an object-array pickle
                buffer = io.BytesIO()
                np.save(buffer, np.array([RunsCode(marker)], dtype=object), allow_pickle=True)
                archive.writestr("observations.npy", buffer.getvalue())
    else:
        raise ValueError(kind)


DAMAGE = ("random", "truncated", "foreign", "pickle")
READS = [  # (stage, the file it reads, relative to the run root, what the stage must do)
    ("vae", "dataset/thread_0/rollout_0.npz", "warn"),  # skipped: the other rollouts train V
    ("vae", "logdir/vae/last.pt", "fail"),
    ("mdrnn", "logdir/vae/best.pt", "fail"),
    ("mdrnn", "logdir/mdrnn/latents.npz", "rebuild"),  # a cache: rebuilt from the rollouts
    ("mdrnn", "logdir/mdrnn/last.pt", "fail"),
    ("ctrl", "logdir/mdrnn/best.pt", "fail"),
    ("ctrl", "logdir/ctrl/last.pt", "fail"),
    ("ctrl", "logdir/ctrl/best.pt", "warn"),  # beside a good last.pt: rewritten by the next evaluation
    ("test", "logdir/vae/best.pt", "fail"),
    ("test", "logdir/ctrl/best.pt", "fail"),
]


def _damage_cases():
    for stage, name, expect in READS:
        for kind in DAMAGE:
            # make test: every case that refuses (well under a second each), and for the files a stage
            # skips, rebuilds or rewrites and then runs on (seconds each), a cut file and a pickle;
            # make faults adds their random bytes (unreadable, as a cut file is) and foreign files
            slow = expect != "fail" and kind in ("random", "foreign")
            marks = (pytest.mark.faults_extra,) if slow else ()
            yield pytest.param(
                stage, name, expect, kind, marks=marks, id=f"{stage}:{'/'.join(name.split('/')[-2:])}:{kind}"
            )


def damage_inputs(stage: str, name: str, kind: str, reference: Path, root: Path) -> None:
    """`root` as the stage finds it: the reference's files it needs, `name` damaged by `kind`."""
    inputs_of(stage, reference, root)
    resumed = (
        [name, "logdir/ctrl/last.pt"] if name == "logdir/ctrl/best.pt" else [name]
    )  # a bad best.pt beside a good last.pt
    for needed in resumed:  # the stage's own files (a resume, the latent cache): from the reference
        if not (root / needed).exists():
            (root / needed).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reference / needed, root / needed)
    _damage(kind, root / name, root / "code_ran")


@pytest.mark.parametrize("stage,name,expect,kind", list(_damage_cases()))
def test_damaged_input_gives_one_line_and_runs_no_code(
    stages, reference, tmp_path, stage, name, expect, kind
):
    reference, _ = reference
    damage_inputs(stage, name, kind, reference, tmp_path)
    result = run(stages, stage, tmp_path)
    marker = tmp_path / "code_ran"
    assert not marker.exists(), "a damaged file ran code"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith(("\r", " ")) and "%|" not in line
    ]
    if expect == "fail":
        assert result.returncode != 0
        assert len(lines) == 1 and Path(name).name in lines[0], result.stderr[-2000:]
    elif expect == "warn":
        assert result.returncode == 0, result.stderr[-2000:]
        assert any(Path(name).name in line for line in lines), result.stderr[-2000:]
        if name.endswith(
            "best.pt"
        ):  # the finished search re-evaluated its mean: best.pt holds a controller again
            assert set(load_checkpoint(tmp_path / name)["state_dict"]) == {"fc.weight", "fc.bias"}
    else:  # rebuild: the cache is whole again, the very one the reference built
        assert result.returncode == 0, result.stderr[-2000:]
        with (
            np.load(reference / name, allow_pickle=False) as x,
            np.load(tmp_path / name, allow_pickle=False) as y,
        ):
            assert sorted(x.files) == sorted(y.files)
            for key in x.files:
                assert np.array_equal(x[key], y[key]), key
