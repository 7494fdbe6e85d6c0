"""The dream: CarRacing simulated by M, as a gymnasium env built from model objects.

M predicts, from (z_t, a_t, h_t), a mixture over z_{t+1}, the reward and the end of the
episode. Sampling z_{t+1} from that mixture with a temperature tau and feeding it back gives
a simulated world in which a controller can be trained without rendering a single frame.

`SimulatedCarRacing(mdrnn, starts, vae=None, temperature)` plays one dream episode at a
time: its observation is [z, h] (what C sees); `render()` decodes z with V's decoder.
`agent.dream` builds it from a logdir (`python -m agent.dream --logdir L --display` lets you
drive it by keyboard) and steps whole populations at once (`dream_returns`).

Both draw every random number of an episode from its seed alone (`episode_noise`): the start
(a real frame from the latent cache, z_0 ~ V's posterior: a rollout's first frame with M's
state at zero, or any frame with M's state there, `start_state`) and, for each step,
one uniform (picks the mixture component) and one normal per latent dimension. So a batch
and the single env give the same returns for the same seeds and controllers, and all the
candidates of a generation dream the same worlds (common random numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from models.mdrnn import sample_gmm

DONE_THRESHOLD = 0.5  # an episode ends when M's done probability exceeds this
DEFAULT_MAX_STEPS = 1000
# M's state at the picked starts: start indices (B,) -> the state tuple of B rows, h first (either M's)
StartState = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def episode_noise(
    seed: int, n_starts: int, steps: int, latent_size: int
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every random number of the dream episode `seed`: (start index, eps0 (L,), uniform (T, L), normal (T, L))."""
    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    start = int(torch.randint(n_starts, (1,), generator=generator))
    eps0 = torch.randn(latent_size, generator=generator)
    uniform = torch.rand(steps, latent_size, generator=generator)
    normal = torch.randn(steps, latent_size, generator=generator)
    return start, eps0, uniform, normal


class SimulatedCarRacing(gym.Env):
    """CarRacing dreamed by M, one episode at a time (gymnasium API).

    Observation: float32 [z, h] of size latent + hidden, exactly what C acts on.
    Action: CarRacing's box (steer in [-1, 1], gas and brake in [0, 1]).
    Reward: M's predicted reward; `terminated` when M's done probability exceeds 0.5;
    `truncated` after `max_steps`. `render()` shows V's decoding of z (64x64, scaled up
    for "human").
    """

    metadata = {"render_modes": ["human", "rgb_array"], "render_fps": 50}

    def __init__(
        self,
        mdrnn: torch.nn.Module,
        starts: torch.Tensor,
        vae: torch.nn.Module | None = None,
        temperature: float = 1.0,
        render_mode: str | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        start_state: StartState | None = None,
    ) -> None:
        """M (one-step, either architecture), the start posteriors (S, 2, L), and V for rendering
        (needed with a render_mode).

        `start_state` gives M's state at a start (a start mid-episode); None: M's initial state
        (a rollout's first frame)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if render_mode is not None and vae is None:
            raise ValueError("rendering the dream needs V (vae=...)")
        self.mdrnn, self.starts, self.vae, self.start_state = mdrnn, starts, vae, start_state
        self.temperature, self.max_steps, self.render_mode = temperature, max_steps, render_mode
        latent, hidden = self.mdrnn.latent_size, self.mdrnn.hidden_size
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (latent + hidden,), np.float32)
        self.action_space = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))
        self._window = None
        self._state: dict[str, Any] = {}

    def _observation(self) -> np.ndarray:
        s = self._state
        return torch.cat([s["z"][0], s["hidden"][0][0]]).numpy().astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is None:  # draw an episode seed from the env's own RNG (gymnasium semantics)
            seed = int(self.np_random.integers(2**63 - 1))
        latent = self.mdrnn.latent_size
        start, eps0, uniform, normal = episode_noise(seed, len(self.starts), self.max_steps, latent)
        mu, logsigma = self.starts[start]
        hidden = (
            self.mdrnn.initial_state(1, "cpu")
            if self.start_state is None
            else self.start_state(torch.tensor([start]))
        )
        self._state = {
            "z": (mu + logsigma.exp() * eps0).unsqueeze(0),
            "hidden": hidden,  # M's state, h first
            "t": 0,
            "uniform": uniform,
            "normal": normal,
        }
        if self.render_mode == "human":
            self.render()
        return self._observation(), {"start": start}

    @torch.no_grad()
    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        s = self._state
        action = torch.as_tensor(
            np.clip(action, self.action_space.low, self.action_space.high), dtype=torch.float32
        ).view(1, -1)
        out = self.mdrnn(s["z"], action, s["hidden"])
        reward = float(out.reward[0])
        terminated = bool(torch.sigmoid(out.done_logit[0]) > DONE_THRESHOLD)
        t = s["t"]
        s["z"] = sample_gmm(
            out.mu,
            out.logsigma,
            out.logpi,
            self.temperature,
            noise=(s["uniform"][t : t + 1], s["normal"][t : t + 1]),
        )
        s["hidden"] = out.hidden
        s["t"] = t + 1
        truncated = s["t"] >= self.max_steps and not terminated
        if self.render_mode == "human":
            self.render()
        return self._observation(), reward, terminated, truncated, {}

    @torch.no_grad()
    def _frame(self) -> np.ndarray:
        """V's decoding of the current z: (64, 64, 3) uint8."""
        image = self.vae.decode(self._state["z"])[0]  # (3, 64, 64) in [0, 1]
        return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        frame = self._frame()
        if self.render_mode == "rgb_array":
            return frame
        import pygame

        if self._window is None:
            pygame.init()
            self._window = pygame.display.set_mode((384, 384))
            pygame.display.set_caption("World Models: the dream")
        surface = pygame.surfarray.make_surface(frame.swapaxes(0, 1))
        self._window.blit(pygame.transform.scale(surface, (384, 384)), (0, 0))
        pygame.event.pump()
        pygame.display.flip()
        return None

    def close(self) -> None:
        if self._window is not None:
            import pygame

            pygame.display.quit()
            self._window = None
