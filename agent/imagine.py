"""Learning C inside M: the actor-critic updates, M's fine-tuning on all data, the start states.

One round of `traincontroller.py --imagine` (docs/imagination.md): fine-tune M on every
rollout so far, compute the real (z, h, c) start states, train the actor and critic on
imagined rollouts from them, then play the actor in the real env (an evaluation, and new
rollouts with exploration noise). This module holds the parts that need no env: everything
here is torch on the main process.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from data.latents import STEP_KEYS
from data.loaders import collate_windows
from data.rollouts import BAD_FILE_ERRORS, save_rollout
from envs.carracing import ENV_FPS
from models.actor_critic import Actor, Critic, discount_weights, imagine, lambda_returns
from models.mdrnn import MDRNN, MDRNNCell, batch_loss
from models.vae import VAE
from models.world_model import build_m
from utils.errors import BadRolloutError
from utils.logs import save_gif

COLLECTED = "rollouts"  # L/ctrl/rollouts/round_RRR/rollout_I.npz: the real rollouts the rounds collected
CANDIDATES = "candidates"  # L/ctrl/candidates/round_RRR.pt: C and M of the best-evaluated rounds so far
KEEP_CANDIDATES = 3  # how many best-evaluated rounds are kept for the final re-scoring
RESCORE_EPISODES = 24  # fresh tracks each kept round plays at the end; the best of them is best.pt


@dataclass(frozen=True)
class ImagineSettings:
    """Everything that decides what a round does: saved in last.pt, a resume must match it."""

    horizon: int = 15  # imagined steps per start state (k = 4: 60 env frames)
    gamma: float = 0.99  # per agent step
    lam: float = 0.95  # TD(lambda)
    batch: int = 256  # start states per update
    updates: int = 600  # actor-critic updates per round
    actor_lr: float = 1e-3
    critic_lr: float = 3e-4
    entropy: float = 1e-3  # weight of the exploration bonus, against normalised returns
    target_tau: float = 0.02  # the target critic follows the critic by this much per update
    init_std: float = 0.5  # exploration noise on C's pre-squash output at the start
    m_updates: int = 300  # M fine-tuning batches per round (0: M stays as trained)
    m_lr: float = 3e-4
    m_batch: int = 32
    seq_len: int = 32
    temperature: float = 1.0  # M's sampling temperature in imagination
    collect_episodes: int = 16  # real rollouts collected per round with the noisy actor
    eval_episodes: int = (
        16  # real evaluation episodes of the deterministic actor per round (kept as data too)
    )
    recent: float = (
        0.5  # share of start states and of M's windows drawn from the rollouts the rounds collected
    )
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def start_states(
    mdrnn: MDRNNCell, rollouts: list[dict[str, np.ndarray]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, h, c), each (N, .): M's state at every non-final step of every rollout, fed z = V's mu
    and the actions played, as the agent's M is in the real env (z_t is the frame at step t and
    (h_t, c_t) the state before M reads it)."""
    lengths = [len(r["actions"]) for r in rollouts]
    steps, latent = max(lengths), mdrnn.latent_size
    mu = torch.zeros(len(rollouts), steps, latent)
    actions = torch.zeros(len(rollouts), steps, mdrnn.action_size)
    for i, r in enumerate(rollouts):
        mu[i, : lengths[i]] = torch.from_numpy(r["mu"])
        actions[i, : lengths[i]] = torch.from_numpy(r["actions"])
    h, c = mdrnn.initial_state(len(rollouts))
    hs, cs = [], []
    for t in range(steps):
        hs.append(h)
        cs.append(c)
        h, c = mdrnn(mu[:, t], actions[:, t], (h, c)).hidden
    hs, cs = torch.stack(hs, 1), torch.stack(cs, 1)  # (R, T, H)
    keep = torch.zeros(len(rollouts), steps, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, : n - 1] = True  # the last step has no next frame to start from
    return mu[keep], hs[keep], cs[keep]


