"""Figures, written atomically as PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdbench import io  # noqa: E402


def save(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Save ``fig`` to ``path`` (format from the suffix) atomically and close it."""
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


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
        ax.plot(x, [math.log10(max(e[key], 1e-12)) for e in epochs], style, label=label)
    ax.axvline(best_epoch, color="grey", lw=0.8)
    ax.set(xlabel="epoch", ylabel="log10 loss", title=title)
    ax.legend()
    save(fig, loss_path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style, label in (
        ("train_acc", ":", "train"),
        ("val_acc", "--", "validation"),
        ("test_acc", "-", "test"),
    ):
        ax.plot(x, [e[key] for e in epochs], style, label=label)
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
    ax.legend(loc="lower right")
    save(fig, accuracy_path)
