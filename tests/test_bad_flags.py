"""Every script refuses a bad flag value at parse time: one line on stderr, exit status 2.

The table holds, per script, values a hostile or unlucky user might type: zero and negative
counts, absurd sizes, non-finite floats, negative tolerances, patiences and loss weights,
unknown devices, and output paths that are files or cannot be made. Parsing is tried
in-process (cheap); one row per script also runs the script as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_controller
import traincontroller
import trainmdrnn
import trainvae
from data import generation_script

ROOT = Path(__file__).resolve().parents[1]
A_FILE = str(Path(__file__).resolve())  # exists and is a file, not a folder
UNMAKEABLE = A_FILE + "/logs"  # below a file: no folder can be made there, even by root


SCRIPTS = {  # name -> (what parses its command line, the flags it requires)
    "trainvae": (trainvae.parse_args, ["--logdir", "L"]),
    "trainmdrnn": (trainmdrnn.parse_args, ["--logdir", "L"]),
    "traincontroller": (traincontroller.parse_args, ["--logdir", "L"]),
    "test_controller": (test_controller.parse_args, ["--logdir", "L"]),
    "generation": (generation_script.main, ["--rollouts", "1"]),
}


def argv_for(required: list[str], flag: str, value: str) -> list[str]:
    """The required flags with `flag` set to `value` (replacing a required one of that name)."""
    argv = list(required)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


BAD = {
    "trainvae": [
        ("--epochs", "0"),
        ("--batch-size", "-3"),
        ("--batch-size", "10000000"),
        ("--latent-size", "100000"),
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--kl-tolerance", "-0.5"),
        ("--patience", "-1"),
        ("--lr-patience", "-2"),
        ("--test-fraction", "1.5"),
        ("--device", "tpu"),
        ("--seed", "-1"),
        ("--seed", "x"),
        ("--logdir", A_FILE),
        ("--logdir", UNMAKEABLE),
        ("--buffer-size", "0"),
    ],
    "trainmdrnn": [
        ("--epochs", "-1"),
        ("--seq-len", "0"),
        ("--hidden-size", "99999999"),
        ("--gaussians", "0"),
        ("--reward-weight", "-1"),
        ("--done-weight", "inf"),
        ("--grad-clip", "-0.1"),
        ("--patience", "-5"),
        ("--device", "gpu0"),
        ("--seed", "-7"),
        ("--lr", "0"),
        ("--logdir", A_FILE),
    ],
    "traincontroller": [
        ("--pop-size", "1"),
        ("--n-samples", "0"),
        ("--generations", "-2"),
        ("--sigma0", "0"),
        ("--sigma0", "inf"),
        ("--target-return", "nan"),
        ("--max-steps", "1000000"),
        ("--action-repeat", "0"),
        ("--stall-frames", "-1"),
        ("--task-timeout", "-1"),
        ("--temperature", "inf"),
        ("--seed", "-1"),
        ("--max-workers", "0"),
        ("--envs-per-worker", "0"),
        ("--backend", "mpi"),
        ("--logdir", UNMAKEABLE),
    ],
    "test_controller": [
        ("--episodes", "0"),
        ("--max-steps", "5000"),
        ("--seed", "-3"),
        ("--workers", "-1"),
        ("--record", "/"),
        ("--record", UNMAKEABLE + "/a.gif"),
        ("--logdir", A_FILE),
        ("--task-timeout", "nan"),
        ("--envs-per-worker", "2000"),
    ],
    "generation": [
        ("--threads", "0"),
        ("--seed", "-1"),
        ("--max-steps", "10000000"),
        ("--action-repeat", "0"),
        ("--policy", "pink"),
        ("--rootdir", A_FILE),
        ("--rootdir", UNMAKEABLE),
    ],
}
CASES = [(script, flag, value) for script, rows in BAD.items() for flag, value in rows]


@pytest.mark.parametrize("script,flag,value", CASES, ids=[f"{s}{f}={v}" for s, f, v in CASES])
def test_bad_value_is_one_line_and_exit_2(script, flag, value, capsys):
    parse, required = SCRIPTS[script]
    with pytest.raises(SystemExit) as stop:
        parse(argv_for(required, flag, value))  # bad values only: nothing runs past parsing
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and flag in lines[0], err


@pytest.mark.parametrize(
    "script,args",
    [
        ("trainvae.py", ["--logdir", "L", "--kl-tolerance", "-1"]),
        ("trainmdrnn.py", ["--logdir", "L", "--device", "tpu"]),
        ("data/generation_script.py", ["--rollouts", "1", "--seed", "-1"]),
    ],
)
def test_as_a_user_would(script, args, tmp_path):
    """The whole script, in a subprocess: one line, exit 2, nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())
