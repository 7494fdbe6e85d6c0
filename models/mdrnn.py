"""MDN-RNN ("M" in World Models): predicts the next latent as a mixture of Gaussians.

An LSTM reads (z_t, a_t); a linear head turns its output h_t into, for EACH latent dimension,
a mixture of K Gaussians over z_{t+1} (mixture weights are per dimension, as in Ha's code),
plus a predicted reward and a done logit. All tensors are batch-first.

MDRNN runs whole sequences (training); MDRNNCell runs one step (rollouts, dreaming). Both
share one base class, hence identical parameter names, so their state_dicts are interchangeable.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# gmm_loss floors log sigma here: sigma = 2e-9 is far below any meaningful precision for
# unit-scale latents, and exp(-logsigma) cannot overflow float32.
LOGSIGMA_MIN = -20.0
# ...and clamps the standardised error (target - mu) / sigma, so its square stays finite.
Z_MAX = 1e15
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class MDNOutput(NamedTuple):
    """MDN-RNN output. Shapes for MDRNN; MDRNNCell has the same without the T dim."""

    mu: torch.Tensor  # (B, T, L, K)
    logsigma: torch.Tensor  # (B, T, L, K)
    logpi: torch.Tensor  # (B, T, L, K), log-softmax normalised over K
    reward: torch.Tensor  # (B, T)
    done_logit: torch.Tensor  # (B, T)
    hidden: tuple[torch.Tensor, torch.Tensor]  # (h, c), each (B, H): final LSTM state
    h: torch.Tensor  # (B, T, H): LSTM output at every step (the controller's input)


def split_head(
    out: torch.Tensor, latent_size: int, gaussians: int, hidden: tuple, h: torch.Tensor
) -> MDNOutput:
    """The head's output (..., 3*L*K + 2) as an MDNOutput: per (latent dim, component) mu,
    logsigma and a mixture logit (log-softmax normalised over K), then the reward and done logit."""
    n, shape = latent_size * gaussians, (latent_size, gaussians)
    mu = out[..., :n].unflatten(-1, shape)
    logsigma = out[..., n : 2 * n].unflatten(-1, shape)
    logpi = out[..., 2 * n : 3 * n].unflatten(-1, shape).log_softmax(dim=-1)
    return MDNOutput(mu, logsigma, logpi, out[..., -2], out[..., -1], hidden, h)


class _MDRNNBase(nn.Module):
    """Layers and head-splitting shared by MDRNN and MDRNNCell."""

    def __init__(
        self, latent_size: int = 32, action_size: int = 3, hidden_size: int = 256, gaussians: int = 5
    ):
        super().__init__()
        self.latent_size = latent_size
        self.action_size = action_size
        self.hidden_size = hidden_size
        self.gaussians = gaussians
        self.lstm = nn.LSTM(latent_size + action_size, hidden_size, batch_first=True)
        # per (latent dim, component): mu, logsigma, logit; then reward and done logit
        self.head = nn.Linear(hidden_size, 3 * latent_size * gaussians + 2)

    @property
    def config(self) -> dict:
        """Constructor arguments, so a checkpoint can rebuild either class with Cls(**config)."""
        return dict(
            latent_size=self.latent_size,
            action_size=self.action_size,
            hidden_size=self.hidden_size,
            gaussians=self.gaussians,
        )

    def initial_state(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c), each (B, H), on `device` (default: the model's device)."""
        p = next(self.parameters())
        h = torch.zeros(batch_size, self.hidden_size, device=device or p.device, dtype=p.dtype)
        return h, h.clone()

    def _run(
        self, latents: torch.Tensor, actions: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor] | None
    ) -> MDNOutput:
        """latents (B, T, L), actions (B, T, A), hidden (h, c) of (B, H) or None -> MDNOutput."""
        if hidden is not None:  # nn.LSTM wants (num_layers=1, B, H); accept both layouts
            hidden = tuple(s if s.dim() == 3 else s.unsqueeze(0) for s in hidden)
        h_seq, (h_n, c_n) = self.lstm(torch.cat([latents, actions], dim=-1), hidden)  # (B, T, H)
        return split_head(
            self.head(h_seq), self.latent_size, self.gaussians, (h_n.squeeze(0), c_n.squeeze(0)), h_seq
        )


