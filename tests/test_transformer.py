"""The transformer M (models/transformer.py): causal, its cached stepping is the sequence form
exactly (across the sliding window's edge), batched steps equal single ones, and it learns."""

from __future__ import annotations

import pytest
import torch

from models.mdrnn import mdrnn_loss
from models.transformer import ARCH, TransformerM, TransformerMCell

LATENT, ACTIONS, WIDTH, CONTEXT = 4, 3, 16, 5


def models(seed: int = 0) -> tuple[TransformerM, TransformerMCell]:
    torch.manual_seed(seed)
    sequence = TransformerM(LATENT, ACTIONS, WIDTH, 2, layers=2, heads=2, context=CONTEXT)
    cell = TransformerMCell(**sequence.config)
    cell.load_state_dict(sequence.state_dict())  # the same parameter names
    return sequence.eval(), cell.eval()


def inputs(batch: int, steps: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, LATENT, generator=g), torch.rand(batch, steps, ACTIONS, generator=g)


@torch.no_grad()
def test_an_output_never_depends_on_a_later_token():
    sequence, _ = models()
    z, a = inputs(2, 9)
    before = sequence(z, a)
    z2, a2 = z.clone(), a.clone()
    z2[:, 6:] += 5.0
    a2[:, 6:] = 1 - a2[:, 6:]
    after = sequence(z2, a2)
    for field in ("mu", "logsigma", "logpi", "reward", "done_logit", "h"):
        x, y = getattr(before, field), getattr(after, field)
        assert torch.allclose(x[:, :6], y[:, :6], atol=1e-6), field
        assert not torch.allclose(x[:, 6:], y[:, 6:], atol=1e-3), field  # later ones do change


@torch.no_grad()
def test_cached_steps_equal_the_sequence_form_past_the_window_edge():
    sequence, cell = models()
    z, a = inputs(3, 3 * CONTEXT + 2)  # the cache slides over 12 times
    full = sequence(z, a)
    state = cell.initial_state(3)
    for t in range(z.shape[1]):
        out = cell(z[:, t], a[:, t], state)
        state = out.hidden
        for field in ("mu", "logsigma", "logpi", "reward", "done_logit", "h"):
            assert torch.allclose(getattr(out, field), getattr(full, field)[:, t], atol=1e-5), (field, t)
    assert torch.allclose(state.kv, full.hidden.kv, atol=1e-5)  # the sequence's final state, too
    assert torch.equal(state.filled, full.hidden.filled)
    assert state.h is state[0]  # h first, where the agent reads the LSTM's h


@torch.no_grad()
def test_c_reads_h_scaled_and_nothing_m_predicts_changes():
    """h_scale multiplies the h in M's state, stepped or recomputed (what C reads), and nothing the
    head predicts; a config written before h_scale builds with 1.0, as its C was trained."""
    sequence, cell = models()
    config = sequence.config | {"h_scale": 0.25}
    scaled_sequence, scaled_cell = TransformerM(**config).eval(), TransformerMCell(**config).eval()
    for model in (scaled_sequence, scaled_cell):
        model.load_state_dict(sequence.state_dict())
    z, a = inputs(2, CONTEXT + 3)
    plain, scaled = sequence(z, a), scaled_sequence(z, a)
    for field in ("mu", "logsigma", "logpi", "reward", "done_logit", "h"):
        assert torch.equal(getattr(plain, field), getattr(scaled, field)), field
    assert torch.equal(scaled.hidden.h, 0.25 * plain.hidden.h) and scaled.hidden.h.abs().max() > 0
    state, plain_state = scaled_cell.initial_state(2), cell.initial_state(2)
    for t in range(z.shape[1]):
        out, plain_out = scaled_cell(z[:, t], a[:, t], state), cell(z[:, t], a[:, t], plain_state)
        state, plain_state = out.hidden, plain_out.hidden
        assert torch.equal(out.mu, plain_out.mu) and torch.equal(state.h, 0.25 * plain_state.h), t
    recomputed = scaled_cell.state_after(z, a, torch.ones(2, z.shape[1], dtype=torch.bool))
    assert torch.allclose(recomputed.h, state.h, atol=1e-5)  # mid-episode starts (dream, imagination)
    assert TransformerMCell(**{k: v for k, v in config.items() if k != "h_scale"}).h_scale == 1.0


@torch.no_grad()
def test_the_window_is_the_whole_memory_of_one_layer():
    torch.manual_seed(0)
    one = TransformerM(LATENT, ACTIONS, WIDTH, 2, layers=1, heads=2, context=CONTEXT).eval()
    z, a = inputs(1, 12)
    z2 = z.clone()
    z2[:, 0] += 5.0  # step 0 is out of the window of steps >= CONTEXT
    x, y = one(z, a).h, one(z2, a).h
    assert not torch.allclose(x[:, CONTEXT - 1], y[:, CONTEXT - 1], atol=1e-4)
    assert torch.allclose(x[:, CONTEXT:], y[:, CONTEXT:], atol=1e-6)


@torch.no_grad()
def test_a_batched_step_equals_single_ones():
    _, cell = models()
    z, a = inputs(4, 8)
    batched = cell.initial_state(4)
    singles = [cell.initial_state(1) for _ in range(4)]
    for t in range(8):
        out = cell(z[:, t], a[:, t], batched)
        batched = out.hidden
        for i in range(4):
            alone = cell(z[i : i + 1, t], a[i : i + 1, t], singles[i])
            singles[i] = alone.hidden
            assert torch.allclose(alone.mu, out.mu[i : i + 1], atol=1e-6)
            assert torch.allclose(alone.h, out.h[i : i + 1], atol=1e-6)


def test_it_trains_to_a_lower_loss_on_a_toy_sequence_task():
    torch.manual_seed(0)
    model = TransformerM(LATENT, ACTIONS, WIDTH, 2, layers=2, heads=2, context=8)
    g = torch.Generator().manual_seed(3)
    actions = torch.rand(16, 12, ACTIONS, generator=g)
    z = torch.zeros(16, 13, LATENT)
    for t in range(12):  # z_{t+1} = 0.8 z_t + the action, padded: a world with memory
        z[:, t + 1] = 0.8 * z[:, t] + torch.cat([actions[:, t], actions[:, t, :1]], -1)
    rewards, terminals = actions[..., 0] - actions[..., 2], torch.zeros(16, 12)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = mdrnn_loss(model(z[:, :-1], actions), z[:, 1:], rewards, terminals)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 2.0, losses[::10]


def test_its_config_names_its_architecture_and_rebuilds_either_form():
    sequence, cell = models()
    assert sequence.config["arch"] == ARCH == cell.config["arch"]
    assert TransformerMCell(**sequence.config).state_dict().keys() == sequence.state_dict().keys()
    with pytest.raises(ValueError, match="lstm"):
        TransformerM(**(sequence.config | {"arch": "lstm"}))
    with pytest.raises(ValueError, match="empty past"):
        sequence(*inputs(1, 2), hidden=cell.initial_state(1))
