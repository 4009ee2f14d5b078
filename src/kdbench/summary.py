"""Aggregation of finished runs: every run, statistics over seeds, paired differences, cost,
provenance, and their figures.

The headline accuracy (``accuracy``: ``best_val``, the test accuracy at the best-validation
epoch, or ``last``, at the last epoch) is the protocol's; the tables always carry both.
Differences to the vanilla student and to logit KD are paired by seed: the same seed means the
same initial weights and data order, so the difference removes most of the seed-to-seed noise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdbench import io
from kdbench.errors import KdbenchError
from kdbench.stats import describe, paired_difference

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
    "rank",
    "batch_size",
    "train_images",
    "lr",
    "schedule",
    "label_smoothing",
    "T",
    "alpha",
    "beta",
    "train_seconds",
    "seconds_per_epoch",
    "peak_rss_mb",
    "peak_cuda_mb",
    "device",
    "host",
    "commit",
    "cohort",
    "path",
]
GROUP = ["role", "dataset", "teacher", "student", "arch", "method", "variant"]
ACCURACY = {"best_val": "test_acc_best_val", "last": "test_acc_last"}


def _schedule(train: dict[str, Any]) -> str:
    if train.get("schedule") == "multistep":
        steps = "/".join(str(m) for m in train.get("milestones", []))
        return f"multistep {steps} ×{train.get('gamma')}"
    return str(train.get("schedule", ""))


def _channel_rank(params: dict[str, Any]) -> float:
    rank = params.get("rank")
    if isinstance(rank, list):
        rank = rank[0] if rank else None
    return float(rank) if rank is not None else math.nan


def rank_family(variant: str) -> str:
    """A Tucker variant's name without its channel rank: the runs :func:`rank_chart` draws as
    one line. Spatial ranks stay: ``full-teacher-r16`` → ``full-teacher``, ``both-r8x2x2`` →
    ``both, spatial 2×2`` (its spatial modes truncated too: another line)."""
    match = re.search(r"-?r[0-9]+((?:x[0-9]+)*)$", variant)
    if match is None:
        return variant
    spatial = match.group(1).lstrip("x").replace("x", "×")
    return variant[: match.start()] + (f", spatial {spatial}" if spatial else "")


def label(method: str, variant: str) -> str:
    """Short name of a method and variant: ``kd``, ``tucker full-teacher-r16``…"""
    return method if variant == "default" else f"{method} {variant}"


def finished_run(path: str | Path) -> dict[str, Any]:
    """A finished run's metrics.json; one-line error for a missing or unfinished one."""
    try:
        doc = io.read_json(path)
    except (OSError, ValueError) as exc:
        raise KdbenchError(f"cannot read {path}: {exc}") from None
    if doc.get("status") != "complete" or "final" not in doc:
        raise KdbenchError(f"{path} is not a finished run (status {doc.get('status')!r})")
    return doc


def run_row(path: str | Path) -> dict[str, Any]:
    """One row of the runs table from a finished run's metrics.json."""
    doc = finished_run(path)
    run, final, prov = doc["run"], doc["final"], doc.get("provenance", {})
    cfg = doc.get("config", {})
    train, params = cfg.get("train", {}), cfg.get("method", {}).get("params", {})
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
        "rank": _channel_rank(params),
        "batch_size": train.get("batch_size"),
        # the images of its training split (train.train_size of them where set)
        "train_images": doc.get("data", {}).get("sizes", {}).get("train", math.nan),
        "lr": train.get("lr"),
        "schedule": _schedule(train),
        "label_smoothing": params.get("label_smoothing", 0.0),
        "T": params.get("T", math.nan),
        "alpha": params.get("alpha", math.nan),
        "beta": params.get("beta", math.nan),
        "train_seconds": final["train_seconds"],
        "seconds_per_epoch": final.get(
            "seconds_per_epoch", final["train_seconds"] / max(final["epochs"], 1)
        ),
        "peak_rss_mb": final.get("peak_rss_mb", math.nan),
        "peak_cuda_mb": final.get("peak_cuda_mb") or math.nan,
        "device": prov.get("device", {}).get("name", ""),
        "host": prov.get("host", ""),
        "commit": prov.get("git", {}).get("commit", ""),
        # the cohort it trained in (cohort_size), empty for a run trained alone
        "cohort": (doc.get("cohort") or {}).get("name", ""),
        "path": str(path),
    }


