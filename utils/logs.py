"""CSV logs, their matplotlib plots and animated GIFs, written in each stage's folder of the logdir."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from utils.files import atomic_write


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the headless Agg backend, imported on first use (it costs half a
    second at start-up, which every script and pool worker would otherwise pay)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


class CSVLog:
    """Append-only CSV with a fixed header; resuming drops rows from epochs being redone.

    A run killed after logging epoch e but before saving its checkpoint redoes epoch e on
    resume; `keep_before` removes such rows so every epoch appears once. A file without the
    step field is another kind of run's log (CMA-ES generations where imagination rounds
    start): none of its rows is kept.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fields: Sequence[str],
        step_field: str = "epoch",
        keep_before: int | None = None,
    ) -> None:
        self.path, self.fields, self.step_field = Path(path), list(fields), step_field
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read() if keep_before is not None and self.path.exists() else []
        if rows and step_field not in rows[0]:  # another kind of run's log (a search where rounds start)
            rows = []
        rows = [r for r in rows if keep_before is not None and int(float(r[step_field])) < keep_before]
        with atomic_write(self.path, "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )

    def read(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))


def plot_columns(
    csv_path: str | os.PathLike,
    png_path: str | os.PathLike,
    x: str,
    panels: dict[str, Sequence[str] | tuple[str, Sequence[str]]],
    title: str = "",
) -> None:
    """One subplot per panel, each drawing the named CSV columns against `x`.

    A panel given as (x_column, columns) uses its own x (e.g. env frames, wall minutes).
    Empty cells (e.g. evaluations that only happen every few generations) are skipped.
    """
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, spec) in zip(axes[0], panels.items()):
        panel_x, columns = spec if isinstance(spec, tuple) else (x, spec)
        for column in columns:
            points = [
                (float(r[panel_x]), float(r[column]))
                for r in rows
                if r.get(column) not in (None, "") and r.get(panel_x) not in (None, "")
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=column)
        ax.set_xlabel(panel_x)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(png_path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


def save_image(path: str | os.PathLike, image: Any) -> None:
    """A uint8 (H, W, 3) array as a PNG, written atomically."""
    with atomic_write(path) as handle:
        pyplot().imsave(handle, image, format="png")


def save_gif(path: str | os.PathLike, frames: Sequence[Any], frame_ms: int) -> None:
    """Frames (PIL images or uint8 (H, W, 3) arrays) as a looping GIF, written atomically."""
    from PIL import Image  # only the GIF writers need PIL

    images = [f if isinstance(f, Image.Image) else Image.fromarray(f) for f in frames]
    with atomic_write(path) as handle:
        images[0].save(
            handle, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0
        )
