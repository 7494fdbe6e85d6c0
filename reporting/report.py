"""One page about a run folder: what each stage made, how long it took, how well C drives.

    python -m reporting.report --logdir L [--dataset datasets/carracing]

Writes `L/report/`: `report.md` and the pictures it shows, copied from the stages' folders
so the folder can be shared on its own (`vae_recon.png`, `vae_samples.png`, `vae_curves.png`,
`mdrnn_curves.png`, `mdrnn_prediction.png`, `ctrl_curves.png`, `episode.gif`, and for an
--imagine run `dream_vs_real.gif`), plus
`test_returns.png`, a histogram drawn here from `L/ctrl/eval/returns.csv` (the numbers the
score is computed from, so picture and text always agree). Stage wall times come from
`L/report/timings.csv` (written by reporting/timing.py, one row per run of a stage).

It only reads: a stage that has not run, or a file that cannot be read, becomes a line in
the report's "Missing" section instead of an error, so it can be run at any point of a run.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from data.rollouts import NoRolloutsError, dataset_paths
from reporting.timing import read_timings
from utils.checkpoint import load_checkpoint
from utils.files import atomic_write, remove_orphaned_temps
from utils.logs import pyplot

STAGE_ORDER = ["data", "vae", "mdrnn", "ctrl", "test"]
MAKE_TARGET = {
    "data": "make data",
    "vae": "make vae",
    "mdrnn": "make mdrnn",
    "ctrl": "make ctrl",
    "test": "make evaluate",
}


class Report:
    """Markdown lines and the list of what was missing, filled section by section."""

    def __init__(self, logdir: Path) -> None:
        self.logdir, self.out = logdir, logdir / "report"
        self.lines: list[str] = []
        self.missing: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def lack(self, what: str, stage: str | None) -> None:
        self.missing.append(f"{what} (`{MAKE_TARGET[stage]}` makes it)" if stage else what)
        self.add(f"*Missing: {what}.*", "")

    def copy(self, source: Path | None, name: str, what: str, stage: str, caption: str) -> bool:
        """Copy `source` to report/`name` and show it; a missing source also removes a stale copy."""
        target = self.out / name
        if source is None or not source.is_file():
            target.unlink(missing_ok=True)
            self.lack(what, stage)
            return False
        copy_file(source, target)
        self.add(f"![{caption}]({name})", "")
        return True


def copy_file(source: Path, target: Path) -> None:
    """`source` to `target`, written to a temporary name and renamed."""
    with open(source, "rb") as src, atomic_write(target) as dst:
        shutil.copyfileobj(src, dst)


def load(path: Path) -> dict[str, Any] | None:
    """A checkpoint, or None if it is absent or unreadable (the report says so, it does not stop)."""
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path)
    except Exception:
        return None


def latest(folder: Path, pattern: str) -> Path | None:
    """The last file matching `pattern` by name (recon_003.png after recon_002.png), or None."""
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return found[-1] if found else None


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min: short enough for a table cell."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV's rows, or [] if it is absent or unreadable."""
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def read_returns(path: Path) -> np.ndarray | None:
    """The per-episode test returns (episodes,) from test_controller.py's returns.csv, or None."""
    try:
        returns = np.array([float(row["return"]) for row in read_csv_rows(path)])
    except (KeyError, TypeError, ValueError):
        return None
    return returns if returns.size else None


def score_text(returns: np.ndarray) -> str:
    return (
        f"{returns.mean():.1f} ± {returns.std():.1f} over {returns.size} episodes "
        f"(min {returns.min():.1f}, max {returns.max():.1f})"
    )


