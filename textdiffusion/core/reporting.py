"""Per-level loss tables: printed, appended to ``per_level_loss.csv``, and drawn as a PNG of curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from textdiffusion.core.evaluation import LevelResult

CSV_FIELDS = ["step", "mask_rate", "loss", "accuracy", "tokens"]


def format_level_table(results: Sequence[LevelResult], references: dict[str, float] | None = None, title: str = "") -> str:
    """The per-level table, with reference lines (e.g. unigram baselines) below it."""
    lines = [title] if title else []
    lines.append(f"{'mask rate':>9}  {'loss (nats)':>11}  {'accuracy':>8}  {'tokens':>7}")
    for r in results:
        lines.append(f"{r.mask_rate:>9.1f}  {r.loss:>11.3f}  {r.accuracy:>8.3f}  {r.tokens:>7d}")
    for name, value in (references or {}).items():
        lines.append(f"{value:>22.3f}  {name}")
    return "\n".join(lines)


def append_level_csv(path: Path, step: int, results: Sequence[LevelResult]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in results:
            writer.writerow({"step": step, "mask_rate": f"{r.mask_rate:.2f}", "loss": f"{r.loss:.5f}",
                             "accuracy": f"{r.accuracy:.5f}", "tokens": r.tokens})


def read_level_csv(path: Path) -> dict[float, list[tuple[int, float]]]:
    """{mask_rate: [(step, loss), ...]} from a ``per_level_loss.csv``."""
    curves: dict[float, list[tuple[int, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            curves.setdefault(float(row["mask_rate"]), []).append((int(row["step"]), float(row["loss"])))
    return curves


def plot_level_curves(csv_path: Path, png_path: Path, references: dict[str, float] | None = None, title: str = "") -> None:
    """One line per mask level: validation loss against training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_level_csv(csv_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, (rate, points) in enumerate(sorted(curves.items())):
        steps, losses = zip(*sorted(points))
        ax.plot(steps, losses, marker="o", ms=3, color=cmap(i / max(len(curves) - 1, 1)), label=f"{rate:.0%} masked")
    for (name, value), style in zip((references or {}).items(), ["--", ":", "-."]):
        ax.axhline(value, color="grey", ls=style, lw=1, label=name.split(" (")[0])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss on masked tokens (nats)")
    ax.set_title(title or "Validation loss at each mask level")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
