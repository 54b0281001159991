"""Tables (CSV, Markdown, plain text) and PNG plots of evaluation results; figures without pyplot."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from freeatten_lightning.evaluation.lengths import LengthResult


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A CSV file with one header line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the rest right-aligned)."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table aligned in plain text, for the terminal."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def loss_cell(result: LengthResult) -> str:
    """'3.1900 (24.29)': loss and perplexity."""
    return f"{result.loss:.4f} ({result.ppl:.2f})"


def length_table(labelled: Sequence[tuple[str, Sequence[LengthResult]]], first: str) -> tuple[list[str], list[list]]:
    """Header and rows: one row per labelled run, one column per length, cells 'loss (ppl)'."""
    lengths = [r.length for r in labelled[0][1]]
    header = [first, *[f"{n:,}" for n in lengths]]
    return header, [[label, *[loss_cell(r) for r in results]] for label, results in labelled]


def plot_lengths(
    path: Path,
    labelled: Sequence[tuple[str, Sequence[LengthResult]]],
    title: str,
    train_length: int | None = None,
    highlight_last: bool = False,
) -> Figure:
    """Loss against context length (log2 axis), one line per labelled run; the training length marked."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for n, (label, results) in enumerate(labelled):
        last = highlight_last and n == len(labelled) - 1
        faded = highlight_last and not last
        ax.plot(
            [r.length for r in results],
            [r.loss for r in results],
            "o-",
            label=label,
            linewidth=2.5 if last else 1.5,
            alpha=0.45 if faded else 1.0,
        )
    ax.set_xscale("log", base=2)
    lengths = sorted({r.length for _, results in labelled for r in results})
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("validation loss (nats / token)")
    return _finish(fig, path, title, train_length)


def plot_positions(path: Path, results: Sequence[LengthResult], title: str, train_length: int | None = None) -> Figure:
    """Mean loss by position in the window, in logarithmic position bins, one line per length: how far
    context keeps helping, and where it starts to hurt."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for result in results:
        if result.position_loss is None:
            continue
        losses = np.asarray(result.position_loss)
        edges = np.unique(np.geomspace(1, result.length + 1, 48).astype(int))
        centers = np.sqrt(edges[:-1] * (edges[1:] - 1))
        means = [losses[a - 1 : b - 1].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax.plot(centers, means, label=f"length {result.length:,}", linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("position in the window (1 = no context)")
    ax.set_ylabel("mean loss (nats / token)")
    return _finish(fig, path, title, train_length)


def _finish(fig: Figure, path: Path, title: str, train_length: int | None) -> Figure:
    """What every line plot of lengths ends with: the training-length marker, title, grid, legend, the file."""
    ax = fig.axes[0]
    if train_length is not None:
        ax.axvline(train_length, color="gray", linestyle=":", label=f"training length {train_length:,}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_heatmaps(
    path: Path, panels: Sequence[tuple[str, np.ndarray]], lengths: Sequence[int], depths: Sequence[float]
) -> Figure:
    """Accuracy grids (depths x lengths, values in [0, 1]) side by side, one panel per checkpoint, annotated."""
    width = len(panels) * max(4.0, 1.6 + 0.8 * len(lengths)) + 1.0
    fig = Figure(figsize=(width, max(3.2, 1.8 + 0.45 * len(depths))), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (label, grid) in zip(axes, panels, strict=True):
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=45 if len(lengths) > 4 else 0)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("passkey depth")
        ax.set_title(label, fontsize=9)
        for (row, col), value in np.ndenumerate(grid):
            ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=list(axes), label="retrieval accuracy", fraction=0.05)
    _save(fig, path)
    return fig


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
