"""Learning in imagination (Dreamer's recipe on the MDN-RNN): an actor of C's shape, a critic,
imagined rollouts through M with gradients, and lambda-returns.

The actor is C (a linear map on [z, h], the paper's squash) plus a learned exploration noise
on its pre-squash output, so the deterministic actor *is* a `Controller` that every tool plays.
`imagine` rolls M forward from real (z, h, c) states: each next z is drawn from M's mixture by
the reparameterisation trick (component picked, then mu + sigma * eps), so the gradient of the
imagined return flows through M's dynamics into the actions. M is only read, never updated.
docs/imagination.md has the whole method and its defaults.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from models.controller import Controller, squash_action
from models.mdrnn import MDRNNCell, sample_gmm


class Actor(nn.Module):
    """a = squash(W [z, h] + b + std * eps): C plus a learned, state-independent noise."""

    def __init__(self, latent_size: int = 32, hidden_size: int = 256, action_size: int = 3, std: float = 0.5):
        super().__init__()
        self.controller = Controller(latent_size, hidden_size, action_size)
        nn.init.zeros_(self.controller.fc.weight)  # as CMA-ES starts: straight ahead, half gas
        nn.init.zeros_(self.controller.fc.bias)
        self.log_std = nn.Parameter(torch.full((action_size,), math.log(std)))

    def forward(self, z: torch.Tensor, h: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """z (..., L), h (..., H) -> action (..., A) in the action box; sample=False is C itself."""
        raw = self.controller.fc(torch.cat([z, h], dim=-1))
        if sample:
            raw = raw + self.log_std.exp() * torch.randn_like(raw)
        return squash_action(raw)

    def entropy(self) -> torch.Tensor:
        """Entropy of the pre-squash Gaussian (a scalar): what the exploration bonus raises."""
        return (self.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum()


class Critic(nn.Module):
    """v(z, h): the expected discounted return from a state, a small MLP."""

    def __init__(self, latent_size: int = 32, hidden_size: int = 256, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_size + hidden_size, width),
            nn.ELU(),
            nn.Linear(width, width),
            nn.ELU(),
            nn.Linear(width, 1),
        )

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """z (..., L), h (..., H) -> value (...)."""
        return self.net(torch.cat([z, h], dim=-1)).squeeze(-1)


class Imagined(NamedTuple):
    """A batch of imagined trajectories, time-major: H steps from B start states."""

    z: torch.Tensor  # (H+1, B, L): the start latent, then M's draws
    h: torch.Tensor  # (H+1, B, Hd): M's hidden state the actor saw at each step
    rewards: torch.Tensor  # (H, B): M's predicted reward of each action
    continues: torch.Tensor  # (H, B): M's probability that the episode goes on after each action


def imagine(
    mdrnn: MDRNNCell,
    actor: Actor,
    z: torch.Tensor,
    hidden: tuple[torch.Tensor, torch.Tensor],
    horizon: int,
    temperature: float = 1.0,
    sample: bool = True,
) -> Imagined:
    """Roll M forward `horizon` steps from z (B, L) and hidden (h, c) (B, Hd) with the actor acting
    (with its noise, or as C alone with sample=False).

    Differentiable end to end: actions are reparameterised, next latents are mu_k + sigma_k * eps.
    """
    zs, hs, rewards, continues = [z], [hidden[0]], [], []
    for _ in range(horizon):
        action = actor(z, hidden[0], sample)
        out = mdrnn(z, action, hidden)
        z = sample_gmm(out.mu, out.logsigma, out.logpi, temperature)  # (B, L), gradients via mu, sigma
        hidden = out.hidden
        zs.append(z)
        hs.append(hidden[0])
        rewards.append(out.reward)
        continues.append(torch.sigmoid(-out.done_logit))  # 1 - P(done)
    return Imagined(torch.stack(zs), torch.stack(hs), torch.stack(rewards), torch.stack(continues))


def lambda_returns(
    rewards: torch.Tensor, continues: torch.Tensor, values: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """TD(lambda) returns (H, B) of rewards, continues (H, B) and values (H+1, B).

    R_t = r_t + gamma c_t ((1 - lambda) v_{t+1} + lambda R_{t+1}), bootstrapped by R_H = v_H.
    """
    returns, next_return = [], values[-1]
    for t in reversed(range(len(rewards))):
        next_return = rewards[t] + gamma * continues[t] * ((1 - lam) * values[t + 1] + lam * next_return)
        returns.append(next_return)
    return torch.stack(returns[::-1])


def discount_weights(continues: torch.Tensor, gamma: float) -> torch.Tensor:
    """(H, B) the weight of each imagined state: the chance, discounted, that it is reached at all."""
    reached = torch.cumprod(gamma * continues, dim=0)
    return torch.cat([torch.ones_like(reached[:1]), reached[:-1]]).detach()
