"""Fault injection: every stage, killed with SIGKILL at its N-th file write or fed a damaged file.

A tiny but real pipeline (4 rollouts of 12 agent steps at k = 4, 2 epochs of V and M, 2
CMA-ES generations, 2 test episodes) runs once uninterrupted: the reference. Then, per stage:

- **kill -9 inside every write.** `WORLD_MODELS_KILL_AT_WRITE=N` (utils/files.py) makes the
  stage's processes SIGKILL themselves inside their N-th atomic write, after the temporary file
  is written and before the rename; in the data stage that hits the pool workers, in the
  others the main process. The same command rerun must finish, leave no temporary file, every
  file must load, and the stage's results must equal the reference (checkpoint tensors, logs
  without their clock columns, rollout bytes, test returns).
- **damaged inputs.** Each file the stage reads is replaced in turn by random bytes, a
  truncated copy, a valid file of the wrong kind and a pickle that would run code: one line
  on stderr naming the file, no traceback, no code run, and a non-zero exit where the stage
  cannot go on (a bad rollout among good ones, or a bad best.pt beside a good last.pt, is
  skipped or repaired with a warning instead).

The full suite is `make faults` (`pytest -m faults`, a few minutes on 2 cores); `make test`
runs one kill point per stage and every damaged-input case.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.rollouts import load_rollout
from utils.checkpoint import load_checkpoint
from utils.files import is_temp_file

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
FIRST_KILL = {"data": 1, "vae": 3, "mdrnn": 4, "ctrl": 3, "test": 1}  # the kill point `make test` runs


def run(stage: str, root: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    """Run `stage` as a user would, in `root` (dataset/ and logdir/ under it)."""
    args = [a.format(D=root / "dataset", L=root / "logdir") for a in COMMANDS[stage]]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")} | {
        "SDL_VIDEODRIVER": "dummy"
    }
    env["WORLD_MODELS_KILL_AT_WRITE"] = str(kill_at)
    return subprocess.run(
        [sys.executable, str(ROOT / args[0]), *args[1:]],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The tiny pipeline, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    for stage in STAGES:
        ok(run(stage, root))
    return root


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


def _kill_points():
    for stage in STAGES:
        for n in range(1, 5 if stage == "data" else 16):  # data: the pool workers write, 4 rollouts in all
            marks = () if n == FIRST_KILL[stage] else (pytest.mark.faults,)
            yield pytest.param(stage, n, marks=marks, id=f"{stage}-write{n}")


@pytest.mark.parametrize("stage,kill_at", list(_kill_points()))
def test_kill_inside_a_write_then_rerun_equals_uninterrupted(reference, tmp_path, stage, kill_at):
    inputs_of(stage, reference, tmp_path)
    killed = run(stage, tmp_path, kill_at)
    if killed.returncode == 0 and stage != "data":  # (in data the pool replaces a killed worker and goes on)
        pytest.skip(f"{stage} makes fewer than {kill_at} writes")  # the run above was just uninterrupted
    assert "Traceback" not in killed.stderr, killed.stderr[-2000:]
    ok(run(stage, tmp_path))  # the same command again, as a user would
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
            marks = () if kind == "pickle" else (pytest.mark.faults,)  # `make test`: the code-running pickles
            yield pytest.param(
                stage, name, expect, kind, marks=marks, id=f"{stage}:{'/'.join(name.split('/')[-2:])}:{kind}"
            )


@pytest.mark.parametrize("stage,name,expect,kind", list(_damage_cases()))
def test_damaged_input_gives_one_line_and_runs_no_code(reference, tmp_path, stage, name, expect, kind):
    inputs_of(stage, reference, tmp_path)
    resumed = (
        [name, "logdir/ctrl/last.pt"] if name == "logdir/ctrl/best.pt" else [name]
    )  # a bad best.pt beside a good last.pt
    for needed in resumed:  # the stage's own files (a resume, the latent cache): from the reference
        if not (tmp_path / needed).exists():
            (tmp_path / needed).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reference / needed, tmp_path / needed)
    marker = tmp_path / "code_ran"
    _damage(kind, tmp_path / name, marker)
    result = run(stage, tmp_path)
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
    else:  # rebuild
        assert result.returncode == 0, result.stderr[-2000:]
