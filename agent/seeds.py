"""Track seeds, split into disjoint ranges by purpose.

Data generation uses [0, 2**32); controller training, evaluations of the CMA-ES mean during
training, the final held-out test, the --display window, the rollouts collected while learning in
imagination and the final re-scoring of its best rounds each draw from their own range,
so a reported test return is on tracks CMA-ES never saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SEED_RANGE = 2**32
TRAIN, EVAL, HOLDOUT, DISPLAY, COLLECT, RESCORE = 1, 2, 3, 4, 5, 6  # ranges [tag * 2**32, (tag + 1) * 2**32)


def seeds_for(purpose: int, key: Sequence[int], n: int) -> list[int]:
    """n env seeds in the purpose's range, a pure function of (purpose, key)."""
    words = np.random.SeedSequence([purpose, *key]).generate_state(n, dtype=np.uint32)
    return [purpose * _SEED_RANGE + int(w) for w in words]


def train_seeds(seed: int, generation: int, n: int) -> list[int]:
    """Tracks every candidate of `generation` is scored on (common random numbers)."""
    return seeds_for(TRAIN, [seed, generation], n)


def eval_seeds(seed: int, generation: int, n: int) -> list[int]:
    """Fresh tracks for evaluating the CMA-ES mean after `generation`."""
    return seeds_for(EVAL, [seed, generation], n)


def collect_seeds(seed: int, round_: int, n: int) -> list[int]:
    """Tracks of the rollouts collected in round `round_` of learning in imagination."""
    return seeds_for(COLLECT, [seed, round_], n)


def rescore_seeds(seed: int, round_: int, n: int) -> list[int]:
    """Fresh tracks on which the best rounds up to `round_` are re-scored, the same for each."""
    return seeds_for(RESCORE, [seed, round_], n)


def holdout_seeds(seed: int, n: int) -> list[int]:
    """The fixed tracks of test_controller.py (episode i is the same track for any n > i)."""
    return [seeds_for(HOLDOUT, [seed, i], 1)[0] for i in range(n)]


def display_seed(seed: int, episode: int) -> int:
    """The track of the training --display window's episode `episode`."""
    return seeds_for(DISPLAY, [seed, episode], 1)[0]
