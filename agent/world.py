"""Loading the trained world from a logdir: V, M and C from their best checkpoints.

Sizes always come from the checkpoints' configs, never from constants; a missing or
mismatched stage stops with one line naming the command that (re)makes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from agent.imagine import StartStates
from data.latents import load_latent_cache
from envs.carracing import ACTION_SIZE
from envs.simulated_carracing import StartState
from models.controller import Controller
from models.mdrnn import MDRNNCell
from models.vae import VAE
from models.world_model import build_m, m_class
from utils.checkpoint import BEST, load_model, require_checkpoint, stage_dir
from utils.cli import stage_command
from utils.errors import BadCheckpointError


def load_vae(logdir: str | os.PathLike, device: str | torch.device = "cpu") -> VAE:
    """V from `L/vae/best.pt`."""
    return load_model(VAE, logdir, "vae", device)[0]


def load_mdrnn(
    logdir: str | os.PathLike, device: str | torch.device = "cpu", one_step: bool = True
) -> nn.Module:
    """M from `L/mdrnn/best.pt`, of the architecture its config names: the one-step form
    (`MDRNNCell`, `TransformerMCell`; default) or the sequence form (`MDRNN`, `TransformerM`)."""
    return load_model(lambda config: m_class(config, one_step), logdir, "mdrnn", device)[0]


def mdrnn_from_state(state: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The one-step M of a checkpoint entry {"state_dict", "config"}: the M a controller trained
    in imagination carries in its best.pt (its own fine-tuned M, docs/imagination.md)."""
    try:
        mdrnn = build_m(dict(state["config"]), one_step=True)
        mdrnn.load_state_dict(state["state_dict"])
    except Exception as error:
        raise BadCheckpointError(
            f"the controller's own M does not load ({type(error).__name__}: {error})"
        ) from None
    return mdrnn.to(device).eval()


def load_world(
    logdir: str | os.PathLike, device: str | torch.device = "cpu", mdrnn_state: dict[str, Any] | None = None
) -> tuple[VAE, MDRNNCell, dict[str, int]]:
    """V and the one-step M, checked against each other: (vae, mdrnn_cell, controller_config).

    M is `L/mdrnn/best.pt`'s, or `mdrnn_state`'s when given (a controller's own M)."""
    vae = load_vae(logdir, device)
    mdrnn = (
        load_mdrnn(logdir, device, one_step=True)
        if mdrnn_state is None
        else mdrnn_from_state(mdrnn_state, device)
    )
    retrain_m = f"`{stage_command('mdrnn', logdir)} --noreload`"
    if mdrnn.latent_size != vae.latent_size:
        raise BadCheckpointError(
            f"M was trained on latents of size {mdrnn.latent_size} but V now has {vae.latent_size}; "
            f"retrain M on this V: {retrain_m}"
        )
    if mdrnn.action_size != ACTION_SIZE:
        raise BadCheckpointError(
            f"M was trained with {mdrnn.action_size} actions but CarRacing has {ACTION_SIZE}; retrain it: {retrain_m}"
        )
    config = dict(latent_size=vae.latent_size, hidden_size=mdrnn.hidden_size, action_size=mdrnn.action_size)
    return vae, mdrnn, config


def world_action_repeat(logdir: str | os.PathLike) -> int:
    """k, the env frames per step M was trained on (its rollouts'); 1 for an M that does not say."""
    config = require_checkpoint(logdir, "mdrnn").get("config", {})
    return int(config.get("action_repeat", 1)) if isinstance(config, dict) else 1


def load_best_controller(
    logdir: str | os.PathLike, config: dict[str, int]
) -> tuple[Controller, dict[str, Any]]:
    """C from `L/ctrl/best.pt`, which must match the sizes of the current V and M."""
    state = require_checkpoint(logdir, "ctrl")
    saved, path = state.get("config", {}), stage_dir(logdir, "ctrl") / BEST
    retrain = f"`{stage_command('ctrl', logdir)} --noreload`"
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in config.items()):
        sizes = lambda c: f"latent {c.get('latent_size')}, hidden {c.get('hidden_size')}"  # noqa: E731
        raise BadCheckpointError(
            f"{path} is a controller for {sizes(saved if isinstance(saved, dict) else {})} but V and M now have "
            f"{sizes(config)}; retrain it: {retrain}"
        )
    controller = Controller(**config)
    try:
        controller.load_state_dict(state["state_dict"])
    except Exception as error:
        raise BadCheckpointError(
            f"{path} does not hold controller weights ({type(error).__name__}); retrain it: {retrain}"
        ) from None
    return controller.eval(), state


def load_mid_episode_starts(
    logdir: str | Path, mdrnn: nn.Module | None = None, every: int = 4
) -> tuple[torch.Tensor, StartState]:
    """Dream starts anywhere in the real rollouts: (S, 2, L) V posteriors (mu, logsigma) of every
    `every`-th frame of every cached rollout, and M's state there, M having read the rollout up
    to that frame as the agent's M does (`agent.imagine.StartStates`: stored for the LSTM,
    recomputed for the picked starts for the transformer)."""
    rollouts = load_latent_cache(logdir)
    states = StartStates(mdrnn if mdrnn is not None else load_mdrnn(logdir), rollouts)
    mu = np.concatenate([r["mu"][:-1] for r in rollouts])  # every step but each rollout's last
    logsigma = np.concatenate([r["logsigma"][:-1] for r in rollouts])
    posterior = torch.from_numpy(np.stack([mu, logsigma], axis=1))  # (N, 2, L)
    return posterior[::every].contiguous(), lambda picked: states.pick(picked * every)[1]


def load_dream_starts(logdir: str | Path) -> torch.Tensor:
    """(S, 2, L) V posteriors (mu, logsigma) of the first frame of every cached rollout."""
    rollouts = load_latent_cache(logdir)
    return torch.from_numpy(np.stack([np.stack([r["mu"][0], r["logsigma"][0]]) for r in rollouts]))
