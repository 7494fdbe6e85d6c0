"""Random-policy rollouts of CarRacing, one compressed `.npz` per episode.

Run alone as one worker:  python -m data.carracing --dir D --rollouts N --policy brown
(`data/generation_script.py` runs several of these in parallel.)

Rollout I is a pure function of (seed, I): its env seed and its policy's noise both come
from `numpy.random.SeedSequence([seed, I])`, so the same command gives the same bytes
whatever the number of workers and whichever worker happens to run it.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python data/carracing.py` as well as `python -m data.carracing`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.carracing import MAX_EPISODE_STEPS, make_env, to_model_frame  # noqa: E402
from utils.cli import positive_int  # noqa: E402

POLICIES = ("brown", "white")
BROWNIAN_DT = 1.0 / 50.0
ROLLOUT_KEYS = ("observations", "actions", "rewards", "terminals")
# zlib level 1: 0.1 ms per frame instead of 0.3 ms at the default level 6, for files about
# 1.4x larger (~1.4 MB per 1000-step rollout). Generation is CPU-bound; disk is cheap.
COMPRESS_LEVEL = 1


def rollout_seeds(seed: int, index: int) -> tuple[int, np.random.Generator]:
    """The env seed and the policy RNG of rollout `index`, derived from (seed, index) only."""
    env_seed_seq, policy_seed_seq = np.random.SeedSequence([seed, index]).spawn(2)
    env_seed = int(env_seed_seq.generate_state(1, dtype=np.uint32)[0])
    return env_seed, np.random.default_rng(policy_seed_seq)


def random_actions(policy: str, steps: int, low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(steps, 3) float32 actions, drawn up front so the env never touches the policy RNG.

    "white": independent uniform samples of the action box.
    "brown": a Brownian walk a(t+1) = clip(a(t) + sqrt(dt) N(0, I)), dt = 1/50, from a
    uniform start: smooth, temporally correlated driving that explores far more of the track
    than white noise, which mostly jitters in place.
    """
    if policy == "white":
        return rng.uniform(low, high, size=(steps, len(low))).astype(np.float32)
    if policy != "brown":
        raise ValueError(f"unknown policy {policy!r}, expected one of {POLICIES}")
    actions = np.empty((steps, len(low)), dtype=np.float32)
    actions[0] = rng.uniform(low, high)
    noise = rng.standard_normal(size=(steps, len(low))) * np.sqrt(BROWNIAN_DT)
    for t in range(1, steps):
        actions[t] = np.clip(actions[t - 1] + noise[t], low, high)
    return actions


def generate_rollout(env, index: int, seed: int = 0, policy: str = "brown", max_steps: int = MAX_EPISODE_STEPS) -> dict[str, np.ndarray]:
    """Play one episode of rollout `index` in `env` and return its arrays (DESIGN.md layout).

    Exactly one action per env step; the episode ends at `terminated`, `truncated`, or
    `max_steps` (the last step is then marked terminal, as the TimeLimit would).
    """
    env_seed, rng = rollout_seeds(seed, index)
    actions = random_actions(policy, max_steps, env.action_space.low, env.action_space.high, rng)
    obs, _ = env.reset(seed=env_seed)
    observations, rewards, terminals = [], [], []
    for t in range(max_steps):
        observations.append(to_model_frame(obs))
        obs, reward, terminated, truncated, _ = env.step(actions[t])
        done = terminated or truncated or t == max_steps - 1
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
        "seed": np.asarray([seed, index, env_seed], dtype=np.int64),
        "policy": np.asarray(policy),
        "env_id": np.asarray(env.spec.id if env.spec else "CarRacing-v3"),
    }


def save_rollout(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as a compressed .npz, atomically and byte-for-byte reproducibly.

    The format is exactly `numpy.savez_compressed`'s (a zip of `.npy` members), but every
    member gets a fixed timestamp so equal arrays give equal bytes. The file is written under
    a hidden temporary name, fsynced, then renamed: a killed run never leaves a partial file
    that matches `rollout_*.npz`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for key, value in arrays.items():
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asanyarray(value), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, buffer.getvalue(), compresslevel=COMPRESS_LEVEL)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)


def rollout_path(root: str | os.PathLike, index: int, thread: int | None = None) -> Path:
    """`root/thread_K/rollout_I.npz`, or `root/rollout_I.npz` without a thread."""
    folder = Path(root) if thread is None else Path(root) / f"thread_{thread}"
    return folder / f"rollout_{index}.npz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate random-policy CarRacing rollouts in one process.")
    parser.add_argument("--dir", required=True, help="folder to write rollout_I.npz files to")
    parser.add_argument("--rollouts", type=positive_int, required=True, help="number of rollouts")
    parser.add_argument("--policy", choices=POLICIES, default="brown", help="random policy (default: brown)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; rollout I is seeded from (seed, I)")
    parser.add_argument("--max-steps", type=positive_int, default=MAX_EPISODE_STEPS, help="steps per rollout at most")
    parser.add_argument("--slow-env", action="store_true", help="use gymnasium's own (slower) CarRacing renderer")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    env = make_env(fast=not args.slow_env)
    frames = 0
    with tqdm(range(args.rollouts), unit="rollout") as bar:
        for index in bar:
            path = rollout_path(args.dir, index)
            if path.exists():
                continue
            arrays = generate_rollout(env, index, args.seed, args.policy, args.max_steps)
            save_rollout(path, arrays)
            frames += len(arrays["actions"])
            bar.set_postfix(frames=frames)
    env.close()
    print(f"{args.rollouts} rollouts in {args.dir} ({frames} new frames)")


if __name__ == "__main__":
    main()
