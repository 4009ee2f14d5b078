"""Aggregation of finished runs: a tidy table of every run, a summary over seeds, a bar chart."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from kdbench import io, plots
from kdbench.errors import KdbenchError

RUN_COLUMNS = [
    "role",
    "dataset",
    "teacher",
    "student",
    "arch",
    "method",
    "variant",
    "seed",
    "epochs",
    "best_epoch",
    "test_acc_last",
    "test_acc_best_val",
    "val_acc_best",
    "train_seconds",
    "device",
    "commit",
    "path",
]
GROUP = ["role", "dataset", "teacher", "arch", "method", "variant"]


def run_row(path: str | Path) -> dict[str, Any]:
    """One row of the runs table from a finished run's metrics.json."""
    doc = io.read_json(path)
    if doc.get("status") != "complete" or "final" not in doc:
        raise KdbenchError(f"{path} is not a finished run (status {doc.get('status')!r})")
    run, final, prov = doc["run"], doc["final"], doc.get("provenance", {})
    return {
        "role": run["role"],
        "dataset": run["dataset"],
        "teacher": run.get("teacher") or "",
        "student": run.get("student") or "",
        "arch": run["arch"],
        "method": run["method"],
        "variant": run["variant"],
        "seed": run["seed"],
        "epochs": final["epochs"],
        "best_epoch": final["best_epoch"],
        "test_acc_last": final["test_acc_last"],
        "test_acc_best_val": final["test_acc_best_val"],
        "val_acc_best": final["val_acc_best"],
        "train_seconds": final["train_seconds"],
        "device": prov.get("device", {}).get("name", ""),
        "commit": prov.get("git", {}).get("commit", ""),
        "path": str(path),
    }


def collect(paths: Iterable[str | Path]) -> pd.DataFrame:
    rows = [run_row(p) for p in paths]
    return pd.DataFrame(rows, columns=RUN_COLUMNS).sort_values(GROUP + ["seed"], ignore_index=True)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample standard deviation (NaN for one run) and n over seeds of each run group."""
    agg = runs.groupby(GROUP, sort=True, dropna=False).agg(
        n=("seed", "nunique"),
        seeds=("seed", lambda s: " ".join(str(v) for v in sorted(s))),
        test_acc_last_mean=("test_acc_last", "mean"),
        test_acc_last_std=("test_acc_last", "std"),
        test_acc_best_val_mean=("test_acc_best_val", "mean"),
        test_acc_best_val_std=("test_acc_best_val", "std"),
        epochs=("epochs", "max"),
        train_seconds_mean=("train_seconds", "mean"),
    )
    return agg.reset_index()


def accuracy_chart(summary: pd.DataFrame, path: str | Path) -> None:
    """Bars of best-validation-epoch test accuracy (mean ± std over seeds) per dataset × student,
    one bar per method and variant, the teacher's accuracy as a dashed line."""
    students = summary[summary.role == "student"]
    teachers = summary[summary.role == "teacher"]
    panels = list(students.groupby(["dataset", "arch"], sort=True))
    if not panels:
        raise KdbenchError("no student runs to aggregate")
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plots.plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, ((dataset, arch), group) in zip(axes.flat, panels, strict=False):
        labels = [
            f"{m}" + (f"\n{v}" if v != "default" else "") + (f"\n← {t}" if t != "none" else "")
            for m, v, t in zip(group.method, group.variant, group.teacher, strict=True)
        ]
        means = group.test_acc_best_val_mean.to_numpy()
        errs = group.test_acc_best_val_std.fillna(0).to_numpy()
        lo = max(0.0, float((means - errs).min()) - 10)
        bars = ax.bar(range(len(group)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        for bar, n in zip(bars, group.n, strict=True):
            x = bar.get_x() + bar.get_width() / 2
            ax.annotate(
                f"n={n}",
                (x, lo),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                color="white",
            )
        for _, t in teachers[teachers.dataset == dataset].iterrows():
            ax.axhline(
                t.test_acc_best_val_mean,
                ls="--",
                color="tab:red",
                lw=1,
                label=f"teacher {t.arch}: {t.test_acc_best_val_mean:.2f}%",
            )
        ax.set_xticks(range(len(group)), labels, fontsize=8)
        ax.set(
            title=f"{dataset}: {arch}", ylabel="test accuracy (%) at best val epoch", ylim=(lo, 100)
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="center", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    plots.save(fig, path)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    with io.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")


def aggregate(
    metrics: Iterable[str | Path], runs_csv: str | Path, summary_csv: str | Path, chart: str | Path
) -> pd.DataFrame:
    """Write the runs table, the summary over seeds and the accuracy chart; return the summary."""
    runs = collect(metrics)
    summary = summarize(runs)
    write_csv(runs, runs_csv)
    write_csv(summary, summary_csv)
    accuracy_chart(summary, chart)
    return summary
