"""reporting/compare_m.py: the open-loop scores of either M on held-out rollouts (#23's table).

At horizon 1 the score is exactly M's one-step (teacher-forced) loss terms over every start,
computed here from the sequence form; past horizon 1, M is fed its own samples, so the score is
not the teacher-forced one of the same steps.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.mdrnn import MDRNN, MDRNNCell, gmm_loss
from models.transformer import TransformerM, TransformerMCell
from reporting.compare_m import done_flags, open_loop_scores

LATENT, WIDTH = 4, 16
MODELS = {
    "lstm": lambda: (MDRNNCell(LATENT, 3, WIDTH, 2), MDRNN),
    "transformer": lambda: (
        TransformerMCell(LATENT, 3, WIDTH, 2, layers=2, heads=2, context=4),
        TransformerM,
    ),
}


def rollouts(lengths: tuple[int, ...] = (21, 14, 9)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        dict(
            mu=rng.normal(size=(n, LATENT)).astype(np.float32),
            logsigma=np.full((n, LATENT), -1.0, np.float32),
            actions=rng.uniform(size=(n, 3)).astype(np.float32),
            rewards=rng.normal(size=n).astype(np.float32),
            terminals=(np.arange(n) == n - 1).astype(np.float32),
        )
        for n in lengths
    ]


@torch.no_grad()
def teacher_forced(sequence: torch.nn.Module, data: list[dict], steps: list[tuple[int, int]]) -> dict:
    """NLL, reward error and done accuracy of the predictions made at `steps` (rollout, t), real inputs."""
    nll, reward, done = [], [], []
    for i, t in steps:
        r = {k: torch.from_numpy(v) for k, v in data[i].items()}
        out = sequence(r["mu"][None, : t + 1], r["actions"][None, : t + 1])
        mu, logsigma, logpi, reward_t, done_t = (x[0, t] for x in out[:5])  # the prediction made at t
        nll.append(gmm_loss(r["mu"][t + 1], mu, logsigma, logpi))
        reward.append((reward_t - r["rewards"][t]) ** 2)
        done.append(float((done_t > 0).float() == r["terminals"][t]))
    return dict(
        nll=float(torch.stack(nll).mean()), reward_mse=float(torch.stack(reward).mean()), done=np.mean(done)
    )


def both_forms(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The one-step M and its sequence form with the same weights."""
    torch.manual_seed(0)
    cell, sequence_class = MODELS[arch]()
    sequence = sequence_class(**cell.config).eval()
    sequence.load_state_dict(cell.state_dict())
    return cell.eval(), sequence


@pytest.mark.parametrize("arch", MODELS)
def test_horizon_one_is_the_teacher_forced_prediction_of_every_start(arch):
    cell, sequence = both_forms(arch)
    data = rollouts()
    (row,) = open_loop_scores(cell.eval(), data, horizons=(1,), warmup=2, stride=3)
    steps = [(i, t) for i, r in enumerate(data) for t in range(2, len(r["actions"]) - 1, 3)]
    expected = teacher_forced(sequence, data, steps)
    assert row["starts"] == len(steps) == 12  # starts past the transformer's window edge too (t up to 17)
    assert row["nll"] == pytest.approx(expected["nll"], abs=1e-5)
    assert row["reward_mse"] == pytest.approx(expected["reward_mse"], abs=1e-5)
    assert row["done_accuracy"] == pytest.approx(expected["done"])


@pytest.mark.parametrize("arch", MODELS)
def test_later_horizons_run_open_loop_on_m_s_own_samples(arch):
    cell, sequence = both_forms(arch)
    data = rollouts()
    rows = open_loop_scores(cell.eval(), data, horizons=(1, 4), warmup=0, stride=2)
    assert [r["horizon"] for r in rows] == [1, 4] and rows[0]["starts"] == rows[1]["starts"]
    # the start t0 is scored at t0 + 4 from what M made of steps t0 + 1 .. t0 + 3: not the real ones
    steps = [(i, t + 3) for i, r in enumerate(data) for t in range(0, len(r["actions"]) - 4, 2)]
    assert abs(rows[1]["nll"] - teacher_forced(sequence, data, steps)["nll"]) > 1e-2
    again = open_loop_scores(cell, data, horizons=(1, 4), warmup=0, stride=2)
    assert again == rows  # one seeded generator: the same table every run


def test_too_short_rollouts_are_refused_in_one_line():
    with pytest.raises(Exception, match="no test rollout is longer than warmup 32 \\+ horizon 50"):
        open_loop_scores(MODELS["lstm"]()[0], rollouts(), warmup=32)


class FlagsFullGas(torch.nn.Module):
    """A stand-in M whose done flag fires exactly when the gas (action 1) is full."""

    def initial_state(self, batch: int) -> tuple[torch.Tensor]:
        return (torch.zeros(batch, 1),)

    def forward(self, latent, action, state):
        return SimpleNamespace(done_logit=torch.where(action[:, 1] == 1.0, 50.0, -50.0), hidden=state)


def test_done_flags_score_terminal_steps_apart_from_the_others():
    data = rollouts()  # 44 steps, one terminal per rollout, at its end
    for r in data:
        r["actions"][:, 1] = np.where(r["terminals"] > 0, 1.0, 0.5)
    assert done_flags(FlagsFullGas(), data) == (1.0, 0.0)
    data[0]["actions"][3, 1] = 1.0  # one false alarm among the 41 other steps
    data[1]["actions"][-1, 1] = 0.5  # one terminal step missed of 3
    recall, false_alarms = done_flags(FlagsFullGas(), data)
    assert recall == pytest.approx(2 / 3) and false_alarms == pytest.approx(1 / 41)
