"""The dream from a logdir: M's CarRacing as a keyboard demo, and a whole CMA-ES population
scored in it at once.

`dream_returns(...)` steps P controllers x N episodes together as tensors: one batched
controller matmul and one M step for all of them per time step, no per-env Python loop (the
LSTM's step fused into a few matmuls; the transformer's through its own cell).
It draws every random number from the episode seeds exactly as `SimulatedCarRacing` does, so
a batch and the single env give the same returns (tested), and all the candidates of a
generation dream the same worlds (common random numbers).

    python -m agent.dream --logdir L --display     # drive the dream with the arrow keys
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from agent.display import display_problem
from agent.population import Scores
from agent.world import (
    load_dream_starts,
    load_mdrnn,
    load_mid_episode_starts,
    load_vae,
    world_action_repeat,
)
from envs.carracing import MAX_EPISODE_STEPS
from envs.simulated_carracing import DEFAULT_MAX_STEPS, SimulatedCarRacing, StartState, episode_noise
from models.controller import batched_actions
from models.mdrnn import MDRNNCell, sample_gmm
from utils import profile
from utils.cli import ArgumentParser, positive_float, positive_int


def make_dream_env(
    logdir: str | Path,
    temperature: float = profile.TEMPERATURE,
    render_mode: str | None = None,
    max_steps: int | None = None,
) -> SimulatedCarRacing:
    """`SimulatedCarRacing` with M, the start latents and (for rendering) V from `logdir`.

    An episode is at most `max_steps` M steps; by default the real env's 1000 frames at M's k.
    """
    vae = load_vae(logdir) if render_mode is not None else None
    max_steps = max_steps or -(-MAX_EPISODE_STEPS // world_action_repeat(logdir))
    return SimulatedCarRacing(
        load_mdrnn(logdir), load_dream_starts(logdir), vae, temperature, render_mode, max_steps
    )


def _batched_noise(
    seeds: Sequence[int], starts: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Stack `episode_noise` for several seeds: z0 (N, L), uniform (T, N, L), normal (T, N, L), start indices."""
    latent_size = starts.shape[-1]
    z0, uniforms, normals, picked = [], [], [], []
    for seed in seeds:
        start, eps0, uniform, normal = episode_noise(seed, len(starts), steps, latent_size)
        mu, logsigma = starts[start]
        z0.append(mu + logsigma.exp() * eps0)
        uniforms.append(uniform)
        normals.append(normal)
        picked.append(start)
    return torch.stack(z0), torch.stack(uniforms, dim=1), torch.stack(normals, dim=1), picked


class _BatchedDreamStep:
    """M's one step plus the mixture draw for a large batch, as a few big matmuls.

    The same math as `MDRNNCell.forward` followed by `sample_gmm(..., noise=...)` (a test
    checks the batch against the single env, which uses those), laid out for speed: the LSTM
    input weights are split by input so no [z, a] copy is made, the LSTM runs as three
    in-place matmuls plus gate activations, the mixture weights are never normalised (the
    component is drawn from the unnormalised CDF: softmax(log_softmax(x) / tau) is
    softmax(x / tau)), and the per-episode noise broadcasts over the population instead of
    being copied.
    """

    def __init__(self, mdrnn: MDRNNCell, temperature: float) -> None:
        lstm, latent = mdrnn.lstm, mdrnn.latent_size
        self.latent, self.gaussians, self.temperature = latent, mdrnn.gaussians, temperature
        self.w_z = lstm.weight_ih_l0[:, :latent].t().contiguous()  # (L, 4H)
        self.w_a = lstm.weight_ih_l0[:, latent:].t().contiguous()  # (A, 4H)
        self.w_h = lstm.weight_hh_l0.t().contiguous()  # (H, 4H)
        self.b = lstm.bias_ih_l0 + lstm.bias_hh_l0  # (4H,)
        self.head_w, self.head_b = mdrnn.head.weight.t().contiguous(), mdrnn.head.bias  # (H, 3LK+2)

    def __call__(self, z, a, state, uniform, normal, n_pop):
        """z (B, L), a (B, A), state (h, c) each (B, H) with B = P*N candidate-major; uniform,
        normal (N, L). Returns next z (B, L), the next state, reward (B,), done_logit (B,)."""
        h, c = state
        gates = torch.addmm(self.b, z, self.w_z).addmm_(a, self.w_a).addmm_(h, self.w_h)  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)  # torch's LSTM gate order
        c = torch.sigmoid(f).mul_(c).add_(torch.sigmoid(i).mul_(torch.tanh(g)))
        h = torch.sigmoid(o).mul_(torch.tanh(c))
        out = torch.addmm(self.head_b, h, self.head_w)  # (B, 3LK + 2)
        n = self.latent * self.gaussians
        shape = (n_pop, -1, self.latent, self.gaussians)  # (P, N, L, K) views, no copies
        mu, logsigma, logits = (out[:, k * n : (k + 1) * n].reshape(shape) for k in range(3))
        weights = logits.sub(logits.amax(dim=-1, keepdim=True)).div_(self.temperature).exp_()
        cdf = weights.cumsum(dim=-1)
        k = (
            (cdf < uniform.unsqueeze(-1) * cdf[..., -1:])
            .sum(dim=-1, keepdim=True)
            .clamp_(max=self.gaussians - 1)
        )
        sigma = logsigma.gather(-1, k).squeeze(-1).exp_().mul_(math.sqrt(self.temperature))
        z_next = sigma.mul_(normal).add_(mu.gather(-1, k).squeeze(-1))  # (P, N, L)
        return z_next.view(-1, self.latent), (h, c), out[:, -2], out[:, -1]


