"""Iterative data for CMA-ES (`traincontroller.py --refresh-every G`): M learns where C drives.

V and M were trained on Brownian rollouts; a good C drives faster and corners harder than those
ever did. Every G generations the CMA-ES mean plays --collect-episodes fresh tracks with
Gaussian noise on its pre-squash actions (the paper's "C plus noise"), M is fine-tuned for
--m-updates batches on those rollouts and on its own training rollouts (half the windows each),
and the search goes on with the new M. V stays as trained, so z keeps the meaning C's weights
were tuned for. Every version of M is kept (L/ctrl/worlds/m_VV.pt): best.pt carries, and the
final re-scoring plays, each mean with the M it was evaluated with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from agent.imagine import COLLECTED, ImagineSettings, fine_tune_m, load_collected, m_entry
from utils.checkpoint import load_checkpoint

WORLDS = "worlds"  # L/ctrl/worlds/m_VV.pt: M after refresh VV, {"state_dict", "config"}


@dataclass(frozen=True)
class RefreshSettings:
    """What a refresh does: saved in last.pt, a resume must match it."""

    refresh_every: int = 0  # generations between refreshes (0: never, M stays as trained)
    refresh_start: int = 0  # the generation of the first refresh (0: --refresh-every's)
    collect_episodes: int = ImagineSettings.collect_episodes  # noisy rollouts of the CMA-ES mean per refresh
    collect_noise: float = 0.3  # std of the Gaussian on C's pre-squash output while collecting
    m_updates: int = ImagineSettings.m_updates  # M's fine-tuning batches per refresh
    m_lr: float = ImagineSettings.m_lr
    m_batch: int = ImagineSettings.m_batch
    seq_len: int = ImagineSettings.seq_len
    recent: float = ImagineSettings.recent  # share of M's windows drawn from the collected rollouts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class WorldRefresh:
    """M as the refreshes left it: its sequence form, its optimiser, how many refreshes made it
    (`version`; 0 is L/mdrnn/best.pt's M), the rollout files collected for it, and the generation
    of the first refresh (`start`: --refresh-start, or --refresh-every; a saved search that turns
    refreshes on has its first refresh no earlier than the generation it was saved at)."""

    def __init__(self, settings: RefreshSettings, mdrnn: nn.Module) -> None:
        self.settings, self.mdrnn = settings, mdrnn
        self.m_opt = torch.optim.Adam(mdrnn.parameters(), lr=settings.m_lr)
        self.version, self.start = 0, settings.refresh_start or settings.refresh_every
        self.collected: list[str] = []  # relative to the run's ctrl/

    def due(self, generation: int) -> bool:
        """Whether M must be refreshed before the generation after `generation` is played: at
        `start`, then every --refresh-every generations."""
        every, since = self.settings.refresh_every, generation - self.start
        return bool(every and since >= 0 and since % every == 0 and self.version <= since // every)

    def version_at(self, generation: int) -> int:
        """The version of M the mean evaluated after `generation` played with (refreshes come after evaluations)."""
        every = self.settings.refresh_every
        return (generation - 1 - self.start) // every + 1 if every and generation > self.start else 0

    def rollout_names(self, count: int) -> list[str]:
        """Where refresh `version + 1` keeps its `count` collected rollouts, relative to ctrl/."""
        return [f"{COLLECTED}/refresh_{self.version + 1:02d}/rollout_{i}.npz" for i in range(count)]

    def fine_tune(self, ctrl_dir: Path, initial: list[dict], names: list[str], seed: int) -> float:
        """Refresh M: fine-tune it on `initial` and every collected rollout so far, `names` included;
        the mean loss. Saves nothing: `world_path(version)` and last.pt are the caller's."""
        s = self.settings
        self.collected += names
        collected = load_collected([ctrl_dir / name for name in self.collected])
        recent = np.arange(len(initial) + len(collected)) >= len(initial)
        rng = np.random.default_rng([seed, 0x5EF, self.version + 1])
        with torch.random.fork_rng():  # M's samples of z: a function of the seed and the version alone
            torch.manual_seed(int(rng.integers(2**31)))
            loss = fine_tune_m(
                self.mdrnn,
                self.m_opt,
                initial + collected,
                s.m_updates,
                s.m_batch,
                s.seq_len,
                rng,
                recent,
                s.recent,
            )
        self.version += 1
        return loss

    def mdrnn_state(self) -> dict[str, Any] | None:
        """The current M for the pool's workers and best.pt; None while it is L/mdrnn/best.pt's."""
        return m_entry(self.mdrnn) if self.version else None

    def state(self) -> dict[str, Any]:
        return self.settings.as_dict() | dict(
            version=self.version,
            start=self.start,
            collected=list(self.collected),
            mdrnn=m_entry(self.mdrnn),
            m_opt=self.m_opt.state_dict(),
        )

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()` (raises KeyError/ValueError/RuntimeError if malformed)."""
        self.mdrnn.load_state_dict(state["mdrnn"]["state_dict"])
        self.m_opt.load_state_dict(state["m_opt"])
        self.version, self.start = int(state["version"]), int(state["start"])
        self.collected = [str(name) for name in state["collected"]]


def world_path(ctrl_dir: Path, version: int) -> Path:
    return ctrl_dir / WORLDS / f"m_{version:02d}.pt"


def saved_m(ctrl_dir: Path, version: int) -> dict[str, Any] | None:
    """M of `version` as a checkpoint entry from L/ctrl/worlds/ (None for version 0: L/mdrnn/best.pt's)."""
    return load_checkpoint(world_path(ctrl_dir, version)) if version else None
