"""A transformer M through the stages, as a user runs them: `trainmdrnn.py --arch transformer`
on the tiny dataset, then every stage builds the M its checkpoint names (#23).

Covers: the checkpoint's config says `arch: transformer` and later stages load a
TransformerMCell from it; a resume with the other --arch is refused with one line;
test_controller.py and CMA-ES in the real env play C with it (the returns are the transformer
agent's, played here by hand); CMA-ES in its dream (--dream) and the actor-critic in its
imagination (--imagine) run on it.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from script_edge import exit_status

from agent.policy import Agent, run_episode
from agent.seeds import holdout_seeds
from agent.world import load_mdrnn, load_mid_episode_starts, load_vae
from data.latents import load_latent_cache
from envs.carracing import make_env
from models.controller import Controller
from models.mdrnn import MDRNNCell
from models.transformer import C_H_SCALE, TransformerMCell
from models.vae import VAE
from reporting import compare_m
from utils.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LATENT, WIDTH, FRAMES = 8, 16, 30
M_FLAGS = ["--arch", "transformer", "--hidden-size", str(WIDTH), "--layers", "2", "--heads", "2"]
M_FLAGS += ["--context", "4", "--gaussians", "2", "--seq-len", "8", "--batch-size", "4", "--epochs", "1"]
M_FLAGS += ["--device", "cpu"]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / name), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert all(needle in line for needle in needles), line


@pytest.fixture(scope="module")
def logdir(tiny_dataset, tmp_path_factory) -> Path:
    """V (random init) and a transformer M trained by its stage; a random C that leans on h."""
    logdir = tmp_path_factory.mktemp("transformer")
    torch.manual_seed(0)
    vae = VAE(LATENT)
    config = {"latent_size": LATENT, "img_channels": 3}
    save_checkpoint(logdir / "vae/best.pt", {"state_dict": vae.state_dict(), "config": config, "epoch": 1})
    result = script("trainmdrnn.py", "--logdir", str(logdir), "--dataset", str(tiny_dataset), *M_FLAGS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "M (transformer 2 x 16, 2 heads, context 4, C reads h x 0.34)" in result.stdout
    controller = Controller(LATENT, WIDTH, 3)
    torch.manual_seed(1)
    controller.load_state_dict({k: 2 * torch.randn_like(v) for k, v in controller.state_dict().items()})
    ctrl = {
        "state_dict": controller.state_dict(),
        "config": dict(latent_size=LATENT, hidden_size=WIDTH, action_size=3),
    }
    save_checkpoint(logdir / "ctrl/best.pt", ctrl | {"generation": 1, "eval_return": 0.0, "action_repeat": 1})
    return logdir


def test_the_checkpoint_names_its_architecture_and_later_stages_build_it(logdir, tiny_dataset):
    best = load_checkpoint(logdir / "mdrnn/best.pt")
    assert best["config"]["arch"] == "transformer" and best["config"]["context"] == 4
    assert best["config"]["h_scale"] == C_H_SCALE  # the stage's default: C reads h at the LSTM's scale
    m = load_mdrnn(logdir)
    assert isinstance(m, TransformerMCell) and not isinstance(m, MDRNNCell)
    assert (m.hidden_size, m.layers, m.heads, m.context, m.h_scale) == (WIDTH, 2, 2, 4, C_H_SCALE)
    assert (logdir / "mdrnn/prediction.png").is_file()
    lstm = script("trainmdrnn.py", "--logdir", str(logdir), "--dataset", str(tiny_dataset), "--epochs", "2")
    one_line_error(lstm, "is an M of --arch transformer", "--noreload")


def test_test_controller_plays_c_with_the_transformer_m(logdir):
    played = script(
        "test_controller.py",
        "--logdir",
        str(logdir),
        "--episodes",
        "2",
        "--max-steps",
        str(FRAMES),
        "--workers",
        "1",
    )
    assert played.returncode == 0, played.stderr[-2000:]
    with open(logdir / "ctrl/eval/returns.csv", newline="") as handle:
        returns = [float(row["return"]) for row in csv.DictReader(handle)]
    controller = Controller(LATENT, WIDTH, 3)
    controller.load_state_dict(load_checkpoint(logdir / "ctrl/best.pt")["state_dict"])
    env = make_env()
    agent = Agent(load_vae(logdir), load_mdrnn(logdir), controller)
    by_hand = [run_episode(env, agent, seed, FRAMES)[0] for seed in holdout_seeds(0, 2)]
    assert returns == pytest.approx(by_hand, abs=1e-4)
    forgetful = load_mdrnn(logdir)
    forgetful.context = 1  # the same weights, but a cache that forgets all but the newest token
    other = Agent(load_vae(logdir), forgetful, controller)
    obs, _ = env.reset(seed=holdout_seeds(0, 1)[0])
    agent.reset()
    gaps = []
    for _ in range(8):  # both read the same frames: only what M remembers differs
        action = agent.act(obs[None])
        gaps.append(float(abs(action - other.act(obs[None])).max()))
        obs = env.step(action[0])[0]
    env.close()
    assert gaps[0] == 0 and max(gaps) > 1e-6  # h = 0 at first for both; then the memory shows in the actions


def test_cma_es_real_and_dreamed_and_imagination_run_on_it(logdir, tmp_path):
    shutil.copytree(logdir, tmp_path / "copy")
    logdir = tmp_path / "copy"
    flags = ["--logdir", str(logdir), "--pop-size", "2", "--n-samples", "1", "--generations", "1"]
    flags += [
        "--eval-every",
        "1",
        "--eval-episodes",
        "1",
        "--max-steps",
        str(FRAMES),
        "--workers",
        "1",
        "--noreload",
    ]
    search = script("traincontroller.py", *flags)
    assert search.returncode == 0, search.stderr[-2000:]
    assert load_checkpoint(logdir / "ctrl/last.pt")["generation"] == 1
    dream = script("traincontroller.py", *flags, "--dream")  # CMA-ES in the transformer's dream
    assert dream.returncode == 0, dream.stderr[-2000:]
    assert "dream" in dream.stdout and load_checkpoint(logdir / "ctrl/last.pt")["generation"] == 1
    imagine = ["--logdir", str(logdir), "--imagine", "--rounds", "2", "--updates", "2", "--horizon", "3"]
    imagine += ["--collect-episodes", "1", "--eval-episodes", "1", "--max-steps", "24", "--workers", "1"]
    imagine += ["--m-updates", "5"]
    ok = script("traincontroller.py", *imagine, "--rescore-episodes", "1", "--noreload")
    assert ok.returncode == 0, ok.stderr[-2000:]
    best = load_checkpoint(logdir / "ctrl/best.pt")
    assert best["mdrnn"]["config"]["arch"] == "transformer"  # C carries the transformer M it learnt in
    original = load_checkpoint(logdir / "mdrnn/best.pt")["state_dict"]
    last = load_checkpoint(logdir / "ctrl/last.pt")
    assert not torch.equal(last["mdrnn"]["state_dict"]["head.weight"], original["head.weight"])  # fine-tuned


@torch.no_grad()
def test_mid_episode_dream_starts_hold_the_state_the_transformer_reaches_there(logdir):
    """The dream's starts (every 4th step of every cached rollout): V's posterior there, and the
    state M reaches by reading the rollout up to there, step by step, as the agent's M does."""
    cell = load_mdrnn(logdir)
    posteriors, start_state = load_mid_episode_starts(logdir, cell, every=4)
    rollouts = load_latent_cache(logdir)
    steps = [(i, t) for i, r in enumerate(rollouts) for t in range(len(r["actions"]) - 1)][::4]
    assert len(posteriors) == len(steps)
    for j in (1, len(steps) // 2, len(steps) - 1):
        i, t = steps[j]
        mu, actions = (torch.from_numpy(rollouts[i][key]) for key in ("mu", "actions"))
        assert torch.equal(posteriors[j, 0], mu[t])
        assert torch.equal(posteriors[j, 1], torch.from_numpy(rollouts[i]["logsigma"][t]))
        state = cell.initial_state(1)
        for s in range(t):
            state = cell(mu[s : s + 1], actions[s : s + 1], state).hidden
        picked = start_state(torch.tensor([j]))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(picked, state, strict=True)), (i, t)