def histogram(returns: np.ndarray, path: Path) -> None:
    """Histogram of the test returns, with the mean marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(returns, bins=min(30, max(5, returns.size // 3)), color="tab:blue", edgecolor="white")
    ax.axvline(returns.mean(), color="k", linestyle="--", label=f"mean {returns.mean():.1f}")
    ax.yaxis.get_major_locator().set_params(integer=True)  # episode counts
    ax.set(xlabel="episode return", ylabel="episodes", title=f"C on {returns.size} held-out tracks")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


# -- sections -----------------------------------------------------------------------------------


def score_section(report: Report) -> None:
    eval_dir = report.logdir / "ctrl" / "eval"
    report.add("## Final score", "")
    returns = read_returns(eval_dir / "returns.csv")
    if returns is None:
        (report.out / "test_returns.png").unlink(missing_ok=True)
        report.lack("test returns (ctrl/eval/returns.csv)", "test")
    else:
        best = load(report.logdir / "ctrl" / "best.pt") or {}
        origin = (
            f", C from round {best['round']} of learning in imagination"
            if "round" in best
            else f", C from CMA-ES generation {best['generation']}"
            if "generation" in best
            else ""
        )
        report.add(f"**Score: {score_text(returns)}** on held-out tracks{origin}.", "")
        histogram(returns, report.out / "test_returns.png")
        report.add("![histogram of the test returns](test_returns.png)", "")
    gifs = sorted(eval_dir.glob("*.gif"), key=lambda p: p.stat().st_mtime) if eval_dir.is_dir() else []
    if gifs:
        report.add("One test episode (episode 0):", "")
    report.copy(
        gifs[-1] if gifs else None,
        "episode.gif",
        "GIF of a test episode (test_controller.py --record)",
        "test",
        "test episode 0",
    )


WORST_LISTED = 5  # the lowest test returns listed, with test_controller.py --record-worst's replays


def worst_section(report: Report) -> None:
    """The lowest-return test tracks, each with its replay (ctrl/eval/worst/) where it was recorded."""
    eval_dir = report.logdir / "ctrl" / "eval"
    for stale in report.out.glob("worst_*.gif"):
        stale.unlink()
    try:
        rows = sorted(read_csv_rows(eval_dir / "returns.csv"), key=lambda row: float(row["return"]))
        replays = {int(p.stem.split("_episode")[1]): p for p in (eval_dir / "worst").glob("*_episode*.gif")}
    except (KeyError, TypeError, ValueError):
        return  # the score section already says what is wrong with returns.csv
    if not rows:
        return
    report.add(
        f"## The {min(WORST_LISTED, len(rows))} worst test tracks",
        "",
        "| episode | seed | return | frames | replay |",
        "|---:|---:|---:|---:|---|",
    )
    for row in rows[:WORST_LISTED]:
        episode, link = int(row["episode"]), "-"
        if episode in replays:
            name = f"worst_{episode:03d}.gif"
            copy_file(replays[episode], report.out / name)
            link = f"[GIF]({name})"
        report.add(
            f"| {episode} | {row['seed']} | {float(row['return']):.1f} | {row.get('frames', '-')} | {link} |"
        )
    report.add("")
    if not replays:
        report.add("No replays: `test_controller.py --record-worst 5` (`make evaluate`) records them.", "")


def timings_section(report: Report) -> None:
    report.add("## Wall time per stage", "")
    rows = read_timings(report.out / "timings.csv")
    if not rows:
        report.lack("stage timings (report/timings.csv, written when the stages run through make)", None)
        return
    stages = sorted(
        {r["stage"] for r in rows},
        key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s),
    )
    report.add(
        "| stage | wall time, all runs | runs | last run | last run started | last exit status |",
        "|---|---:|---:|---:|---|---:|",
    )
    total = 0.0
    for stage in stages:
        mine = [r for r in rows if r["stage"] == stage]
        seconds = sum(float(r["seconds"]) for r in mine)
        total += seconds
        last = mine[-1]
        report.add(
            f"| {stage} | {duration(seconds)} | {len(mine)} | {duration(float(last['seconds']))} | "
            f"{last['started']} | {last['status']} |"
        )
    report.add(f"| **total** | **{duration(total)}** | | | | |", "")
    report.add(
        "A stage that was interrupted and resumed has several runs; the first column is their sum.", ""
    )
    for stage in STAGE_ORDER:
        if stage not in stages:
            report.missing.append(f"timing of stage {stage} (`{MAKE_TARGET[stage]}` records it)")


def data_section(report: Report, dataset: Path | None) -> None:
    report.add("## Data", "")
    if dataset is None:  # what M was trained on, from its latent cache
        try:
            with np.load(report.logdir / "mdrnn" / "latents.npz") as cache:
                lengths = cache["lengths"]
            report.add(
                f"{lengths.size} rollouts, {int(lengths.sum()):,} frames in M's latent cache (no --dataset given).",
                "",
            )
        except (OSError, KeyError, ValueError):
            report.add("No --dataset given and no latent cache (mdrnn/latents.npz) to count from.", "")
        return
    try:
        paths, lengths = dataset_paths(dataset)
    except NoRolloutsError:
        report.lack(f"rollouts under {dataset}", "data")
        return
    mib = sum(p.stat().st_size for p in paths) / 2**20
    report.add(
        f"{len(paths)} rollouts, {sum(lengths):,} frames (mean {np.mean(lengths):.0f} steps per rollout), "
        f"{mib:.{0 if mib >= 10 else 1}f} MiB under `{dataset}`.",
        "",
    )


def model_section(report: Report, stage: str, title: str) -> None:
    """V or M: best test loss, epochs, and the pictures its script drew."""
    folder = report.logdir / stage
    report.add(f"## {title}", "")
    best, last = load(folder / "best.pt"), load(folder / "last.pt")
    if best is None or "best_loss" not in best:
        report.lack(f"{stage}/best.pt", stage)
    else:
        trained = f" of {last['epoch']} trained" if last is not None and "epoch" in last else ""
        split = (
            f", test set: {len(best['test_rollouts'])} held-out rollouts" if "test_rollouts" in best else ""
        )
        report.add(
            f"Best test loss **{best['best_loss']:.5g}** at epoch {best.get('epoch', '?')}{trained}{split}.",
            "",
        )
    if stage == "vae":
        report.add(
            "Reconstructions of fixed test frames (each row of frames above its reconstruction), latest epoch:",
            "",
        )
        report.copy(
            latest(folder / "images", "recon_*.png"),
            "vae_recon.png",
            "V reconstructions (vae/images/recon_*.png)",
            stage,
            "V reconstructions",
        )
        report.add("Decoded draws from the prior N(0, I):", "")
        report.copy(
            latest(folder / "images", "samples_*.png"),
            "vae_samples.png",
            "V samples (vae/images/samples_*.png)",
            stage,
            "V samples",
        )
        report.copy(
            folder / "curves.png",
            "vae_curves.png",
            "V learning curves (vae/curves.png)",
            stage,
            "V learning curves",
        )
    else:
        report.copy(
            folder / "curves.png",
            "mdrnn_curves.png",
            "M learning curves (mdrnn/curves.png)",
            stage,
            "M learning curves",
        )
        report.add("Predicted vs true next latents and rewards on a test rollout:", "")
        report.copy(
            folder / "prediction.png",
            "mdrnn_prediction.png",
            "M predictions (mdrnn/prediction.png)",
            stage,
            "M predictions",
        )


def ctrl_mode(report: Report) -> str:
    """Where candidates were scored, read from the last ctrl command in timings.csv (the
    checkpoints do not say): ", candidates scored in M's dream (--temperature 1.15)" or ""."""
    commands = [
        r["command"].split() for r in read_timings(report.out / "timings.csv") if r["stage"] == "ctrl"
    ]
    if not commands:
        return ""
    words = commands[-1]
    if "--dream" not in words:
        return ", candidates scored in the real env"
    temperature = words[words.index("--temperature") + 1] if "--temperature" in words[:-1] else "default"
    return f", candidates scored in M's dream (temperature {temperature})"


def ctrl_section(report: Report) -> None:
    folder = report.logdir / "ctrl"
    report.add("## C (controller)", "")
    best, last = load(folder / "best.pt"), load(folder / "last.pt")
    if last is not None and "imagine" in last:  # traincontroller.py --imagine
        settings = ", ".join(f"{k} {v}" for k, v in dict(last["imagine"]).items())
        report.add(
            f"{last.get('round', '?')} rounds of learning in imagination ({settings}), "
            f"{int(last.get('frames', 0))} real env frames in all, the initial rollouts included.",
            "",
        )
    elif last is None:
        report.lack("ctrl/last.pt", "ctrl")
    else:
        search = ", ".join(f"{k} {v}" for k, v in dict(last.get("search", {})).items())
        report.add(
            f"{last.get('generation', '?')} CMA-ES generations run ({search}){ctrl_mode(report)}; "
            f"final step size {float(last.get('sigma', math.nan)):.3g}.",
            "",
        )
        refresh = dict(last.get("refresh") or {})
        if refresh.get("refresh_every"):  # --refresh-every: M fine-tuned on the search's own driving
            times = f"{refresh.get('version', '?')} time{'' if refresh.get('version') == 1 else 's'}"
            report.add(
                f"M refreshed {times}, every {refresh['refresh_every']} generations "
                f"from generation {refresh.get('start', '?')}: each time the CMA-ES mean plus noise (std "
                f"{refresh.get('collect_noise', '?')}) played {refresh.get('collect_episodes', '?')} fresh tracks "
                f"and M was fine-tuned on them for {refresh.get('m_updates', '?')} batches (ctrl/worlds/); "
                f"{int(last.get('frames', 0))} real env frames in C, the refreshes' included.",
                "",
            )
    if best is None:
        report.lack("ctrl/best.pt (no evaluation of the CMA-ES mean yet)", "ctrl")
    else:
        report.add(
            f"Best evaluation of {'C' if 'round' in best else 'the CMA-ES mean'}: "
            f"**{float(best['eval_return']):.1f} ± {float(best.get('eval_std', math.nan)):.1f}** "
            f"over {best.get('eval_episodes', '?')} tracks at {'round' if 'round' in best else 'generation'} "
            f"{best.get('generation', '?')} (this C is the one tested).",
            "",
        )
    try:
        rows = read_csv_rows(folder / "rescore.csv")
        step = "round" if rows and "round" in rows[0] else "generation"  # --imagine re-scores rounds
        rescored = [
            f"| {r[step]} | {float(r['eval_mean']):.1f} | {float(r['rescore_mean']):.1f} ± "
            f"{float(r['rescore_std']):.1f} | {'yes' if r['chosen'] == '1' else ''} |"
            for r in rows
        ]
    except (KeyError, TypeError, ValueError):  # a damaged log: the table is left out
        rescored = []
    if rescored:
        report.add(
            f"The best-evaluated {'rounds' if step == 'round' else 'CMA-ES means'}, re-scored on the same "
            "fresh tracks (ctrl/rescore.csv); the chosen one is best.pt:",
            "",
            f"| {step} | its evaluation | re-scored | chosen |",
            "|---|---|---|---|",
            *rescored,
            "",
        )
    if last is not None and "imagine" in last:
        report.add(
            "A real evaluation episode of the last round (left) beside M's imagination from its first "
            "frame, C acting on the imagined frames, decoded by V (right):",
            "",
        )
        report.copy(
            folder / "dream_vs_real.gif",
            "dream_vs_real.gif",
            "ctrl/dream_vs_real.gif",
            "ctrl",
            "a real episode beside M's imagination of it",
        )
    report.copy(
        folder / "curves.png",
        "ctrl_curves.png",
        "C learning curves (ctrl/curves.png)",
        "ctrl",
        "C learning curves",
    )


def learning_curve(points: list[dict[str, float]], path: Path) -> None:
    """The evaluated return of the CMA-ES mean (mean ± std) against real env frames and wall minutes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    mean, std = np.array([p["eval_mean"] for p in points]), np.array([p["eval_std"] for p in points])
    for ax, key, label in (
        (axes[0], "env_frames", "real env frames (millions)"),
        (axes[1], "wall_min", "wall minutes of the C stage"),
    ):
        x = np.array([p[key] for p in points]) / (1e6 if key == "env_frames" else 1)
        ax.plot(x, mean, marker="o", color="tab:blue")
        ax.fill_between(x, mean - std, mean + std, color="tab:blue", alpha=0.2)
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="return of the CMA-ES mean (± std)")
    fig.suptitle("learning curve: the CMA-ES mean on fresh tracks, full episodes")
    fig.tight_layout()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


