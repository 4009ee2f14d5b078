"""Diagnostic figures of one teacher → student pair (rule ``diagnose``).

The teacher and one seed's student of every method are run on the same test images; the figures
put them side by side, one row per model:

* ``attention``: attention maps of a few fixed test images per stage (:func:`attention_map`);
* ``spectra``: centred log-magnitude Fourier spectra, averaged over images and channels;
* ``changed_spectra``: the same per channel, teacher beside student, for the channels that the
  ``most_affected`` ranking lists first for each method;
* ``histograms``: activation histograms, teacher and student overlaid, per stage;
* ``channels``: the first 16 channels of one image per stage as a 4×4 grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from kdbench import plots
from kdbench.analysis import (
    STAGES,
    load_model,
    model_info,
    read_table,
    stage_features,
    test_images,
)
from kdbench.data import Dataset, load_dataset
from kdbench.errors import KdbenchError

log = logging.getLogger("kdbench")

#: activation values per stage and model kept for the histograms
HISTOGRAM_SAMPLE = 200_000


def attention_map(fmap: Tensor, tau: float = 0.5) -> Tensor:
    """B×C×H×W → B×H×W: softmax over the H·W positions of the channel mean divided by ``tau``,
    times H·W (so a uniform map is 1 everywhere)."""
    if tau <= 0:
        raise KdbenchError(f"the attention temperature must be positive, got {tau}")
    a = fmap.float().mean(1)
    b, h, w = a.shape
    return torch.softmax(a.reshape(b, -1) / tau, dim=1).reshape(b, h, w) * (h * w)


def log_spectra(fmap: Tensor) -> Tensor:
    """N×C×H×W → C×H×W: log(1 + |F|) of the centred 2-D spectrum, averaged over the images."""
    f = torch.fft.fftshift(torch.fft.fft2(fmap.double()), dim=(-2, -1))
    return torch.log1p(f.abs()).mean(0)


def channel_grid(fmap: Tensor, side: int = 4) -> np.ndarray:
    """C×H×W → a side×side mosaic of the first side² channels, each scaled by its own maximum
    |value| (an all-zero channel stays 0), with one-pixel NaN gaps."""
    c, h, w = fmap.shape
    grid = np.full((side * (h + 1) - 1, side * (w + 1) - 1), np.nan)
    for k in range(min(c, side * side)):
        ch = fmap[k].double().numpy()
        peak = np.abs(ch).max()
        i, j = divmod(k, side)
        grid[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = (
            ch / peak if peak > 0 else ch
        )
    return grid


def _tile(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Maps of one size side by side with one-pixel NaN gaps (H×W or H×W×3)."""
    gap = np.full((maps[0].shape[0], 1, *maps[0].shape[2:]), np.nan)
    parts: list[np.ndarray] = []
    for m in maps:
        parts += [m, gap]
    return np.concatenate(parts[:-1], axis=1)


@dataclass
class ModelView:
    """What the figures need of one model (its features are not kept)."""

    info: dict[str, Any]
    attention: list[np.ndarray] = field(default_factory=list)  # per stage: tiled maps
    spectra: list[np.ndarray] = field(default_factory=list)  # per stage: C×H×W
    values: list[np.ndarray] = field(default_factory=list)  # per stage: activation sample
    grids: list[np.ndarray] = field(default_factory=list)  # per stage: channel mosaic

    @property
    def name(self) -> str:
        i = self.info
        return f"{i['arch']} {i['label']}"


def view_model(
    info: dict[str, Any],
    weights: str | Path,
    ds: Dataset,
    n: int,
    shown: Tensor,
    tau: float,
    batch_size: int,
) -> ModelView:
    model = load_model(info, weights, ds)
    view = ModelView(info)
    g = torch.Generator().manual_seed(0)
    for fmap in stage_features(model, ds, ds.test.x[:n], batch_size):
        view.spectra.append(log_spectra(fmap).numpy())
        flat = fmap.flatten()
        if flat.numel() > HISTOGRAM_SAMPLE:
            flat = flat[torch.randperm(flat.numel(), generator=g)[:HISTOGRAM_SAMPLE]]
        view.values.append(flat.numpy())
    for fmap in stage_features(model, ds, shown, batch_size):
        view.attention.append(_tile(list(attention_map(fmap, tau).numpy())))
        view.grids.append(channel_grid(fmap[0]))
    return view


