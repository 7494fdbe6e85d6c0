"""Stage 4 (C + CMA-ES) for real, small: random-init V (latent 8) and M (hidden 16), pop 4,
episodes of 30 steps in the real CarRacing env.

Covers: fitness = mean of the episodes' returns; resuming continues the very same search;
actions stay in the box for any parameters; missing or mismatched checkpoints give one line;
Ctrl-C leaves a valid last.pt and no workers; an end-to-end run trains, resumes, is evaluated
by test_controller.py and recorded as a GIF. Pool failures are in test_pool.py.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.policy import BLOCK, Agent, run_episode, run_episodes
from agent.population import RealEvaluator, WorkerSpec, init_worker
from agent.search import Search
from agent.world import load_world
from envs.carracing import make_env
from models.controller import Controller
from models.mdrnn import MDRNNCell
from models.vae import VAE
from pool.local import WorkerPool
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.params import count_params, get_flat_params, set_flat_params

ROOT = Path(__file__).resolve().parents[1]
LATENT, HIDDEN, STEPS = 8, 16, 32  # STEPS: env frames, a multiple of the default action repeat 4
SMALL = [
    "--pop-size",
    "4",
    "--n-samples",
    "2",
    "--max-steps",
    str(STEPS),
    "--eval-episodes",
    "2",
    "--sigma0",
    "0.5",
    "--max-workers",
    "2",
    "--rescore-episodes",
    "0",  # best.pt: the best evaluation (the final re-scoring: test_controller_noise.py)
]


def make_world(logdir: Path, latent: int = LATENT, hidden: int = HIDDEN, action_repeat: int = 4) -> Path:
    """Random-init V and M checkpoints, laid out as trainvae.py / trainmdrnn.py write them (M at k = action_repeat)."""
    torch.manual_seed(0)
    vae, mdrnn = VAE(latent_size=latent), MDRNNCell(latent, 3, hidden, 5)
    for stage, model, extra in (("vae", vae, {}), ("mdrnn", mdrnn, {"action_repeat": action_repeat})):
        save_checkpoint(
            logdir / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 1, "best_loss": 1.0},
        )
    return logdir


def run_script(script: str, *args: str, display: str | None = None, wait: bool = True):
    """Run a top-level script like a user would. display=None: no display at all; "dummy": SDL's virtual one."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    if display:
        env["SDL_VIDEODRIVER"] = display
    process = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if not wait:
        return process
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A user's session: 1 generation with --display on a machine without one, then a resume to 2."""
    logdir = make_world(tmp_path_factory.mktemp("trained"))
    first = run_script(
        "traincontroller.py", "--logdir", str(logdir), *SMALL, "--generations", "1", "--display"
    )
    assert first.returncode == 0, first.stderr
    shutil.copy(logdir / "ctrl" / "last.pt", logdir / "last_after_1.pt")
    second = run_script("traincontroller.py", "--logdir", str(logdir), *SMALL, "--generations", "2")
    assert second.returncode == 0, second.stderr
    return dict(logdir=logdir, first=first, second=second)


# ----------------------------------------------------------------------------- building blocks


def test_flat_params_roundtrip():
    controller = Controller(LATENT, HIDDEN, 3)
    flat = np.random.default_rng(0).normal(size=count_params(controller))
    assert count_params(controller) == (LATENT + HIDDEN) * 3 + 3
    np.testing.assert_allclose(get_flat_params(set_flat_params(controller, flat)), flat, rtol=1e-6)
    assert get_flat_params(controller).dtype == np.float64
    with pytest.raises(ValueError, match="expected a flat vector"):
        set_flat_params(controller, flat[:-1])


