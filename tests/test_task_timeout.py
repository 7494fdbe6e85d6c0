"""--task-timeout as test_controller.py passes it to its pool: an episode task that hangs is
killed after --task-timeout seconds per episode of the task, its worker replaced, the task
rerun, and the run ends with the returns it would have had. (Pool-level cases: test_pool.py.)

The hang is real and inside the task: the worker's env sleeps in its 5th step, once in the
whole process tree (tests/worker_hooks.py). main() runs in this process, its spawned workers
get the hook through PYTHONPATH. The default timeout (300 s per episode) would outlast the
test's watchdog alarm, which then fails it (the pool stops its workers on the way out).
"""

from __future__ import annotations

import csv
import re
import signal
from pathlib import Path

import numpy as np
import torch
from worker_hooks import hooked_env

from agent.policy import Agent, run_episode
from agent.seeds import holdout_seeds
from agent.world import load_best_controller, load_world
from envs.carracing import make_env
from models.controller import Controller
from models.mdrnn import MDRNNCell
from models.vae import VAE
from utils.checkpoint import save_checkpoint
from utils.params import count_params, set_flat_params

LATENT, HIDDEN, K, FRAMES = 8, 16, 4, 40
TIMEOUT, ENVS_PER_WORKER = 3, 2  # a task of 2 episodes may run 6 s (it needs well under 1 s)
WATCHDOG_S = 120  # the whole run, hang and rerun included, on a loaded machine: about 20 s


class StillHung(Exception):
    """Raised by the watchdog alarm: the hung task was never timed out."""


def _watchdog(signum, frame):
    raise StillHung(f"test_controller.py still running after {WATCHDOG_S} s: the hung task was not timed out")


def make_trained_world(logdir: Path) -> Path:
    """Random-init V and M (k = 4) and a C in best.pt, laid out as the stages write them."""
    torch.manual_seed(0)
    vae, mdrnn = VAE(latent_size=LATENT), MDRNNCell(LATENT, 3, HIDDEN, 5)
    for stage, model, extra in (("vae", vae, {}), ("mdrnn", mdrnn, {"action_repeat": K})):
        save_checkpoint(
            logdir / stage / "best.pt",
            {"state_dict": model.state_dict(), "config": model.config | extra, "epoch": 1, "best_loss": 1.0},
        )
    controller = Controller(LATENT, HIDDEN, 3)
    set_flat_params(controller, np.random.default_rng(3).normal(0, 0.5, count_params(controller)))
    save_checkpoint(
        logdir / "ctrl" / "best.pt",
        {"state_dict": controller.state_dict(), "config": controller.config, "generation": 1}
        | {"eval_return": 1.0, "action_repeat": K},
    )
    return logdir


def test_hung_episode_is_killed_after_task_timeout_and_rerun(tmp_path, monkeypatch, capsys):
    import test_controller

    logdir = make_trained_world(tmp_path / "logdir")
    hooks = hooked_env(
        tmp_path / "hooks", WM_TEST_HANG_AT_STEP="5", WM_TEST_HANG_MARKER=str(tmp_path / "hung")
    )
    for name in ("PYTHONPATH", "WM_TEST_HANG_AT_STEP", "WM_TEST_HANG_MARKER"):
        monkeypatch.setenv(name, hooks[name])
    previous = signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(WATCHDOG_S)
    try:
        test_controller.main(
            ["--logdir", str(logdir), "--episodes", "2", "--max-steps", str(FRAMES), "--workers", "1"]
            + ["--envs-per-worker", str(ENVS_PER_WORKER), "--task-timeout", str(TIMEOUT)]
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert (tmp_path / "hung").exists()  # the episode did hang
    limit = TIMEOUT * ENVS_PER_WORKER
    said = re.findall(
        r"warning: worker pid \d+ ran over (\d+)s on task 0; replacing it and rerunning the task", err
    )
    assert said == [str(limit)], err

    with open(logdir / "ctrl" / "eval" / "returns.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    vae, mdrnn, config = load_world(logdir)
    agent, env = Agent(vae, mdrnn, load_best_controller(logdir, config)[0]), make_env(action_repeat=K)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run it
    try:
        expected = [run_episode(env, agent, seed, FRAMES) for seed in holdout_seeds(0, 2)]
    finally:
        torch.set_num_threads(threads)
        env.close()
    assert [(r["return"], int(r["frames"])) for r in rows] == [(f"{r:.6g}", n) for r, n in expected]