def learning_curve_section(report: Report) -> None:
    report.add("## Learning curve", "")
    points = []
    path = report.logdir / "ctrl" / "log.csv"
    if path.is_file():
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                step = "round" if "round" in row else "generation"  # --imagine logs rounds
                try:
                    points.append(
                        {k: float(row[k]) for k in (step, "eval_mean", "eval_std", "env_frames", "wall_min")}
                        | {"step": step}
                    )
                except (
                    KeyError,
                    TypeError,
                    ValueError,
                ):  # a generation without an evaluation, or an older log
                    continue
    if not points:
        (report.out / "learning_curve.png").unlink(missing_ok=True)
        report.lack("evaluations of the CMA-ES mean in ctrl/log.csv", "ctrl")
        return
    learning_curve(points, report.out / "learning_curve.png")
    report.add(
        "![return of the CMA-ES mean against env frames and wall minutes](learning_curve.png)",
        "",
        f"| {points[0]['step']} | real env frames | wall minutes (C) | evaluated return of C |",
        "|---|---|---|---|",
        *(
            f"| {p[p['step']]:.0f} | {p['env_frames'] / 1e6:.2f} M | {p['wall_min']:.1f} | "
            f"{p['eval_mean']:.1f} ± {p['eval_std']:.1f} |"
            for p in points
        ),
        "",
    )


