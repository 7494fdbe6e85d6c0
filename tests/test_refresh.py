"""`traincontroller.py --refresh-every` (iterative data for CMA-ES) end to end at toy size:
random-init V (latent 8) and M (hidden 16) over the tiny real rollouts, a population of 4 on
episodes of 24 frames, M refreshed after generation 1 on 2 noisy rollouts of the mean.

Covers: the refresh collects, counts its frames, fine-tunes M and saves it as a new version
while L/mdrnn stays as trained; a search saved without refreshes that turns them on, killed
inside the refresh (SIGKILL inside a write) and rerun, gives the files of a run refreshed from
the start; the final re-scoring plays each kept mean with the M it was evaluated with, and
best.pt carries that M for test_controller.py; the report says how M was refreshed; a resume
with another refresh setting, or --refresh-every with --dream, is refused with one line.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_imagine_stage import assert_same, ok

import test_controller
import traincontroller
from agent.policy import Agent, run_episodes
from agent.refresh import RefreshSettings, WorldRefresh, world_path
from agent.seeds import COLLECT, rescore_seeds
from agent.world import load_vae, mdrnn_from_state
from envs.carracing import make_env
from models.controller import Controller
from reporting.report import build_report
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import BadCheckpointError
from utils.params import set_flat_params

ROOT = Path(__file__).resolve().parents[1]
LATENT, HIDDEN, FRAMES = 8, 16, 24
SMALL = ["--pop-size", "4", "--n-samples", "2", "--max-steps", str(FRAMES), "--eval-episodes", "2"]
SMALL += ["--eval-every", "1", "--sigma0", "0.5", "--workers", "1", "--refresh-every", "1"]
SMALL += ["--collect-episodes", "2", "--m-updates", "5", "--rescore-episodes", "2"]


def run(logdir: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "traincontroller.py"), "--logdir", str(logdir), *flags]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env or dict(os.environ)
    )


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


def copy_world(world: Path, logdir: Path) -> Path:
    for stage in ("vae", "mdrnn"):
        shutil.copytree(world / stage, logdir / stage)
    return logdir


@pytest.fixture(scope="module")
def refreshed(world, tmp_path_factory) -> Path:
    """A user's session: generation 1 without refreshes (and not re-scored: that would cost
    frames); then --generations 2 with refreshes every generation, which turns them on, killed
    inside the refresh that comes first (SIGKILL inside its third file write: the log rewritten
    at the start, then the two collected rollouts); then the same command again."""
    logdir = copy_world(world, tmp_path_factory.mktemp("refreshed"))
    ok(run(logdir, *SMALL, "--generations", "1", "--refresh-every", "0", "--rescore-episodes", "0"))
    assert "refresh" not in load_checkpoint(logdir / "ctrl/last.pt")
    died = run(logdir, *SMALL, "--generations", "2", env=dict(os.environ, WORLD_MODELS_KILL_AT_WRITE="3"))
    assert died.returncode == -signal.SIGKILL, (died.returncode, died.stderr[-2000:])
    assert "refresh" not in load_checkpoint(logdir / "ctrl/last.pt")  # the refresh was not committed
    assert (logdir / "ctrl/rollouts/refresh_01/rollout_0.npz").is_file()
    assert list((logdir / "ctrl/rollouts/refresh_01").glob(".rollout_1.npz.*.tmp*"))  # killed in that write
    resumed = ok(run(logdir, *SMALL, "--generations", "2"))
    assert "M is refreshed from generation 1 on, every 1" in resumed.stdout
    assert "refresh 1 after generation 1" in resumed.stdout and "re-scored: best.pt" in resumed.stdout
    return logdir


def log_rows(logdir: Path) -> list[dict]:
    with open(logdir / "ctrl/log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_refresh_counts_its_frames_and_fine_tunes_a_new_m(world, refreshed):
    last = load_checkpoint(refreshed / "ctrl/last.pt")
    assert last["generation"] == 2 and last["refresh"]["version"] == 1  # after generation 2: no refresh
    assert last["refresh"]["m_updates"] == 5 and last["refresh"]["collect_episodes"] == 2
    collected = [dict(np.load(refreshed / "ctrl" / name)) for name in last["refresh"]["collected"]]
    assert len(collected) == 2 and all(r["mu"].shape == (len(r["actions"]), LATENT) for r in collected)
    assert all(r["seed"][0] // 2**32 == COLLECT for r in collected)  # fresh tracks, not training ones
    assert not np.allclose(*[r["actions"][:5] for r in collected])  # noise of their own
    rows = log_rows(refreshed)
    assert [r["generation"] for r in rows] == ["1", "2"] and rows[0]["m_loss"] == ""
    assert float(rows[1]["m_loss"]) > 0 and float(rows[1]["collect_mean"]) == pytest.approx(
        np.mean([r["rewards"].sum() for r in collected]), abs=1e-3
    )
    # between the rows: the refresh's rollouts, generation 2's candidates (4 x 2 tracks) and its evaluation (2)
    played = int(rows[1]["env_frames"]) - int(rows[0]["env_frames"])
    refresh_frames = sum(int(r["seed"][2]) for r in collected)
    assert refresh_frames == sum(len(r["actions"]) for r in collected) == 2 * FRAMES  # k = 1
    assert played == refresh_frames + (4 * 2 + 2) * FRAMES  # 24 frames: no episode ends sooner
    original = load_checkpoint(world / "mdrnn/best.pt")["state_dict"]
    new_m = load_checkpoint(world_path(refreshed / "ctrl", 1))
    assert torch.equal(
        new_m["state_dict"]["head.weight"], last["refresh"]["mdrnn"]["state_dict"]["head.weight"]
    )
    assert not torch.equal(new_m["state_dict"]["head.weight"], original["head.weight"])
    stage_m = load_checkpoint(refreshed / "mdrnn/best.pt")["state_dict"]
    assert torch.equal(stage_m["head.weight"], original["head.weight"])  # L/mdrnn stays as trained


def test_turned_on_killed_and_rerun_equals_a_run_refreshed_from_the_start(world, refreshed, tmp_path):
    straight = copy_world(world, tmp_path / "straight")
    ok(run(straight, *SMALL, "--generations", "2"))  # the first refresh after generation 1, as above
    for name in ("last.pt", "best.pt", "worlds/m_01.pt"):
        assert_same(
            load_checkpoint(straight / "ctrl" / name), load_checkpoint(refreshed / "ctrl" / name), name
        )
    for name in ("rollout_0.npz", "rollout_1.npz"):
        path = Path("ctrl/rollouts/refresh_01") / name
        assert (straight / path).read_bytes() == (refreshed / path).read_bytes(), name
    assert not [p for p in (refreshed / "ctrl").rglob("*") if ".tmp" in p.name]  # the rerun cleaned up


def test_each_kept_mean_is_rescored_and_shipped_with_the_m_it_was_evaluated_with(refreshed, tmp_path):
    """Generation 1 was evaluated before the refresh, with L/mdrnn's M; generation 2 with refresh
    1's. Made to lean on h, with a refreshed M far from L/mdrnn's so that playing the wrong M
    shows, the two kept means are re-scored again on 3 tracks."""
    logdir = tmp_path / "copy"
    shutil.copytree(refreshed, logdir)
    last = load_checkpoint(logdir / "ctrl/last.pt")
    assert sorted(last["kept_generations"].tolist()) == [1, 2]
    torch.manual_seed(5)
    last["kept_means"] = torch.randn_like(last["kept_means"])
    own = {k: 3 * torch.randn_like(v) for k, v in last["refresh"]["mdrnn"]["state_dict"].items()}
    last["refresh"]["mdrnn"]["state_dict"] = own
    save_checkpoint(logdir / "ctrl/last.pt", last)
    save_checkpoint(world_path(logdir / "ctrl", 1), last["refresh"]["mdrnn"])
    done = ok(run(logdir, *SMALL[:-1], "3", "--generations", "2"))
    assert "re-scored: best.pt is generation" in done.stdout
    ms = {1: load_checkpoint(logdir / "mdrnn/best.pt"), 2: last["refresh"]["mdrnn"]}
    tracks, envs = rescore_seeds(0, 2, 3), [make_env() for _ in range(3)]
    by_hand = {}  # (generation, the generation whose M) -> mean return on the re-scoring tracks
    for generation, mean in zip(last["kept_generations"].tolist(), last["kept_means"].double().numpy()):
        controller = set_flat_params(Controller(LATENT, HIDDEN, 3), mean)
        for m_of in (1, 2):
            agent = Agent(load_vae(logdir), mdrnn_from_state(ms[m_of]), controller)
            by_hand[generation, m_of] = np.mean([r for r, _ in run_episodes(envs, agent, tracks, FRAMES)])
    for env in envs:
        env.close()
    assert any(by_hand[g, 1] != pytest.approx(by_hand[g, 2], abs=1e-3) for g in (1, 2))  # the M matters
    with open(logdir / "ctrl/rescore.csv", newline="") as handle:
        rows = {int(row["generation"]): row for row in csv.DictReader(handle)}
    assert {g: float(row["rescore_mean"]) for g, row in rows.items()} == pytest.approx(
        {g: by_hand[g, g] for g in (1, 2)}, abs=1e-3
    )
    chosen = next(g for g, row in rows.items() if row["chosen"] == "1")
    best = load_checkpoint(logdir / "ctrl/best.pt")
    assert best["generation"] == chosen and ("mdrnn" in best) == (chosen == 2)
    agent, _, _ = test_controller.load_agent(str(logdir))  # the test plays best.pt's C with its M
    assert torch.equal(agent.mdrnn.head.weight, ms[chosen]["state_dict"]["head.weight"])


def test_other_refresh_settings_or_a_dream_refresh_are_refused_with_one_line(refreshed, tmp_path, capsys):
    logdir = tmp_path / "copy"
    shutil.copytree(refreshed, logdir)
    other = run(logdir, *[("3" if flag == "5" else flag) for flag in SMALL], "--generations", "3")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith("error: ") and "--m-updates 5" in other.stderr
    off = traincontroller.parse_args(["--logdir", str(logdir), *SMALL, "--refresh-every", "0"])
    with pytest.raises(BadCheckpointError, match=re.escape("--refresh-every 1 (this run: 0)")):
        traincontroller.resume_or_start(
            off, {"latent_size": LATENT, "hidden_size": HIDDEN, "action_size": 3}, logdir / "ctrl"
        )
    with pytest.raises(SystemExit) as refused:  # argparse's one line, before anything is loaded
        traincontroller.parse_args(["--logdir", str(logdir), "--dream", "--refresh-every", "2"])
    assert refused.value.code == 2 and "--refresh-every" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_report_says_how_m_was_refreshed_and_lists_the_rescored_means(refreshed, tmp_path):
    logdir = tmp_path / "copy"
    shutil.copytree(refreshed, logdir)
    text = build_report(logdir).read_text()
    assert "M refreshed 1 time, every 1 generations from generation 1" in text
    assert "played 2 fresh tracks and M was fine-tuned on them for 5 batches" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert "| generation | its evaluation | re-scored | chosen |" in text and len(rows) >= 2


def test_the_schedule_refreshes_at_the_start_then_every_g_and_evaluations_see_the_m_before():
    """--refresh-start 50 --refresh-every 10: refreshes before generations 51, 61, ...; the mean
    evaluated after generation g played with the M of the refreshes before g."""

    def refreshed_after(refresh: WorldRefresh, generations: int) -> list[int]:
        done = []  # as traincontroller.py's loop: before each generation, refresh if due
        for generation in range(generations):
            if refresh.due(generation):
                done.append(generation)
                refresh.version += 1
            assert not refresh.due(generation)  # once per generation
        return done

    refresh = WorldRefresh(RefreshSettings(refresh_every=10, refresh_start=50), torch.nn.Linear(1, 1))
    assert refreshed_after(refresh, 100) == [50, 60, 70, 80, 90]
    assert [refresh.version_at(g) for g in (1, 50, 51, 60, 61, 70, 71)] == [0, 0, 1, 1, 2, 2, 3]
    default = WorldRefresh(RefreshSettings(refresh_every=10), torch.nn.Linear(1, 1))
    assert refreshed_after(default, 30) == [10, 20] and default.version_at(11) == 1
    off = WorldRefresh(RefreshSettings(), torch.nn.Linear(1, 1))
    assert refreshed_after(off, 100) == [] and off.version_at(99) == 0
