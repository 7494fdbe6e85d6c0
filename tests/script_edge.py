"""Run a script's main() in this process as its `__main__` does, through utils.cli.run_script."""

from __future__ import annotations

import signal
from collections.abc import Callable

from utils.cli import run_script


def exit_status(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """main(argv) at the script's edge: its exit status (the one line, if any, is on stderr)."""
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        run_script(lambda: main(argv))
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    raise AssertionError("run_script returned instead of exiting")
