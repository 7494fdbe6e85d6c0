"""The dream: CarRacing simulated by M, as a gymnasium env and as a batched evaluator.

M predicts, from (z_t, a_t, h_t), a mixture over z_{t+1}, the reward and the end of the
episode. Sampling z_{t+1} from that mixture with a temperature tau and feeding it back gives
a simulated world in which a controller can be trained without rendering a single frame.

- `SimulatedCarRacing(logdir, temperature)`: one dream episode at a time, a gymnasium.Env
  whose observation is [z, h] (what C sees); `render()` decodes z with V's decoder.
  `python -m envs.simulated_carracing --logdir L --display` lets you drive it by keyboard.
- `dream_returns(...)`: a whole population x n-samples of controllers stepped together as
  tensors: one LSTM step for all of them per time step, no per-env Python loop.

Both draw every random number of an episode from its seed alone (`episode_noise`): the start
(a real rollout's first frame from the latent cache, z_0 ~ V's posterior) and, for each step,
one uniform (picks the mixture component) and one normal per latent dimension. So a batch
and the single env give the same returns for the same seeds and controllers, and all the
candidates of a generation dream the same worlds (common random numbers).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.controller import batched_actions  # noqa: E402
from models.mdrnn import MDRNNCell, sample_gmm  # noqa: E402

DONE_THRESHOLD = 0.5  # an episode ends when M's done probability exceeds this
DEFAULT_MAX_STEPS = 1000


def load_dream_starts(logdir: str | Path) -> torch.Tensor:
    """(S, 2, L) V posteriors (mu, logsigma) of the first frame of every cached rollout."""
    from data.latents import load_latent_cache

    rollouts = load_latent_cache(logdir)
    return torch.from_numpy(np.stack([np.stack([r["mu"][0], r["logsigma"][0]]) for r in rollouts]))


def episode_noise(seed: int, n_starts: int, steps: int, latent_size: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every random number of the dream episode `seed`: (start index, eps0 (L,), uniform (T, L), normal (T, L))."""
    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    start = int(torch.randint(n_starts, (1,), generator=generator))
    eps0 = torch.randn(latent_size, generator=generator)
    uniform = torch.rand(steps, latent_size, generator=generator)
    normal = torch.randn(steps, latent_size, generator=generator)
    return start, eps0, uniform, normal


