"""Run one pipeline stage and append its wall time to a CSV log.

    python -m reporting.timing --csv L/report/timings.csv --stage vae -- python trainvae.py --logdir L

Every run appends one row (stage, seconds, started, status, command), so the file is the
history of the run folder: a stage that was interrupted and resumed has several rows, and
their sum is what the stage cost in all (reporting/report.py shows both the sum and the last
run). A failed or interrupted run still gets its row, with its exit status. A wrapper
rather than shell `date` stamps so the Makefile keeps one line per stage and Ctrl-C still
lets the stage save its checkpoint before the row is written.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

FIELDS = ["stage", "seconds", "started", "status", "command"]


def run_timed(stage: str, command: list[str], csv_path: str | os.PathLike) -> int:
    """Run `command`, append its row to `csv_path`, return its exit status (128 + N if killed by signal N)."""
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        process = subprocess.Popen(command)
    except OSError as error:  # e.g. the interpreter is missing: a row says so too
        print(f"error: cannot run {command[0]}: {error}", file=sys.stderr)
        append_row(
            csv_path,
            dict(
                stage=stage,
                seconds="0.0",
                started=started,
                status=127,
                command=subprocess.list2cmdline(command),
            ),
        )
        return 127
    # SIGTERM to this wrapper goes on to the stage, which saves and exits; Ctrl-C reaches the
    # stage by itself (same process group), so here it only means: keep waiting for it.
    signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    while True:
        try:
            status = process.wait()
            break
        except KeyboardInterrupt:
            continue
    status = 128 - status if status < 0 else status
    append_row(
        csv_path,
        dict(
            stage=stage,
            seconds=f"{time.perf_counter() - t0:.1f}",
            started=started,
            status=status,
            command=subprocess.list2cmdline(command),
        ),
    )
    return status


def append_row(csv_path: str | os.PathLike, row: dict) -> None:
    """One row, with the header first if the file is new."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_timings(csv_path: str | os.PathLike) -> list[dict[str, str]]:
    """All rows of a timings CSV, oldest first; [] if there is none."""
    try:
        with open(csv_path, newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command and append its wall time to a CSV (stage, seconds, started, status, command)."
    )
    parser.add_argument("--csv", required=True, help="timings file to append to")
    parser.add_argument("--stage", required=True, help="stage name for the row")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    return run_timed(args.stage, command, args.csv)


if __name__ == "__main__":
    sys.exit(main())
