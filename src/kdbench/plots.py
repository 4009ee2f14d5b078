"""Figures, written atomically as PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdbench import io  # noqa: E402


def save(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Save ``fig`` to ``path`` (format from the suffix) atomically and close it."""
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def panel_grid(
    count: int, cols: int, width: float, height: float, extra_height: float = 0.0
) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels, up to ``cols`` to a row, each ``width`` × ``height``
    inches (plus ``extra_height`` for the figure), and its first ``count`` axes in order; the
    grid's axes past them are hidden."""
    cols = max(1, min(count, cols))
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows + extra_height), squeeze=False
    )
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.axis("off")
    return fig, flat[:count]


def epoch_axis(ax: Any, epochs: int) -> None:
    """Whole epochs on the x axis of a per-epoch chart of up to ``epochs`` epochs; a run of one
    epoch gets its one tick (matplotlib would label fractions of an epoch)."""
    if epochs <= 1:
        ax.set_xlim(0.5, 1.5)
        ax.set_xticks([1])
    else:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))


def log_y_axis(ax: Any) -> None:
    """A log-scale y axis labelled in plain numbers (0.01, 0.5, 2, 30), and at its minor ticks
    too where it spans less than a decade (matplotlib would write 6×10⁰, 4×10⁰, …)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v: float, _: Any) -> str:
        low, high = ax.get_ylim()
        return f"{v:g}" if high < 10 * low else ""

    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(minor))


def line_marker(points: int) -> str | None:
    """A marker for a line of one point (a run of one epoch), which would not show otherwise."""
    return "o" if points == 1 else None


def learning_curves(
    epochs: Sequence[dict[str, Any]],
    best_epoch: int,
    loss_path: str | Path,
    accuracy_path: str | Path,
    title: str = "",
) -> None:
    """``Loss.png`` (log10 scale) and ``Accuracy.png`` (0–100) in the original projects' style:
    train dotted, validation dashed, test solid, a vertical line at the best-validation epoch."""
    x = [e["epoch"] for e in epochs]
    best = epochs[best_epoch - 1]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style, label in (
        ("train_loss", ":", "train"),
        ("val_loss", "--", "validation"),
        ("test_loss", "-", "test"),
    ):
        values = [math.log10(max(e[key], 1e-12)) for e in epochs]
        ax.plot(x, values, style, marker=line_marker(len(x)), label=label)
    ax.axvline(best_epoch, color="grey", lw=0.8)
    ax.set(xlabel="epoch", ylabel="log10 loss", title=title)
    epoch_axis(ax, len(x))
    ax.legend()
    save(fig, loss_path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style, label in (
        ("train_acc", ":", "train"),
        ("val_acc", "--", "validation"),
        ("test_acc", "-", "test"),
    ):
        ax.plot(x, [e[key] for e in epochs], style, marker=line_marker(len(x)), label=label)
    ax.axvline(best_epoch, color="grey", lw=0.8)
    ax.axhline(best["test_acc"], color="grey", lw=0.8, ls=":")
    ax.annotate(
        f"best val epoch {best_epoch}: test {best['test_acc']:.2f}%",
        (best_epoch, best["test_acc"]),
        textcoords="offset points",
        xytext=(4, -14),
        fontsize=8,
    )
    ax.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100), title=title)
    epoch_axis(ax, len(x))
    ax.legend(loc="lower right")
    save(fig, accuracy_path)


#: display height in pixels of one mosaic cell (maps are enlarged by an integer factor)
CELL = 64
GAP = 6


def _enlarge(image: np.ndarray, cell: int) -> np.ndarray:
    k = max(1, cell // max(image.shape[0], 1))
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def mosaic(
    cells: Sequence[Sequence[np.ndarray | None]],
    row_names: Sequence[str],
    col_titles: Sequence[str],
    norms: Sequence[tuple[float, float] | None],
    cmap: str,
    title: str,
    *,
    colorbars: bool = True,
    cell: int = CELL,
    dpi: int = 110,
) -> Any:
    """A grid of maps drawn as one image (fast for many rows): ``cells[r][c]`` is an H×W map
    (coloured with ``cmap``, NaN white), an H×W×3 RGB image in [0, 1], or None (blank).

    Column ``c`` shares the colour range ``norms[c]`` (with a colour bar under it) or, if None,
    each of its maps is scaled to its own range. ``colorbars=False`` leaves the bars out (for
    maps the caller already scaled). Maps are enlarged by an integer factor to about ``cell``
    pixels high."""
    colour = plt.get_cmap(cmap)
    rgb: list[list[np.ndarray | None]] = []
    for row in cells:
        out_row: list[np.ndarray | None] = []
        for c, item in enumerate(row):
            if item is None:
                out_row.append(None)
                continue
            if item.ndim == 2:
                lo, hi = norms[c] if norms[c] is not None else (np.nanmin(item), np.nanmax(item))
                scaled = (item - lo) / (hi - lo) if hi > lo else np.zeros_like(item)
                image = colour(np.clip(np.nan_to_num(scaled, nan=0.0), 0, 1))[..., :3]
                image[np.isnan(item)] = 1.0
            else:
                image = item
            out_row.append(_enlarge(image, cell))
        rgb.append(out_row)
    n_cols = len(col_titles)
    widths = [
        max((r[c].shape[1] for r in rgb if r[c] is not None), default=cell) for c in range(n_cols)
    ]
    heights = [max((x.shape[0] for x in r if x is not None), default=cell) for r in rgb]
    xs = np.concatenate([[0], np.cumsum(np.array(widths) + GAP)])
    ys = np.concatenate([[0], np.cumsum(np.array(heights) + GAP)])
    canvas = np.ones((int(ys[-1]) - GAP, int(xs[-1]) - GAP, 3))
    for r, row in enumerate(rgb):
        for c, image in enumerate(row):
            if image is not None:
                h, w = image.shape[:2]
                canvas[ys[r] : ys[r] + h, xs[c] : xs[c] + w] = image
    left = 12 + 6.5 * max((len(n) for n in row_names), default=0)
    bars = colorbars and any(n is not None for n in norms)
    top, bottom, right = 46 + 14 * title.count("\n"), 44 if bars else 8, 8
    width, height = canvas.shape[1] + left + right, canvas.shape[0] + top + bottom
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes(
        (left / width, bottom / height, canvas.shape[1] / width, canvas.shape[0] / height)
    )
    ax.imshow(canvas, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for r, name in enumerate(row_names):
        ax.text(-8, ys[r] + heights[r] / 2, name, ha="right", va="center", fontsize=8)
    for c, text in enumerate(col_titles):
        ax.text(xs[c] + widths[c] / 2, -6, text, ha="center", va="bottom", fontsize=8)
        if bars and norms[c] is not None:
            cax = fig.add_axes(((left + xs[c]) / width, 14 / height, widths[c] / width, 8 / height))
            bar = fig.colorbar(
                matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(*norms[c]), cmap=colour),
                cax=cax,
                orientation="horizontal",
            )
            bar.ax.tick_params(labelsize=6, length=2, pad=1)
            bar.locator = matplotlib.ticker.MaxNLocator(3)
            bar.update_ticks()
    fig.suptitle(title, fontsize=9, y=1 - 8 / height, va="top")
    return fig