@pytest.mark.parametrize("scale", [1e6, -1e6, 30.0])
def test_actions_stay_in_action_space(world, scale):
    """Extreme controller parameters saturate, they never leave the box CarRacing accepts."""
    vae, mdrnn, config = load_world(world)
    controller = Controller(**config)
    rng = np.random.default_rng(int(abs(scale)))
    set_flat_params(
        controller,
        scale * (rng.random(count_params(controller)) if scale > 0 else np.ones(count_params(controller))),
    )
    agent, env = Agent(vae, mdrnn, controller), make_env()
    obs, _ = env.reset(seed=1)
    for _ in range(10):
        action = agent.act(obs[None])[0]  # a batch of one
        assert action.shape == (3,) and action.dtype == np.float32
        assert env.action_space.contains(action), action
        obs, *_ = env.step(action)
    env.close()


def test_display_process_drives_best_controller(trained):
    """watch_best (the --display process) opens a window (SDL's virtual one here) and drives best.pt.
    At niceness 0: at 19 it would wait its turn behind every other test process of the suite."""
    spec = f"DisplaySpec({str(trained['logdir'])!r}, max_steps=20, seed=0, action_repeat=4, episodes=2, niceness=0)"
    code = f"from agent.display import DisplaySpec, watch_best; watch_best({spec})"
    env = dict(os.environ, SDL_VIDEODRIVER="dummy")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "display:" not in result.stderr  # no "cannot open" / "closed" message


# ----------------------------------------------------------------------------- resume


def test_resume_restores_saved_search(trained):
    """last.pt after generation 1 rebuilds the search: same sigma, mean = the saved C, generation 1."""
    state = load_checkpoint(trained["logdir"] / "last_after_1.pt")  # weights_only=True
    assert state["fitness"].shape == (1, 4)
    es = Search.from_state(state).es
    assert state["generation"] == 1 and es.countiter == 1
    assert es.sigma == state["sigma"]
    controller = Controller(**state["config"])
    controller.load_state_dict(state["state_dict"])
    np.testing.assert_allclose(get_flat_params(controller), es.mean, atol=1e-6)
    assert "resuming" in trained["second"].stdout and "after generation 1" in trained["second"].stdout


