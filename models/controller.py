"""Controller ("C" in World Models): a single linear map from [z_t, h_t] to the action.

It is deliberately tiny (867 parameters at the defaults) so that CMA-ES can search its weights
directly; all the capacity lives in V and M.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def squash_action(raw: torch.Tensor) -> torch.Tensor:
    """Map unbounded outputs (..., 3) into CarRacing's action box, as the paper's C does.

    steer = tanh in [-1, 1], gas = (tanh + 1) / 2 in [0, 1], brake = clip(tanh, 0, 1): a C at
    zero drives straight at half gas without braking (a sigmoid brake would hold it at 0.5).
    """
    t = raw.tanh()
    return torch.cat([t[..., :1], (t[..., 1:2] + 1) / 2, t[..., 2:].clamp(min=0)], dim=-1)


class Controller(nn.Module):
    """a_t = squash(W [z_t, h_t] + b)."""

    def __init__(self, latent_size: int = 32, hidden_size: int = 256, action_size: int = 3):
        super().__init__()
        self.latent_size = latent_size
        self.hidden_size = hidden_size
        self.action_size = action_size
        self.fc = nn.Linear(latent_size + hidden_size, action_size)

    @property
    def config(self) -> dict:
        """Constructor arguments, so a checkpoint can rebuild the model with Controller(**config)."""
        return dict(latent_size=self.latent_size, hidden_size=self.hidden_size, action_size=self.action_size)

    def forward(self, z: torch.Tensor, h: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z (..., L), h (..., H) -> action (..., A), always inside the action box; `noise`
        (..., A), when given, is added before the squash (exploration)."""
        raw = self.fc(torch.cat([z, h], dim=-1))
        return squash_action(raw if noise is None else raw + noise)


def batched_actions(
    flat_params: torch.Tensor,
    z: torch.Tensor,
    h: torch.Tensor,
    latent_size: int,
    hidden_size: int,
    action_size: int = 3,
) -> torch.Tensor:
    """Apply a whole population of controllers at once: one batched matmul instead of P modules.

    flat_params (P, n_params) uses the layout of parameters_to_vector(Controller(...).parameters()):
    the (A, L+H) weight row-major, then the (A,) bias. z (P, N, L), h (P, N, H) -> actions (P, N, A),
    where controller p acts on its own N inputs.
    """
    P, in_size = flat_params.shape[0], latent_size + hidden_size
    n_weight = action_size * in_size
    if flat_params.shape[1] != n_weight + action_size:
        raise ValueError(
            f"expected {n_weight + action_size} params per controller, got {flat_params.shape[1]}"
        )
    weight = flat_params[:, :n_weight].reshape(P, action_size, in_size)  # (P, A, L+H)
    bias = flat_params[:, n_weight:].unsqueeze(1)  # (P, 1, A)
    # W [z, h] = W_z z + W_h h: two batched matmuls instead of concatenating a (P, N, L+H) copy
    w_z, w_h = weight[..., :latent_size].transpose(1, 2), weight[..., latent_size:].transpose(1, 2)
    return squash_action(torch.baddbmm(bias, z, w_z).baddbmm_(h, w_h))  # (P, N, A)
