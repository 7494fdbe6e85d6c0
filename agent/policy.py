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
        self.hidden: tuple[torch.Tensor, ...] | None = None  # M's state, h first
        self.reset()

    def reset(self, batch_size: int = 1) -> None:
        """Zero M's state for `batch_size` new episodes: call at the start of every episode."""
        rows = -(-batch_size // self.block) * self.block
        self.hidden = self.mdrnn.initial_state(rows, device=self.device)  # M's state, rows first

    @torch.no_grad()
    def act(self, obs: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Raw uint8 frames (B, 96, 96, 3), one per episode of the batch -> actions (B, 3) float32.

        `noise` (B, 3), when given, is added to C's output before the squash (exploration)."""
        frames = to_model_frame(obs)  # (B, 64, 64, 3)
        rows = len(self.hidden[0])
        padding = np.zeros((rows - len(frames), *frames.shape[1:]), dtype=np.uint8)
        z, _ = self.vae.encode_frames(np.concatenate([frames, padding]), batch_size=self.block)  # (rows, L)
        raw_noise = torch.zeros(rows, self.controller.action_size, device=self.device)
        if noise is not None:
            raw_noise[: len(noise)] = torch.as_tensor(noise, dtype=torch.float32)
        actions, hidden = [], []
        make = getattr(type(self.hidden), "_make", tuple)  # the LSTM's (h, c) or the transformer's state
        blocks = zip(*(s.split(self.block) for s in self.hidden))  # M's state, h first, block by block
        for z_block, state, n_block in zip(z.split(self.block), blocks, raw_noise.split(self.block)):
            state = make(state)
            action = self.controller(z_block, state[0], n_block if noise is not None else None)  # (block, A)
            hidden.append(self.mdrnn(z_block, action, state).hidden)
            actions.append(action)
        self.hidden = make(torch.cat(states) for states in zip(*hidden))  # rows first
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


def record_episode(
    env, agent: Agent, seed: int, noise_seed: int, noise_std: np.ndarray, max_frames: int = MAX_EPISODE_STEPS
) -> dict[str, np.ndarray]:
    """One episode of the agent with Gaussian noise (std `noise_std` per action, drawn from
    `noise_seed`) added to C's output, recorded as a rollout (data/rollouts.py's format, policy
    "actor"): the iterative data of learning in imagination. A pure function of its arguments."""
    k = getattr(env, "action_repeat", 1)
    steps = -(-max_frames // k)
    noise = np.random.default_rng(noise_seed).standard_normal((steps, len(noise_std))) * noise_std
    obs, _ = env.reset(seed=int(seed))
    agent.reset(1)
    observations, actions, rewards, terminals, frames = [], [], [], [], 0
    for t in range(steps):
        observations.append(to_model_frame(obs))
        action = agent.act(obs[None], noise[t : t + 1])[0]
        obs, reward, terminated, truncated, info = env.step(action)
        frames += env_frames(info)
        done = terminated or truncated or frames >= max_frames
        actions.append(action)
        rewards.append(reward)
        terminals.append(done)
        if done:
            break
    return {
        "observations": np.stack(observations),  # (T, 64, 64, 3) uint8
        "actions": np.asarray(actions, dtype=np.float32),  # (T, 3): what was played, noise included
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminals": np.asarray(terminals, dtype=bool),
        "action_repeat": np.asarray(k, dtype=np.int64),
        "seed": np.asarray([seed, noise_seed, frames], dtype=np.int64),  # track, noise, env frames played
        "policy": np.asarray("actor"),
        "env_id": np.asarray(env.spec.id if env.spec else "CarRacing-v3"),
    }
