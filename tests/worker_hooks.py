"""Test-only hooks into every Python process a script starts, its spawned pool workers included.

A `sitecustomize.py` on PYTHONPATH is imported by each interpreter at start-up, so it reaches
processes a test cannot patch from outside (the workers are spawned, not forked). Only when
its variables are set, it wraps `gymnasium.make` (which envs.carracing.make_env calls) to:

- `WM_TEST_MAKE_LOG=FILE`: append one line per env made: pid, whether in a pool worker, the
  env id, the class of the env under the wrappers;
- `WM_TEST_HANG_AT_STEP=N` with `WM_TEST_HANG_MARKER=FILE`: in a pool worker, hang (sleep an
  hour) inside the N-th step of an env, once over the whole process tree (the first process
  to create FILE): a stuck episode, for the task timeout to catch.

and, with `WM_TEST_SIGNAL=INT|TERM` and `WM_TEST_SIGNAL_AT_STEP=N`, sends that signal from a
training process just before its N-th optimizer step (mid-epoch): INT to the whole process
group, as Ctrl-C in a terminal; TERM to the process, as `kill`.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = """
import os

if os.environ.get("WM_TEST_MAKE_LOG") or os.environ.get("WM_TEST_HANG_AT_STEP"):
    import multiprocessing
    import time

    import gymnasium

    _make = gymnasium.make

    def _first_to_claim(marker):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def make(env_id, *args, **kwargs):
        env = _make(env_id, *args, **kwargs)
        in_worker = multiprocessing.parent_process() is not None
        log = os.environ.get("WM_TEST_MAKE_LOG")
        if log:
            with open(log, "a") as handle:
                handle.write(f"{os.getpid()} {in_worker} {env_id} {type(env.unwrapped).__name__}\\n")
        hang_at = int(os.environ.get("WM_TEST_HANG_AT_STEP") or 0)
        if hang_at and in_worker:
            inner, count = env.unwrapped, [0]
            step = inner.step

            def hanging_step(action):
                count[0] += 1
                if count[0] == hang_at and _first_to_claim(os.environ["WM_TEST_HANG_MARKER"]):
                    time.sleep(3600)
                return step(action)

            inner.step = hanging_step
        return env

    gymnasium.make = make

if os.environ.get("WM_TEST_SIGNAL"):
    import signal

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def _send():
        if os.environ["WM_TEST_SIGNAL"] == "INT":
            os.killpg(os.getpgid(0), signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    _counts = {"step": 0}
    _step_at = int(os.environ.get("WM_TEST_SIGNAL_AT_STEP") or 0)

    def _before_step(optimizer, args, kwargs):
        _counts["step"] += 1
        if _counts["step"] == _step_at:
            _send()

    register_optimizer_step_pre_hook(_before_step)
"""


def hooked_env(folder: Path, **variables: str) -> dict[str, str]:
    """The environment for a script run with the hooks: sitecustomize.py written into `folder`,
    `variables` (WM_TEST_...) set, and no display."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    path = [str(folder), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    return env | {"PYTHONPATH": os.pathsep.join(path), "SDL_VIDEODRIVER": "dummy"} | variables


def made_envs(log: Path) -> list[tuple[int, bool, str, str]]:
    """The WM_TEST_MAKE_LOG lines: (pid, in a worker, env id, class under the wrappers)."""
    rows = []
    for line in log.read_text().splitlines():
        pid, in_worker, env_id, cls = line.split()
        rows.append((int(pid), in_worker == "True", env_id, cls))
    return rows
