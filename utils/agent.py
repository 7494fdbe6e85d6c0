"""The one place where V, M and C act together in the real CarRacing env.

Controller training (its pool workers and its --display window) and `test_controller.py`
all drive the car through `Agent` and `run_episode`, so the return CMA-ES optimised is
exactly the return the evaluation reports.

Everything runs on the CPU by default, one torch thread per process: an agent handles one
frame at a time, and for a batch of one the VAE's small convolutions cost about a
millisecond on a CPU core, less than a GPU's launch-and-copy latency per step, while N
worker processes sharing one GPU would each pay for a CUDA context. Parallelism comes from
running whole episodes in separate processes (utils.pool.WorkerPool) instead.

Env seeds are split into disjoint ranges by purpose (data generation uses [0, 2**32)):
training tracks, evaluation tracks during training and the final test tracks never overlap,
so a reported test return is on tracks CMA-ES never saw.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from envs.carracing import ACTION_SIZE, make_env, to_model_frame
from models.controller import Controller
from utils.checkpoint import STAGE_COMMANDS, fail, load_checkpoint, load_mdrnn, load_vae, require_checkpoint
from utils.params import set_flat_params

# -- track seeds ---------------------------------------------------------------------------
_SEED_RANGE = 2**32
TRAIN, EVAL, HOLDOUT, DISPLAY = 1, 2, 3, 4  # purpose tags: seed ranges [tag * 2**32, (tag + 1) * 2**32)


def _seeds(purpose: int, key: Sequence[int], n: int) -> list[int]:
    """n env seeds in the purpose's range, a pure function of (purpose, key)."""
    words = np.random.SeedSequence([purpose, *key]).generate_state(n, dtype=np.uint32)
    return [purpose * _SEED_RANGE + int(w) for w in words]


def train_seeds(seed: int, generation: int, n: int) -> list[int]:
    """Tracks every candidate of `generation` is scored on (common random numbers)."""
    return _seeds(TRAIN, [seed, generation], n)


def eval_seeds(seed: int, generation: int, n: int) -> list[int]:
    """Fresh tracks for evaluating the CMA-ES mean after `generation`."""
    return _seeds(EVAL, [seed, generation], n)


def holdout_seeds(seed: int, n: int) -> list[int]:
    """The fixed tracks of test_controller.py (episode i is the same track for any n > i)."""
    return [_seeds(HOLDOUT, [seed, i], 1)[0] for i in range(n)]


# -- V, M and C ------------------------------------------------------------------------------
def load_world(logdir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, torch.nn.Module, dict[str, int]]:
    """V and the one-step M from their best checkpoints, checked against each other.

    Returns (vae, mdrnn_cell, controller_config): the controller's sizes come from V and M's
    checkpoints, never from constants. A missing V or M, or a pair that does not fit
    together, stops with one line naming the command to run.
    """
    vae = load_vae(logdir, device)
    mdrnn = load_mdrnn(logdir, device, one_step=True)
    if mdrnn.latent_size != vae.latent_size:
        command = STAGE_COMMANDS["mdrnn"].format(logdir=logdir)
        fail(f"M was trained on latents of size {mdrnn.latent_size} but V now has {vae.latent_size}; "
             f"retrain M on this V: `{command} --noreload`")
    if mdrnn.action_size != ACTION_SIZE:
        fail(f"M was trained with {mdrnn.action_size} actions but CarRacing has {ACTION_SIZE}; "
             f"retrain it: `{STAGE_COMMANDS['mdrnn'].format(logdir=logdir)} --noreload`")
    config = dict(latent_size=vae.latent_size, hidden_size=mdrnn.hidden_size, action_size=mdrnn.action_size)
    return vae, mdrnn, config


def load_best_controller(logdir: str | os.PathLike, config: dict[str, int]) -> tuple[Controller, dict[str, Any]]:
    """C from `L/ctrl/best.pt`, which must match the sizes of the current V and M."""
    state = require_checkpoint(logdir, "ctrl")
    saved = state.get("config", {})
    if any(saved.get(k) != v for k, v in config.items()):
        fail(f"{Path(logdir) / 'ctrl' / 'best.pt'} is a controller for latent {saved.get('latent_size')}, "
             f"hidden {saved.get('hidden_size')} but V and M now have latent {config['latent_size']}, "
             f"hidden {config['hidden_size']}; retrain it: `{STAGE_COMMANDS['ctrl'].format(logdir=logdir)} --noreload`")
    controller = Controller(**config)
    controller.load_state_dict(state["state_dict"])
    return controller.eval(), state


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


class WindowClosed(Exception):
    """The user closed the render window."""


def run_episode(env, agent: Agent, seed: int, max_steps: int = 1000, render: bool = False,
                on_frame: Callable[[np.ndarray], None] | None = None) -> tuple[float, int]:
    """Play one episode on track `seed`; returns (total reward, steps taken).

    Ends at termination (lap done, or off the playfield), truncation (the env's 1000-step
    limit) or `max_steps`. With render=True the frames are rendered: a "human" env already
    draws inside step(), and closing its window raises WindowClosed; an "rgb_array" env's
    frames (H, W, 3) go to `on_frame` (recording).
    """
    obs, _ = env.reset(seed=int(seed))
    agent.reset()
    human = render and getattr(env, "render_mode", None) == "human"
    if render and not human and on_frame is not None:
        on_frame(env.render())
    total, steps = 0.0, 0
    while steps < max_steps:
        obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
        total += float(reward)
        steps += 1
        if human:
            _check_window_open()
        elif render and on_frame is not None:
            on_frame(env.render())
        if terminated or truncated:
            break
    return total, steps


