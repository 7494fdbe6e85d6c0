"""The errors library code raises when a stage cannot go on; scripts turn them into one line.

Every message is one line written for the user, naming the file at fault and the way out
(the command that makes a missing input, `--noreload`, a smaller batch). Library code only
raises; `utils.cli.run_script` catches these at the script's edge, prints `error: <message>`
and exits with the error's status: 2 for bad input, 1 for a stage that failed while running.
"""

from __future__ import annotations


class StageError(Exception):
    """A stage failed while running (a non-finite loss, a worker that crashed): exit status 1."""

    exit_status = 1


class BadInputError(StageError):
    """What a stage was given cannot be used (a flag, a file, a folder): exit status 2."""

    exit_status = 2


class MissingInputError(BadInputError):
    """A stage's input does not exist yet; the message names the command that makes it."""


class BadCheckpointError(BadInputError):
    """A checkpoint is unreadable, foreign, or was made with other settings than asked for now."""


class BadRolloutError(BadInputError):
    """Rollouts that cannot be used: none readable, a mix of action repeats, a damaged cache."""
