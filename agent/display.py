"""Windows: whether one can open, opening one on CarRacing, and the trainer's --display process.

pygame is imported lazily: it is only needed when a window is asked for.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from agent.policy import Agent, run_episode
from agent.seeds import display_seed
from agent.world import load_world, mdrnn_from_state
from envs.carracing import make_env
from models.controller import Controller
from utils.checkpoint import BEST, load_checkpoint


class WindowClosed(Exception):
    """The user closed the render window."""


def display_problem() -> str | None:
    """Why no window can open here (one line), or None when one probably can.

    SDL_VIDEODRIVER=dummy/offscreen is a virtual display the user chose: windows "open"
    and nothing is shown, which keeps the --display code path testable headless.
    """
    if os.environ.get("SDL_VIDEODRIVER", "") in ("dummy", "offscreen"):
        return None
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    return None


def open_window_env(fast: bool = True, seed: int = 0, action_repeat: int = 1):
    """(env with render_mode="human", None), or (None, one-line reason) if no window opens."""
    problem = display_problem()
    if problem is not None:
        return None, problem
    env = None
    try:
        env = make_env(fast=fast, action_repeat=action_repeat, render_mode="human")
        env.reset(seed=int(seed))  # opens the window: this is where a missing display fails
        import pygame

        driver = pygame.display.get_driver() if pygame.display.get_init() else None
        if driver in ("offscreen", "dummy") and os.environ.get("SDL_VIDEODRIVER") != driver:
            # SDL found no usable display (e.g. DISPLAY names a dead X server) and silently fell
            # back to an invisible one: for the user that is no window at all.
            env.close()
            return (
                None,
                f"no window could open (SDL fell back to its invisible '{driver}' driver; is "
                "DISPLAY/WAYLAND_DISPLAY reachable?)",
            )
        return env, None
    except Exception as error:  # pygame.error and friends: report, never crash the caller
        if env is not None:
            try:
                env.close()
            except Exception:
                pass
        return None, f"cannot open a window ({type(error).__name__}: {str(error).strip() or 'no detail'})"


def check_window_open() -> None:
    """Raise WindowClosed once the user has closed the window (run_episode's on_step)."""
    import pygame

    if pygame.display.get_init() and pygame.event.peek(pygame.QUIT):
        raise WindowClosed


def _pump_window(seconds: float) -> None:
    """Keep an idle window responsive for `seconds` (the OS flags windows that stop pumping)."""
    import pygame

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pygame.event.pump()
        check_window_open()
        time.sleep(0.05)


@dataclass(frozen=True)
class DisplaySpec:
    """What the trainer's --display process needs: where best.pt is, and how to play it."""

    logdir: str
    max_steps: int
    seed: int  # picks the display's own tracks (agent.seeds.display_seed)
    action_repeat: int
    fast: bool = True
    episodes: int | None = None  # stop after this many (tests); None: until the window closes
    niceness: int = 19  # the lowest CPU priority: the search's workers come first (tests: 0)


def watch_best(spec: DisplaySpec) -> None:
    """Display process of traincontroller --display: drive the current best.pt in a window.

    Runs at nice 19 (`spec.niceness`) and at the window's 50 fps, so on a busy machine it takes only the CPU
    time the search's workers leave; it reloads best.pt (by modification time) between
    episodes. Ends when the window is closed, cannot open (one line), after `spec.episodes`
    episodes if given, or when the trainer kills it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the trainer, which stops us
    if hasattr(os, "nice"):
        try:
            os.nice(spec.niceness)
        except OSError:
            pass
    torch.set_num_threads(1)
    vae, mdrnn, config = load_world(spec.logdir)
    agent = Agent(vae, mdrnn, Controller(**config))
    env, problem = open_window_env(spec.fast, spec.seed, spec.action_repeat)
    if env is None:
        print(f"display: {problem}; training continues headless", file=sys.stderr, flush=True)
        return
    import pygame

    best_path, seen, episode = Path(spec.logdir) / "ctrl" / BEST, None, 0
    try:
        while spec.episodes is None or episode < spec.episodes:
            if not best_path.exists():
                pygame.display.set_caption("World Models: waiting for the first evaluated controller")
                _pump_window(1.0)
                continue
            stamp = best_path.stat().st_mtime_ns
            if stamp != seen:
                try:
                    state = load_checkpoint(best_path)
                    agent.controller.load_state_dict(state["state_dict"])
                    if "mdrnn" in state:  # imagination or --refresh-every: C plays with its own M
                        agent.mdrnn = mdrnn_from_state(state["mdrnn"])
                    seen = stamp
                    pygame.display.set_caption(
                        f"World Models: best C, generation {state.get('generation')}, "
                        f"eval return {state.get('eval_return', float('nan')):.1f}"
                    )
                except Exception:  # caught mid-replace or a foreign file: try again shortly
                    _pump_window(1.0)
                    continue
            run_episode(
                env, agent, display_seed(spec.seed, episode), spec.max_steps, on_step=check_window_open
            )
            episode += 1
    except WindowClosed:
        print("display: window closed; training continues headless", file=sys.stderr, flush=True)
    finally:
        env.close()