# -- windows -----------------------------------------------------------------------------------
def display_problem() -> str | None:
    """Why no window can open here (one line), or None when one probably can.

    SDL_VIDEODRIVER=dummy/offscreen is a virtual display the user chose: windows "open"
    and nothing is shown, which keeps the --display code path testable headless.
    """
    if os.environ.get("SDL_VIDEODRIVER", "") in ("dummy", "offscreen"):
        return None
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


def open_window_env(fast: bool = True, seed: int = 0):
    """(env with render_mode="human", None), or (None, one-line reason) if no window opens."""
    problem = display_problem()
    if problem is not None:
        return None, problem
    env = None
    try:
        env = make_env(fast=fast, render_mode="human")
        env.reset(seed=int(seed))  # opens the window: this is where a missing display fails
        import pygame

        driver = pygame.display.get_driver() if pygame.display.get_init() else None
        if driver in ("offscreen", "dummy") and os.environ.get("SDL_VIDEODRIVER") != driver:
            # SDL found no usable display (e.g. DISPLAY names a dead X server) and silently fell
            # back to an invisible one: for the user that is no window at all.
            env.close()
            return None, f"no window could open (SDL fell back to its invisible '{driver}' driver; is DISPLAY/WAYLAND_DISPLAY reachable?)"
        return env, None
    except Exception as error:  # pygame.error and friends: report, never crash the caller
        if env is not None:
            try:
                env.close()
            except Exception:
                pass
        return None, f"cannot open a window ({type(error).__name__}: {str(error).strip() or 'no detail'})"


def _check_window_open() -> None:
    import pygame

    if pygame.display.get_init() and pygame.event.peek(pygame.QUIT):
        raise WindowClosed


def _pump_window(seconds: float) -> None:
    """Keep an idle window responsive for `seconds` (the OS flags windows that stop pumping)."""
    import pygame

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pygame.event.pump()
        _check_window_open()
        time.sleep(0.05)


def watch_best(logdir: str, max_steps: int, seed: int, fast: bool = True, episodes: int | None = None) -> None:
    """Display process of traincontroller --display: drive the current best.pt in a window.

    Runs at nice 19 and at the window's 50 fps, so on a busy machine it takes only the CPU
    time the search's workers leave; it reloads best.pt (by modification time) between
    episodes. Ends when the window is closed, cannot open (one line), after `episodes`
    episodes if given (tests), or when the trainer kills it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the trainer, which stops us
    if hasattr(os, "nice"):
        try:
            os.nice(19)
        except OSError:
            pass
    torch.set_num_threads(1)
    vae, mdrnn, config = load_world(logdir)
    agent = Agent(vae, mdrnn, Controller(**config))
    env, problem = open_window_env(fast, seed)
    if env is None:
        print(f"display: {problem}; training continues headless", file=sys.stderr, flush=True)
        return
    import pygame

    best_path, seen, episode = Path(logdir) / "ctrl" / "best.pt", None, 0
    try:
        while episodes is None or episode < episodes:
            if not best_path.exists():
                pygame.display.set_caption("World Models: waiting for the first evaluated controller")
                _pump_window(1.0)
                continue
            stamp = best_path.stat().st_mtime_ns
            if stamp != seen:
                try:
                    state = load_checkpoint(best_path)
                    agent.controller.load_state_dict(state["state_dict"])
                    seen = stamp
                    pygame.display.set_caption(f"World Models: best C, generation {state.get('generation')}, "
                                               f"eval return {state.get('eval_return', float('nan')):.1f}")
                except Exception:  # caught mid-replace or a foreign file: try again shortly
                    _pump_window(1.0)
                    continue
            run_episode(env, agent, _seeds(DISPLAY, [seed, episode], 1)[0], max_steps, render=True)
            episode += 1
    except WindowClosed:
        print("display: window closed; training continues headless", file=sys.stderr, flush=True)
    finally:
        env.close()


# -- pool workers ---------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def init_worker(logdir: str, fast: bool, expected_config: dict[str, int]) -> None:
    """Pool initializer: load V and M and make the env once per worker process."""
    torch.set_num_threads(1)
    vae, mdrnn, config = load_world(logdir)
    if config != expected_config:
        raise RuntimeError(f"V/M in {logdir} changed during the run: sizes {config}, expected {expected_config}")
    _WORKER["agent"] = Agent(vae, mdrnn, Controller(**config))
    _WORKER["env"] = make_env(fast=fast)


def episode_task(params: np.ndarray, seed: int, max_steps: int) -> tuple[float, int]:
    """Pool task: one episode of the controller with flat parameters `params` on track `seed`."""
    agent = _WORKER["agent"]
    set_flat_params(agent.controller, params)
    return run_episode(_WORKER["env"], agent, seed, max_steps)


def evaluate_candidates(pool, candidates: Sequence[np.ndarray], seeds: Sequence[int], max_steps: int,
                        on_episode: Callable[[int, tuple[float, int]], None] | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate on every seed, one pool task per episode (a lost worker costs one episode).

    Returns fitness (P,) = mean return over the seeds, returns (P, S) and steps (P, S).
    """
    tasks = [(np.asarray(c, dtype=np.float64), int(s), int(max_steps)) for c in candidates for s in seeds]
    results = pool.map(episode_task, tasks, on_result=on_episode)
    shape = (len(candidates), len(seeds))
    returns = np.array([r for r, _ in results], dtype=np.float64).reshape(shape)
    steps = np.array([n for _, n in results], dtype=np.int64).reshape(shape)
    return returns.mean(axis=1), returns, steps
