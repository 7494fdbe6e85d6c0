"""How well each M predicts held-out rollouts, one step ahead and open-loop: the LSTM beside the transformer.

    python -m reporting.compare_m --logdir runs/lstm --logdir runs/transformer --out m_comparison.csv

Each logdir's M (`mdrnn/best.pt`) is scored on the test rollouts of its own latent cache (V's
test split, which M never trained on); the logdirs must share the data and V, so the rollouts
are the same (checked). From starts every `--stride` steps past the first `--warmup` steps of
each rollout, M reads the real past (V's mu and the actions played, as the agent's M does),
then runs open-loop: it is fed its own sample of z (at `--temperature`) and the real actions.
At each horizon h it is scored on the real step h ahead: the NLL per latent dimension of V's mu
under its mixture, the squared error of its reward, and whether its done flag (logit > 0) is
right. Horizon 1 is the one-step (teacher-forced) prediction M trains on.

With `--dream-episodes N`, a logdir's C (`ctrl/best.pt`) also plays N episodes in its M's dream,
from the rollouts' first frames, as long as a real episode, at `--dream-temperature`: what M
promises C, to set beside its real test score (the dream-to-real gap).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from agent.dream import DreamEvaluator
from agent.imagine import StartStates
from agent.world import load_best_controller, load_mdrnn, load_world, world_action_repeat
from data.latents import load_latent_cache
from envs.carracing import MAX_EPISODE_STEPS
from models.mdrnn import gmm_loss, sample_gmm
from models.world_model import m_arch
from utils import profile
from utils.cli import ArgumentParser, int_in, positive_float, run_script, writable_file
from utils.errors import BadInputError
from utils.files import atomic_write
from utils.params import count_params, get_flat_params

HORIZONS = (1, 5, 15, 50)
FIELDS = ("logdir", "arch", "params", "horizon", "starts", "nll", "reward_mse", "done_accuracy")


def held_out_rollouts(logdir: str) -> list[dict[str, np.ndarray]]:
    """The test rollouts (V's split) of the logdir's latent cache, file names included."""
    return [r for r in load_latent_cache(logdir) if r["test"]]


def padded(rollouts: list[dict[str, np.ndarray]], key: str) -> torch.Tensor:
    """(R, T_max, ...) float32: one per-step array of every rollout, zero past its end."""
    steps = max(len(r[key]) for r in rollouts)
    out = torch.zeros((len(rollouts), steps) + rollouts[0][key].shape[1:])
    for i, r in enumerate(rollouts):
        out[i, : len(r[key])] = torch.from_numpy(r[key].astype(np.float32))
    return out


@torch.no_grad()
def open_loop_scores(
    cell: torch.nn.Module,
    rollouts: list[dict[str, np.ndarray]],
    horizons: tuple[int, ...] = HORIZONS,
    warmup: int = 32,
    stride: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[dict[str, float]]:
    """One row per horizon: {horizon, starts, nll, reward_mse, done_accuracy}, averaged over every
    start t0 (t0 >= warmup, every `stride` steps) with a real step t0 + max(horizons) to score."""
    longest = max(horizons)
    lengths = [len(r["actions"]) for r in rollouts]
    offsets = np.cumsum([0] + [n - 1 for n in lengths])  # where each rollout's starts begin in StartStates
    picked = [(i, t) for i, n in enumerate(lengths) for t in range(warmup, n - longest, stride)]
    if not picked:
        raise BadInputError(f"no test rollout is longer than warmup {warmup} + horizon {longest} steps")
    rows, t0 = torch.tensor(picked).unbind(1)  # (S,) each: the rollout and the start step
    mu, actions, rewards, terminals = (
        padded(rollouts, key) for key in ("mu", "actions", "rewards", "terminals")
    )
    z, state = StartStates(cell, rollouts).pick(torch.from_numpy(offsets)[rows] + t0)
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for h in range(1, longest + 1):
        t = t0 + h - 1  # the step M reads now; it predicts step t + 1
        out = cell(z, actions[rows, t], state)
        if h in horizons:
            done_right = (out.done_logit > 0).float() == terminals[rows, t]
            scores.append(
                dict(
                    horizon=h,
                    starts=len(rows),
                    nll=float(gmm_loss(mu[rows, t + 1], out.mu, out.logsigma, out.logpi)),
                    reward_mse=float((out.reward - rewards[rows, t]).pow(2).mean()),
                    done_accuracy=float(done_right.float().mean()),
                )
            )
        z = sample_gmm(out.mu, out.logsigma, out.logpi, temperature, generator)
        state = out.hidden
    return scores


@torch.no_grad()
def done_flags(cell: torch.nn.Module, rollouts: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """(recall, false alarm rate) of M's done flag (logit > 0), one step ahead over whole rollouts
    read from their start: the share of terminal steps it flags, and of the other steps."""
    mu, actions, terminals = (padded(rollouts, key) for key in ("mu", "actions", "terminals"))
    lengths = torch.tensor([len(r["actions"]) for r in rollouts])
    state, flags = cell.initial_state(len(rollouts)), []
    for t in range(mu.shape[1]):
        out = cell(mu[:, t], actions[:, t], state)
        flags.append(out.done_logit > 0)
        state = out.hidden
    flagged = torch.stack(flags, 1)  # (R, T)
    real = torch.arange(mu.shape[1]) < lengths.unsqueeze(1)
    done = (terminals > 0) & real
    return float(flagged[done].float().mean()), float(flagged[~done & real].float().mean())


def dream_returns_of_c(logdir: str, episodes: int, temperature: float) -> np.ndarray:
    """(episodes,) returns of the logdir's C in its M's dream, from rollouts' first frames, full length."""
    _, _, config = load_world(logdir)
    controller, _ = load_best_controller(logdir, config)
    steps = -(-MAX_EPISODE_STEPS // world_action_repeat(logdir))
    dream = DreamEvaluator(logdir, temperature, steps, mid_episode=False)
    return dream.evaluate([get_flat_params(controller)], list(range(episodes))).returns[0]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--logdir", action="append", required=True, help="a logdir with mdrnn/best.pt (repeat)"
    )
    parser.add_argument("--out", type=writable_file, help="CSV to write (default: print only)")
    parser.add_argument(
        "--horizons", type=int_in(1), nargs="+", default=list(HORIZONS), help="steps ahead to score"
    )
    parser.add_argument("--warmup", type=int_in(0), default=32, help="real steps M reads before a start")
    parser.add_argument("--stride", type=int_in(1), default=8, help="steps between starts in a rollout")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="M's sampling temperature")
    parser.add_argument("--seed", type=int_in(0), default=0, help="seed of M's open-loop samples")
    parser.add_argument(
        "--dream-episodes", type=int_in(0), default=0, help="C's episodes in M's dream (0: none)"
    )
    parser.add_argument(
        "--dream-temperature",
        type=positive_float,
        default=profile.TEMPERATURE,
        help="the dream's temperature",
    )
    args = parser.parse_args(argv)
    table, reference = [], None
    for logdir in args.logdir:
        rollouts = held_out_rollouts(logdir)
        files = [r["file"] for r in rollouts]
        if reference is not None and files != reference:
            raise BadInputError(
                f"{logdir} has other test rollouts than {args.logdir[0]}: compare Ms on the same data and V"
            )
        if reference is None:  # what a constant reward prediction scores
            rewards = np.concatenate([r["rewards"] for r in rollouts])
            print(
                f"{len(rollouts)} test rollouts; reward variance {rewards.var():.4f} (a constant's squared error)"
            )
        reference = files
        cell = load_mdrnn(logdir).requires_grad_(False)
        head = dict(logdir=logdir, arch=m_arch(cell.config), params=count_params(cell))
        for row in open_loop_scores(
            cell,
            rollouts,
            tuple(args.horizons),
            args.warmup,
            stride=args.stride,
            temperature=args.temperature,
            seed=args.seed,
        ):
            table.append(head | row)
            print(
                f"{logdir} ({head['arch']}, {head['params']:,} params) h={row['horizon']:>2}: "
                f"nll {row['nll']:.3f}, reward mse {row['reward_mse']:.4f}, done acc {row['done_accuracy']:.4f} "
                f"({row['starts']} starts)"
            )
        recall, false_alarms = done_flags(cell, rollouts)
        print(
            f"{logdir}: done flagged at {recall:.0%} of the terminal steps and {false_alarms:.2%} of the others"
        )
        if args.dream_episodes:
            returns = dream_returns_of_c(logdir, args.dream_episodes, args.dream_temperature)
            print(
                f"{logdir}: C in M's dream (tau {args.dream_temperature}): {returns.mean():.1f} +- {returns.std():.1f} "
                f"over {len(returns)} episodes from first frames"
            )
    if args.out:
        with atomic_write(Path(args.out), "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in table
            )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_script(main)
