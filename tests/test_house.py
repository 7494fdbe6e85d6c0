"""One house: library code raises typed errors and the scripts' edge prints them as one line;
a resumed search refuses settings that would change what it measured; rerunning generation
remakes a damaged rollout; the worker flag has one name and ctallec's aliases."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_controller_stage import SMALL, assert_one_line_error, make_world, run_script

import traincontroller
from data.rollouts import check_rollout, find_rollouts
from utils.cli import run_script as script_edge
from utils.errors import BadCheckpointError, BadInputError, MissingInputError, StageError

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ["utils", "models", "envs", "data", "agent", "pool"]
EDGE = {"utils/cli.py", "data/generation_script.py"}  # the edge itself, and a script that lives in data/


def _exits(tree: ast.AST) -> list[int]:
    """Lines that end the process: sys.exit / exit / SystemExit / parser.error, outside `if __name__ == ...`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            node.body = []  # a module's own __main__ block is a script's edge
    for node in ast.walk(tree):
        text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Raise, ast.Name)) else ""
        if isinstance(node, ast.Call) and (text.startswith(("sys.exit(", "exit(")) or ".error(" in text):
            found.append(node.lineno)
        if isinstance(node, ast.Name) and node.id == "SystemExit":
            found.append(node.lineno)
    return found


def test_library_code_never_ends_the_process():
    """Below the scripts nothing calls sys.exit, raises SystemExit or exits through argparse."""
    offenders = []
    for folder in LIBRARY:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in EDGE:
                offenders += [f"{rel}:{line}" for line in _exits(ast.parse(path.read_text()))]
    assert offenders == []


@pytest.mark.parametrize(
    ("error", "status"),
    [(MissingInputError("x.pt not found"), 2), (BadCheckpointError("bad"), 2), (StageError("worker"), 1)],
)
def test_the_edge_prints_one_line_with_the_errors_status(error, status, capsys):
    def main() -> int:
        raise error

    with pytest.raises(SystemExit) as stop:
        script_edge(main)
    assert stop.value.code == status
    assert capsys.readouterr().err.strip() == f"error: {error}"


def test_a_missing_stage_input_is_a_typed_error_naming_the_command(tmp_path):
    with pytest.raises(MissingInputError, match=r"run `python trainvae.py --logdir"):
        traincontroller.main(["--logdir", str(tmp_path)])


def test_one_worker_flag_with_ctallecs_aliases():
    from data.generation_script import parse_args as generation_args
    from test_controller import parse_args as test_args

    assert generation_args(["--threads", "3"]).workers == generation_args(["--workers", "3"]).workers == 3
    assert traincontroller.parse_args(["--logdir", "L", "--max-workers", "5"]).workers == 5
    assert test_args(["--logdir", "L", "--workers", "7"]).workers == 7


# ------------------------------------------------------------------ a resumed search's settings


CONFIG = {"latent_size": 8, "hidden_size": 16, "action_size": 3}  # make_world's sizes


def saved_search(logdir: Path, *flags: str) -> traincontroller.Search:
    """A new search saved to L/ctrl/last.pt as traincontroller.py starts one (random V and M at k = 4)."""
    args = traincontroller.parse_args(["--logdir", str(logdir), *flags, "--noreload"])
    return traincontroller.resume_or_start(args, CONFIG, logdir / "ctrl")[0]


@pytest.mark.parametrize(
    ("saved", "flags", "named"),
    [
        ([], ["--stall-frames", "40"], "--stall-frames 100 (this run: 40)"),
        ([], ["--pop-size", "6"], "--pop-size 24 (this run: 6)"),
        ([], ["--dream"], "--dream False (this run: True)"),
        (["--dream"], ["--dream", "--temperature", "1.0"], "--temperature 1.15 (this run: 1.0)"),
    ],
)
def test_resume_with_another_setting_is_refused_naming_the_flag(tmp_path, saved, flags, named):
    logdir = make_world(tmp_path / "logdir")
    search = saved_search(logdir, *saved)
    args = traincontroller.parse_args(["--logdir", str(logdir), *saved, *flags])
    with pytest.raises(BadCheckpointError, match=re.escape(named) + ".*--noreload"):
        traincontroller.resume_or_start(args, CONFIG, logdir / "ctrl")
    args = traincontroller.parse_args(["--logdir", str(logdir), *saved])  # the same flags resume it
    assert traincontroller.resume_or_start(args, CONFIG, logdir / "ctrl")[0].settings == search.settings


def test_a_refused_resume_is_one_line_and_touches_nothing(tmp_path):
    logdir = make_world(tmp_path / "logdir")
    saved_search(logdir)
    before = (logdir / "ctrl" / "last.pt").read_bytes()
    result = run_script("traincontroller.py", "--logdir", str(logdir), *SMALL, "--stall-frames", "40")
    assert result.returncode == 2
    assert_one_line_error(result, "--stall-frames 100 (this run: 40)", "--noreload")
    assert (logdir / "ctrl" / "last.pt").read_bytes() == before


# ------------------------------------------------------------------ a damaged rollout on disk


def test_rerunning_generation_remakes_a_damaged_rollout(tmp_path):
    """A rollout cut short (full disk, interrupted copy) is found by the cheap check and made again,
    to the same bytes; a rerun with nothing damaged has nothing to do."""
    root = tmp_path / "d"
    command = [sys.executable, str(ROOT / "data/generation_script.py"), "--rollouts", "3", "--rootdir", str(root),
               "--max-steps", "24", "--workers", "1"]  # fmt: skip
    assert subprocess.run(command, capture_output=True, text=True, timeout=300).returncode == 0
    files = {index: path for index, path in find_rollouts(root)}
    original = files[1].read_bytes()
    files[1].write_bytes(original[: len(original) // 2])
    with pytest.raises(BadInputError):
        check_rollout(files[1])

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"rollout {files[1]}" in rerun.stderr and "making it again" in rerun.stderr
    assert "generated 1 rollouts" in rerun.stdout
    assert [check_rollout(path) > 0 for _, path in find_rollouts(root)] == [True] * 3
    assert files[1].read_bytes() == original

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_scripts_start_without_plotting_or_cma_loaded():
    """The pool spawns its workers by importing the script again: cma and matplotlib.pyplot (half a
    second each start) load only where a search or a plot first needs them."""
    code = "import sys, traincontroller, test_controller; "
    code += "print(sorted({'cma', 'matplotlib.pyplot'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
