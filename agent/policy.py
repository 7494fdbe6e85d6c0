"""The policy in the real env: raw frame -> V -> z -> C(z, h) -> action, with M carrying h.

Everything runs on the CPU by default, one torch thread per process: an agent handles one
frame at a time, and for a batch of one the VAE's small convolutions cost about a millisecond
on a CPU core, less than a GPU's launch-and-copy latency per step. Parallelism comes from
running whole episodes in separate pool workers instead.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from envs.carracing import MAX_EPISODE_STEPS, env_frames, to_model_frame
from models.controller import Controller


class Agent:
    """Raw env frame -> action, carrying M's LSTM state between steps.

    Per step: frame (96, 96, 3) -> model frame (64, 64, 3) -> z = mu of V (no sampling, so
    an episode is a deterministic function of its seed) -> a = C(z, h) -> M steps on (z, a)
    to give the h the controller sees next.
    """

    def __init__(self, vae: torch.nn.Module, mdrnn: torch.nn.Module, controller: Controller,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        self.mdrnn = mdrnn.to(self.device).eval()
        self.controller = controller.to(self.device).eval()
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        """Zero M's state: call at the start of every episode."""
        self.hidden = self.mdrnn.initial_state(1, device=self.device)  # (h, c), each (1, H)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """One raw uint8 frame (96, 96, 3) -> action (3,) float32 inside the action box."""
        frame = to_model_frame(obs)[None]  # (1, 64, 64, 3) uint8
        z, _ = self.vae.encode_frames(frame)  # (1, L)
        action = self.controller(z, self.hidden[0])  # (1, A)
        self.hidden = self.mdrnn(z, action, self.hidden).hidden  # (h, c), each (1, H)
        return action[0].cpu().numpy()


def run_episode(env, agent: Agent, seed: int, max_frames: int = MAX_EPISODE_STEPS,
                on_step: Callable[[], None] | None = None, stall_frames: int | None = None) -> tuple[float, int]:
    """Play one episode on track `seed`; returns (total reward, env frames played).

    The agent acts once per `env.step`, which is k frames on an `ActionRepeat` env. Ends at
    termination (lap done, off the playfield), truncation (the env's 1000-frame limit), after
    `max_frames`, or, with `stall_frames` (training only), once no new tile was reached for
    that many frames: the frames left are then charged -0.1 each, the return the episode
    would get if no tile came again. `on_step()` runs after the reset and after every step.
    """
    obs, _ = env.reset(seed=int(seed))
    agent.reset()
    if on_step is not None:
        on_step()
    track = env.unwrapped
    total, frames, tiles, progress_frame = 0.0, 0, 0, 0
    while frames < max_frames:
        obs, reward, terminated, truncated, info = env.step(agent.act(obs))
        total += float(reward)
        frames += env_frames(info)
        if on_step is not None:
            on_step()
        if terminated or truncated:
            break
        if stall_frames is not None:
            if track.tile_visited_count > tiles:
                tiles, progress_frame = track.tile_visited_count, frames
            elif frames - progress_frame >= stall_frames:
                total -= 0.1 * max(min(max_frames, MAX_EPISODE_STEPS) - frames, 0)
                break
    return total, frames
