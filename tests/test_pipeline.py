"""The whole pipeline through `make smoke` (every stage for real, toy size), the README's
by-hand commands giving the very same run, and the report and timing helpers on their own,
including a run folder with pieces missing.

`make smoke` gets PY=<this interpreter>, so it reuses the environment the tests run in and
never creates or reinstalls .venv.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reporting.report import build_report, score_text
from reporting.timing import read_timings, run_timed

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "vae", "mdrnn", "ctrl", "test"]
# The Makefile's SMOKE_PROFILE as each script's flags: a by-hand run with these is `make smoke`.
SMOKE_FLAGS = {
    "data/generation_script.py": ["--rollouts", "4", "--max-steps", "60"],
    "trainvae.py": [],
    "trainmdrnn.py": ["--epochs", "1", "--seq-len", "16"],
    "traincontroller.py": [
        "--pop-size",
        "4",
        "--n-samples",
        "1",
        "--generations",
        "2",
        "--eval-every",
        "1",
        "--eval-episodes",
        "2",
        "--rescore-episodes",
        "2",
        "--max-steps",
        "52",
    ],  # fmt: skip
    "test_controller.py": ["--episodes", "3", "--max-steps", "52"],
}


def clean_env() -> dict[str, str]:
    """This environment minus an outer make's flags and variables (`make test LOGDIR=...`)."""
    return {
        k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    }


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_smoke_runs_every_stage_and_reports(tmp_path):
    result = subprocess.run(
        ["make", "smoke", f"PY={sys.executable}", f"SMOKE_DIR={tmp_path}", "CTRL_MODE=real"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert "pip install" not in result.stdout  # reused this interpreter, no .venv work

    logdir = tmp_path / "logdir"
    assert len(list((tmp_path / "dataset").rglob("rollout_*.npz"))) == 4
    for name in [
        "vae/best.pt",
        "mdrnn/best.pt",
        "ctrl/best.pt",
        "ctrl/eval/returns.csv",
        "ctrl/eval/episode.gif",
        "report/report.md",
        "report/test_returns.png",
        "report/episode.gif",
        "report/vae_recon.png",
        "report/mdrnn_curves.png",
        "report/ctrl_curves.png",
        "report/learning_curve.png",
    ]:
        assert (logdir / name).is_file(), f"{name} missing"
    assert (logdir / "report/episode.gif").read_bytes()[:4] == b"GIF8"
    assert (logdir / "report/test_returns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(logdir / "ctrl/eval/returns.csv", newline="") as handle:
        returns = np.array([float(row["return"]) for row in csv.DictReader(handle)])
    assert returns.size == 3
    report = (logdir / "report/report.md").read_text()
    assert score_text(returns) in report  # "mean ± std over 3 episodes (min, max)"
    assert "Nothing: every stage's outputs are here." in report
    worst = sorted(returns)[0]  # the worst test tracks, each with its replay (--record-worst)
    assert "## The 3 worst test tracks" in report and f"| {worst:.1f} |" in report
    assert len(list((logdir / "report").glob("worst_*.gif"))) == 3 and report.count("[GIF](worst_") == 3
    with open(logdir / "ctrl/log.csv", newline="") as handle:  # the learning curve: one row per evaluation
        evaluated = [row for row in csv.DictReader(handle) if row["eval_mean"]]
    assert len(evaluated) == 2 and all(
        f"| {float(r['eval_mean']):.1f} ± {float(r['eval_std']):.1f} |" in report for r in evaluated
    )

    timings = read_timings(logdir / "report/timings.csv")
    assert [row["stage"] for row in timings] == STAGES
    assert all(row["status"] == "0" and float(row["seconds"]) > 0 for row in timings)

    # The README's by-hand commands, verbatim but for the smoke profile's sizes, in a folder of
    # their own (their default paths): the same rollouts, V, M, C and test returns, bit for bit.
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    commands = readme_commands()
    assert [c[1] for c in commands] == list(SMOKE_FLAGS)
    for command in commands:
        script = command[1]
        run = subprocess.run([sys.executable, str(ROOT / script), *command[2:], *SMOKE_FLAGS[script]],
                             cwd=by_hand, env=clean_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, f"{command}: {run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    dataset = by_hand / "datasets/carracing-k4"  # the default profile's folder
    made = sorted(p.relative_to(tmp_path / "dataset") for p in (tmp_path / "dataset").rglob("rollout_*.npz"))
    assert made == sorted(p.relative_to(dataset) for p in dataset.rglob("rollout_*.npz"))
    for name in made:
        assert (dataset / name).read_bytes() == (tmp_path / "dataset" / name).read_bytes()
    for name in ["vae/best.pt", "mdrnn/best.pt", "ctrl/best.pt", "ctrl/last.pt"]:
        ours, by_make = (
            torch.load(folder / name, weights_only=True) for folder in (by_hand / "logs", logdir)
        )
        for key in ("state_dict", "fitness"):
            if key in by_make:
                assert_same_tensors(ours[key], by_make[key], f"{name} {key}")
    assert (by_hand / "logs/ctrl/eval/returns.csv").read_text() == (
        logdir / "ctrl/eval/returns.csv"
    ).read_text()


def readme_commands() -> list[list[str]]:
    """The by-hand pipeline block of the README: one command per stage, `[...]` options dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- by-hand pipeline -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no by-hand pipeline block"
    lines = [re.sub(r"\[[^]]*\]", "", line).split("#")[0] for line in block.group(1).splitlines()]
    return [shlex.split(line) for line in lines if line.strip()]


def assert_same_tensors(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
    else:
        assert torch.equal(a, b), what


def test_timing_records_every_run_even_failures(tmp_path):
    log = tmp_path / "timings.csv"
    assert run_timed("vae", [sys.executable, "-c", "pass"], log) == 0
    assert run_timed("vae", [sys.executable, "-c", "raise SystemExit(3)"], log) == 3
    rows = read_timings(log)
    assert [(r["stage"], r["status"]) for r in rows] == [("vae", "0"), ("vae", "3")]
    assert "raise SystemExit(3)" in rows[1]["command"]


def test_report_lists_missing_pieces_instead_of_failing(tmp_path):
    empty = build_report(tmp_path / "empty", dataset=tmp_path / "no-dataset").read_text()
    for piece in [
        "test returns",
        "vae/best.pt",
        "mdrnn/best.pt",
        "ctrl/last.pt",
        "V reconstructions",
        "GIF of a test episode",
        "stage timings",
        f"rollouts under {tmp_path / 'no-dataset'}",
    ]:
        assert piece in empty.split("## Missing")[1], piece

    # only the test and two runs of one stage: the score is reported, the timings summed
    logdir = tmp_path / "partial"
    (logdir / "ctrl" / "eval").mkdir(parents=True)
    (logdir / "ctrl" / "eval" / "returns.csv").write_text(
        "episode,seed,return,frames\n0,1,100,1000\n1,2,300,1000\n"
    )
    for _ in range(2):
        run_timed("data", [sys.executable, "-c", "pass"], logdir / "report" / "timings.csv")
    text = build_report(logdir).read_text()
    assert "200.0 ± 100.0 over 2 episodes (min 100.0, max 300.0)" in text
    assert "| data |" in text and "| 2 |" in text
    assert "## The 2 worst test tracks" in text
    assert text.index("| 0 | 1 | 100.0 | 1000 | - |") < text.index("| 1 | 2 | 300.0 | 1000 | - |")
    assert (logdir / "report" / "test_returns.png").is_file()
    assert "timing of stage vae" in text and "ctrl/best.pt" in text
