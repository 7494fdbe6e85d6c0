"""Learning in imagination, the pieces: lambda-returns by hand, gradients through M into the
actor (and none into M), the start states as the agent's M sees them, the noisy episode
recording, and M's fine-tuning lowering its loss. The whole --imagine loop: test_imagine_stage.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.imagine import (
    ImagineRun,
    ImagineSettings,
    Learner,
    StartStates,
    dream_beside_real,
    fine_tune_m,
    one_step,
    predicted_returns,
    recent_weights,
    start_states,
)
from models.actor_critic import Actor, discount_weights, imagine, lambda_returns
from models.mdrnn import MDRNN, MDRNNCell
from models.transformer import TransformerMCell
from models.vae import VAE

LATENT, HIDDEN = 4, 8


def test_lambda_returns_by_hand():
    rewards = torch.tensor([[1.0], [2.0]])  # (H=2, B=1)
    continues = torch.tensor([[1.0], [0.5]])
    values = torch.tensor([[10.0], [20.0], [30.0]])
    gamma, lam = 0.9, 0.8
    # R_1 = r_1 + g c_1 ((1 - l) v_2 + l v_2) = 2 + 0.9 * 0.5 * 30 = 15.5
    # R_0 = r_0 + g c_0 ((1 - l) v_1 + l R_1) = 1 + 0.9 * (0.2 * 20 + 0.8 * 15.5) = 15.76
    expected = torch.tensor([[15.76], [15.5]])
    torch.testing.assert_close(lambda_returns(rewards, continues, values, gamma, lam), expected)
    # lambda = 0 is one-step TD, lambda = 1 the discounted sum bootstrapped at the end
    torch.testing.assert_close(
        lambda_returns(rewards, continues, values, gamma, 0.0), torch.tensor([[19.0], [15.5]])
    )
    torch.testing.assert_close(
        lambda_returns(rewards, continues, values, gamma, 1.0), torch.tensor([[1 + 0.9 * 15.5], [15.5]])
    )
    torch.testing.assert_close(discount_weights(continues, gamma), torch.tensor([[1.0], [0.9]]))


def test_gradients_reach_the_actor_through_m_and_m_stays_unchanged():
    torch.manual_seed(0)
    mdrnn = MDRNNCell(LATENT, 3, HIDDEN, 3).requires_grad_(False)
    before = {k: v.clone() for k, v in mdrnn.state_dict().items()}
    actor = Actor(LATENT, HIDDEN, 3)
    torch.nn.init.normal_(actor.controller.fc.weight, std=0.1)
    z, hidden = torch.randn(5, LATENT), mdrnn.initial_state(5)
    actions = []  # every action the actor takes, kept with its gradient

    def keep(module, inputs, action):
        action.retain_grad()
        actions.append(action)

    actor.register_forward_hook(keep)
    # the return of the later steps alone: it reaches the first action only through M's dynamics
    traj = imagine(mdrnn, actor, z, hidden, horizon=4)
    traj.rewards[1:].sum().backward()
    assert actions[0].grad is not None and actions[0].grad.abs().sum() > 0
    assert actor.controller.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in mdrnn.parameters())
    # ... and a learner's updates change the actor and critic, never M
    learner = Learner(dict(latent_size=LATENT, hidden_size=HIDDEN, action_size=3), ImagineSettings(horizon=4))
    actor_before = learner.actor.controller.fc.weight.clone()
    for _ in range(3):
        learner.update(mdrnn, z, hidden)
    assert not torch.equal(learner.actor.controller.fc.weight, actor_before)
    for key, value in mdrnn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_start_states_are_the_agents_m_state():
    """h_t, c_t at step t of a rollout are M's state after reading steps 0..t-1 with z = mu."""
    torch.manual_seed(1)
    cell = MDRNNCell(LATENT, 3, HIDDEN, 3)
    rng = np.random.default_rng(0)
    rollouts = [
        {
            "mu": rng.normal(size=(n, LATENT)).astype(np.float32),
            "actions": rng.random((n, 3)).astype(np.float32),
        }
        for n in (5, 3)
    ]
    z, h, c = start_states(cell, rollouts)
    assert len(z) == 4 + 2  # every step but each rollout's last
    hidden = cell.initial_state(1)
    for t in range(3):  # the first rollout's first steps, by hand
        assert torch.allclose(h[t], hidden[0][0], atol=1e-6) and torch.allclose(c[t], hidden[1][0], atol=1e-6)
        assert torch.equal(z[t], torch.from_numpy(rollouts[0]["mu"][t]))
        step = cell(z[t : t + 1], torch.from_numpy(rollouts[0]["actions"][t : t + 1]), hidden)
        hidden = step.hidden
    assert torch.equal(z[4], torch.from_numpy(rollouts[1]["mu"][0])) and torch.all(h[4] == 0)