def collect(paths: Iterable[str | Path]) -> pd.DataFrame:
    rows = [run_row(p) for p in paths]
    if not rows:
        raise KdbenchError("no finished runs to aggregate")
    return pd.DataFrame(rows, columns=RUN_COLUMNS).sort_values(GROUP + ["seed"], ignore_index=True)


def _reference(runs: pd.DataFrame, **where: str) -> pd.DataFrame:
    """The runs of one reference group (its ``default`` variant if it has several)."""
    mask = np.ones(len(runs), dtype=bool)
    for key, value in where.items():
        mask &= (runs[key] == value).to_numpy()
    ref = runs[mask]
    if ref.empty:
        return ref
    variant = "default" if "default" in set(ref.variant) else sorted(ref.variant)[0]
    return ref[ref.variant == variant]


def _paired(group: pd.DataFrame, ref: pd.DataFrame, column: str) -> dict[str, float]:
    joined = group[["seed", column]].merge(ref[["seed", column]], on="seed", suffixes=("", "_ref"))
    return paired_difference(joined[column], joined[f"{column}_ref"])


def summarize(runs: pd.DataFrame, accuracy: str = "best_val") -> pd.DataFrame:
    """Per group: n and seeds; mean, std and 95% CI of the last-epoch and best-validation test
    accuracy; the teacher's accuracy; paired differences (headline accuracy) to the vanilla
    student and to logit KD with the paired t-test p-value and the number of pairs."""
    if accuracy not in ACCURACY:
        raise KdbenchError(f"accuracy must be best_val or last, got {accuracy!r}")
    column = ACCURACY[accuracy]
    teachers = runs[runs.role == "teacher"]
    rows = []
    for key, group in runs.groupby(GROUP, sort=False, dropna=False):
        row: dict[str, Any] = dict(zip(GROUP, key, strict=True))
        row["n"] = group.seed.nunique()
        row["seeds"] = " ".join(str(s) for s in sorted(group.seed))
        row["note"] = "n < 2: no spread" if row["n"] < 2 else ""
        for name, col in ACCURACY.items():
            d = describe(group[col])
            row |= {f"{name}_mean": d["mean"], f"{name}_std": d["std"], f"{name}_ci95": d["ci95"]}
        row["rank"] = group["rank"].iloc[0]
        row["epochs"] = int(group.epochs.max())
        row["seconds_per_epoch"] = float(group.seconds_per_epoch.mean())
        teacher = teachers[(teachers.dataset == row["dataset"]) & (teachers.arch == row["teacher"])]
        row["teacher_acc"] = float(teacher[column].mean()) if len(teacher) else math.nan
        for ref_name, where in (
            ("vanilla", {"method": "vanilla"}),
            ("kd", {"method": "kd", "teacher": row["teacher"]}),
        ):
            diff = {"n": 0, "diff": math.nan, "ci95": math.nan, "p": math.nan}
            if row["role"] == "student" and row["method"] != ref_name:
                ref = _reference(
                    runs, role="student", dataset=row["dataset"], arch=row["arch"], **where
                )
                if len(ref):
                    diff = _paired(group, ref, column)
            row |= {
                f"vs_{ref_name}": diff["diff"],
                f"vs_{ref_name}_ci95": diff["ci95"],
                f"vs_{ref_name}_p": diff["p"],
                f"vs_{ref_name}_n": diff["n"],
            }
        rows.append(row)
    out = pd.DataFrame(rows)
    out.insert(len(GROUP), "accuracy", accuracy)
    return out