# -- the page ------------------------------------------------------------------------------------


def build_report(logdir: str | os.PathLike, dataset: str | os.PathLike | None = None) -> Path:
    """Write L/report/report.md (and its pictures); returns its path. Never fails for missing pieces."""
    report = Report(Path(logdir))
    report.out.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temps(report.out)  # what a kill inside a write left behind
    report.add(
        f"# World Models run `{logdir}`",
        "",
        f"Built {datetime.now().astimezone().isoformat(timespec='seconds')} by `python -m reporting.report`.",
        "",
    )
    score_section(report)
    worst_section(report)
    timings_section(report)
    data_section(report, Path(dataset) if dataset is not None else None)
    model_section(report, "vae", "V (VAE)")
    model_section(report, "mdrnn", "M (MDN-RNN)")
    ctrl_section(report)
    learning_curve_section(report)
    report.add("## Missing", "")
    report.add(
        *(f"- {item}" for item in report.missing)
        if report.missing
        else ["Nothing: every stage's outputs are here."]
    )
    path = report.out / "report.md"
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(report.lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write L/report/report.md: stage timings, dataset, losses, CMA-ES, test score."
    )
    parser.add_argument("--logdir", required=True, help="run folder (holds vae/, mdrnn/, ctrl/)")
    parser.add_argument("--dataset", help="rollout folder, to report its size (e.g. datasets/carracing)")
    args = parser.parse_args(argv)
    if not Path(args.logdir).is_dir():
        print(
            f"error: {args.logdir} is not a folder; run the pipeline first (make pipeline LOGDIR={args.logdir})",
            file=sys.stderr,
        )
        return 1
    path = build_report(args.logdir, args.dataset)
    returns = read_returns(Path(args.logdir) / "ctrl" / "eval" / "returns.csv")
    print(
        f"report: {path}"
        + (f"; score {score_text(returns)}" if returns is not None else "; no test returns yet")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
