"""Feature-map analysis: per-model metric tables, most-affected stages and channels, aggregation.

The workflow's analysis stage, one function per rule:

* :func:`extract` (rule ``extract_features_metrics``, one job per trained model): the stage 1–3
  features of the first ``n_images`` test images, :func:`kdbench.metrics.feature_metrics` of each
  whole stage and of each channel, both definitions, as tidy tables;
* :func:`rank_affected` (rule ``most_affected``, per teacher → student pair): how far each method
  moves a stage's or a channel's metric values away from the vanilla student's, and whether
  towards the teacher's;
* :func:`analyse` (rule ``analyse_features``, per dataset): metric × method tables (mean ± std
  over seeds) and Pearson/Spearman correlations of the metrics with test accuracy and with each
  other, as CSV and heatmaps.

Diagnostic figures of a pair (rule ``diagnose``) are in :mod:`kdbench.diagnostics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from kdbench import io, models
from kdbench.data import Dataset, load_dataset
from kdbench.errors import KdbenchError
from kdbench.metrics import DEFINITIONS, KEYS, feature_metrics, per_channel_metrics
from kdbench.stats import correlation
from kdbench.summary import finished_run, label, write_csv

log = logging.getLogger("kdbench")

STAGES = (1, 2, 3)
#: Columns that identify a model in every table.
MODEL = ["dataset", "role", "arch", "teacher", "method", "variant", "label", "seed"]
CHANNEL_COLUMNS = [*MODEL, "stage", "definition", "channel", "metric", "value"]
STAGE_COLUMNS = [*MODEL, "test_acc", "stage", "definition", "metric", "value"]
TEACHER_LABEL = "teacher"


def model_info(run_metrics: str | Path, checkpoint: str = "best") -> dict[str, Any]:
    """Who a trained model is (from its finished run's metrics.json) and its test accuracy."""
    doc = finished_run(run_metrics)
    run, final = doc["run"], doc["final"]
    teacher_role = run["role"] == "teacher"
    method = TEACHER_LABEL if teacher_role else run["method"]
    variant = "default" if teacher_role else run["variant"]
    return {
        "dataset": run["dataset"],
        "role": run["role"],
        "arch": run["arch"],
        "teacher": "none" if teacher_role else (run.get("teacher") or "none"),
        "method": method,
        "variant": variant,
        "label": label(method, variant),
        "seed": int(run["seed"]),
        "test_acc": float(final["test_acc_best_val" if checkpoint == "best" else "test_acc_last"]),
    }


def load_model(info: dict[str, Any], weights: str | Path, ds: Dataset) -> nn.Module:
    """The trained model of ``info`` in eval mode on the CPU."""
    model = models.build(info["arch"], ds.num_classes, ds.in_channels)
    models.load_weights(model, weights, f"{info['arch']} {info['label']}")
    return model.eval()


def test_images(ds: Dataset, n_images: int) -> int:
    """How many test images the analysis uses (``n_images`` capped at the test split)."""
    if n_images < 1:
        raise KdbenchError(f"analysis.n_images must be positive, got {n_images}")
    n = min(int(n_images), len(ds.test))
    if n < n_images:
        log.info("%s has %d test images: analysing all of them", ds.name, n)
    return n


def stage_features(
    model: nn.Module, ds: Dataset, images: Tensor, batch_size: int = 250
) -> list[Tensor]:
    """Stage 1–3 features (N×C×H×W, float32, CPU) of raw ``images`` of ``ds`` (values in [0, 1]),
    normalised as the training loader does."""
    mean = torch.tensor(ds.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float32).view(1, -1, 1, 1)
    feats: list[list[Tensor]] = [[] for _ in STAGES]
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = (images[start : start + batch_size] - mean) / std
            for out, f in zip(feats, model(x)[:3], strict=True):
                out.append(f.float())
    return [torch.cat(f) for f in feats]


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """CSV or Parquet (by suffix), atomically, values at full float precision."""
    path = Path(path)
    if path.suffix != ".parquet":
        write_csv(df, path, "%.8g")
        return
    with io.atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise KdbenchError(f"cannot read table {path}: {exc}") from None


def model_tables(
    feats: Sequence[Tensor], info: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-channel table, per-stage table) of one model's stage features, both definitions."""
    meta = {k: info[k] for k in MODEL}
    channel_parts, stage_rows = [], []
    for stage, fmap in zip(STAGES, feats, strict=True):
        for definition in DEFINITIONS:
            for metric, value in feature_metrics(fmap, definition).items():
                stage_rows.append(
                    {
                        **meta,
                        "test_acc": info["test_acc"],
                        "stage": stage,
                        "definition": definition,
                        "metric": metric,
                        "value": value,
                    }
                )
            part = per_channel_metrics(fmap, definition)
            channel_parts.append(part.assign(**meta, stage=stage, definition=definition))
    channels = pd.concat(channel_parts, ignore_index=True)[CHANNEL_COLUMNS]
    return channels, pd.DataFrame(stage_rows, columns=STAGE_COLUMNS)


def extract(
    *,
    dataset: str,
    data: dict[str, Any],
    weights: str | Path,
    run_metrics: str | Path,
    n_images: int,
    checkpoint: str,
    batch_size: int,
    channels_table: str | Path,
    stages_table: str | Path,
) -> None:
    """Measure one trained model: write its per-channel (Parquet) and per-stage (CSV) tables."""
    info = model_info(run_metrics, checkpoint)
    if info["dataset"] != dataset:
        raise KdbenchError(f"{run_metrics} is a {info['dataset']} run, not {dataset}")
    ds = load_dataset(dataset, **data)
    model = load_model(info, weights, ds)
    n = test_images(ds, n_images)
    feats = stage_features(model, ds, ds.test.x[:n], batch_size)
    log.info(
        "%s %s seed %d: stages %s of %d test images",
        info["arch"],
        info["label"],
        info["seed"],
        [tuple(f.shape[1:]) for f in feats],
        n,
    )
    channels, stages = model_tables(feats, info)
    write_table(channels, channels_table)
    write_table(stages, stages_table)
    log.info("wrote %d channel rows and %d stage rows", len(channels), len(stages))


# --- most-affected stages and channels --------------------------------------------------------


def _mean_over_seeds(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df.groupby(keys, sort=False, as_index=False).agg(
        value=("value", "mean"), n_seeds=("seed", "nunique")
    )


def rank_affected(channels: pd.DataFrame, teacher: str, student: str) -> pd.DataFrame:
    """Rank each method's stages and channels by how far its students' metrics moved.

    ``channels`` holds the channel tables of the pair's teacher, of the vanilla ``student`` and of
    the pair's distilled students. For method M, stage s, channel c and metric m, with t, v and x
    the teacher's, the vanilla student's and M's student's values (students averaged over seeds)
    and σ the standard deviation over the stage's channels of the teacher's and vanilla values:

    * ``shift`` = (x − v) / σ: how far M moved the value from where plain training puts it;
    * ``toward`` = (|v − t| − |x − t|) / σ: positive when M brought it closer to the teacher's.

    A channel's ``affected`` score is the mean |shift| over the metrics (``top_metric`` the one
    that moved most) and its ``toward`` the mean over metrics; a stage's scores are the means over
    its channels. ``rank`` orders each method's channels (level ``channel``) or stages (level
    ``stage``) by ``affected``, 1 the most affected.
    """
    keys = ["stage", "definition", "channel", "metric"]
    t_rows = channels[(channels.role == "teacher") & (channels.arch == teacher)]
    v_rows = channels[
        (channels.role == "student") & (channels.method == "vanilla") & (channels.arch == student)
    ]
    if t_rows.empty:
        raise KdbenchError(f"no feature table of teacher {teacher}")
    if v_rows.empty:
        raise KdbenchError(f"no feature table of a vanilla {student}: the ranking needs one")
    ref = _mean_over_seeds(t_rows, keys).rename(columns={"value": "t"}).drop(columns="n_seeds")
    van = _mean_over_seeds(v_rows, keys).rename(columns={"value": "v"}).drop(columns="n_seeds")
    base = ref.merge(van, on=keys, how="inner")
    grp = ["stage", "definition", "metric"]
    both_refs = pd.concat(
        [
            base[[*grp, "t"]].rename(columns={"t": "val"}),
            base[[*grp, "v"]].rename(columns={"v": "val"}),
        ]
    )
    sigma = both_refs.groupby(grp).val.std(ddof=0).rename("sigma").reset_index()
    sigma["sigma"] = sigma.sigma.where(sigma.sigma > 0, 1.0)  # constant over channels: unit scale
    base = base.merge(sigma, on=grp)
    rows = channels[
        (channels.role == "student")
        & (channels.teacher == teacher)
        & (channels.arch == student)
        & (channels.method != "vanilla")
    ]
    out = []
    for (method, variant, lab), group in rows.groupby(["method", "variant", "label"], sort=False):
        x = _mean_over_seeds(group, keys).rename(columns={"value": "x"})
        d = base.merge(x, on=keys, how="inner")
        d["shift"] = (d.x - d.v) / d.sigma
        d["toward"] = ((d.v - d.t).abs() - (d.x - d.t).abs()) / d.sigma
        d["abs_shift"] = d["shift"].abs()
        per_channel = d.groupby(["definition", "stage", "channel"], as_index=False).agg(
            affected=("abs_shift", "mean"),
            toward=("toward", "mean"),
            n_seeds=("n_seeds", "max"),
        )
        top = d.loc[d.groupby(["definition", "stage", "channel"]).abs_shift.idxmax()]
        per_channel = per_channel.merge(
            top[["definition", "stage", "channel", "metric"]].rename(
                columns={"metric": "top_metric"}
            ),
            on=["definition", "stage", "channel"],
        )
        per_channel["level"] = "channel"
        per_stage = per_channel.groupby(["definition", "stage"], as_index=False).agg(
            affected=("affected", "mean"), toward=("toward", "mean"), n_seeds=("n_seeds", "max")
        )
        per_stage["level"] = "stage"
        both = pd.concat([per_channel, per_stage], ignore_index=True)
        both["rank"] = (
            both.groupby(["definition", "level"])
            .affected.rank(ascending=False, method="first")
            .astype(int)
        )
        out.append(both.assign(method=method, variant=variant, label=lab))
    if not out:
        raise KdbenchError(f"no distilled {student} students of teacher {teacher}")
    result = pd.concat(out, ignore_index=True)
    result["channel"] = result["channel"].astype("Int64")
    result.insert(0, "teacher", teacher)
    result.insert(1, "student", student)
    columns = [
        "teacher",
        "student",
        "method",
        "variant",
        "label",
        "definition",
        "level",
        "stage",
        "channel",
        "rank",
        "affected",
        "toward",
        "top_metric",
        "n_seeds",
    ]
    order = {lab: i for i, lab in enumerate(dict.fromkeys(result.label))}
    result["order"] = result.label.map(order)
    result = result.sort_values(["definition", "order", "level", "rank"], ignore_index=True)
    return result[columns]


def _heatmap(
    ax: Any,
    values: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    vmin: float,
    vmax: float,
    cmap: str,
    fmt: str = "{:.2f}",
) -> Any:
    from kdbench import plots  # matplotlib only where figures are drawn

    masked = np.ma.masked_invalid(values)
    cm = plots.plt.get_cmap(cmap).with_extremes(bad="0.85")
    image = ax.imshow(masked, vmin=vmin, vmax=vmax, cmap=cm, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if values.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            text = "–" if not np.isfinite(v) else fmt.format(v)
            colour = _text_colour(cm(image.norm(v))) if np.isfinite(v) else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color=colour)
    return image


def _text_colour(rgba: Sequence[float]) -> str:
    """Black on a light cell, white on a dark one (by its luma, with BT.709's weights)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def affected_figures(
    ranking: pd.DataFrame, stages_png: str | Path, channels_png: str | Path, top_k: int
) -> None:
    """Heatmaps of the stage scores and bars of each method's top channels (corrected)."""
    from kdbench import plots  # matplotlib only where figures are drawn

    d = ranking[ranking.definition == "corrected"]
    pair = f"{d.teacher.iloc[0]} → {d.student.iloc[0]}"
    labels = list(dict.fromkeys(d.label))
    st = d[d.level == "stage"]
    cols = [f"stage {s}" for s in STAGES]
    aff = st.pivot(index="label", columns="stage", values="affected").reindex(labels)
    tow = st.pivot(index="label", columns="stage", values="toward").reindex(labels)
    fig, axes = plots.plt.subplots(1, 2, figsize=(9, 1.2 + 0.38 * len(labels)))
    vmax = float(np.nanmax(aff.to_numpy())) or 1.0
    im = _heatmap(axes[0], aff.to_numpy(), labels, cols, vmin=0, vmax=vmax, cmap="viridis")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    axes[0].set_title("how far from vanilla: mean |shift| (σ)", fontsize=9)
    lim = float(np.nanmax(np.abs(tow.to_numpy()))) or 1.0
    im = _heatmap(axes[1], tow.to_numpy(), labels, cols, vmin=-lim, vmax=lim, cmap="RdBu")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    axes[1].set_title("towards the teacher (+) or away (−) (σ)", fontsize=9)
    axes[1].set_yticks([])
    fig.suptitle(f"{pair}: stages most affected by each method (corrected metrics)", fontsize=10)
    fig.tight_layout()
    plots.save(fig, stages_png)

    ch = d[(d.level == "channel") & (d["rank"] <= top_k)]
    fig, axes = plots.panel_grid(len(labels), 3, 4.2, 0.32 * top_k + 0.5, extra_height=0.6)
    for ax, lab in zip(axes, labels, strict=True):
        g = ch[ch.label == lab].sort_values("rank", ascending=False)
        colours = ["tab:green" if t > 0 else "tab:red" for t in g.toward]
        ax.barh(range(len(g)), g.affected, color=colours)
        ax.set_yticks(
            range(len(g)),
            [f"s{s} c{c} ({m})" for s, c, m in zip(g.stage, g.channel, g.top_metric, strict=True)],
            fontsize=7,
        )
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("mean |shift| (σ)", fontsize=8)
    fig.suptitle(
        f"{pair}: top {top_k} channels per method (green: towards the teacher, red: away)",
        fontsize=10,
    )
    fig.tight_layout()
    plots.save(fig, channels_png)


def most_affected(
    *,
    channel_tables: Iterable[str | Path],
    teacher: str,
    student: str,
    top_k: int,
    table: str | Path,
    stages_plot: str | Path,
    channels_plot: str | Path,
) -> pd.DataFrame:
    """Rule ``most_affected``: the ranking table of a pair and its two figures."""
    channels = pd.concat([read_table(p) for p in channel_tables], ignore_index=True)
    ranking = rank_affected(channels, teacher, student)
    write_table(ranking, table)
    affected_figures(ranking, stages_plot, channels_plot, top_k)
    return ranking


# --- aggregation over a dataset ---------------------------------------------------------------


def column_name(row: Any) -> str:
    """A model group's column in the metric × method table."""
    if row.role == "teacher":
        return f"{row.arch} teacher"
    if row.teacher == "none":
        return f"{row.arch} {row.label}"
    return f"{row.teacher}→{row.arch} {row.label}"


def summarise_stages(stages: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (NaN for one seed) and n over seeds of every stage metric."""
    keys = ["dataset", "role", "arch", "teacher", "method", "variant", "label"]
    out = stages.groupby([*keys, "stage", "definition", "metric"], sort=False, as_index=False).agg(
        mean=("value", "mean"), std=("value", "std"), n=("seed", "nunique")
    )
    out.insert(len(keys), "column", [column_name(r) for r in out.itertuples()])
    return out


def metric_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Wide table: one row per stage × definition × metric, one "mean ± std" column per model."""
    cell = [
        f"{m:.4g}" if not np.isfinite(s) else f"{m:.4g} ± {s:.2g}"
        for m, s in zip(summary["mean"], summary["std"], strict=True)
    ]
    wide = summary.assign(cell=cell).pivot(
        index=["stage", "definition", "metric"], columns="column", values="cell"
    )
    order = list(dict.fromkeys(summary.column))
    wide = wide[order].reset_index()
    wide["metric"] = pd.Categorical(wide.metric, categories=list(KEYS), ordered=True)
    wide["definition"] = pd.Categorical(wide.definition, categories=DEFINITIONS, ordered=True)
    return wide.sort_values(["stage", "definition", "metric"], ignore_index=True).astype(
        {"metric": str, "definition": str}
    )


def correlations(stages: pd.DataFrame) -> pd.DataFrame:
    """Pearson and Spearman correlations (with p-values and n) of each stage metric with student
    test accuracy (students only: one point per run), and between metrics (every model)."""
    rows = []
    for (dataset, stage, definition), g in stages.groupby(
        ["dataset", "stage", "definition"], sort=True
    ):
        wide = g.pivot_table(
            index=["role", "arch", "teacher", "method", "variant", "seed", "test_acc"],
            columns="metric",
            values="value",
        ).reset_index()
        students = wide[wide.role == "student"]
        accuracy = students.test_acc.to_numpy(float)
        where = {"dataset": dataset, "stage": stage, "definition": definition}
        for metric in KEYS:
            if metric not in wide:
                continue
            rows.append(
                {
                    **where,
                    "kind": "metric~accuracy",
                    "x": metric,
                    "y": "test_acc",
                    **correlation(students[metric].to_numpy(float), accuracy),
                }
            )
        for i, a in enumerate(KEYS):
            for b in KEYS[i + 1 :]:
                if a in wide and b in wide:
                    rows.append(
                        {
                            **where,
                            "kind": "metric~metric",
                            "x": a,
                            "y": b,
                            **correlation(wide[a].to_numpy(float), wide[b].to_numpy(float)),
                        }
                    )
    columns = ["dataset", "stage", "definition", "kind", "x", "y", "n"]
    columns += ["pearson_r", "pearson_p", "spearman_r", "spearman_p"]
    return pd.DataFrame(rows, columns=columns)


def correlation_figures(
    corr: pd.DataFrame, accuracy_png: str | Path, metrics_png: str | Path
) -> None:
    """Heatmaps (corrected definition): metric ~ test accuracy per stage, Pearson and Spearman;
    metric ~ metric per stage, Pearson above Spearman."""
    from kdbench import plots  # matplotlib only where figures are drawn

    d = corr[corr.definition == "corrected"]
    dataset = d.dataset.iloc[0]
    acc = d[d.kind == "metric~accuracy"]
    n = int(acc.n.max()) if len(acc) else 0
    values = np.full((len(KEYS), 2 * len(STAGES)), np.nan)
    cols = []
    for j, (stat, stage) in enumerate(
        (stat, stage) for stat in ("pearson", "spearman") for stage in STAGES
    ):
        cols.append(f"{stat} s{stage}")
        for i, metric in enumerate(KEYS):
            hit = acc[(acc.stage == stage) & (acc.x == metric)]
            if len(hit):
                values[i, j] = hit[f"{stat}_r"].iloc[0]
    fig, ax = plots.plt.subplots(figsize=(6.5, 5.2))
    im = _heatmap(ax, values, list(KEYS), cols, vmin=-1, vmax=1, cmap="RdBu_r")
    fig.colorbar(im, ax=ax, shrink=0.8, label="correlation with test accuracy")
    note = "" if n >= 3 else ": at least 3 are needed, so every value is undefined"
    ax.set_title(
        f"{dataset}: stage metrics vs student test accuracy (n = {n} student runs{note})",
        fontsize=10,
    )
    fig.tight_layout()
    plots.save(fig, accuracy_png)

    mm = d[d.kind == "metric~metric"]
    k = len(KEYS)
    fig, axes = plots.plt.subplots(
        2, len(STAGES), figsize=(4.6 * len(STAGES) + 1.8, 10), layout="constrained"
    )
    index = {m: i for i, m in enumerate(KEYS)}
    for row, stat in enumerate(("pearson", "spearman")):
        for col, stage in enumerate(STAGES):
            mat = np.eye(k)
            g = mm[mm.stage == stage]
            for x, y, r in zip(g.x, g.y, g[f"{stat}_r"], strict=True):
                mat[index[x], index[y]] = mat[index[y], index[x]] = r
            ax = axes[row, col]
            im = _heatmap(
                ax, mat, list(KEYS), list(KEYS), vmin=-1, vmax=1, cmap="RdBu_r", fmt="{:.1f}"
            )
            n_models = int(g.n.max()) if len(g) else 0
            ax.set_title(f"{stat.capitalize()}, stage {stage} (n = {n_models} models)", fontsize=9)
            if col:
                ax.set_yticks([])
            if not row:
                ax.set_xticks([])
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.suptitle(f"{dataset}: correlations between metrics (corrected)", fontsize=11)
    plots.save(fig, metrics_png)


def analyse(
    *,
    stage_tables: Iterable[str | Path],
    summary_table: str | Path,
    method_table: str | Path,
    correlation_table: str | Path,
    accuracy_plot: str | Path,
    metrics_plot: str | Path,
) -> None:
    """Rule ``analyse_features`` (one dataset): summaries, correlations and their heatmaps."""
    stages = pd.concat([read_table(p) for p in stage_tables], ignore_index=True)
    if stages.dataset.nunique() != 1:
        raise KdbenchError("analyse_features takes the stage tables of one dataset")
    summary = summarise_stages(stages)
    write_table(summary, summary_table)
    write_table(metric_table(summary), method_table)
    corr = correlations(stages)
    write_table(corr, correlation_table)
    correlation_figures(corr, accuracy_plot, metrics_plot)