def _image_row(shown: Tensor) -> np.ndarray:
    """The shown test images side by side as one RGB image (white gaps)."""
    imgs = shown.numpy()
    if imgs.shape[1] == 1:
        imgs = np.repeat(imgs, 3, axis=1)
    return np.nan_to_num(_tile([im.transpose(1, 2, 0) for im in imgs]), nan=1.0)


def _column_norms(panels: Sequence[Sequence[np.ndarray]]) -> list[tuple[float, float]]:
    """Per stage: the colour range shared by every model."""
    return [
        (
            min(float(np.nanmin(p[s])) for p in panels),
            max(float(np.nanmax(p[s])) for p in panels),
        )
        for s in range(len(STAGES))
    ]


def _stage_mosaic(
    views: Sequence[ModelView],
    panels: Sequence[list[np.ndarray]],
    title: str,
    cmap: str,
    *,
    norms: Sequence[tuple[float, float] | None] | None = None,
    colorbars: bool = True,
    cell: int = plots.CELL,
    top: np.ndarray | None = None,
) -> Any:
    """Rows = models (after an optional ``top`` row), columns = stages."""
    cells: list[list[np.ndarray | None]] = [list(p) for p in panels]
    names = [v.name for v in views]
    if top is not None:
        cells.insert(0, [top, None, None])
        names.insert(0, "input")
    return plots.mosaic(
        cells,
        names,
        [f"stage {s}" for s in STAGES],
        list(norms) if norms is not None else _column_norms(panels),
        cmap,
        title,
        colorbars=colorbars,
        cell=cell,
    )


def attention_figure(views: Sequence[ModelView], shown: Tensor, tau: float) -> Any:
    return _stage_mosaic(
        views,
        [v.attention for v in views],
        f"attention maps (channel mean → softmax(x/τ)·H·W, τ = {tau}; 1 = uniform) "
        "of the test images in the top row",
        "inferno",
        top=_image_row(shown),
    )


def spectra_figure(views: Sequence[ModelView]) -> Any:
    return _stage_mosaic(
        views,
        [[s.mean(0) for s in v.spectra] for v in views],
        "centred log-magnitude spectra log(1+|F|), mean over images and channels "
        "(zero frequency at the centre)",
        "magma",
    )


def channels_figure(views: Sequence[ModelView], image: int) -> Any:
    return _stage_mosaic(
        views,
        [v.grids for v in views],
        f"channels 0–15 of test image {image}, each scaled by its own maximum",
        "viridis",
        norms=[(0.0, 1.0)] * len(STAGES),
        colorbars=False,
        cell=3 * plots.CELL,
    )


def histogram_figure(teacher: ModelView, students: Sequence[ModelView]) -> Any:
    rows = len(students)
    fig, axes = plots.plt.subplots(
        rows,
        len(STAGES),
        figsize=(3.6 * len(STAGES), 0.8 + 1.3 * rows),
        squeeze=False,
        sharex="col",
    )
    for s, stage in enumerate(STAGES):
        hi = max(float(v.values[s].max()) for v in (teacher, *students))
        lo = min(float(v.values[s].min()) for v in (teacher, *students))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 61)
        t_counts, _ = np.histogram(teacher.values[s], bins=bins)
        for r, view in enumerate(students):
            counts, _ = np.histogram(view.values[s], bins=bins)
            ax = axes[r, s]
            ax.stairs(t_counts + 0.5, bins, baseline=0.5, fill=True, color="0.7")
            ax.stairs(counts + 0.5, bins, baseline=0.5, color="tab:blue")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(plots.matplotlib.ticker.LogLocator(numticks=3))
            ax.yaxis.set_minor_locator(plots.matplotlib.ticker.NullLocator())
            ax.tick_params(labelsize=7)
            ax.text(0.98, 0.92, view.name, transform=ax.transAxes, ha="right", va="top", fontsize=7)
            if r == 0:
                ax.set_title(f"stage {stage}", fontsize=9)
    handles = [
        plots.plt.Rectangle((0, 0), 1, 1, color="0.7"),
        plots.plt.Line2D([0], [0], color="tab:blue"),
    ]
    fig.legend(
        handles,
        [f"teacher {teacher.name}", "student (named in each panel)"],
        loc="lower center",
        ncol=2,
    )
    fig.suptitle("activation histograms per stage, teacher vs student (log counts)", fontsize=10)
    height = fig.get_figheight()
    fig.subplots_adjust(
        left=0.06, right=0.98, top=1 - 0.75 / height, bottom=0.5 / height, hspace=0.3
    )
    return fig