def test_two_generations_equal_one_plus_resume(trained, tmp_path):
    """An uninterrupted 2-generation run and 1 generation + resume give the same search."""
    import traincontroller

    logdir = make_world(tmp_path)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        traincontroller.main(["--logdir", str(logdir), *SMALL, "--generations", "2"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    straight = load_checkpoint(logdir / "ctrl" / "last.pt")
    resumed = load_checkpoint(trained["logdir"] / "ctrl" / "last.pt")
    es_straight, es_resumed = Search.from_state(straight).es, Search.from_state(resumed).es
    assert straight["generation"] == resumed["generation"] == 2
    assert np.array_equal(es_straight.mean, es_resumed.mean)
    assert es_straight.sigma == es_resumed.sigma
    assert np.array_equal(es_straight.sm.C, es_resumed.sm.C)
    fitness = ["generation", "best_fitness", "mean_fitness", "worst_fitness", "sigma"]
    rows = [
        [{k: r[k] for k in fitness} for r in read_csv(d / "ctrl" / "log.csv")]
        for d in (logdir, trained["logdir"])
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 2


# ----------------------------------------------------------------------------- as a user


def test_end_to_end_train_resume_evaluate_record(trained, tmp_path):
    logdir, first, second = trained["logdir"], trained["first"], trained["second"]
    assert "display: no display" in first.stdout + first.stderr and "Traceback" not in first.stderr
    assert "stopped after generation 2: --generations 2 reached" in second.stdout
    log = read_csv(logdir / "ctrl" / "log.csv")
    assert [r["generation"] for r in log] == ["1", "2"] and all(r["eval_mean"] for r in log)
    assert (logdir / "ctrl" / "curves.png").stat().st_size > 0
    best = load_checkpoint(logdir / "ctrl" / "best.pt")
    assert best["config"] == dict(latent_size=LATENT, hidden_size=HIDDEN, action_size=3)
    Controller(**best["config"]).load_state_dict(best["state_dict"])
    assert best["eval_return"] == pytest.approx(max(float(r["eval_mean"]) for r in log), rel=1e-5)

    gif = tmp_path / "episode.gif"
    result = run_script(
        "test_controller.py",
        "--logdir",
        str(logdir),
        "--episodes",
        "2",
        "--max-steps",
        str(STEPS),
        "--record",
        str(gif),
        "--record-worst",
        "2",
        "--display",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "display: no display" in result.stdout and "Traceback" not in result.stderr
    assert "return over 2 episodes" in result.stdout
    rows = read_csv(logdir / "ctrl" / "eval" / "returns.csv")
    assert len(rows) == 2 and all(int(r["frames"]) == STEPS for r in rows)
    assert (logdir / "ctrl" / "eval" / "returns.png").stat().st_size > 0
    assert (
        f"recorded episode 0 (return {float(rows[0]['return']):.1f}" in result.stdout
    )  # deterministic replay
    from PIL import Image

    with Image.open(gif) as image:
        assert image.n_frames > 5 and image.size == (300, 200)
    worst = sorted(rows, key=lambda r: float(r["return"]))  # --record-worst 2: both, the lowest first
    for rank, row in enumerate(worst, start=1):
        path = logdir / "ctrl" / "eval" / "worst" / f"{rank}_episode{int(row['episode']):03d}.gif"
        assert (
            f"episode {row['episode']} (return {float(row['return']):.1f}" in result.stdout
        )  # the same replay
        with Image.open(path) as image:
            assert image.n_frames > 5


def test_interrupt_leaves_valid_last_pt(tmp_path):
    """Ctrl-C mid-generation: exit 130, one message, a loadable last.pt, and no worker left running.

    SIGINT goes once the generation's progress bar shows a finished episode, i.e. the workers
    have loaded V, M and the env and are playing: 8 full episodes (no stall cut-off, one per
    task) of which at most two are done, so the generation is surely still running.
    """
    logdir = make_world(tmp_path)
    process = run_script(
        "traincontroller.py",
        "--logdir",
        str(logdir),
        "--pop-size",
        "4",
        "--n-samples",
        "2",
        "--envs-per-worker",
        "1",
        "--stall-frames",
        "0",
        "--max-steps",
        "1000",
        "--max-workers",
        "2",
        wait=False,
    )
    err, playing = [], threading.Event()

    def read_stderr() -> None:  # tqdm redraws its bar with \r: read what comes, not lines
        while chunk := os.read(process.stderr.fileno(), 4096):
            err.append(chunk.decode(errors="replace"))
            if re.search(r"generation 1/\d+: [^\r]*\| *[1-7]/8 \[", "".join(err)):
                playing.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert playing.wait(timeout=240), "no episode finished in 240 s:\n" + "".join(err)[-3000:]
        workers = _children(process.pid)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        process.kill()
    reader.join(timeout=60)
    err = "".join(err)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted in generation 1" in err
    state = load_checkpoint(logdir / "ctrl" / "last.pt")
    assert state["generation"] == 0 and Search.from_state(state).es.countiter == 0
    assert len(workers) >= 2  # 2 workers (+ multiprocessing's resource tracker)
    deadline = time.monotonic() + 60  # they are stopped before the exit; a little slack to be reaped
    while [pid for pid in workers if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _running(pid)]


def _children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in result.stdout.split()]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------- one-line errors


def run_main(capsys, module: str, *args: str) -> str:
    """A script's main() at its edge (run_script) in this process: its one-line error on stderr, status 2."""
    import importlib

    from script_edge import exit_status

    assert exit_status(importlib.import_module(module).main, list(args)) == 2  # bad input
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_checkpoints_name_the_command(tmp_path, capsys):
    # as a user runs it: exit status, stderr, no traceback
    assert_one_line_error(
        run_script("traincontroller.py", "--logdir", str(tmp_path / "empty")),
        "vae",
        "python trainvae.py --logdir",
    )
    only_v = make_world(tmp_path / "only_v")
    (only_v / "mdrnn" / "best.pt").unlink()
    assert "python trainmdrnn.py --logdir" in run_main(capsys, "traincontroller", "--logdir", str(only_v))
    assert "python trainmdrnn.py --logdir" in run_main(capsys, "test_controller", "--logdir", str(only_v))
    no_c = make_world(tmp_path / "no_c")
    assert "python traincontroller.py --logdir" in run_main(capsys, "test_controller", "--logdir", str(no_c))


def test_checkpoint_for_other_sizes_suggests_noreload(tmp_path, capsys):
    """A C made for other V/M sizes (say M was retrained with hidden 32): one line, --noreload."""
    logdir = make_world(tmp_path)
    other = dict(latent_size=LATENT, hidden_size=32, action_size=3)
    save_checkpoint(logdir / "ctrl" / "last.pt", Search(other, 4, 0.1, 0).state())
    save_checkpoint(
        logdir / "ctrl" / "best.pt",
        {
            "state_dict": Controller(**other).state_dict(),
            "config": other,
            "generation": 1,
            "eval_return": 1.0,
            "eval_std": 0.0,
        },
    )
    line = run_main(capsys, "traincontroller", "--logdir", str(logdir), "--pop-size", "4")
    assert "--hidden-size 32 (this run: 16)" in line and "--noreload" in line
    line = run_main(capsys, "test_controller", "--logdir", str(logdir), "--episodes", "1")
    assert "hidden 32" in line and "--noreload" in line

    same = dict(latent_size=LATENT, hidden_size=HIDDEN, action_size=3)
    state = Search(same, 4, 0.1, 0).state()
    save_checkpoint(logdir / "ctrl" / "last.pt", state)
    line = run_main(
        capsys, "traincontroller", "--logdir", str(logdir), "--pop-size", "8"
    )  # the saved es samples 4
    assert "--pop-size 4 (this run: 8)" in line and "--noreload" in line


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_runs_code_from_last_pt(tmp_path, capsys):
    """A last.pt carrying a code-running pickle (inside a bytes entry, or as the file itself): no code runs."""
    import pickle

    logdir, marker = make_world(tmp_path), tmp_path / "code_ran"
    config = dict(latent_size=LATENT, hidden_size=HIDDEN, action_size=3)
    old_style = Search(config, 4, 0.1, 0, 4, 100).state() | {"es": pickle.dumps(_RunsCode(marker))}
    del old_style["fitness"]  # the pre-relayout format: the search only in the pickled "es" bytes
    save_checkpoint(logdir / "ctrl" / "last.pt", old_style)
    line = run_main(capsys, "traincontroller", "--logdir", str(logdir), "--pop-size", "4")
    assert "cannot resume" in line and "--noreload" in line
    torch.save({"search": _RunsCode(marker)}, logdir / "ctrl" / "last.pt")  # the pickle itself runs code
    line = run_main(capsys, "traincontroller", "--logdir", str(logdir), "--pop-size", "4")
    assert "cannot resume" in line and "--noreload" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------- acting every k frames


def _drive(env, agent: Agent, seed: int, k: int, frames: int) -> tuple[float, int]:
    """By hand: the agent acts on every k-th frame of a plain env, each action held for k frames."""
    obs, _ = env.reset(seed=seed)
    agent.reset()
    total, played = 0.0, 0
    while played < frames:
        action = agent.act(obs[None])[0]
        for _ in range(k):
            obs, reward, terminated, truncated, _ = env.step(action)
            total, played = total + float(reward), played + 1
            if terminated or truncated:
                return total, played
    return total, played


@pytest.mark.parametrize("k", [1, 4])
def test_agent_at_k_equals_stepping_by_hand(world, k):
    """run_episode on make_env(action_repeat=k) == holding each action for k frames of the plain env."""
    vae, mdrnn, config = load_world(world)
    controller = set_flat_params(
        Controller(**config), np.random.default_rng(k).normal(0, 0.3, count_params(Controller(**config)))
    )
    agent = Agent(vae, mdrnn, controller)
    repeated, plain = make_env(action_repeat=k), make_env()
    for seed in (3, 4):
        assert run_episode(repeated, agent, seed, 120) == _drive(plain, agent, seed, k, 120)
    repeated.close()
    plain.close()


def test_batched_episodes_return_the_same_as_single_ones(world):
    """Episodes driven side by side (V, M and C batched) give, bit for bit, what each gives alone:
    the actions step by step (an unpadded batch of 6 differs here in the last bits, which short
    random-world episodes would not show in their returns), and the returns, also when some end
    early (stall cut) and the batch spans two blocks; and the pool's returns do not depend on
    how many envs a worker drives."""
    vae, mdrnn, config = load_world(world)
    params = np.random.default_rng(9).normal(0, 0.3, count_params(Controller(**config)))
    agent = Agent(vae, mdrnn, set_flat_params(Controller(**config), params))
    seeds = [11, 12, 13, 14, 15, 16]  # BLOCK + 2: a full block and a padded one
    envs = [make_env(action_repeat=4) for _ in seeds]
    frames = np.stack([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)])  # (6, 96, 96, 3)
    alone = [Agent(vae, mdrnn, agent.controller) for _ in seeds]
    agent.reset(len(seeds))
    for single in alone:
        single.reset(1)
    for _ in range(3):  # M's state carried along, row by row
        together = agent.act(frames)  # (6, 3)
        assert np.array_equal(
            together, np.concatenate([single.act(frames[i : i + 1]) for i, single in enumerate(alone)])
        )
    stall_frames = 20  # training's cut: episodes of different lengths
    batched = run_episodes(envs, agent, seeds, 160, stall_frames)
    single = [run_episode(envs[0], agent, seed, 160, stall_frames=stall_frames) for seed in seeds]
    assert batched == single and len(seeds) > BLOCK
    assert len({n for _, n in batched}) > 1  # some episodes ended while others went on
    for env in envs:
        env.close()
    by_workers = []
    for envs_per_worker in (1, 4):
        spec = WorkerSpec(str(world), config, 4, envs_per_worker)
        with WorkerPool(2, init_worker, (spec,), task_timeout=120) as pool:
            by_workers.append(
                RealEvaluator(pool, 160, envs_per_worker, stall_frames).evaluate([params], seeds).returns
            )
    np.testing.assert_array_equal(by_workers[0], by_workers[1])
    assert by_workers[0][0].tolist() == [r for r, _ in single]


def test_stalled_training_episodes_stop_early_but_evaluations_play_in_full(world):
    """A C that brakes hard never reaches a new tile: cut after stall_frames with -0.1 per frame left;
    without stall_frames (evaluations, the test) it plays every frame."""
    vae, mdrnn, config = load_world(world)
    params = np.zeros(count_params(Controller(**config)))
    params[-3:] = [0.0, -5.0, 5.0]  # biases: straight, no gas, full brake
    agent = Agent(vae, mdrnn, set_flat_params(Controller(**config), params))
    env = make_env(action_repeat=4)
    full_return, full_frames = run_episode(env, agent, 5, 400)
    cut_return, cut_frames = run_episode(env, agent, 5, 400, stall_frames=40)
    assert full_frames == 400 and 40 <= cut_frames < 100
    assert cut_return == pytest.approx(full_return, abs=1e-6)  # no tile either way: -0.1 for every frame
    with WorkerPool(1, init_worker, (WorkerSpec(str(world), config, 4, 1),)) as pool:
        frames = (
            RealEvaluator(pool, 400, envs_per_worker=1).evaluate([params], [5]).frames
        )  # no stall: the default
    assert frames.tolist() == [[400]]
    env.close()
