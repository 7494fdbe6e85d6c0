"""The policy in the real env: raw frames -> V -> z -> C(z, h) -> actions, with M carrying h.

Everything runs on the CPU by default, one torch thread per process. An agent drives a small
batch of episodes side by side (one env each) and V, C and M step them as one batch, which
costs less per frame than one episode at a time (README, Speed). An episode's return is the
same to the bit whether it ran alone or in a batch (Agent pads every batch to blocks of BLOCK
rows). Parallelism beyond the batch comes from pool workers running separate tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from envs.carracing import MAX_EPISODE_STEPS, env_frames, to_model_frame
from models.controller import Controller

BLOCK = 4  # V, M and C always see exactly this many rows at once (padded): see Agent


class Agent:
    """Raw env frames -> actions for a batch of episodes, carrying M's LSTM state between steps.

    Per step: frames (B, 96, 96, 3) -> model frames (B, 64, 64, 3) -> z = mu of V (no sampling,
    so an episode is a deterministic function of its seed) -> a = C(z, h) -> M steps on (z, a)
    to give the h the controller sees next. One call encodes the whole batch.

    CarRacing is chaotic: an action that differs in its last bit changes a pixel a few steps
    later and the track's outcome soon after. CPU kernels round differently for different
    batch sizes (never for different neighbours in the batch), so V, M and C always run on
    blocks of exactly BLOCK rows, padded: an episode's actions are then the same bits whether
    it runs alone, beside others, or beside episodes that have already ended.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        mdrnn: torch.nn.Module,
        controller: Controller,
        device: str | torch.device = "cpu",
        block: int = BLOCK,
    ) -> None:
        self.device = torch.device(device)
        self.block = block  # rows per V, M and C call; only the benchmark's old path changes it
        self.vae = vae.to(self.device).eval()
        self.mdrnn = mdrnn.to(self.device).eval()
        self.controller = controller.to(self.device).eval()
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset()

    def reset(self, batch_size: int = 1) -> None:
        """Zero M's state for `batch_size` new episodes: call at the start of every episode."""
        rows = -(-batch_size // self.block) * self.block
        self.hidden = self.mdrnn.initial_state(rows, device=self.device)  # (h, c), each (rows, H)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Raw uint8 frames (B, 96, 96, 3), one per episode of the batch -> actions (B, 3) float32."""
        frames = to_model_frame(obs)  # (B, 64, 64, 3)
        padding = np.zeros((len(self.hidden[0]) - len(frames), *frames.shape[1:]), dtype=np.uint8)
        z, _ = self.vae.encode_frames(np.concatenate([frames, padding]), batch_size=self.block)  # (rows, L)
        actions, hidden = [], []
        for z_block, h_block, c_block in zip(
            z.split(self.block), *(s.split(self.block) for s in self.hidden)
        ):
            action = self.controller(z_block, h_block)  # (block, A)
            hidden.append(self.mdrnn(z_block, action, (h_block, c_block)).hidden)
            actions.append(action)
        self.hidden = tuple(torch.cat(states) for states in zip(*hidden))  # (h, c), each (rows, H)
        return torch.cat(actions)[: len(frames)].cpu().numpy()


def run_episodes(
    envs: Sequence,
    agent: Agent,
    seeds: Sequence[int],
    max_frames: int = MAX_EPISODE_STEPS,
    stall_frames: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[tuple[float, int]]:
    """Play one episode per env, on track seeds[i] in envs[i], side by side; [(total reward, env frames)].

    The agent acts for all unfinished episodes at once, once per `env.step`, which is k frames
    on an `ActionRepeat` env. An episode ends at termination (lap done, off the playfield),
    truncation (the env's 1000-frame limit), after `max_frames`, or, with `stall_frames`
    (training only), once no new tile was reached for that many frames: the frames left are
    then charged -0.1 each, the return the episode would get if no tile came again. `on_step()`
    runs after the reset and after every step.
    """
    n = len(seeds)
    obs = [env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)]
    agent.reset(n)
    if on_step is not None:
        on_step()
    totals, frames, tiles, progress_frame = [0.0] * n, [0] * n, [0] * n, [0] * n
    live = [max_frames > 0] * n  # which episodes are still running
    while any(live):
        actions = agent.act(np.stack(obs))  # (n, A); an ended episode's row is computed and ignored
        for i in [i for i in range(n) if live[i]]:
            obs[i], reward, terminated, truncated, info = envs[i].step(actions[i])
            totals[i] += float(reward)
            frames[i] += env_frames(info)
            ended = terminated or truncated or frames[i] >= max_frames
            if not ended and stall_frames is not None:
                track = envs[i].unwrapped
                if track.tile_visited_count > tiles[i]:
                    tiles[i], progress_frame[i] = track.tile_visited_count, frames[i]
                elif frames[i] - progress_frame[i] >= stall_frames:
                    totals[i] -= 0.1 * max(min(max_frames, MAX_EPISODE_STEPS) - frames[i], 0)
                    ended = True
            live[i] = not ended
        if on_step is not None:
            on_step()
    return list(zip(totals, frames))


def run_episode(
    env,
    agent: Agent,
    seed: int,
    max_frames: int = MAX_EPISODE_STEPS,
    on_step: Callable[[], None] | None = None,
    stall_frames: int | None = None,
) -> tuple[float, int]:
    """One episode on track `seed` (run_episodes with a batch of one); returns (total reward, env frames)."""
    return run_episodes([env], agent, [seed], max_frames, stall_frames, on_step)[0]