def _pm(mean: float, half: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return ""
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _versus(row: Any, ref: str) -> str:
    n = row[f"vs_{ref}_n"]
    if not n or math.isnan(row[f"vs_{ref}"]):
        return ""
    text = f"{row[f'vs_{ref}']:+.2f}"
    if not math.isnan(row[f"vs_{ref}_ci95"]):
        text += f" ± {row[f'vs_{ref}_ci95']:.2f}"
    p = row[f"vs_{ref}_p"]
    return text + (f" (p = {p:.2g}, n = {n})" if not math.isnan(p) else f" (n = {n})")


def headline_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The report's first table: one formatted line per model group, headline accuracy first."""
    accuracy = str(summary.accuracy.iloc[0])
    other = "last" if accuracy == "best_val" else "best_val"
    names = {"best_val": "best-val epoch", "last": "last epoch"}
    rows = []
    for _, row in summary.iterrows():
        if row.role == "teacher":
            model = f"teacher {row.arch}"
        elif row.teacher in ("", "none"):
            model = row.arch
        else:
            model = f"{row.teacher} → {row.arch}"
        rows.append(
            {
                "dataset": row.dataset,
                "model": model,
                "method": "teacher" if row.role == "teacher" else label(row.method, row.variant),
                "n": int(row.n),
                f"test acc. % ({names[accuracy]}, 95% CI)": _pm(
                    row[f"{accuracy}_mean"], row[f"{accuracy}_ci95"]
                ),
                f"{names[other]}": _pm(row[f"{other}_mean"], row[f"{other}_ci95"]),
                "vs vanilla (paired)": _versus(row, "vanilla"),
                "vs kd (paired)": _versus(row, "kd"),
                "note": row.note,
            }
        )
    return pd.DataFrame(rows)


def write_csv(df: pd.DataFrame, path: str | Path, float_format: str = "%.4f") -> None:
    with io.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format=float_format)


#: the dashed lines of the teachers in a panel of :func:`accuracy_chart` (not the bars' colours)
TEACHER_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")
#: the markers of the teachers in a panel of :func:`cost_chart`, in the panel's teacher order
TEACHER_MARKERS = ("o", "s", "^", "D", "v", "P")