def changed_spectra_figure(
    teacher: ModelView, students: Sequence[ModelView], ranking: pd.DataFrame, k: int
) -> Any:
    """Per distilled student: its top-``k`` most-affected channels, teacher | student spectra."""
    ranked = ranking[(ranking.definition == "corrected") & (ranking.level == "channel")]
    rows = [v for v in students if v.info["label"] in set(ranked.label)]
    if not rows:
        raise KdbenchError("the most-affected table ranks none of the students shown")
    cells: list[list[np.ndarray | None]] = []
    names = []
    for view in rows:
        top = ranked[ranked.label == view.info["label"]].sort_values("rank").head(k)
        row: list[np.ndarray | None] = [None] * (2 * k)
        where = [(int(s), int(c)) for s, c in zip(top.stage, top.channel, strict=True)]
        for j, (stage, channel) in enumerate(where):
            t = teacher.spectra[stage - 1][channel]
            x = view.spectra[stage - 1][channel]
            lo, hi = float(min(t.min(), x.min())), float(max(t.max(), x.max()))
            for c, image in enumerate((t, x)):  # each pair on its own shared range
                row[2 * j + c] = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
        cells.append(row)
        names.append(
            f"{view.name}: "
            + ", ".join(f"s{s} c{c}" for s, c in zip(top.stage, top.channel, strict=True))
        )
    titles = [f"#{j + 1} {who}" for j in range(k) for who in ("teacher", "student")]
    return plots.mosaic(
        cells,
        names,
        titles,
        [(0.0, 1.0)] * (2 * k),
        "magma",
        f"log-magnitude spectra of each method's {k} most-affected channels (s: stage, c: channel)"
        "\nranking by corrected metrics, mean over seeds; teacher beside student, each pair "
        "scaled to its joint range",
        colorbars=False,
    )


def diagnose(
    *,
    dataset: str,
    data: dict[str, Any],
    weights: Sequence[str | Path],
    run_metrics: Sequence[str | Path],
    affected_table: str | Path,
    checkpoint: str,
    n_images: int,
    images: Sequence[int],
    tau: float,
    spectra_channels: int,
    batch_size: int,
    outputs: dict[str, str | Path],
) -> None:
    """Rule ``diagnose``: the teacher (first of ``weights``/``run_metrics``) and its students."""
    if len(weights) != len(run_metrics) or len(weights) < 2:
        raise KdbenchError("diagnose needs the teacher and at least one student, weights and runs")
    ds = load_dataset(dataset, **data)
    infos = [model_info(p, checkpoint) for p in run_metrics]
    if infos[0]["role"] != "teacher" or any(i["role"] != "student" for i in infos[1:]):
        raise KdbenchError("diagnose takes the teacher first, then students")
    bad = [i for i in images if not 0 <= int(i) < len(ds.test)]
    if bad:
        raise KdbenchError(
            f"analysis.images: {bad} out of range ({dataset} has {len(ds.test)} test images)"
        )
    n = test_images(ds, n_images)
    shown = ds.test.x[torch.tensor([int(i) for i in images])]
    views = [
        view_model(info, w, ds, n, shown, tau, batch_size)
        for info, w in zip(infos, weights, strict=True)
    ]
    log.info("diagnostics of %d models on %d test images", len(views), n)
    teacher, students = views[0], views[1:]
    ranking = read_table(affected_table)
    plots.save(attention_figure(views, shown, tau), outputs["attention"])
    plots.save(spectra_figure(views), outputs["spectra"])
    plots.save(
        changed_spectra_figure(teacher, students, ranking, spectra_channels),
        outputs["changed_spectra"],
    )
    plots.save(histogram_figure(teacher, students), outputs["histograms"])
    plots.save(channels_figure(views, int(images[0])), outputs["channels"])