class _CellDreamStep:
    """Any other one-step M (the transformer): its own forward, then `sample_gmm` with the episode
    noise broadcast over the population; the same call and return as `_BatchedDreamStep`."""

    def __init__(self, mdrnn: torch.nn.Module, temperature: float) -> None:
        self.mdrnn, self.temperature = mdrnn, temperature

    def __call__(self, z, a, state, uniform, normal, n_pop):
        out = self.mdrnn(z, a, state)
        shape = (n_pop, -1) + out.mu.shape[1:]  # (P, N, L, K)
        mixture = (x.view(shape) for x in (out.mu, out.logsigma, out.logpi))
        z_next = sample_gmm(*mixture, self.temperature, noise=(uniform, normal))  # (P, N, L)
        return z_next.view(z.shape), out.hidden, out.reward, out.done_logit


@torch.inference_mode()
def dream_returns(
    mdrnn: torch.nn.Module,
    flat_params: torch.Tensor,
    seeds: Sequence[int],
    starts: torch.Tensor,
    temperature: float = 1.0,
    max_steps: int = DEFAULT_MAX_STEPS,
    start_state: StartState | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(returns, steps), each (P, N): P controllers (flat_params (P, n)) each dreaming the N
    episodes `seeds` (from `starts`, and M's state there from `start_state` if given, else M's
    initial state).

    All P*N episodes advance together: one batched controller matmul and one M step per
    time step. An episode stops accumulating reward once M says it is done; the loop ends
    when every episode is done or after `max_steps`.
    """
    device = next(mdrnn.parameters()).device
    n_pop, n_eps = flat_params.shape[0], len(seeds)
    latent, hidden = mdrnn.latent_size, mdrnn.hidden_size
    z0, uniform, normal, picked = _batched_noise(seeds, starts, max_steps)
    z0, uniform, normal = z0.to(device), uniform.to(device), normal.to(device)
    params = flat_params.to(device=device, dtype=torch.float32)
    step = (_BatchedDreamStep if isinstance(mdrnn, MDRNNCell) else _CellDreamStep)(mdrnn, temperature)
    z = z0.expand(n_pop, n_eps, latent).reshape(-1, latent)  # (P*N, L): same starts for every candidate
    if start_state is None:
        state = mdrnn.initial_state(n_pop * n_eps, device)
    else:  # every tensor (P*N, ...), candidate-major like z
        start = start_state(torch.tensor(picked))
        state = tuple(s.to(device).expand(n_pop, *s.shape).flatten(0, 1) for s in start)
    total = torch.zeros(n_pop * n_eps, device=device)
    alive = torch.ones(n_pop * n_eps, dtype=torch.bool, device=device)
    steps = torch.zeros(n_pop * n_eps, dtype=torch.long, device=device)
    for t in range(max_steps):
        actions = batched_actions(
            params,
            z.view(n_pop, n_eps, latent),
            state[0].view(n_pop, n_eps, hidden),
            latent,
            hidden,
            mdrnn.action_size,
        )
        z, state, reward, done_logit = step(
            z, actions.view(-1, mdrnn.action_size), state, uniform[t], normal[t], n_pop
        )
        total += torch.where(alive, reward, 0.0)
        steps += alive
        alive &= done_logit <= 0.0  # sigmoid(logit) <= DONE_THRESHOLD = 0.5
        if t % 16 == 15 and not alive.any():  # checking forces a sync; every few steps is enough
            break
    return total.view(n_pop, n_eps).cpu(), steps.view(n_pop, n_eps).cpu()


class DreamEvaluator:
    """Scores CMA-ES candidates in M's dream: `agent.population.RealEvaluator`'s interface.

    `evaluate(candidates, seeds)` -> Scores (their dream returns; no real env frame is played),
    so the controller loop swaps one for the other.
    """

    def __init__(
        self,
        logdir: str | Path,
        temperature: float = 1.0,
        max_steps: int = DEFAULT_MAX_STEPS,
        device: str = "cpu",
        mid_episode: bool = True,
    ) -> None:
        self.mdrnn = load_mdrnn(logdir, device)
        if mid_episode:  # anywhere in the real rollouts, with M's state there
            self.starts, self.start_state = load_mid_episode_starts(logdir, self.mdrnn)
        else:  # a rollout's first frame, M's initial state
            self.starts, self.start_state = load_dream_starts(logdir), None
        self.temperature, self.max_steps = temperature, max_steps

    def evaluate(
        self,
        candidates: Sequence[np.ndarray],
        seeds: Sequence[int],
        on_episodes: Callable[[int], None] | None = None,
    ) -> Scores:
        started = time.perf_counter()
        params = torch.from_numpy(np.stack(candidates).astype(np.float32))  # (P, n_params)
        returns, steps = dream_returns(
            self.mdrnn, params, seeds, self.starts, self.temperature, self.max_steps, self.start_state
        )
        if on_episodes is not None:
            on_episodes(returns.numel())  # the whole population at once
        seconds = time.perf_counter() - started
        returns = returns.double().numpy()
        return Scores(
            returns, np.zeros(returns.shape, np.int64), dream_steps=int(steps.sum()), seconds=seconds
        )


def play(logdir: str, temperature: float, episodes: int) -> None:
    """Drive the dream with the arrow keys (left/right steer, up gas, down brake)."""
    problem = display_problem()
    if problem is not None:
        print(f"cannot show the dream: {problem}")
        return
    import pygame

    env = make_dream_env(logdir, temperature, render_mode="human")
    clock = pygame.time.Clock()
    for episode in range(episodes):
        env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            keys = pygame.key.get_pressed()
            action = np.array(
                [keys[pygame.K_RIGHT] - keys[pygame.K_LEFT], keys[pygame.K_UP], 0.8 * keys[pygame.K_DOWN]],
                np.float32,
            )
            _, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated or any(e.type == pygame.QUIT for e in pygame.event.get())
            clock.tick(50)
        print(f"dream episode {episode}: return {total:.1f}")
    env.close()


if __name__ == "__main__":
    parser = ArgumentParser(description="Drive CarRacing as dreamed by M, with the arrow keys.")
    parser.add_argument("--logdir", required=True, help="logdir holding vae/, mdrnn/ and the latent cache")
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=profile.TEMPERATURE,
        help=f"dream temperature tau (default {profile.TEMPERATURE})",
    )
    parser.add_argument("--episodes", type=positive_int, default=3, help="episodes to play (default 3)")
    parser.add_argument(
        "--display", action="store_true", help="open the window (required: this is a keyboard demo)"
    )
    args = parser.parse_args()
    if not args.display:
        parser.error("this demo needs --display")
    play(args.logdir, args.temperature, args.episodes)
