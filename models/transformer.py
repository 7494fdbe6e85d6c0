"""A transformer M beside the MDN-RNN: a small causal transformer over time steps (STORM's layout).

One token per step, a linear embedding of [z_t, a_t]; `layers` pre-norm blocks of causal
self-attention and an MLP; the final normalised output h_t (width `hidden_size`, 256 like the
LSTM's, so C reads [z, h] unchanged) feeds the MDN-RNN's own head (a mixture over z_{t+1} per
latent dimension, the reward, the done logit), with the same loss (`models.mdrnn.mdrnn_loss`).

C reads `h_scale` x h_t, the state's h; the head reads h_t itself, so the scale changes nothing
M predicts. A normalised output has an rms near 1 (0.91 on held-out rollouts) where the LSTM's
tanh-bounded h has 0.31; CMA-ES starts C at 0 with one step size for every weight, so with the
raw output the first generations' cars steer erratically and the search crawls (README, Which
M). `trainmdrnn.py --h-scale` (C_H_SCALE) brings it to the LSTM's scale; configs written before
it have no `h_scale` and build with 1.0, as their C was trained.

Positions are relative, not absolute: each head adds -slope * (distance) to its attention
scores (ALiBi), and a token sees at most the `context` latest tokens, itself included (a sliding
window). So a token's keys and values never depend on where it sits, and stepping one token at a
time with a cache of the last `context` keys and values per layer is *exactly* the sequence form
with a banded causal mask, however long the episode: at the window's edge the oldest token drops
out of the cache, and with `layers` blocks the output still depends on up to layers x context
past steps, through the tokens it attends to.

`TransformerM` runs whole sequences (training); `TransformerMCell` runs one step from a
`TransformerState` (rollouts, the dream, imagination). They share one base class, so their
state_dicts are interchangeable, as MDRNN's and MDRNNCell's are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.mdrnn import MDNOutput, split_head

ARCH = "transformer"  # the `arch` a checkpoint's config names (the MDN-RNN's configs have none)
# trainmdrnn.py's --h-scale: about the LSTM h's rms over the normalised output's (0.31 / 0.91)
C_H_SCALE = 0.34


class TransformerState(NamedTuple):
    """What one step needs of the past: h first, as the LSTM's (h, c) has it."""

    h: torch.Tensor  # (B, H): the output of the latest step times h_scale, the controller's input
    kv: torch.Tensor  # (B, layers, 2, context, H): keys and values of the latest tokens, oldest first
    filled: torch.Tensor  # (B, context): 1 where kv holds a token, 0 in the slots not yet reached


