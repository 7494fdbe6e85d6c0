"""The shipped agents load with the project's own code; the default one (pretrained/carracing-k4) drives.

One full episode (up to the env's 1000 frames, at the k it was trained at) on the first track
of its recorded test, pretrained/carracing-k4/test_returns.csv, where it recorded 908.5. Not
to the bit: CarRacing turns a last-bit difference in the models' arithmetic into another drive,
and CPUs and library builds round differently. 870-912 were seen elsewhere; on this project's
2-core AMD EPYC (torch 2.14.1, AVX2 kernels, 1 or 2 threads alike) the track scores 761.0
over the full 1000 frames, as test_controller.py does there, also at the commit that shipped
the agent. Hence the bound of 700: a driving agent clears it, one that does not drive (a C
left at its random initialisation, V's log-sigma taken for its mean: below 0) is far from it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from agent.policy import Agent, run_episode
from agent.seeds import holdout_seeds
from agent.world import load_best_controller, load_world, world_action_repeat
from envs.carracing import MAX_EPISODE_STEPS, make_env
from models.transformer import C_H_SCALE, TransformerMCell

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "carracing-k4"


def recorded_test() -> list[dict[str, str]]:
    with open(PRETRAINED / "test_returns.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_pretrained_agent_drives_its_first_test_track():
    first = recorded_test()[0]
    seed, recorded = int(first["seed"]), float(first["return"])
    assert recorded == 908.5 and seed == holdout_seeds(0, 1)[0]  # test_controller.py's default track 0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a test worker runs it (and the 2 cores are shared)
    try:
        vae, mdrnn, config = load_world(PRETRAINED)
        controller, state = load_best_controller(PRETRAINED, config)
        k = int(state["action_repeat"])
        assert k == world_action_repeat(PRETRAINED) == 4
        env = make_env(action_repeat=k)
        total, frames = run_episode(env, Agent(vae, mdrnn, controller), seed, MAX_EPISODE_STEPS)
        env.close()
    finally:
        torch.set_num_threads(threads)
    assert total >= 700, f"the shipped agent scored {total:.1f} in {frames} frames (recorded {recorded})"
    assert 0 < frames <= MAX_EPISODE_STEPS


def test_the_shipped_transformer_agent_shares_v_and_names_its_m():
    """pretrained/carracing-k4-transformer: the default agent's V (linked), a transformer M that
    every stage builds from its checkpoint, and a C of its sizes, at the same k."""
    shipped = PRETRAINED.parent / "carracing-k4-transformer"
    assert (shipped / "vae/best.pt").resolve() == (PRETRAINED / "vae/best.pt").resolve()
    vae, mdrnn, config = load_world(shipped)
    assert isinstance(mdrnn, TransformerMCell) and config["hidden_size"] == 256
    assert mdrnn.h_scale == C_H_SCALE  # its C was trained on h at the LSTM's scale
    controller, state = load_best_controller(shipped, config)
    assert int(state["action_repeat"]) == world_action_repeat(shipped) == 4
    with open(shipped / "test_returns.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 100
