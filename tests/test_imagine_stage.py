"""`traincontroller.py --imagine` end to end at toy size, as a user runs it: random-init V
(latent 8) and M (hidden 16) over 6 tiny real rollouts, rounds of a few updates, 2 evaluation
and 2 noisy episodes of 24 frames, all four kept as rollouts.

Covers: every real frame is counted (the initial rollouts, the evaluations, the collected
rollouts, which are on disk); M is fine-tuned on the new data and best.pt carries it;
test_controller.py plays best.pt with that M; a run killed inside round 2 (SIGKILL inside a
write) and rerun gives the files of two rounds run straight; a resume with another setting,
or a CMA-ES last.pt, is refused with one line; the final re-scoring plays each kept round's C
with its own M on the same fresh tracks, counts their frames and makes the best one best.pt.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import test_controller
from agent.policy import Agent, run_episode
from agent.seeds import RESCORE, holdout_seeds, rescore_seeds
from agent.world import load_mdrnn, load_vae, mdrnn_from_state
from data.rollouts import load_rollout
from envs.carracing import make_env
from models.controller import Controller
from reporting import dream_gif
from reporting.export import export
from reporting.report import build_report
from utils.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LATENT, HIDDEN, FRAMES = 8, 16, 24
SMALL = ["--updates", "3", "--collect-episodes", "2", "--eval-episodes", "2", "--max-steps", str(FRAMES)]
SMALL += ["--workers", "1", "--horizon", "5", "--m-updates", "5", "--rescore-episodes", "0"]


def run(logdir: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "traincontroller.py"), "--logdir", str(logdir), "--imagine", *flags]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env or dict(os.environ)
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


@pytest.fixture(scope="module")
def two_rounds(world, tmp_path_factory) -> Path:
    """A user's session: one round; then --rounds 2, killed inside round 2 (SIGKILL inside its
    third file write: the log rewritten at the start, then the two collected rollouts); then
    the same command again."""
    logdir = tmp_path_factory.mktemp("two_rounds")
    for stage in ("vae", "mdrnn"):
        shutil.copytree(world / stage, logdir / stage)
    ok(run(logdir, *SMALL, "--rounds", "1"))
    shutil.copy(logdir / "ctrl/last.pt", logdir / "last_after_1.pt")
    died = run(logdir, *SMALL, "--rounds", "2", env=dict(os.environ, WORLD_MODELS_KILL_AT_WRITE="3"))
    assert died.returncode == -signal.SIGKILL, (died.returncode, died.stderr[-2000:])
    assert load_checkpoint(logdir / "ctrl/last.pt")["round"] == 1  # round 2 was not committed
    assert (logdir / "ctrl/rollouts/round_002/rollout_0.npz").is_file()
    assert list((logdir / "ctrl/rollouts/round_002").glob(".rollout_1.npz.*.tmp*"))  # killed in that write
    resumed = ok(run(logdir, *SMALL, "--rounds", "2"))
    assert "resuming" in resumed.stdout and "after round 1" in resumed.stdout
    return logdir


def same_files(a: Path, b: Path) -> None:
    """The same run: last.pt's tensors and numbers, best.pt's, the collected rollouts' bytes."""
    for name in ("last.pt", "best.pt"):
        x, y = load_checkpoint(a / "ctrl" / name), load_checkpoint(b / "ctrl" / name)
        assert_same(x, y, name)
    collected = sorted(p.relative_to(a) for p in (a / "ctrl/rollouts").rglob("*.npz"))
    assert collected == sorted(p.relative_to(b) for p in (b / "ctrl/rollouts").rglob("*.npz"))
    for name in collected:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def assert_same(x, y, where: str) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for key in x:
            if key != "seconds":  # wall time
                assert_same(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


def test_every_real_frame_is_counted_and_m_is_fine_tuned(world, two_rounds, tiny_dataset):
    last = load_checkpoint(two_rounds / "ctrl/last.pt")
    initial = sum(len(load_rollout(p)["actions"]) for p in tiny_dataset.rglob("rollout_*.npz"))  # k = 1
    collected = [dict(np.load(p)) for p in (two_rounds / "ctrl/rollouts").rglob("*.npz")]
    assert len(collected) == 2 * (2 + 2) == len(last["collected"])  # per round: 2 evaluations, 2 noisy
    assert all(len(r["actions"]) == FRAMES and r["mu"].shape == (FRAMES, LATENT) for r in collected)
    assert sorted(r["seed"][2] for r in collected) == [FRAMES] * 8  # each file says the frames it played
    assert last["frames"] == initial + 8 * FRAMES
    assert last["imagine"]["m_updates"] == 5  # --m-updates is the run's setting
    # round 1 learns on the initial data; round 2 fine-tunes M on it and the collected rollouts first
    original = load_checkpoint(world / "mdrnn/best.pt")["state_dict"]
    after_1 = load_checkpoint(two_rounds / "last_after_1.pt")["mdrnn"]["state_dict"]
    assert all(torch.equal(after_1[k], v) for k, v in original.items())
    assert not torch.equal(last["mdrnn"]["state_dict"]["head.weight"], original["head.weight"])
    assert torch.equal(
        load_checkpoint(two_rounds / "mdrnn/best.pt")["state_dict"]["head.weight"], original["head.weight"]
    )
    rows = (two_rounds / "ctrl/log.csv").read_text().splitlines()
    assert rows[0].startswith("round,") and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert (two_rounds / "ctrl/curves.png").read_bytes()[:4] == b"\x89PNG"


def test_exported_best_pt_plays_with_its_own_m(world, two_rounds, tmp_path):
    """Exported beside the shipped V and M it shares (symlinks), test_controller.py plays C with
    the M in its best.pt."""
    run_dir = tmp_path / "copy"
    shutil.copytree(two_rounds, run_dir)
    best = load_checkpoint(run_dir / "ctrl/best.pt")
    assert "mdrnn" in best and best["action_repeat"] == 1
    # a C that leans on h, and an M of its own far from L/mdrnn's, so that playing the wrong M shows
    torch.manual_seed(5)
    best["state_dict"] = {k: torch.randn_like(v) for k, v in best["state_dict"].items()}
    best["mdrnn"]["state_dict"] = {k: 3 * torch.randn_like(v) for k, v in best["mdrnn"]["state_dict"].items()}
    save_checkpoint(run_dir / "ctrl/best.pt", best)
    logdir = tmp_path / "exported"
    export(run_dir, logdir, share=world)
    assert (logdir / "vae/best.pt").is_symlink() and (logdir / "mdrnn/best.pt").is_symlink()
    assert not (logdir / "ctrl/best.pt").is_symlink()
    played = subprocess.run(
        [sys.executable, str(ROOT / "test_controller.py"), "--logdir", str(logdir), "--episodes", "2",
         "--max-steps", "60", "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert played.returncode == 0, played.stderr[-2000:]
    rows = (logdir / "ctrl/eval/returns.csv").read_text().splitlines()[1:]
    returns = [float(line.split(",")[2]) for line in rows]
    controller = Controller(LATENT, HIDDEN, 3)
    controller.load_state_dict(best["state_dict"])
    env = make_env()
    by_hand = {}
    for which, mdrnn in (("own", mdrnn_from_state(best["mdrnn"])), ("stage", load_mdrnn(logdir))):
        agent = Agent(load_vae(logdir), mdrnn, controller)
        by_hand[which] = [run_episode(env, agent, seed, 60)[0] for seed in holdout_seeds(0, 2)]
    env.close()
    assert by_hand["own"] != pytest.approx(by_hand["stage"], abs=1e-3)  # the M played matters here
    assert returns == pytest.approx(by_hand["own"], abs=1e-4)  # returns.csv keeps 6 digits
    loaded, _, _ = test_controller.load_agent(str(logdir))
    assert torch.equal(loaded.mdrnn.head.weight, best["mdrnn"]["state_dict"]["head.weight"])


def test_two_rounds_straight_equal_one_then_a_killed_round_rerun(world, two_rounds, tmp_path):
    straight = tmp_path / "straight"
    for stage in ("vae", "mdrnn"):
        shutil.copytree(world / stage, straight / stage)
    ok(run(straight, *SMALL, "--rounds", "2"))
    same_files(straight, two_rounds)
    assert not [p for p in (two_rounds / "ctrl").rglob("*") if ".tmp" in p.name]  # the rerun cleaned up


def test_the_report_reads_an_imagination_run(two_rounds, tmp_path):
    logdir = tmp_path / "copy"
    shutil.copytree(two_rounds, logdir)
    text = build_report(logdir).read_text()
    assert "2 rounds of learning in imagination" in text and "| round | real env frames |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) >= 2 and (logdir / "report/learning_curve.png").is_file()
    assert "M's imagination" in text and "(dream_vs_real.gif)" in text
    from PIL import Image

    with Image.open(logdir / "report/dream_vs_real.gif") as gif:  # round 2's first evaluation episode
        assert gif.size == (260, 128) and gif.n_frames == FRAMES // 2
    dream_gif.main(["--logdir", str(logdir), "--out", str(tmp_path / "d.gif"), "--max-steps", str(FRAMES)])
    with Image.open(tmp_path / "d.gif") as gif:  # a held-out track, every other step, twice the size
        assert gif.size == (260, 128) and gif.n_frames == FRAMES // 2


def test_a_resume_with_other_settings_or_of_another_kind_is_refused(two_rounds, tmp_path):
    logdir = tmp_path / "copy"
    shutil.copytree(two_rounds, logdir)
    other = run(logdir, *[("7" if flag == "3" else flag) for flag in SMALL], "--rounds", "3")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith("error: ") and "--updates 3" in other.stderr
    cmaes = subprocess.run(
        [sys.executable, str(ROOT / "traincontroller.py"), "--logdir", str(logdir), "--generations", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cmaes.returncode == 2 and "is an --imagine run" in cmaes.stderr and "Traceback" not in cmaes.stderr


def test_the_final_rescoring_picks_the_kept_round_that_plays_best(two_rounds, tmp_path):
    logdir = tmp_path / "copy"
    shutil.copytree(two_rounds, logdir)
    before = load_checkpoint(logdir / "ctrl/last.pt")
    log = [line.split(",") for line in (logdir / "ctrl/log.csv").read_text().splitlines()]
    evals = {int(row[0]): float(row[log[0].index("eval_mean")]) for row in log[1:]}
    assert [r for _, r in before["candidates"]] == sorted(evals, key=lambda r: -evals[r])  # best first
    assert [e for e, _ in before["candidates"]] == pytest.approx(
        sorted(evals.values(), reverse=True), abs=1e-3
    )
    assert sorted(p.name for p in (logdir / "ctrl/candidates").iterdir()) == ["round_001.pt", "round_002.pt"]
    done = ok(run(logdir, *SMALL[:-1], "3", "--rounds", "2"))
    assert "re-scored: best.pt is round" in done.stdout
    rows = [line.split(",") for line in (logdir / "ctrl/rescore.csv").read_text().splitlines()[1:]]
    assert len(rows) == 2 and sum(int(row[-1]) for row in rows) == 1
    tracks = rescore_seeds(0, 2, 3)
    assert all(t // 2**32 == RESCORE for t in tracks) and not set(tracks) & set(holdout_seeds(0, 1000))
    env, by_hand = make_env(), {}
    for row in rows:
        candidate = load_checkpoint(logdir / f"ctrl/candidates/round_{int(row[0]):03d}.pt")
        controller = Controller(LATENT, HIDDEN, 3)
        controller.load_state_dict(candidate["state_dict"])
        agent = Agent(load_vae(logdir), mdrnn_from_state(candidate["mdrnn"]), controller)
        by_hand[int(row[0])] = np.mean([run_episode(env, agent, track, FRAMES)[0] for track in tracks])
        assert float(row[2]) == pytest.approx(by_hand[int(row[0])], abs=1e-3)
    env.close()
    chosen = max(by_hand, key=by_hand.get)
    best = load_checkpoint(logdir / "ctrl/best.pt")
    expected = load_checkpoint(logdir / f"ctrl/candidates/round_{chosen:03d}.pt")
    assert best["round"] == chosen and best["eval_episodes"] == 3
    assert all(torch.equal(best["state_dict"][k], v) for k, v in expected["state_dict"].items())
    assert best["eval_return"] == pytest.approx(by_hand[chosen], abs=1e-3)
    assert load_checkpoint(logdir / "ctrl/last.pt")["frames"] == before["frames"] + 2 * 3 * FRAMES
    again = ok(run(logdir, *SMALL[:-1], "3", "--rounds", "2"))
    assert "nothing to do" in again.stdout
    table = [line for line in build_report(logdir).read_text().splitlines() if line.endswith("| yes |")]
    assert len(table) == 1 and table[0].startswith(f"| {chosen} |")  # the report shows the pick