class MDRNN(_MDRNNBase):
    """Sequence form, for training on (B, T) batches."""

    def forward(
        self,
        latents: torch.Tensor,
        actions: torch.Tensor,
        hidden: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MDNOutput:
        """latents (B, T, L), actions (B, T, A), hidden (h, c) each (B, H) or None (zeros).

        Output t predicts step t+1 (latents[:, t+1], the reward and done of taking actions[:, t]).
        """
        return self._run(latents, actions, hidden)


class MDRNNCell(_MDRNNBase):
    """One-step form, for rollouts in the real or dreamed environment.

    Runs the same nn.LSTM on a length-1 sequence, which keeps the state_dict identical to MDRNN's.
    """

    def forward(
        self,
        latent: torch.Tensor,
        action: torch.Tensor,
        hidden: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> MDNOutput:
        """latent (B, L), action (B, A), hidden (h, c) each (B, H) or None -> MDNOutput without T."""
        out = self._run(latent.unsqueeze(1), action.unsqueeze(1), hidden)
        return out._replace(**{f: getattr(out, f).squeeze(1) for f in out._fields if f != "hidden"})


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x over the positions where mask is nonzero.

    mask covers x's leading dims (e.g. (B, T) for x of (B, T, L)) and is broadcast over the rest.
    Masked-out values are selected away (not multiplied by 0), so garbage there, even inf, is ignored.
    """
    if mask is None:
        return x.mean()
    keep = (mask != 0).reshape(mask.shape + (1,) * (x.dim() - mask.dim())).expand_as(x)
    return torch.where(keep, x, 0.0).sum() / keep.sum().clamp(min=1)


def gmm_loss(
    target: torch.Tensor,
    mu: torch.Tensor,
    logsigma: torch.Tensor,
    logpi: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of target (..., L) under per-dimension mixtures (..., L, K).

    Reduction: mean over every (leading..., latent) element, i.e. NLL per latent dimension, which
    is Ha's sum-over-dims divided by the latent size. With a mask over the leading dims (e.g. (B, T)),
    the mean is taken over masked-in positions only.

    Computed entirely in log space: log N = -z^2/2 - log sigma - log sqrt(2 pi), z = (x - mu) e^{-log sigma},
    then logsumexp over K. logpi is re-normalised (so raw logits are accepted). log sigma is floored at
    LOGSIGMA_MIN and |z| capped at Z_MAX, so the loss and its gradients stay finite for any inputs whose
    differences are finite (e.g. logsigma = +-50, mu = 1e6, logits = 1e30).
    """
    logsigma = logsigma.clamp(min=LOGSIGMA_MIN)
    z = ((target.unsqueeze(-1) - mu) * torch.exp(-logsigma)).clamp(-Z_MAX, Z_MAX)  # (..., L, K)
    log_prob = -0.5 * z.pow(2) - logsigma - LOG_SQRT_2PI
    nll = -torch.logsumexp(logpi.log_softmax(dim=-1) + log_prob, dim=-1)  # (..., L)
    return _masked_mean(nll, mask)


def sample_gmm(
    mu: torch.Tensor,
    logsigma: torch.Tensor,
    logpi: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw one sample per latent dimension from mixtures (..., L, K) -> (..., L).

    Ha's temperature: mixture logits are divided by tau (then renormalised) and sigma is scaled by
    sqrt(tau); tau > 1 gives a more uncertain dream, tau < 1 a more deterministic one. tau must be > 0.
    `generator` must live on the tensors' device.

    `noise` = (uniform, normal), each broadcastable to (..., L), makes the draw a pure function
    of the given noise: the component is picked by inverse CDF of the uniform, and the normal
    scales sigma. The dream uses it so that a batch of controllers and a single env stepped
    alone see the same random numbers for the same seed.
    """
    probs = (logpi / temperature).softmax(dim=-1)  # (..., L, K)
    if noise is None:
        k = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        k = k.reshape(probs.shape[:-1] + (1,))  # (..., L, 1) component index per dimension
        eps = torch.randn(probs.shape[:-1], generator=generator, device=mu.device, dtype=mu.dtype)
    else:
        uniform, eps = (n.expand(probs.shape[:-1]) for n in noise)
        below = (probs.cumsum(dim=-1) < uniform.unsqueeze(-1)).sum(dim=-1, keepdim=True)
        k = below.clamp(max=probs.shape[-1] - 1)  # (..., L, 1)
    mu_k = mu.gather(-1, k).squeeze(-1)
    sigma_k = logsigma.gather(-1, k).squeeze(-1).exp() * math.sqrt(temperature)
    return mu_k + sigma_k * eps


def mdrnn_loss(
    out: MDNOutput,
    next_latents: torch.Tensor,
    rewards: torch.Tensor,
    terminals: torch.Tensor,
    mask: torch.Tensor | None = None,
    reward_weight: float = 1.0,
    done_weight: float = 1.0,
    next_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """GMM NLL of next_latents (B, T, L) + reward_weight * MSE(reward) + done_weight * BCE(done).

    rewards and terminals are (B, T); mask (B, T) selects valid steps of padded sequences, with the
    same per-element averaging as gmm_loss. next_mask (B, T), if given, replaces mask for the GMM
    term only: a rollout's last step has a reward and a done flag but no next latent.
    Returns dict(loss, gmm, reward, done) of scalars.
    """
    gmm = gmm_loss(next_latents, out.mu, out.logsigma, out.logpi, mask if next_mask is None else next_mask)
    reward = _masked_mean((out.reward - rewards).pow(2), mask)
    done = _masked_mean(
        F.binary_cross_entropy_with_logits(
            out.done_logit, terminals.to(out.done_logit.dtype), reduction="none"
        ),
        mask,
    )
    loss = gmm + reward_weight * reward + done_weight * done
    return dict(loss=loss, gmm=gmm, reward=reward, done=done)


def sample_z(
    batch: dict[str, torch.Tensor], device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw z = mu + sigma * eps for the batch's steps and their next steps -> (z_t, z_{t+1}).

    One draw per frame: the window's S frames plus the frame after its last step form S+1
    frames, so the target z_{t+1} of step t is the very sample fed as input at step t+1, as
    when a rollout's frames are each encoded once. Steps past a rollout's end are padding that
    the loss masks out.
    """
    mu = torch.cat([batch["mu"], batch["next_mu"][:, -1:]], 1).to(device, non_blocking=True)  # (B, S+1, L)
    logsigma = torch.cat([batch["logsigma"], batch["next_logsigma"][:, -1:]], 1).to(device, non_blocking=True)
    eps = torch.randn(mu.shape, device=device, generator=generator)
    z = mu + logsigma.exp() * eps  # (B, S+1, L)
    return z[:, :-1], z[:, 1:]


def batch_loss(
    model: MDRNN,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    reward_weight: float,
    done_weight: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Forward one batch of cached latents; the GMM term is masked by next_mask (no frame
    follows a rollout's last step), reward and done by mask (padding of short windows)."""
    z, next_z = sample_z(batch, device, generator)  # (B, S, L) each
    out = model(z, batch["actions"].to(device))  # heads (B, S, L, K), reward/done (B, S)
    return mdrnn_loss(
        out,
        next_z,
        batch["rewards"].to(device),
        batch["terminals"].to(device),
        mask=batch["mask"].to(device),
        reward_weight=reward_weight,
        done_weight=done_weight,
        next_mask=batch["next_mask"].to(device),
    )
