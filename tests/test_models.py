"""Unit tests for models/: shapes, loss formulas against hand/closed-form values, numerical safety."""

import math

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from models.controller import Controller, batched_actions, squash_action
from models.mdrnn import MDRNN, MDRNNCell, gmm_loss, mdrnn_loss, sample_gmm
from models.vae import VAE, frames_to_tensor, vae_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("latent", [32, 16])
def test_vae_shapes(latent):
    vae = VAE(latent_size=latent)
    x = torch.rand(3, 3, 64, 64)
    recon, mu, logsigma = vae(x)
    assert recon.shape == (3, 3, 64, 64)
    assert mu.shape == logsigma.shape == (3, latent)
    assert recon.min() >= 0 and recon.max() <= 1
    assert vae.decode(torch.randn(5, latent)).shape == (5, 3, 64, 64)
    assert VAE(**vae.config).config == dict(latent_size=latent, img_channels=3)


def test_vae_eval_is_deterministic_and_train_samples():
    vae = VAE(latent_size=8)
    x = torch.rand(2, 3, 64, 64)
    vae.eval()
    assert torch.equal(vae(x)[0], vae(x)[0])
    assert torch.allclose(vae(x)[0], vae.decode(vae.encode(x)[0]))
    vae.train()
    assert not torch.equal(vae(x)[0], vae(x)[0])


def test_encode_never_decodes():
    vae = VAE(latent_size=8)

    def boom(*_):
        raise AssertionError("decode called")

    vae.decode = boom
    vae.decoder.forward = boom
    vae.encode(torch.rand(2, 3, 64, 64))
    vae.encode_frames(np.zeros((2, 64, 64, 3), np.uint8))


def test_frames_to_tensor():
    frames = torch.randint(0, 256, (2, 4, 64, 64, 3), dtype=torch.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 4, 3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
    assert x[1, 2, 0, 5, 7] == frames[1, 2, 5, 7, 0].item() / 255
    assert x[0, 3, 2, 63, 1] == frames[0, 3, 63, 1, 2].item() / 255
    with pytest.raises(TypeError):
        frames_to_tensor(frames.float())


@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_encode_frames_matches_encode(lead):
    vae = VAE(latent_size=8)
    frames = np.random.default_rng(0).integers(0, 256, lead + (64, 64, 3), dtype=np.uint8)
    mu, logsigma = vae.encode_frames(frames, batch_size=3)  # chunked: 3 does not divide 7 or 10
    assert mu.shape == logsigma.shape == lead + (8,)
    assert not mu.requires_grad
    x = frames_to_tensor(torch.from_numpy(frames)).reshape(-1, 3, 64, 64)
    ref_mu, ref_ls = vae.encode(x)
    torch.testing.assert_close(mu, ref_mu.reshape(lead + (8,)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logsigma, ref_ls.reshape(lead + (8,)), atol=1e-5, rtol=1e-5)
    mu_t, _ = vae.encode_frames(torch.from_numpy(frames))  # torch input too
    torch.testing.assert_close(mu_t, mu, atol=1e-5, rtol=1e-5)


def test_vae_loss_values():
    recon, x = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mu = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 0.0], [3.0, 1.0]])
    logsigma = torch.tensor([[0.0, 0.5], [-1.0, 0.2], [0.0, 0.0], [1.0, -0.5]])
    loss, rec, kl = vae_loss(recon, x, mu, logsigma, kl_tolerance=0.0)
    rec_ref = sum(((recon[i] - x[i]) ** 2).sum() for i in range(4)) / 4
    # closed form KL(N(mu, s^2) || N(0, 1)) = 0.5 * (s^2 + mu^2 - 1) - log s
    s = logsigma.double().exp()
    kl_ref = (0.5 * (s**2 + mu.double() ** 2 - 1) - logsigma.double()).sum(1).mean()
    assert rec.item() == pytest.approx(rec_ref.item(), rel=1e-6)
    assert kl.item() == pytest.approx(kl_ref.item(), rel=1e-6)
    assert loss.item() == pytest.approx(rec_ref.item() + kl_ref.item(), rel=1e-6)