class StartStates:
    """Every non-final step of every rollout as a start for imagination: z there (V's mu) and M's
    state before it reads z, as the agent's M has it in the real env (the order of `start_states`).

    The LSTM's states are computed once for all steps (`start_states`). A transformer's state is a
    cache of keys and values, too big to keep for every step, so `pick` recomputes the picked ones:
    it reads the `memory_steps` steps before each start, which determine its state exactly, in one
    banded pass (`TransformerMCell.state_after`)."""

    def __init__(self, cell: nn.Module, rollouts: list[dict[str, np.ndarray]]) -> None:
        self.cell = cell
        if isinstance(cell, MDRNNCell):
            self.z, h, c = start_states(cell, rollouts)
            self.hidden = (h, c)
            return
        lengths = [len(r["actions"]) for r in rollouts]
        self.mu = torch.zeros(len(rollouts), max(lengths), cell.latent_size)
        self.actions = torch.zeros(len(rollouts), max(lengths), cell.action_size)
        for i, r in enumerate(rollouts):
            self.mu[i, : lengths[i]] = torch.from_numpy(r["mu"])
            self.actions[i, : lengths[i]] = torch.from_numpy(r["actions"])
        self.rows = torch.cat([torch.full((n - 1,), i) for i, n in enumerate(lengths)])
        self.steps = torch.cat([torch.arange(n - 1) for n in lengths])
        self.z = self.mu[self.rows, self.steps]

    def __len__(self) -> int:
        return len(self.z)

    @torch.no_grad()
    def pick(self, indices: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(z (B, L), M's state there, h first) of the start states at `indices` (B,)."""
        if isinstance(self.cell, MDRNNCell):
            return self.z[indices], tuple(s[indices] for s in self.hidden)
        rows, starts = self.rows[indices], self.steps[indices]
        back = torch.arange(self.cell.memory_steps, 0, -1)  # (W,): how far back, oldest first
        t = starts.unsqueeze(1) - back  # (B, W): the steps before each start; < 0 is padding
        rows, at = rows.unsqueeze(1), t.clamp(min=0)
        state = self.cell.state_after(self.mu[rows, at], self.actions[rows, at], t >= 0)
        return self.z[indices], state


class Learner:
    """The actor, the critic, its slow target copy, their optimisers and the return scale."""

    def __init__(self, config: dict[str, int], settings: ImagineSettings) -> None:
        self.settings = settings
        with torch.random.fork_rng():  # the initial weights are a function of the seed alone
            torch.manual_seed(settings.seed)
            sizes = config["latent_size"], config["hidden_size"]
            self.actor = Actor(*sizes, config["action_size"], settings.init_std)
            self.critic = Critic(*sizes)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=settings.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=settings.critic_lr)
        self.return_scale = 1.0  # EMA of the 5th-95th percentile range of the returns (DreamerV3)

    def update(self, mdrnn: nn.Module, z: torch.Tensor, hidden: tuple[torch.Tensor, ...]) -> dict[str, float]:
        """One actor and one critic step on imagined rollouts from start states z (B, L) and M's state there."""
        s = self.settings
        traj = imagine(mdrnn, self.actor, z, hidden, s.horizon, s.temperature)
        values = self.target(traj.z, traj.h)  # (H+1, B), differentiable in z and h, not in its weights
        returns = lambda_returns(traj.rewards, traj.continues, values, s.gamma, s.lam)  # (H, B)
        weights = discount_weights(traj.continues, s.gamma)  # (H, B)
        spread = torch.quantile(returns.detach().flatten(), torch.tensor([0.05, 0.95]))
        self.return_scale = 0.99 * self.return_scale + 0.01 * float(spread[1] - spread[0])
        scale = max(1.0, self.return_scale)
        actor_loss = -(weights * returns).mean() / scale - s.entropy * self.actor.entropy()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.actor.parameters(), 100.0)
        self.actor_opt.step()

        value = self.critic(traj.z[:-1].detach(), traj.h[:-1].detach())  # (H, B)
        critic_loss = 0.5 * (weights * (value - returns.detach()).pow(2)).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 100.0)
        self.critic_opt.step()
        with torch.no_grad():
            for target, source in zip(self.target.parameters(), self.critic.parameters()):
                target.lerp_(source, s.target_tau)
        return dict(
            actor_loss=actor_loss.detach().item(),
            critic_loss=critic_loss.detach().item(),
            imagined_return=traj.rewards.detach().sum(0).mean().item(),
            value=value.detach().mean().item(),
            action_std=self.actor.log_std.detach().exp().mean().item(),
        )

    def state_dict(self) -> dict[str, Any]:
        return dict(
            actor=self.actor.state_dict(),
            critic=self.critic.state_dict(),
            target=self.target.state_dict(),
            actor_opt=self.actor_opt.state_dict(),
            critic_opt=self.critic_opt.state_dict(),
            return_scale=self.return_scale,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target.load_state_dict(state["target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.return_scale = float(state["return_scale"])


def fine_tune_m(
    mdrnn: MDRNN,
    optimizer: torch.optim.Optimizer,
    rollouts: list[dict[str, np.ndarray]],
    updates: int,
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator,
    recent: np.ndarray | None = None,
    share: float = 0.5,
) -> float:
    """`updates` Adam steps of M's own loss on random windows of `rollouts`; the mean loss. Every
    window is as likely as any other, except that the `recent` rollouts (a bool mask), when
    given, get `share` of the draws."""
    lengths = np.array([len(r["actions"]) for r in rollouts])
    starts_per_rollout = np.maximum(lengths - seq_len, 0) + 1
    recent = np.zeros(len(rollouts), bool) if recent is None else recent
    chance = starts_per_rollout * recent_weights(starts_per_rollout, recent, share)
    keys = ("mu", "logsigma", "actions", "rewards", "terminals")
    data = [{key: r[key] for key in keys} for r in rollouts]
    total = 0.0
    for _ in range(updates):
        picks = rng.choice(len(rollouts), batch_size, p=chance / chance.sum())
        windows = [(int(i), int(rng.integers(starts_per_rollout[i]))) for i in picks]
        batch = collate_windows(data, windows, seq_len, ("mu", "logsigma"))
        loss = batch_loss(mdrnn, batch, torch.device("cpu"), 1.0, 1.0)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mdrnn.parameters(), 1.0)
        optimizer.step()
        total += loss.detach().item()
    return total / max(updates, 1)


def recent_weights(sizes: np.ndarray, recent: np.ndarray, share: float) -> np.ndarray:
    """Per-item weights that give the `recent` items (a bool mask) `share` of the total weight of
    `sizes` (each item's own count: windows, states), all items alike within each group; the
    items' own proportions when one group is empty."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if recent.all() or not recent.any():
        return np.ones(len(sizes))
    return np.where(recent, share / sizes[recent].sum(), (1 - share) / sizes[~recent].sum()) * sizes.sum()


@torch.no_grad()
def predicted_returns(
    mdrnn: MDRNNCell, actor: Actor, first_latents: torch.Tensor, steps: int
) -> torch.Tensor:
    """(N,) the return M predicts for C (the actor without noise) from real first frames z (N, L)
    over `steps` steps, each reward weighted by M's chance that the episode is still going: the
    dream's side of the dream-to-real gap."""
    traj = imagine(mdrnn, actor, first_latents, mdrnn.initial_state(len(first_latents)), steps, sample=False)
    return (discount_weights(traj.continues, 1.0) * traj.rewards).sum(0)


@torch.no_grad()
def dream_beside_real(vae: VAE, mdrnn: nn.Module, actor: Actor, observations: np.ndarray) -> np.ndarray:
    """(T, 64, 130, 3) uint8: a real episode's frames (T, 64, 64, 3) on the left and, on the right,
    what M imagines from its first frame with C acting on the imagined frames, decoded by V."""
    first = vae.encode_frames(observations[:1])[0]
    traj = imagine(mdrnn, actor, first, mdrnn.initial_state(1), len(observations) - 1, sample=False)
    dreamt = vae.decode(traj.z[:, 0]).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    gap = np.full((len(observations), 64, 2, 3), 255, np.uint8)
    return np.concatenate([observations, gap, dreamt], axis=2)


def save_dream_gif(
    path: Path, vae: VAE, mdrnn: nn.Module, actor: Actor, observations: np.ndarray, action_repeat: int
) -> None:
    """`dream_beside_real` as a GIF at `path`: every other step, at twice V's size, in real time."""
    frames = dream_beside_real(vae, mdrnn, actor, observations)[::2]
    save_gif(
        path, list(np.kron(frames, np.ones((1, 2, 2, 1), np.uint8))), round(2000 * action_repeat / ENV_FPS)
    )


def m_entry(mdrnn: nn.Module) -> dict[str, Any]:
    """M as a checkpoint entry: what the pool's workers and best.pt's readers rebuild it from."""
    return {"state_dict": {k: v.clone() for k, v in mdrnn.state_dict().items()}, "config": mdrnn.config}


def one_step(mdrnn: nn.Module) -> nn.Module:
    """The frozen one-step form of `mdrnn` (the same weights), for imagination and start states."""
    cell = build_m(mdrnn.config, one_step=True)
    cell.load_state_dict(mdrnn.state_dict())
    return cell.requires_grad_(False).eval()


class ImagineRun:
    """Learning in imagination as one object that saves and loads itself (last.pt), like
    `agent.search.Search`: the settings, the learner, M and its optimiser, the round reached,
    the real frames and wall time spent, the best evaluation, the rollouts collected so far."""

    def __init__(
        self, config: dict[str, int], settings: ImagineSettings, mdrnn: MDRNN, action_repeat: int
    ) -> None:
        self.config, self.settings, self.action_repeat = dict(config), settings, int(action_repeat)
        self.learner = Learner(config, settings)
        self.mdrnn = mdrnn
        self.m_opt = torch.optim.Adam(mdrnn.parameters(), lr=settings.m_lr)
        self.round, self.frames, self.seconds = 0, 0, 0.0
        self.best_eval, self.best_round = -float("inf"), 0
        self.collected: list[str] = []  # rollout files of the rounds so far, relative to the run's ctrl/
        self.candidates: list[tuple[float, int]] = []  # (eval return, round) of the kept rounds, best first
        self.rescored: list[int] = []  # [round, tracks] of the last final re-scoring, [] if none yet

    def mdrnn_state(self) -> dict[str, Any]:
        return m_entry(self.mdrnn)

    def controller_state(self) -> dict[str, torch.Tensor]:
        return self.learner.actor.controller.state_dict()

    def record_eval(self, mean_return: float) -> bool:
        if mean_return > self.best_eval:
            self.best_eval, self.best_round = float(mean_return), self.round
            return True
        return False

    def keep_candidate(self, mean_return: float) -> tuple[bool, list[int]]:
        """Rank this round's evaluation among the kept ones: (is it kept, the rounds it pushes out)."""
        ranked = sorted(self.candidates + [(float(mean_return), self.round)], key=lambda c: (-c[0], c[1]))
        self.candidates = ranked[:KEEP_CANDIDATES]
        return (float(mean_return), self.round) in self.candidates, [r for _, r in ranked[KEEP_CANDIDATES:]]

    def best_checkpoint(self, eval_std: float, eval_episodes: int) -> dict[str, Any]:
        """best.pt: C (loads into Controller(**config)) and the M it was trained with."""
        return self.checkpoint(self.best_eval, eval_std, eval_episodes)

    def checkpoint(self, eval_return: float, eval_std: float, eval_episodes: int) -> dict[str, Any]:
        """This round's C and M in best.pt's format, with its evaluation."""
        return {
            "state_dict": self.controller_state(),
            "config": self.config,
            "generation": self.round,  # the round, where test_controller.py reads a generation
            "round": self.round,
            "eval_return": eval_return,
            "eval_std": eval_std,
            "eval_episodes": eval_episodes,
            "action_repeat": self.action_repeat,
            "imagine": self.settings.as_dict(),
            "frames": self.frames,
            "mdrnn": self.mdrnn_state(),
        }

    def state(self) -> dict[str, Any]:
        return {
            "imagine": self.settings.as_dict(),
            "config": self.config,
            "action_repeat": self.action_repeat,
            "round": self.round,
            "frames": self.frames,
            "seconds": self.seconds,
            "best_eval_return": self.best_eval,
            "best_round": self.best_round,
            "collected": list(self.collected),
            "candidates": [list(c) for c in self.candidates],
            "rescored": list(self.rescored),
            "learner": self.learner.state_dict(),
            "mdrnn": self.mdrnn_state(),
            "m_opt": self.m_opt.state_dict(),
            "state_dict": self.controller_state(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ImagineRun:
        """Rebuild a saved run (raises KeyError/ValueError/RuntimeError if malformed)."""
        mdrnn = build_m(dict(state["mdrnn"]["config"]), one_step=False)
        mdrnn.load_state_dict(state["mdrnn"]["state_dict"])
        run = cls(
            dict(state["config"]),
            ImagineSettings(**dict(state["imagine"])),
            mdrnn,
            int(state["action_repeat"]),
        )
        run.learner.load_state_dict(state["learner"])
        run.m_opt.load_state_dict(state["m_opt"])
        run.round, run.frames, run.seconds = (
            int(state["round"]),
            int(state["frames"]),
            float(state["seconds"]),
        )
        run.best_eval, run.best_round = float(state["best_eval_return"]), int(state["best_round"])
        run.collected = [str(name) for name in state["collected"]]
        run.candidates = [(float(e), int(r)) for e, r in state.get("candidates", [])]
        run.rescored = [int(n) for n in state.get("rescored", [])]
        return run


def save_collected(path: Path, arrays: dict[str, np.ndarray], vae: VAE) -> None:
    """A collected rollout with V's posterior of its frames (`mu`, `logsigma`) beside them, so
    later rounds never re-encode it (readers of the rollout format ignore the extra keys)."""
    mu, logsigma = vae.encode_frames(arrays["observations"])
    save_rollout(path, arrays | {"mu": mu.numpy(), "logsigma": logsigma.numpy()})


def load_collected(paths: list[Path]) -> list[dict[str, np.ndarray]]:
    """The per-step arrays (`data.latents.STEP_KEYS`) of collected rollouts, frames left unread."""
    rollouts = []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as archive:
                rollouts.append({key: archive[key] for key in STEP_KEYS})
        except BAD_FILE_ERRORS as error:
            raise BadRolloutError(
                f"cannot read the collected rollout {path} ({type(error).__name__}); "
                "rerun with --noreload to start the imagination run afresh"
            ) from None
    return rollouts
