"""The CMA-ES search over C's flat parameters, as one small object that saves and loads itself.

`Search` holds the `cma` strategy, the generation count and the best evaluation so far.
Its checkpoint is numbers only: the search settings and every generation's fitness values.
cma's own state (mean, step size, covariance, evolution paths, its private RNG) is rebuilt
on load by replaying those generations: a fresh strategy with the same settings asks the same
candidates and is told the same fitness, so it reaches bit for bit the state an uninterrupted
run has, and nothing read from a logdir is ever unpickled or executed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agent.population import Scores
from models.controller import Controller
from utils.params import get_flat_params, set_flat_params

if TYPE_CHECKING:
    import cma


def _new_strategy(
    config: dict[str, int], pop_size: int, sigma0: float, seed: int
) -> cma.CMAEvolutionStrategy:
    """A fresh CMA-ES around C = 0, silent and file-less.

    cma draws its samples from options["randn"]; by default that is numpy's *global* RNG. A
    private RandomState makes the search a function of the seed alone. cma is imported here, not
    at the top: it imports matplotlib.pyplot, half a second that every spawned pool worker would pay.
    """
    import cma

    x0 = np.zeros_like(get_flat_params(Controller(**config)))  # straight ahead, half gas, no brake
    rng = np.random.RandomState(np.random.SeedSequence([seed, 0xC3A]).generate_state(1)[0])
    options = {
        "popsize": pop_size,
        "randn": rng.randn,
        "seed": np.nan,  # do not (re)seed numpy's global RNG; ours is private
        # Early generations may score all alike (no candidate moves the car yet): by default one
        # such generation ends the search (tolfun). Stop only after 10 flat ones (tolfunhist).
        "tolfun": 0.0,
        "tolflatfitness": 10,
        "verbose": -9,
        "verb_disp": 0,
        "verb_log": 0,  # no console spam, no outcmaes/ files
    }
    return cma.CMAEvolutionStrategy(x0, sigma0, options)


KEEP_MEANS = 3  # the best-evaluated CMA-ES means kept for the final re-scoring


def tracks_per_candidate(generation: int, n_samples: int, double_every: int, max_samples: int) -> int:
    """Tracks each candidate of `generation` plays: n_samples, doubled after every `double_every`
    generations (0: never) up to max_samples; more tracks as the search nears the top, where
    candidates differ less than tracks do."""
    if not double_every:
        return n_samples
    return max(n_samples, min(max_samples, n_samples * 2 ** ((generation - 1) // double_every)))


class Search:
    """CMA-ES (maximising fitness) plus the run's bookkeeping: generation, best evaluation,
    the best-evaluated means (`kept`) and whether they were re-scored."""

    def __init__(
        self,
        config: dict[str, int],
        pop_size: int,
        sigma0: float,
        seed: int,
        action_repeat: int = 1,
        stall_frames: int | None = None,
        dream: bool = False,
        temperature: float | None = None,
        dream_starts: str | None = None,
    ) -> None:
        self.config = dict(config)
        # Everything that decides what the saved fitness values measured: a resume must match it.
        self.settings = dict(
            pop_size=int(pop_size),
            sigma0=float(sigma0),
            seed=int(seed),
            action_repeat=int(action_repeat),
            stall_frames=stall_frames,
            dream=bool(dream),
            temperature=temperature,
            dream_starts=dream_starts,
        )
        self.es = _new_strategy(self.config, pop_size, sigma0, seed)
        self.generation = 0
        self.frames, self.seconds = 0, 0.0  # real env frames played and wall time spent, over all runs
        self.fitness_history: list[np.ndarray] = []  # one (P,) array per generation told
        self.best_eval, self.best_generation = -math.inf, 0
        self.kept: list[tuple[float, int, np.ndarray]] = []  # (eval return, generation, mean), best first
        self.rescored: list[int] = []  # [generation, tracks] of the final re-scoring, [] if none yet
        self.world: dict[str, Any] | None = None  # M as --refresh-every left it (agent.refresh), None: off

    def account(self, scores: list[Scores], seconds: float) -> None:
        """Add what a generation cost: the real env frames its scores played, and its wall time."""
        self.frames += sum(s.real_frames for s in scores)
        self.seconds += seconds

    def ask(self) -> list[np.ndarray]:
        """The next generation's candidates: pop_size flat parameter vectors."""
        return self.es.ask()

    def tell(self, candidates: list[np.ndarray], fitness: np.ndarray) -> None:
        """Update the strategy with the candidates' fitness (higher is better)."""
        fitness = np.asarray(fitness, dtype=np.float64)
        self.es.tell(candidates, (-fitness).tolist())  # cma minimises
        self.fitness_history.append(fitness)
        self.generation += 1

    @property
    def mean(self) -> np.ndarray:
        """(n_params,) the search's current estimate of the best C."""
        return np.array(self.es.mean, dtype=np.float64)

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def controller(self, params: np.ndarray | None = None) -> Controller:
        """C with `params` (default: the CMA-ES mean)."""
        return set_flat_params(Controller(**self.config), self.mean if params is None else params)

    def record_eval(self, mean_return: float) -> bool:
        """Note an evaluation of the mean after this generation (kept if among the KEEP_MEANS best);
        True if it is the best so far."""
        others = [kept for kept in self.kept if kept[1] != self.generation]  # a re-evaluation replaces
        ranked = others + [(float(mean_return), self.generation, self.mean)]
        self.kept = sorted(ranked, key=lambda kept: (-kept[0], kept[1]))[:KEEP_MEANS]
        if mean_return > self.best_eval:
            self.best_eval, self.best_generation = float(mean_return), self.generation
            return True
        return False

    def best_checkpoint(
        self,
        eval_std: float,
        eval_episodes: int,
        params: np.ndarray | None = None,
        generation: int | None = None,
        eval_return: float | None = None,
    ) -> dict[str, Any]:
        """best.pt (loads into Controller(**config)): by default the CMA-ES mean, just evaluated as the
        best so far; or a kept mean `params` of `generation`, re-scored at `eval_return`."""
        return {
            "state_dict": self.controller(params).state_dict(),
            "config": self.config,
            "generation": self.generation if generation is None else generation,
            "eval_return": self.best_eval if eval_return is None else eval_return,
            "eval_std": eval_std,
            "eval_episodes": eval_episodes,
            "search": self.settings,
            "action_repeat": self.settings["action_repeat"],
        }

    def state(self) -> dict[str, Any]:
        """The checkpoint: numbers and tensors only (torch.load(weights_only=True) loads it)."""
        fitness = (
            torch.from_numpy(np.stack(self.fitness_history))
            if self.fitness_history
            else torch.zeros(0, self.settings["pop_size"], dtype=torch.float64)
        )
        return {
            "search": self.settings,
            "config": self.config,
            "generation": self.generation,
            "fitness": fitness,
            "frames": self.frames,
            "seconds": self.seconds,
            "sigma": self.sigma,
            "best_eval_return": self.best_eval,
            "best_generation": self.best_generation,
            "kept_returns": torch.tensor([k[0] for k in self.kept], dtype=torch.float64),
            "kept_generations": torch.tensor([k[1] for k in self.kept], dtype=torch.int64),
            "kept_means": torch.from_numpy(np.stack([k[2] for k in self.kept]))
            if self.kept
            else torch.zeros(0, len(self.mean), dtype=torch.float64),
            "rescored": list(self.rescored),
            "state_dict": self.controller().state_dict(),
        } | ({} if self.world is None else {"refresh": self.world})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Search:
        """Rebuild a saved search by replaying its generations (raises ValueError/KeyError if malformed)."""
        settings, fitness = dict(state["search"]), state["fitness"]
        search = cls(dict(state["config"]), **settings)
        if (
            not isinstance(fitness, torch.Tensor)
            or fitness.dim() != 2
            or fitness.shape[1] != search.es.popsize
        ):
            raise ValueError(
                f"fitness history of shape {tuple(getattr(fitness, 'shape', ()))}, expected "
                f"(generations, {search.es.popsize})"
            )
        if fitness.shape[0] != int(state["generation"]):
            raise ValueError(
                f"{fitness.shape[0]} generations of fitness for generation {state['generation']}"
            )
        for row in fitness.double().numpy():
            search.tell(search.ask(), row)
        search.best_eval, search.best_generation = (
            float(state["best_eval_return"]),
            int(state["best_generation"]),
        )
        search.frames, search.seconds = int(state["frames"]), float(state["seconds"])
        if "kept_means" in state:  # absent from searches saved before the final re-scoring
            means = state["kept_means"].double().numpy()
            if means.ndim != 2 or means.shape[1] != len(search.mean):
                raise ValueError(f"kept means of shape {means.shape}, expected (n, {len(search.mean)})")
            search.kept = [
                (float(r), int(g), m)
                for r, g, m in zip(state["kept_returns"].tolist(), state["kept_generations"].tolist(), means)
            ]
        search.rescored = [int(n) for n in state.get("rescored", [])]
        search.world = state.get("refresh")
        return search