def accuracy_chart(summary: pd.DataFrame, path: str | Path) -> None:
    """Methods ranked by headline accuracy per dataset × student: a dot at the mean over seeds,
    whiskers for its 95% CI, the vanilla student's dot grey, the accuracy of each teacher of the
    panel's students as a dashed line of its own colour. Dots, not bars: the axis starts near the
    lowest interval, and a bar's length from there would overstate the differences."""
    from kdbench import plots

    students = summary[summary.role == "student"]
    panels = list(students.groupby(["dataset", "arch"], sort=True))
    if not panels:
        raise KdbenchError("no student runs to aggregate")
    accuracy = str(summary.accuracy.iloc[0])
    height = max(len(g) for _, g in panels)
    fig, axes = plots.panel_grid(len(panels), 2, 6.5, 1.2 + 0.32 * height)
    for ax, ((dataset, arch), group) in zip(axes, panels, strict=True):
        group = group.sort_values(f"{accuracy}_mean", ascending=True)
        means = group[f"{accuracy}_mean"].to_numpy()
        # no whisker where there is no interval (n < 2), not one of width 0
        errs = group[f"{accuracy}_ci95"].to_numpy(dtype=float)
        labels = [
            f"{label(m, v)}{'' if t in ('', 'none') else f' ← {t}'}  (n={n})"
            for m, v, t, n in zip(group.method, group.variant, group.teacher, group.n, strict=True)
        ]
        rows = np.arange(len(group))
        colours = ["tab:gray" if m == "vanilla" else "tab:blue" for m in group.method]
        ax.errorbar(means, rows, xerr=errs, fmt="none", ecolor="0.25", elinewidth=1, capsize=3)
        ax.scatter(means, rows, c=colours, s=30, zorder=3)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(rows, labels, fontsize=7)
        ax.set_ylim(-0.6, len(group) - 0.4)
        teachers = summary[
            (summary.role == "teacher")
            & (summary.dataset == dataset)
            & summary.arch.isin(set(group.teacher))  # the teachers of this panel's students
        ].set_index("arch")[f"{accuracy}_mean"]
        # from 5 points below the lowest interval or teacher
        lo = max(0.0, float(np.nanmin([*(means - np.nan_to_num(errs)), *teachers])) - 5)
        for i, (t, acc) in enumerate(teachers.items()):
            colour = TEACHER_COLOURS[i % len(TEACHER_COLOURS)]
            ax.axvline(acc, ls="--", color=colour, lw=1, label=f"teacher {t}: {acc:.2f}%")
        ax.set(
            title=f"{dataset}: {arch}",
            xlabel=f"test accuracy (%), {'best-validation' if accuracy == 'best_val' else 'last'}"
            " epoch; mean and 95% CI over seeds",
            xlim=(lo, 100),
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    plots.save(fig, path)


def rank_chart(summary: pd.DataFrame, path: str | Path) -> None:
    """Headline accuracy against the Tucker channel rank, one line per method and variant family
    (:func:`rank_family`: the variant name without its channel rank), 95% CI error bars; the
    vanilla student dotted."""
    from kdbench import plots

    accuracy = str(summary.accuracy.iloc[0])
    ranked = summary[(summary.role == "student") & summary["rank"].notna()]
    if ranked.empty:
        raise KdbenchError("no run has a Tucker rank: nothing to plot against the rank")
    panels = list(ranked.groupby(["dataset", "teacher", "arch"], sort=True))
    fig, axes = plots.plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, ((dataset, teacher, arch), group) in zip(axes.flat, panels, strict=True):
        lines = list(group.groupby([group.method, group.variant.map(rank_family)], sort=True))
        for i, ((method, fam), g) in enumerate(lines):
            # more lines than the default cycle's 10 colours: 20 distinct ones
            colour = plots.plt.cm.tab20.colors[i % 20] if len(lines) > 10 else None
            g = g.sort_values("rank")
            ax.errorbar(
                g["rank"],
                g[f"{accuracy}_mean"],
                yerr=g[f"{accuracy}_ci95"],  # none where n < 2
                marker="o",
                capsize=3,
                color=colour,
                label=f"{method} {fam}".strip(),
            )
        vanilla = summary[
            (summary.role == "student")  # not a teacher of that architecture (trained alike)
            & (summary.dataset == dataset)
            & (summary.method == "vanilla")
            & (summary.arch == arch)
        ]
        for acc in vanilla[f"{accuracy}_mean"]:
            ax.axhline(acc, ls=":", color="0.4", label=f"vanilla {arch}: {acc:.2f}%")
        ax.set(
            title=f"{dataset}: {teacher} → {arch}",
            xlabel="Tucker channel rank r",
            ylabel=f"test accuracy (%), {accuracy} (95% CI)",
        )
        ax.set_xticks(sorted(set(group["rank"])))
        _accuracy_axis(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save(fig, path)


def _accuracy_axis(ax: Any) -> None:
    """Keep an accuracy axis within 0-100 % and a margin that shows a point at 0 or 100 whole:
    an interval past them is cut at the axis."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, -2.0), min(high, 102.0))


def read_table(path: str | Path) -> pd.DataFrame:
    """A runs or summary CSV as written here (empty text fields stay empty strings)."""
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise KdbenchError(f"cannot read {path}: {exc}") from None
    for column in ("teacher", "student", "note", "seeds", "commit", "host", "device"):
        if column in df:
            df[column] = df[column].fillna("").astype(str)
    return df


def rank_chart_from_csv(summary_csv: str | Path, path: str | Path) -> None:
    """Rule ``rank_chart``: :func:`rank_chart` of the aggregated summary."""
    rank_chart(read_table(summary_csv), path)


def learning_curves_overlay(paths: Iterable[str | Path], path: str | Path, title: str) -> None:
    """Test and validation accuracy and train loss per epoch, one line per method and variant
    (mean over seeds) with a band from the lowest to the highest seed."""
    from kdbench import plots

    curves: dict[str, list[pd.DataFrame]] = {}
    for p in paths:
        doc = io.read_json(p)
        run = doc["run"]
        name = label(run["method"], run["variant"])
        curves.setdefault(name, []).append(pd.DataFrame(doc["epochs"]))
    if not curves:
        raise KdbenchError("no runs to draw learning curves of")
    panels = (("test_acc", "test accuracy (%)"), ("val_acc", "validation accuracy (%)"))
    panels += (("train_loss", "train loss"),)
    fig, axes = plots.plt.subplots(1, 3, figsize=(16, 5))
    colours = plots.plt.get_cmap("tab20")
    longest = 0
    for i, (name, runs) in enumerate(curves.items()):
        epochs = min(len(r) for r in runs)
        longest = max(longest, epochs)
        for ax, (key, _) in zip(axes, panels, strict=True):
            values = np.stack([r[key].to_numpy()[:epochs] for r in runs])
            x = np.arange(1, epochs + 1)
            colour = colours(i % 20)
            ax.plot(
                x,
                values.mean(0),
                color=colour,
                lw=1.2,
                marker=plots.line_marker(epochs),
                label=f"{name} (n={len(runs)})",
            )
            if len(runs) > 1:
                ax.fill_between(x, values.min(0), values.max(0), color=colour, alpha=0.15, lw=0)
    for ax, (_, ylabel) in zip(axes, panels, strict=True):
        ax.set(xlabel="epoch", ylabel=ylabel)
        plots.epoch_axis(ax, longest)
    plots.log_y_axis(axes[2])
    fig.suptitle(f"{title}: mean over seeds, band = lowest to highest seed", fontsize=10)
    fig.tight_layout()
    # below the panels, where it hides no curve however many runs there are
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(4, len(names)),
        fontsize=8,
        frameon=False,
    )
    plots.save(fig, path)


def cost_table(
    runs: pd.DataFrame,
    benchmarks: Sequence[str | Path] = (),
    shared_benchmarks: Mapping[str | Path, Sequence[str | Path]] | None = None,
) -> pd.DataFrame:
    """Per dataset × role × arch × method: runs, seconds per epoch, training and job seconds,
    CPU seconds and peak memory (from metrics.json and Snakemake's ``benchmark:`` files).
    ``benchmarks`` lie in their run's directory; ``shared_benchmarks`` maps the benchmark of a
    job that trained several runs (a cohort) to their directories, and each run gets an equal
    share of its job and CPU seconds, as it records an equal share of the epoch time."""
    rows = [_benchmark_row(p) for p in benchmarks]
    for path, dirs in (shared_benchmarks or {}).items():
        row = _benchmark_row(path)
        share = {k: row[k] / max(len(dirs), 1) for k in ("job_seconds", "cpu_seconds")}
        rows += [{**row, **share, "path": str(Path(d))} for d in dirs]
    bench = pd.DataFrame(rows, columns=["path", "job_seconds", "cpu_seconds", "max_rss_mb"])
    runs = runs.assign(bench=[str(Path(p).parent) for p in runs.path])
    if len(bench):
        bench["bench"] = bench.pop("path")
        runs = runs.merge(bench, on="bench", how="left")
    else:
        runs = runs.assign(job_seconds=math.nan, cpu_seconds=math.nan, max_rss_mb=math.nan)
    keys = ["dataset", "role", "arch", "teacher", "method", "device"]

    def total(values: pd.Series) -> float:
        return float(values.sum(min_count=1))  # NaN, not 0, where nothing was measured

    return runs.groupby(keys, sort=True, as_index=False, dropna=False).agg(
        runs=("seed", "size"),
        epochs=("epochs", "max"),
        seconds_per_epoch=("seconds_per_epoch", "mean"),
        train_seconds_total=("train_seconds", "sum"),
        job_seconds_total=("job_seconds", total),
        cpu_seconds_total=("cpu_seconds", total),
        peak_rss_mb=("peak_rss_mb", "max"),
        peak_cuda_mb=("peak_cuda_mb", "max"),
        test_acc_best_val=("test_acc_best_val", "mean"),
        test_acc_last=("test_acc_last", "mean"),
    )


def _benchmark_row(path: str | Path) -> dict[str, Any]:
    """A Snakemake benchmark file (TSV: s, max_rss, cpu_time, …) of a training job, keyed by
    the directory it lies in (a run's, by which it joins the run)."""
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, ValueError) as exc:
        raise KdbenchError(f"cannot read benchmark {path}: {exc}") from None
    last = table.iloc[-1]
    return {
        "path": str(Path(path).parent),
        "job_seconds": float(last.get("s", math.nan)),
        "cpu_seconds": float(last.get("cpu_time", math.nan)),
        "max_rss_mb": float(last.get("max_rss", math.nan)),
    }


def cost_chart(cost: pd.DataFrame, summary: pd.DataFrame, path: str | Path) -> None:
    """Training seconds per epoch against headline accuracy per dataset × student, one point
    per method, variant and teacher with its 95% CI: a colour per method (the same in every
    panel), a marker per teacher of the panel's students."""
    from kdbench import plots

    accuracy = str(summary.accuracy.iloc[0])
    students = summary[summary.role == "student"]
    colours = {m: f"C{i % 10}" for i, m in enumerate(sorted(set(students.method)))}
    panels = list(students.groupby(["dataset", "arch"], sort=True))
    fig, axes = plots.panel_grid(len(panels), 2, 6.5, 4.5)
    for ax, ((dataset, arch), group) in zip(axes, panels, strict=True):
        teachers = sorted(set(group.teacher) - {"", "none"})
        markers = {t: TEACHER_MARKERS[i % len(TEACHER_MARKERS)] for i, t in enumerate(teachers)}
        for (method, teacher), g in group.groupby(["method", "teacher"], sort=True):
            named = teacher in markers and len(teachers) > 1  # which teacher, where it matters
            ax.errorbar(
                g.seconds_per_epoch,
                g[f"{accuracy}_mean"],
                yerr=g[f"{accuracy}_ci95"],  # none where n < 2
                fmt=markers.get(teacher, "o"),
                capsize=3,
                color=colours[method],
                label=f"{method} ← {teacher}" if named else method,
            )
        devices = ", ".join(sorted(set(cost[cost.dataset == dataset].device)))
        ax.set(
            title=f"{dataset}: {arch} ({devices})",
            xlabel="training seconds per epoch (mean over seeds)",
            ylabel=f"test accuracy (%), {accuracy} (95% CI)",
        )
        _accuracy_axis(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save(fig, path)


def provenance_table(paths: Iterable[str | Path]) -> pd.DataFrame:
    """What produced the results: versions, git commits, devices and hosts, with run counts,
    and one md5 over every run's recorded configuration (:func:`kdbench.config.config_hash`)."""
    from kdbench.config import config_hash

    counts: dict[tuple[str, str], int] = {}
    configs = []

    def add(item: str, value: Any) -> None:
        counts[(item, str(value))] = counts.get((item, str(value)), 0) + 1

    for path in paths:
        doc = io.read_json(path)
        configs.append({"run": doc.get("run"), "seed": doc.get("seed"), **doc.get("config", {})})
        prov = doc.get("provenance", {})
        for package, version in sorted(prov.get("versions", {}).items()):
            add(f"version: {package}", version)
        git = prov.get("git", {})
        dirty = " (uncommitted changes)" if git.get("dirty") else ""
        add("git commit", f"{git.get('commit') or 'unknown'}{dirty}")
        add("device", prov.get("device", {}).get("name", "unknown"))
        add("host", prov.get("host", "unknown"))
        add("platform", prov.get("platform", "unknown"))
        if "samplewise_solver" in prov:  # a run of sample-wise Tucker
            add("sample-wise Tucker solver", prov["samplewise_solver"])
    digest = config_hash({"runs": sorted(configs, key=lambda c: json.dumps(c, sort_keys=True))})
    rows = [
        {"item": "config hash (md5 of the runs' configs)", "value": digest, "runs": len(configs)}
    ]
    rows += [{"item": i, "value": v, "runs": n} for (i, v), n in counts.items()]
    table = pd.DataFrame(rows, columns=["item", "value", "runs"])
    return table.sort_values("item", kind="stable", ignore_index=True)


def aggregate(
    metrics: Iterable[str | Path],
    runs_csv: str | Path,
    summary_csv: str | Path,
    chart: str | Path,
    *,
    accuracy: str = "best_val",
    benchmarks: Sequence[str | Path] = (),
    shared_benchmarks: Mapping[str | Path, Sequence[str | Path]] | None = None,
    cost_csv: str | Path | None = None,
    cost_plot: str | Path | None = None,
    provenance_csv: str | Path | None = None,
    anchors_path: str | Path | None = None,
    anchors_csv: str | Path | None = None,
    headline_csv: str | Path | None = None,
) -> pd.DataFrame:
    """Write the runs table, the summary over seeds and the ranked chart; with the keyword
    paths also the report's headline table, the cost table and plot, the provenance table and
    the published results beside the measured ones (:func:`kdbench.anchors.anchor_table`).
    Returns the summary."""
    metrics = list(metrics)
    runs = collect(metrics)
    summary = summarize(runs, accuracy)
    write_csv(runs, runs_csv)
    write_csv(summary, summary_csv)
    if headline_csv is not None:
        write_csv(headline_table(summary), headline_csv)
    accuracy_chart(summary, chart)
    if cost_csv is not None:
        cost = cost_table(runs, benchmarks, shared_benchmarks)
        write_csv(cost, cost_csv, "%.2f")
        if cost_plot is not None:
            cost_chart(cost, summary, cost_plot)
    if provenance_csv is not None:
        write_csv(provenance_table(metrics), provenance_csv)
    if anchors_path is not None and anchors_csv is not None:
        from kdbench.anchors import anchor_table

        write_csv(anchor_table(anchors_path, summary, runs), anchors_csv, "%.2f")
    return summary