def test_vae_kl_tolerance_clamps():
    recon, x = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    latent, tol = 4, 0.5
    # tiny KL: clamped to tol * latent per image, and no gradient flows into mu / logsigma
    mu = torch.full((3, latent), 0.01, requires_grad=True)
    logsigma = torch.full((3, latent), 0.01, requires_grad=True)
    loss, rec, kl = vae_loss(recon, x, mu, logsigma, kl_tolerance=tol)
    assert 0 < kl.item() < tol * latent
    assert loss.item() == pytest.approx(rec.item() + tol * latent, rel=1e-6)
    loss.backward()
    assert torch.all(mu.grad == 0) and torch.all(logsigma.grad == 0)
    # large KL: unclamped
    mu = torch.full((3, latent), 3.0, requires_grad=True)
    logsigma = torch.zeros(3, latent, requires_grad=True)
    loss, rec, kl = vae_loss(recon, x, mu, logsigma, kl_tolerance=tol)
    assert kl.item() == pytest.approx(latent * 4.5)
    assert loss.item() == pytest.approx(rec.item() + kl.item(), rel=1e-6)
    loss.backward()
    assert torch.all(mu.grad != 0)


# ----------------------------------------------------------------------------- MDRNN

L, A, H, K = 4, 3, 16, 3


def test_mdrnn_shapes_and_normalisation():
    m = MDRNN(L, A, H, K)
    out = m(torch.randn(2, 5, L), torch.randn(2, 5, A))
    for t in (out.mu, out.logsigma, out.logpi):
        assert t.shape == (2, 5, L, K)
    assert out.reward.shape == out.done_logit.shape == (2, 5)
    assert out.h.shape == (2, 5, H)
    assert out.hidden[0].shape == out.hidden[1].shape == (2, H)
    torch.testing.assert_close(out.logpi.exp().sum(-1), torch.ones(2, 5, L))
    torch.testing.assert_close(out.h[:, -1], out.hidden[0])
    assert MDRNN(**m.config).config == m.config
    assert sum(p.numel() for p in MDRNN().head.parameters()) == 256 * (3 * 32 * 5 + 2) + 3 * 32 * 5 + 2