def test_fine_tuning_lowers_ms_loss():
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    walk = np.cumsum(rng.normal(0, 0.1, size=(2, 40, LATENT)), axis=1).astype(np.float32)
    rollouts = [
        {
            "mu": w,
            "logsigma": np.full_like(w, -3.0),
            "actions": rng.random((40, 3)).astype(np.float32),
            "rewards": np.ones(40, np.float32),
            "terminals": np.arange(40) == 39,
        }
        for w in walk
    ]
    mdrnn = MDRNN(LATENT, 3, HIDDEN, 3)
    optimizer = torch.optim.Adam(mdrnn.parameters(), lr=3e-3)
    first = fine_tune_m(mdrnn, optimizer, rollouts, 5, 4, 8, np.random.default_rng(0))
    later = fine_tune_m(mdrnn, optimizer, rollouts, 100, 4, 8, np.random.default_rng(1))
    assert later < first - 0.5
    cell = one_step(mdrnn)
    assert all(not p.requires_grad for p in cell.parameters())
    assert torch.equal(cell.head.weight, mdrnn.head.weight)


@pytest.mark.parametrize("sample", [True, False])
def test_actor_without_noise_is_c(sample):
    torch.manual_seed(3)
    actor = Actor(LATENT, HIDDEN, 3)
    torch.nn.init.normal_(actor.controller.fc.weight)
    z, h = torch.randn(6, LATENT), torch.randn(6, HIDDEN)
    same = torch.equal(actor(z, h, sample=sample), actor.controller(z, h))
    assert same != sample  # noise changes the action; without it the actor is exactly C


def test_recent_rollouts_get_their_share_of_the_draws():
    sizes, recent = np.array([100, 300, 10, 30]), np.array([False, False, True, True])
    weights = recent_weights(sizes, recent, 0.5)
    chance = sizes * weights / (sizes * weights).sum()
    assert chance[recent].sum() == pytest.approx(0.5) and chance[0] / chance[1] == pytest.approx(1 / 3)
    assert chance[2] / chance[3] == pytest.approx(1 / 3)  # within a group, in proportion to the sizes
    assert np.array_equal(recent_weights(sizes, np.zeros(4, bool), 0.5), np.ones(4))  # nothing collected yet


@pytest.mark.parametrize("done_logit,expected", [(-30.0, 7 * 0.5), (30.0, 0.5)])
def test_predicted_returns_weigh_rewards_by_the_chance_of_going_on(done_logit, expected):
    """M that predicts reward 0.5 each step: 7 steps never done give 3.5; done at once, 0.5."""
    mdrnn = MDRNNCell(LATENT, 3, HIDDEN, 3).requires_grad_(False)
    with torch.no_grad():
        mdrnn.head.weight.zero_()
        mdrnn.head.bias[-2:] = torch.tensor([0.5, done_logit])
    returns = predicted_returns(mdrnn, Actor(LATENT, HIDDEN, 3), torch.randn(4, LATENT), steps=7)
    assert returns == pytest.approx([expected] * 4, abs=1e-6)


