"""The default profile, written once: every script's defaults are these, and so is `make pipeline`.

A 2-core CPU and no GPU, about 95 minutes from empty folders (README, Results). The Makefile
passes a flag only when the user overrides its variable, so the README's by-hand commands
and `make pipeline` run the same program.
"""

from __future__ import annotations

import os

ACTION_REPEAT = 4  # env frames per agent step: rollouts, M, the dream and C (1 is the paper)


def dataset_folder(action_repeat: int = ACTION_REPEAT) -> str:
    """The rollout folder for k: one k per folder, so rollouts of another k never mix in."""
    return f"datasets/carracing-k{action_repeat}"


DATASET = dataset_folder()
ROLLOUTS = 640  # Brownian-policy rollouts (stage 1)
VAE_EPOCHS = 1
MDRNN_EPOCHS = 10
SEQ_LEN = 32  # steps per M training sequence (truncated BPTT)
M_ARCH = "lstm"  # M: the MDN-RNN's LSTM, or "transformer" (trainmdrnn.py --arch)
POP_SIZE = 24  # CMA-ES candidates per generation
N_SAMPLES = 4  # tracks per candidate; its fitness is their mean return
SAMPLES_DOUBLE_EVERY = 0  # the tracks per candidate double after every this many generations (0: never) ...
MAX_SAMPLES = 16  # ... up to this many (the paper's 16)
GENERATIONS = 100
REFRESH_EVERY = 0  # generations between refreshes of M on new rollouts of C (0: never; agent/refresh.py)
REFRESH_START = 0  # the generation of the first refresh (0: REFRESH_EVERY's)
EVAL_EVERY = 5  # generations between evaluations of the CMA-ES mean on fresh tracks
EVAL_EPISODES = 16
STALL_FRAMES = 100  # a training episode ends after this many frames without a new tile
IMAGINE_ROUNDS = 40  # rounds of learning in imagination (traincontroller.py --imagine)
TEMPERATURE = 1.15  # M's sampling temperature in the dream
TEST_EPISODES = 100  # held-out tracks of test_controller.py
ENVS_PER_WORKER = 4  # episodes a worker drives side by side as one batch
WORKERS = os.cpu_count() or 1  # worker processes of every pool