def test_compare_m_scores_it_and_refuses_ms_of_other_data(logdir, tmp_path, capsys):
    out = tmp_path / "m.csv"
    flags = ["--horizons", "1", "3", "--warmup", "2", "--stride", "4", "--dream-episodes", "2"]
    assert (
        exit_status(
            compare_m.main, ["--logdir", str(logdir), "--logdir", str(logdir), *flags, "--out", str(out)]
        )
        == 0
    )
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["arch"], r["horizon"]) for r in rows] == [("transformer", "1"), ("transformer", "3")] * 2
    assert rows[0]["nll"] == rows[2]["nll"] and float(rows[0]["nll"]) != float(rows[1]["nll"])
    assert capsys.readouterr().out.count("C in M's dream") == 2
    other = tmp_path / "other"
    shutil.copytree(logdir, other)
    cache = other / "mdrnn" / "latents.npz"
    with np.load(cache) as archive:
        arrays = dict(archive)
    arrays["files"] = np.array([f"moved/{name}" for name in arrays["files"]])  # another dataset's rollouts
    arrays["all_files"] = np.array([f"moved/{name}" for name in arrays["all_files"]])
    np.savez(cache, **arrays)
    assert exit_status(compare_m.main, ["--logdir", str(logdir), "--logdir", str(other), *flags]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has other test rollouts than" in err[0], err