def test_the_run_keeps_the_best_evaluated_rounds_and_names_those_it_drops():
    run = ImagineRun(
        dict(latent_size=4, hidden_size=8, action_size=3), ImagineSettings(), MDRNN(4, 3, 8, 2), 4
    )
    kept_by_round = []
    for round_, mean_return in enumerate([5.0, 1.0, 7.0, 3.0, 9.0, 7.0], start=1):
        run.round = round_
        kept_by_round.append(run.keep_candidate(mean_return))
    assert kept_by_round == [
        (True, []), (True, []), (True, []), (True, [2]), (True, [4]), (True, [1]),
    ]  # fmt: skip
    assert run.candidates == [(9.0, 5), (7.0, 3), (7.0, 6)]  # ties: the earlier round first
    run.round = 7
    assert run.keep_candidate(6.0) == (False, [7])
    assert ImagineRun.from_state(run.state()).candidates == run.candidates


def test_the_dream_gif_puts_the_real_frames_beside_v_decoding_m_imagination():
    torch.manual_seed(0)
    vae, cell, actor = VAE(4).eval(), MDRNNCell(4, 3, 8, 2), Actor(4, 8, 3)
    observations = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    torch.manual_seed(1)
    picture = dream_beside_real(vae, cell, actor, observations)
    assert picture.shape == (6, 64, 130, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture[:, :, :64], observations) and (picture[:, :, 64:66] == 255).all()
    torch.manual_seed(1)
    first = vae.encode_frames(observations[:1])[0]
    traj = imagine(cell, actor, first, cell.initial_state(1), 5, sample=False)
    decoded = (vae.decode(traj.z[:, 0]).detach().permute(0, 2, 3, 1).numpy() * 255).round()
    assert np.abs(picture[:, :, 66:].astype(float) - decoded).max() <= 1  # frame t is M's z_t
    assert not np.array_equal(picture[0, :, 66:], picture[5, :, 66:])  # M's frames move


@pytest.mark.parametrize("layers", [2, 3])
def test_a_transformer_ms_start_states_are_the_agents_m_state_far_into_a_rollout(layers):
    """Recomputed from the memory_steps steps before each start (each block running only the
    tokens the state needs), the transformer's state is the one its cell reaches stepping the
    whole rollout from its first frame, past the window's edge."""
    torch.manual_seed(2)
    cell = TransformerMCell(LATENT, 3, HIDDEN, 2, layers=layers, heads=2, context=3).eval()
    rng = np.random.default_rng(1)
    rollouts = [
        {
            "mu": rng.normal(size=(n, LATENT)).astype(np.float32),
            "actions": rng.random((n, 3)).astype(np.float32),
        }
        for n in (12, 4)
    ]
    starts = StartStates(cell, rollouts)
    assert len(starts) == 11 + 3 and cell.memory_steps == 2 * layers + 1
    z, state = starts.pick(torch.arange(len(starts)))
    running, by_hand = cell.initial_state(1), []
    for t in range(11):  # the first rollout, stepped from its start
        by_hand.append(running)
        running = cell(
            torch.from_numpy(rollouts[0]["mu"][t : t + 1]),
            torch.from_numpy(rollouts[0]["actions"][t : t + 1]),
            running,
        ).hidden
    for t in range(11):
        assert torch.equal(z[t], torch.from_numpy(rollouts[0]["mu"][t]))
        for got, want in zip(state, by_hand[t]):
            assert torch.allclose(got[t], want[0], atol=1e-5), t
    assert torch.all(state.filled[11] == 0) and torch.equal(z[11], torch.from_numpy(rollouts[1]["mu"][0]))
    picked_z, picked = starts.pick(torch.tensor([9, 2]))  # any batch of picks: the same states
    assert torch.equal(picked_z, z[[9, 2]]) and torch.allclose(picked.kv, state.kv[[9, 2]], atol=1e-6)