def _batched_noise(seeds: Sequence[int], starts: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack `episode_noise` for several seeds: z0 (N, L), uniform (T, N, L), normal (T, N, L)."""
    latent_size = starts.shape[-1]
    z0, uniforms, normals = [], [], []
    for seed in seeds:
        start, eps0, uniform, normal = episode_noise(seed, len(starts), steps, latent_size)
        mu, logsigma = starts[start]
        z0.append(mu + logsigma.exp() * eps0)
        uniforms.append(uniform)
        normals.append(normal)
    return torch.stack(z0), torch.stack(uniforms, dim=1), torch.stack(normals, dim=1)


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

    def __call__(self, z, a, h, c, uniform, normal, n_pop):
        """z (B, L), a (B, A), h, c (B, H) with B = P*N candidate-major; uniform, normal (N, L).
        Returns next z (B, L), h, c, reward (B,), done_logit (B,)."""
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
        k = (cdf < uniform.unsqueeze(-1) * cdf[..., -1:]).sum(dim=-1, keepdim=True).clamp_(max=self.gaussians - 1)
        sigma = logsigma.gather(-1, k).squeeze(-1).exp_().mul_(math.sqrt(self.temperature))
        z_next = sigma.mul_(normal).add_(mu.gather(-1, k).squeeze(-1))  # (P, N, L)
        return z_next.view(-1, self.latent), h, c, out[:, -2], out[:, -1]


@torch.inference_mode()
def dream_returns(
    mdrnn: MDRNNCell,
    flat_params: torch.Tensor,
    seeds: Sequence[int],
    starts: torch.Tensor,
    temperature: float = 1.0,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(returns, steps), each (P, N): P controllers (flat_params (P, n)) each dreaming the N
    episodes `seeds`.

    All P*N episodes advance together: one batched controller matmul and one LSTM step per
    time step. An episode stops accumulating reward once M says it is done; the loop ends
    when every episode is done or after `max_steps`.
    """
    device = next(mdrnn.parameters()).device
    n_pop, n_eps = flat_params.shape[0], len(seeds)
    latent, hidden = mdrnn.latent_size, mdrnn.hidden_size
    z0, uniform, normal = (x.to(device) for x in _batched_noise(seeds, starts, max_steps))
    params = flat_params.to(device=device, dtype=torch.float32)
    step = _BatchedDreamStep(mdrnn, temperature)
    z = z0.expand(n_pop, n_eps, latent).reshape(-1, latent)  # (P*N, L): same starts for every candidate
    h, c = mdrnn.initial_state(n_pop * n_eps, device)
    total = torch.zeros(n_pop * n_eps, device=device)
    alive = torch.ones(n_pop * n_eps, dtype=torch.bool, device=device)
    steps = torch.zeros(n_pop * n_eps, dtype=torch.long, device=device)
    for t in range(max_steps):
        actions = batched_actions(params, z.view(n_pop, n_eps, latent), h.view(n_pop, n_eps, hidden), latent, hidden, mdrnn.action_size)
        z, h, c, reward, done_logit = step(z, actions.view(-1, mdrnn.action_size), h, c, uniform[t], normal[t], n_pop)
        total += torch.where(alive, reward, 0.0)
        steps += alive
        alive &= done_logit <= 0.0  # sigmoid(logit) <= DONE_THRESHOLD = 0.5
        if t % 16 == 15 and not alive.any():  # checking forces a sync; every few steps is enough
            break
    return total.view(n_pop, n_eps).cpu(), steps.view(n_pop, n_eps).cpu()


class DreamEvaluator:
    """Scores CMA-ES candidates in the dream, with the real-env evaluator's contract.

    `evaluate(candidates, seeds)` -> (fitness (P,), returns (P, S), steps (P, S)) as numpy, like
    `utils.agent.evaluate_candidates`, so traincontroller.py swaps one for the other.
    """

    def __init__(self, logdir: str | Path, temperature: float = 1.0, max_steps: int = DEFAULT_MAX_STEPS, device: str = "cpu") -> None:
        from utils.checkpoint import load_mdrnn

        self.mdrnn = load_mdrnn(logdir, device)
        self.starts = load_dream_starts(logdir)
        self.temperature, self.max_steps = temperature, max_steps

    def evaluate(self, candidates: Sequence[np.ndarray], seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        params = torch.from_numpy(np.stack(candidates).astype(np.float32))  # (P, n_params)
        returns, steps = dream_returns(self.mdrnn, params, seeds, self.starts, self.temperature, self.max_steps)
        returns, steps = returns.double().numpy(), steps.numpy()
        return returns.mean(axis=1), returns, steps


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
        logdir: str | Path | None = None,
        temperature: float = 1.0,
        render_mode: str | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        mdrnn: MDRNNCell | None = None,
        starts: torch.Tensor | None = None,
        vae: torch.nn.Module | None = None,
    ) -> None:
        """Loads M (and V for rendering) from `logdir`, or takes them directly (tests)."""
        from utils.checkpoint import load_mdrnn, load_vae

        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mdrnn = mdrnn if mdrnn is not None else load_mdrnn(logdir)
        self.starts = starts if starts is not None else load_dream_starts(logdir)
        self.vae = vae if vae is not None or render_mode is None else load_vae(logdir)
        self.temperature, self.max_steps, self.render_mode = temperature, max_steps, render_mode
        latent, hidden = self.mdrnn.latent_size, self.mdrnn.hidden_size
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (latent + hidden,), np.float32)
        self.action_space = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))
        self._window = None
        self._state: dict[str, Any] = {}

    def _observation(self) -> np.ndarray:
        s = self._state
        return torch.cat([s["z"][0], s["h"][0]]).numpy().astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is None:  # draw an episode seed from the env's own RNG (gymnasium semantics)
            seed = int(self.np_random.integers(2**63 - 1))
        latent = self.mdrnn.latent_size
        start, eps0, uniform, normal = episode_noise(seed, len(self.starts), self.max_steps, latent)
        mu, logsigma = self.starts[start]
        h, c = self.mdrnn.initial_state(1, "cpu")
        self._state = {"z": (mu + logsigma.exp() * eps0).unsqueeze(0), "h": h, "c": c, "t": 0, "uniform": uniform, "normal": normal}
        if self.render_mode == "human":
            self.render()
        return self._observation(), {"start": start}

    @torch.no_grad()
    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        s = self._state
        action = torch.as_tensor(np.clip(action, self.action_space.low, self.action_space.high), dtype=torch.float32).view(1, -1)
        out = self.mdrnn(s["z"], action, (s["h"], s["c"]))
        reward = float(out.reward[0])
        terminated = bool(torch.sigmoid(out.done_logit[0]) > DONE_THRESHOLD)
        t = s["t"]
        s["z"] = sample_gmm(out.mu, out.logsigma, out.logpi, self.temperature, noise=(s["uniform"][t : t + 1], s["normal"][t : t + 1]))
        s["h"], s["c"] = out.hidden
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
        if self.render_mode is None or self.vae is None:
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


def play(logdir: str, temperature: float, episodes: int) -> None:
    """Drive the dream with the arrow keys (left/right steer, up gas, down brake)."""
    import pygame

    from utils.agent import display_problem

    problem = display_problem()
    if problem is not None:
        print(f"cannot show the dream: {problem}")
        return
    env = SimulatedCarRacing(logdir, temperature, render_mode="human")
    clock = pygame.time.Clock()
    for episode in range(episodes):
        env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            keys = pygame.key.get_pressed()
            action = np.array([keys[pygame.K_RIGHT] - keys[pygame.K_LEFT], keys[pygame.K_UP], 0.8 * keys[pygame.K_DOWN]], np.float32)
            _, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated or any(e.type == pygame.QUIT for e in pygame.event.get())
            clock.tick(50)
        print(f"dream episode {episode}: return {total:.1f}")
    env.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Drive CarRacing as dreamed by M, with the arrow keys.")
    parser.add_argument("--logdir", required=True, help="logdir holding vae/, mdrnn/ and the latent cache")
    parser.add_argument("--temperature", type=float, default=1.0, help="dream temperature tau (default 1.0)")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--display", action="store_true", help="open the window (required: this is a keyboard demo)")
    args = parser.parse_args()
    if not args.display:
        parser.error("this demo needs --display")
    play(args.logdir, args.temperature, args.episodes)
