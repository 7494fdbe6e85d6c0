"""Convolutional VAE ("V" in World Models): compresses a 64x64 RGB frame into a small latent z.

Architecture follows Ha & Schmidhuber (2018), appendix A.1:
encoder = 4 conv layers (kernel 4, stride 2) -> flatten 1024 -> linear heads for mu and log sigma,
decoder = linear -> 1024x1x1 -> 4 transposed convs (kernels 5,5,6,6, stride 2) -> sigmoid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def frames_to_tensor(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, C) frames -> float (..., C, H, W) in [0, 1], on the same device.

    Frames are stored and moved as uint8 (4x smaller); the float conversion happens here,
    as late as possible, ideally after the transfer to the GPU.
    """
    if frames.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames.dtype}")
    # permute the cheap uint8 tensor, so that the float copy comes out contiguous
    return frames.movedim(-1, -3).contiguous().float().div_(255.0)


class VAE(nn.Module):
    """Paper VAE for 64x64 images. x is float NCHW in [0, 1]."""

    def __init__(self, latent_size: int = 32, img_channels: int = 3):
        super().__init__()
        self.latent_size = latent_size
        self.img_channels = img_channels
        # 64 -> 31 -> 14 -> 6 -> 2 (no padding), so 256 * 2 * 2 = 1024 features
        self.encoder = nn.Sequential(
            nn.Conv2d(img_channels, 32, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(128, 256, 4, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(1024, latent_size)
        self.fc_logsigma = nn.Linear(1024, latent_size)
        # 1 -> 5 -> 13 -> 30 -> 64
        self.fc_dec = nn.Linear(latent_size, 1024)
        self.decoder = nn.Sequential(
            nn.Unflatten(1, (1024, 1, 1)),
            nn.ConvTranspose2d(1024, 128, 5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 6, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(32, img_channels, 6, stride=2),
            nn.Sigmoid(),
        )

    @property
    def config(self) -> dict:
        """Constructor arguments, so a checkpoint can rebuild the model with VAE(**config)."""
        return dict(latent_size=self.latent_size, img_channels=self.img_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, 64, 64) -> mu, logsigma, each (N, latent). Never touches the decoder."""
        feats = self.encoder(x)  # (N, 1024)
        return self.fc_mu(feats), self.fc_logsigma(feats)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent) -> reconstruction (N, C, 64, 64) in [0, 1]."""
        return self.decoder(F.relu(self.fc_dec(z)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (recon, mu, logsigma).

        In training mode z is a reparameterised sample mu + sigma * eps, so gradients reach the
        encoder; in eval mode z = mu, which gives deterministic reconstructions.
        """
        mu, logsigma = self.encode(x)
        z = mu + logsigma.exp() * torch.randn_like(mu) if self.training else mu
        return self.decode(z), mu, logsigma

    @torch.no_grad()
    def encode_frames(
        self, frames_uint8: np.ndarray | torch.Tensor, batch_size: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode raw uint8 frames (..., 64, 64, 3) -> mu, logsigma (..., latent) on the model's device.

        Accepts numpy or torch with any leading dims (e.g. (T, ...) or (B, T, ...)); frames are
        moved to the device as uint8 in chunks of `batch_size`, which bounds peak memory.
        """
        frames = torch.as_tensor(frames_uint8)
        lead = frames.shape[:-3]
        p = next(self.parameters())
        mus, logsigmas = [], []
        for chunk in frames.reshape(-1, *frames.shape[-3:]).split(batch_size):
            x = frames_to_tensor(chunk.to(p.device, non_blocking=True)).to(p.dtype)
            mu, logsigma = self.encode(x)  # (chunk, latent)
            mus.append(mu)
            logsigmas.append(logsigma)
        return (
            torch.cat(mus).reshape(*lead, self.latent_size),
            torch.cat(logsigmas).reshape(*lead, self.latent_size),
        )


def vae_loss(
    recon: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logsigma: torch.Tensor,
    kl_tolerance: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, recon_loss, kl), each a scalar averaged over the batch.

    recon_loss: squared error summed over each image (C, H, W), averaged over the batch.
    kl: KL(q(z|x) || N(0, I)) summed over latent dims, averaged over the batch. This is the
        *unclamped* value, returned for logging only.
    loss: recon_loss + mean over images of max(KL, kl_tolerance * latent_size). This is the paper's
        KL tolerance ("free bits"): once an image's KL is below the budget it gets no gradient,
        which stops the KL term from collapsing the latent. kl_tolerance=0 gives the plain ELBO.
    """
    recon_loss = (recon - x).pow(2).flatten(1).sum(1).mean()
    kl = -0.5 * (1 + 2 * logsigma - mu.pow(2) - (2 * logsigma).exp()).sum(-1)  # (N,)
    kl_clamped = kl.clamp(min=kl_tolerance * mu.shape[-1])
    return recon_loss + kl_clamped.mean(), recon_loss, kl.mean()
