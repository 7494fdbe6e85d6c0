"""World Models components: V (VAE), M (MDN-RNN) and C (Controller). Pure torch, no I/O."""

from .controller import Controller, batched_actions, squash_action
from .mdrnn import MDRNN, MDNOutput, MDRNNCell, gmm_loss, mdrnn_loss, sample_gmm
from .vae import VAE, frames_to_tensor, vae_loss

__all__ = [
    "VAE",
    "frames_to_tensor",
    "vae_loss",
    "MDRNN",
    "MDRNNCell",
    "MDNOutput",
    "gmm_loss",
    "sample_gmm",
    "mdrnn_loss",
    "Controller",
    "squash_action",
    "batched_actions",
]
