"""Random-policy CarRacing episodes: the policies, and playing one rollout.

Rollout I is a pure function of (seed, I): its env seed and its policy's noise both come
from `numpy.random.SeedSequence([seed, I])`, so the same command gives the same bytes
whatever the number of workers and whichever worker happens to run it.

The command line is data/generation_script.py (K workers, resumable); the file format
(naming, atomic reproducible writes) is data/rollouts.py's.
"""

from __future__ import annotations

import numpy as np

from envs.carracing import MAX_EPISODE_STEPS, to_model_frame

POLICIES = ("brown", "white")
BROWNIAN_DT = 1.0 / 50.0


def rollout_seeds(seed: int, index: int) -> tuple[int, np.random.Generator]:
    """The env seed and the policy RNG of rollout `index`, derived from (seed, index) only."""
    env_seed_seq, policy_seed_seq = np.random.SeedSequence([seed, index]).spawn(2)
    env_seed = int(env_seed_seq.generate_state(1, dtype=np.uint32)[0])
    return env_seed, np.random.default_rng(policy_seed_seq)


def random_actions(
    policy: str,
    steps: int,
    low: np.ndarray,
    high: np.ndarray,
    rng: np.random.Generator,
    dt: float = BROWNIAN_DT,
) -> np.ndarray:
    """(steps, 3) float32 actions, drawn up front so the env never touches the policy RNG.

    "white": independent uniform samples of the action box.
    "brown": a Brownian walk a(t+1) = clip(a(t) + sqrt(dt) N(0, I)), dt = 1/50 per frame, from a
    uniform start: smooth, temporally correlated driving that explores far more of the track
    than white noise, which mostly jitters in place.
    """
    if policy == "white":
        return rng.uniform(low, high, size=(steps, len(low))).astype(np.float32)
    if policy != "brown":
        raise ValueError(f"unknown policy {policy!r}, expected one of {POLICIES}")
    actions = np.empty((steps, len(low)), dtype=np.float32)
    actions[0] = rng.uniform(low, high)
    noise = rng.standard_normal(size=(steps, len(low))) * np.sqrt(dt)
    for t in range(1, steps):
        actions[t] = np.clip(actions[t - 1] + noise[t], low, high)
    return actions


def generate_rollout(
    env, index: int, seed: int = 0, policy: str = "brown", max_steps: int = MAX_EPISODE_STEPS
) -> dict[str, np.ndarray]:
    """Play one episode of rollout `index` in `env` and return its arrays (docs/design.md, File formats).

    One row per `env.step`: on an `ActionRepeat(k)` env that is one agent step of k frames
    (reward summed over them), and the Brownian walk moves k/50 per step, so it drives alike
    at any k. The episode ends at `terminated`, `truncated`, or after `max_steps` env frames
    (the last row is then marked terminal, as the TimeLimit would).
    """
    k = getattr(env, "action_repeat", 1)
    steps = -(-max_steps // k)  # agent steps covering max_steps frames
    env_seed, rng = rollout_seeds(seed, index)
    actions = random_actions(policy, steps, env.action_space.low, env.action_space.high, rng, BROWNIAN_DT * k)
    obs, _ = env.reset(seed=env_seed)
    observations, rewards, terminals = [], [], []
    for t in range(steps):
        observations.append(to_model_frame(obs))
        obs, reward, terminated, truncated, _ = env.step(actions[t])
        done = terminated or truncated or t == steps - 1
        rewards.append(reward)
        terminals.append(done)
        if done:
            break
    steps = len(rewards)
    return {
        "observations": np.stack(observations),  # (T, 64, 64, 3) uint8
        "actions": actions[:steps],  # (T, 3) float32
        "rewards": np.asarray(rewards, dtype=np.float32),  # (T,)
        "terminals": np.asarray(terminals, dtype=bool),  # (T,)
        "action_repeat": np.asarray(k, dtype=np.int64),  # env frames per row
        "seed": np.asarray([seed, index, env_seed], dtype=np.int64),
        "policy": np.asarray(policy),
        "env_id": np.asarray(env.spec.id if env.spec else "CarRacing-v3"),
    }