def test_cell_matches_sequence():
    B, T = 2, 6
    m, cell = MDRNN(L, A, H, K), MDRNNCell(L, A, H, K)
    cell.load_state_dict(m.state_dict())  # strict
    m.load_state_dict(cell.state_dict())  # and back
    latents, actions = torch.randn(B, T, L), torch.randn(B, T, A)
    h0 = (torch.randn(B, H), torch.randn(B, H))
    for start in (None, h0):
        seq = m(latents, actions, start)
        hidden = start
        for t in range(T):
            step = cell(latents[:, t], actions[:, t], hidden)
            hidden = step.hidden
            for name in ("mu", "logsigma", "logpi", "reward", "done_logit", "h"):
                torch.testing.assert_close(
                    getattr(step, name), getattr(seq, name)[:, t], atol=1e-5, rtol=1e-5
                )
        torch.testing.assert_close(hidden[0], seq.hidden[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden[1], seq.hidden[1], atol=1e-5, rtol=1e-5)
    h, c = cell.initial_state(3)
    assert h.shape == c.shape == (3, H) and not h.any() and not c.any()
    assert cell(latents[:, 0], actions[:, 0]).mu.shape == (B, L, K)


def _gmm_nll_numpy(target, mu, logsigma, logits):
    """Brute force: -log sum_k pi_k N(x; mu_k, sigma_k), averaged over elements, in float64 loops."""
    target, mu, logsigma, logits = (np.asarray(a, np.float64) for a in (target, mu, logsigma, logits))
    total, count = 0.0, 0
    for idx in np.ndindex(*target.shape):
        w = np.exp(logits[idx] - logits[idx].max())
        w /= w.sum()
        p = 0.0
        for k in range(w.shape[0]):
            s = math.exp(logsigma[idx][k])
            p += w[k] * math.exp(-0.5 * ((target[idx] - mu[idx][k]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        total -= math.log(p)
        count += 1
    return total / count


def test_gmm_loss_matches_bruteforce():
    target = torch.randn(3, 4, L)
    mu, logsigma = torch.randn(3, 4, L, K), 0.3 * torch.randn(3, 4, L, K)
    logits = torch.randn(3, 4, L, K)
    ref = _gmm_nll_numpy(target, mu, logsigma, logits)
    assert gmm_loss(target, mu, logsigma, logits.log_softmax(-1)).item() == pytest.approx(ref, rel=1e-5)
    # raw logits are renormalised, so they give the same answer
    assert gmm_loss(target, mu, logsigma, logits).item() == pytest.approx(ref, rel=1e-5)


def test_gmm_loss_extreme_inputs_finite():
    target = torch.randn(2, 3, L)
    cases = [
        (torch.full((2, 3, L, K), 1e6), torch.full((2, 3, L, K), -50.0)),
        (torch.full((2, 3, L, K), 1e6), torch.full((2, 3, L, K), 50.0)),
        (torch.full((2, 3, L, K), -1e20), torch.full((2, 3, L, K), -1e4)),
        (target.unsqueeze(-1).expand(2, 3, L, K).clone(), torch.full((2, 3, L, K), -50.0)),
    ]
    for mu0, logsigma0 in cases:
        for logits0 in (torch.randn(2, 3, L, K) * 1e30, torch.zeros(2, 3, L, K)):
            mu, logsigma, logits = (t.clone().requires_grad_() for t in (mu0, logsigma0, logits0))
            loss = gmm_loss(target, mu, logsigma, logits.log_softmax(-1))
            loss.backward()
            assert torch.isfinite(loss)
            for t in (mu, logsigma, logits):
                assert torch.isfinite(t.grad).all()


def test_gmm_fit_recovers_two_component_mixture():
    g = torch.Generator().manual_seed(0)
    n = 20000
    comp = torch.rand(n, generator=g) < 0.3
    data = torch.where(comp, -2 + 0.5 * torch.randn(n, generator=g), 3 + torch.randn(n, generator=g))
    target = data.reshape(n, 1)  # (N, L=1)
    mu = torch.tensor([[[-0.5, 0.5]]], requires_grad=True)  # (1, 1, K=2), broadcast over samples
    logsigma = torch.zeros(1, 1, 2, requires_grad=True)
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    opt = torch.optim.Adam([mu, logsigma, logits], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        gmm_loss(target, mu, logsigma, logits.log_softmax(-1)).backward()
        opt.step()
    order = mu.detach().flatten().argsort()
    means = mu.detach().flatten()[order]
    sigmas = logsigma.detach().exp().flatten()[order]
    weights = logits.detach().softmax(-1).flatten()[order]
    assert means.tolist() == pytest.approx([-2.0, 3.0], abs=0.15)
    assert sigmas.tolist() == pytest.approx([0.5, 1.0], abs=0.1)
    assert weights.tolist() == pytest.approx([0.3, 0.7], abs=0.05)


def test_mask_ignores_padding():
    B, T = 3, 5
    m = MDRNN(L, A, H, K)
    out = m(torch.randn(B, T, L), torch.randn(B, T, A))
    nxt, rew, done = torch.randn(B, T, L), torch.randn(B, T), (torch.rand(B, T) < 0.2).float()
    lengths = torch.tensor([5, 3, 1])
    mask = torch.arange(T) < lengths[:, None]  # (B, T) bool
    base = mdrnn_loss(out, nxt, rew, done, mask)
    pad = ~mask
    garbage = mdrnn_loss(
        out,
        torch.where(pad[..., None], 1e8, nxt),
        torch.where(pad, -1e8, rew),
        torch.where(pad, 1 - done, done),
        mask.float(),
    )
    for key in ("loss", "gmm", "reward", "done"):
        assert garbage[key].item() == pytest.approx(base[key].item(), rel=1e-6)
    # equals the plain mean over the valid elements only
    valid = mask.nonzero(as_tuple=True)
    ref = gmm_loss(nxt[valid], out.mu[valid], out.logsigma[valid], out.logpi[valid])
    assert base["gmm"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert base["reward"].item() == pytest.approx(((out.reward - rew)[valid] ** 2).mean().item(), rel=1e-6)
    # no mask == all-ones mask, and the weights combine as documented
    full = mdrnn_loss(out, nxt, rew, done, reward_weight=2.0, done_weight=0.5)
    ones = mdrnn_loss(out, nxt, rew, done, torch.ones(B, T), reward_weight=2.0, done_weight=0.5)
    assert full["loss"].item() == pytest.approx(ones["loss"].item(), rel=1e-6)
    assert full["loss"].item() == pytest.approx(
        (full["gmm"] + 2.0 * full["reward"] + 0.5 * full["done"]).item(), rel=1e-6
    )


def test_sample_gmm_temperature():
    n = 20000
    mu = torch.tensor([0.0, 2.0]).expand(n, 1, 2)
    logsigma = torch.full((n, 1, 2), math.log(0.5))
    logpi = torch.tensor([0.8, 0.2]).log().expand(n, 1, 2)
    stds = []
    for tau in (0.5, 1.0, 1.5):
        z = sample_gmm(mu, logsigma, logpi, tau, generator=torch.Generator().manual_seed(1))
        assert z.shape == (n, 1)
        stds.append(z.std().item())
    assert stds[0] < stds[1] < stds[2]
    # single component: std is exactly sigma * sqrt(tau)
    for tau in (0.25, 2.0):
        z = sample_gmm(mu[..., :1], logsigma[..., :1], torch.zeros(n, 1, 1), tau)
        assert z.std().item() == pytest.approx(0.5 * math.sqrt(tau), rel=0.05)
    # reproducible with a generator
    a = sample_gmm(mu, logsigma, logpi, generator=torch.Generator().manual_seed(3))
    b = sample_gmm(mu, logsigma, logpi, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sample_gmm_dominant_component():
    B, T = 4, 3
    mu = torch.randn(B, T, L, K)
    logits = torch.full((B, T, L, K), -30.0)
    logits[..., 1] = 30.0
    z = sample_gmm(mu, torch.full((B, T, L, K), -20.0), logits.log_softmax(-1), temperature=1.0)
    assert z.shape == (B, T, L)
    torch.testing.assert_close(z, mu[..., 1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- Controller


def test_controller_params_and_box():
    c = Controller()
    assert sum(p.numel() for p in c.parameters()) == 867
    assert Controller(**c.config).config == dict(latent_size=32, hidden_size=256, action_size=3)
    for sign in (1.0, -1.0):
        a = c(torch.full((5, 32), sign * 1e4), torch.full((5, 256), sign * 1e4))
        assert a.shape == (5, 3)
        assert (a[:, 0].abs() <= 1).all() and (a[:, 1:] >= 0).all() and (a[:, 1:] <= 1).all()
    # the paper's squash: C = 0 drives straight at half gas, no brake; a negative brake output is no brake
    raw = torch.tensor([[0.0, 0.0, 0.0], [100.0, -100.0, -3.0], [-100.0, 100.0, 100.0]])
    torch.testing.assert_close(
        squash_action(raw), torch.tensor([[0.0, 0.5, 0.0], [1.0, 0.0, 0.0], [-1.0, 1.0, 1.0]])
    )


def test_batched_actions_matches_forward():
    P, N, lat, hid = 5, 7, 6, 10
    ctrls = [Controller(lat, hid) for _ in range(P)]
    flat = torch.stack([parameters_to_vector(c.parameters()) for c in ctrls]).detach()
    z, h = torch.randn(P, N, lat), torch.randn(P, N, hid)
    out = batched_actions(flat, z, h, lat, hid)
    assert out.shape == (P, N, 3)
    with torch.no_grad():
        ref = torch.stack([c(z[p], h[p]) for p, c in enumerate(ctrls)])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError):
        batched_actions(flat[:, :-1], z, h, lat, hid)