def alibi_slopes(heads: int) -> torch.Tensor:
    """(heads,) the geometric slopes 2^(-8 i / heads), i = 1..heads, of ALiBi's distance penalty."""
    return torch.pow(2.0, -8.0 * torch.arange(1, heads + 1) / heads)


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., S, H) -> (..., heads, S, H / heads)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def forward(
        self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """x (B, T, H), its queries q (B, T, H), attends to keys/values (B, S, H) with an additive
        bias (B or 1, heads, T, S)."""
        attended = F.scaled_dot_product_attention(
            self.split(q), self.split(keys), self.split(values), attn_mask=bias
        )
        x = x + self.proj(attended.transpose(-3, -2).flatten(-2))
        return x + self.mlp(self.norm2(x))

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The queries, keys and values (..., H) of tokens x (..., H), from one matmul."""
        return self.qkv(self.norm1(x)).chunk(3, dim=-1)


class _TransformerBase(nn.Module):
    """Layers and head shared by TransformerM and TransformerMCell."""

    def __init__(
        self,
        latent_size: int = 32,
        action_size: int = 3,
        hidden_size: int = 256,
        gaussians: int = 5,
        layers: int = 2,
        heads: int = 4,
        context: int = 32,
        h_scale: float = 1.0,
        arch: str = ARCH,
    ):
        super().__init__()
        if arch != ARCH:
            raise ValueError(f"a {type(self).__name__} cannot be built from an '{arch}' config")
        self.latent_size, self.action_size, self.hidden_size = latent_size, action_size, hidden_size
        self.gaussians, self.layers, self.heads, self.context = gaussians, layers, heads, context
        self.h_scale = float(h_scale)  # on the h that C reads, not on what the head reads
        self.embed = nn.Linear(latent_size + action_size, hidden_size)
        self.blocks = nn.ModuleList(Block(hidden_size, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, 3 * latent_size * gaussians + 2)  # the MDN-RNN's head
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    @property
    def memory_steps(self) -> int:
        """How many latest steps decide the state exactly: each block reaches context - 1 steps further back."""
        return self.layers * (self.context - 1) + 1

    @property
    def config(self) -> dict:
        """Constructor arguments, `arch` included: every stage rebuilds the right M from it."""
        return dict(
            latent_size=self.latent_size,
            action_size=self.action_size,
            hidden_size=self.hidden_size,
            gaussians=self.gaussians,
            layers=self.layers,
            heads=self.heads,
            context=self.context,
            h_scale=self.h_scale,
            arch=ARCH,
        )

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> TransformerState:
        """An empty past: h = 0, no token in the cache."""
        p = next(self.parameters())
        device = device or p.device
        h = torch.zeros(batch_size, self.hidden_size, device=device, dtype=p.dtype)
        kv = torch.zeros(
            batch_size, self.layers, 2, self.context, self.hidden_size, device=device, dtype=p.dtype
        )
        return TransformerState(h, kv, torch.zeros(batch_size, self.context, device=device, dtype=p.dtype))

    def _outputs_needed(self, block: int) -> int:
        """How many latest tokens' outputs of `block` the state after the last token needs: the last
        block's for h alone; an earlier one's for the keys and values of the next block's window,
        as far back as that block's own needed tokens look."""
        later = self.layers - 1 - block  # blocks after this one
        return 1 if later == 0 else (later - 1) * (self.context - 1) + self.context

    def _sequence(
        self,
        latents: torch.Tensor,
        actions: torch.Tensor,
        valid: torch.Tensor | None = None,
        state_only: bool = False,
    ) -> tuple[torch.Tensor, TransformerState]:
        """The banded causal pass over (B, T) tokens: (h at every step (B, T, H), the state after the
        last). `valid` (B, T), if given, marks the real tokens: each row's first ones may be padding,
        which no real token attends to and the state does not hold. `state_only`: each block runs
        only the tokens the state needs (`_outputs_needed`), and h comes for the last step alone."""
        batch, steps = latents.shape[:2]
        distance = torch.arange(steps).unsqueeze(1) - torch.arange(steps).unsqueeze(0)  # (T, T): i - j
        allowed = ((distance >= 0) & (distance < self.context)).to(latents.device)
        if valid is not None:  # a padding key is seen by no one but itself (so no row is empty)
            allowed = allowed & (
                valid.unsqueeze(1) | torch.eye(steps, dtype=torch.bool, device=latents.device)
            )
            allowed = allowed.unsqueeze(1)  # (B, 1, T, T)
        bias = (-self.slopes.view(-1, 1, 1) * distance.to(latents.dtype).to(latents.device)).masked_fill(
            ~allowed, float("-inf")
        )  # (heads, T, T), or (B, heads, T, T) with `valid`
        x = self.embed(torch.cat([latents, actions], dim=-1))  # (B, T, H)
        kept = min(steps, self.context)
        cached = []
        for i, block in enumerate(self.blocks):
            q, k, v = block.queries_keys_values(x)  # of this block's tokens, the latest x.shape[1]
            cached.append(torch.stack([k, v], 1)[:, :, -kept:])  # (B, 2, kept, H)
            out = min(x.shape[1], self._outputs_needed(i)) if state_only else x.shape[1]
            x = block(x[:, -out:], q[:, -out:], k, v, bias[..., -out:, -x.shape[1] :])
        h_seq = self.norm(x)
        state = self.initial_state(batch, latents.device)
        real = torch.ones(batch, kept, device=latents.device) if valid is None else valid[:, -kept:].float()
        filled = torch.cat([state.filled[:, : self.context - kept], real], 1)  # (B, context)
        kv = torch.cat([state.kv[:, :, :, : self.context - kept], torch.stack(cached, 1)], 3)
        kv = kv * filled.view(batch, 1, 1, -1, 1)  # padding slots hold zeros, as an empty cache does
        h = self.h_scale * h_seq[:, -1] * real[:, -1:]  # a row of padding only has no past: h = 0
        return h_seq, TransformerState(h, kv, filled)

    def _heads(self, h_seq: torch.Tensor, state: TransformerState) -> MDNOutput:
        """The MDN-RNN's head on the outputs h (..., H)."""
        return split_head(self.head(h_seq), self.latent_size, self.gaussians, state, h_seq)


class TransformerM(_TransformerBase):
    """Sequence form, for training on (B, T) batches, from an empty past."""

    def forward(self, latents: torch.Tensor, actions: torch.Tensor, hidden: None = None) -> MDNOutput:
        """latents (B, T, L), actions (B, T, A) -> MDNOutput; output t predicts step t+1.

        `hidden` must be None (the sequence starts from nothing); `hidden` of the output is the
        state after the last step, which `TransformerMCell` continues from.
        """
        if hidden is not None:
            raise ValueError(
                "TransformerM runs a sequence from an empty past; step from a state with the cell"
            )
        h_seq, state = self._sequence(latents, actions)
        return self._heads(h_seq, state)


class TransformerMCell(_TransformerBase):
    """One-step form: reads (z_t, a_t) and the cache of the past, returns the next state."""

    def state_after(
        self, latents: torch.Tensor, actions: torch.Tensor, valid: torch.Tensor
    ) -> TransformerState:
        """The state after reading the (B, T) tokens whose `valid` (B, T) marks the real ones (the
        first ones of a row may be padding), in one banded pass: what stepping them would give."""
        return self._sequence(latents, actions, valid, state_only=True)[1]

    def forward(
        self, latent: torch.Tensor, action: torch.Tensor, hidden: TransformerState | None = None
    ) -> MDNOutput:
        """latent (B, L), action (B, A), hidden a TransformerState or None -> MDNOutput without T."""
        state = TransformerState(*hidden) if hidden is not None else self.initial_state(latent.shape[0])
        filled = torch.cat([state.filled[:, 1:], torch.ones_like(state.filled[:, :1])], 1)  # (B, context)
        distance = torch.arange(self.context - 1, -1, -1, device=latent.device, dtype=latent.dtype)
        bias = -self.slopes.view(-1, 1, 1) * distance  # (heads, 1, context): the newest slot is distance 0
        bias = bias.unsqueeze(0).masked_fill(filled.view(-1, 1, 1, self.context) == 0, float("-inf"))
        x = self.embed(torch.cat([latent, action], dim=-1)).unsqueeze(1)  # (B, 1, H)
        new_kv = []
        # unbind and split, not indexing and slicing: their backward stacks and concatenates the
        # gradients instead of filling a zero tensor of the whole cache for every piece taken
        for block, cached in zip(self.blocks, state.kv.unbind(1), strict=True):
            q, k, v = block.queries_keys_values(x)  # (B, 1, H) each
            kept = cached.split([1, self.context - 1], dim=2)[
                1
            ]  # (B, 2, context - 1, H): the oldest drops out
            kv = torch.cat([kept, torch.stack([k, v], 1)], 2)  # (B, 2, context, H)
            new_kv.append(kv)
            x = block(x, q, *kv.unbind(1), bias)
        h = self.norm(x).squeeze(1)  # (B, H)
        out = self._heads(h, TransformerState(self.h_scale * h, torch.stack(new_kv, 1), filled))
        return out
