"""The feature-map analysis stage: tables, most-affected ranking, correlations, diagnostics."""

import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fresh_imports, train_digits

from kdbench import analysis, diagnostics, metrics
from kdbench.errors import KdbenchError

DATA = {"image_size": 8}
INFO = {
    "dataset": "digits",
    "role": "student",
    "arch": "resnet8",
    "teacher": "resnet20",
    "method": "kd",
    "variant": "default",
    "label": "kd",
    "seed": 0,
    "test_acc": 91.5,
}


def fake_features(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.relu(torch.randn(n, c, s, s, generator=g)) for c, s in ((16, 8), (32, 4), (64, 2))
    ]


def test_model_tables_schema():
    channels, stages = analysis.model_tables(fake_features(), INFO)
    assert list(channels.columns) == analysis.CHANNEL_COLUMNS
    assert list(stages.columns) == analysis.STAGE_COLUMNS
    n_metrics = len(metrics.KEYS)
    assert len(channels) == (16 + 32 + 64) * n_metrics * 2
    assert len(stages) == 3 * n_metrics * 2
    assert set(channels.definition) == {"corrected", "legacy"}
    assert channels.groupby("stage").channel.nunique().to_dict() == {1: 16, 2: 32, 3: 64}
    assert (stages.test_acc == 91.5).all() and (channels.method == "kd").all()
    assert np.isfinite(channels.value).all() and np.isfinite(stages.value).all()
    # the stage rows are feature_metrics of the whole stage, the channel rows of each channel
    whole = metrics.feature_metrics(fake_features()[1], "legacy")
    row = stages[(stages.stage == 2) & (stages.definition == "legacy")]
    assert dict(zip(row.metric, row.value, strict=True)) == pytest.approx(whole)


def channel_rows(label, method, role, arch, teacher, values, seed=0):
    """A channel table of one stage, two channels, metrics mean and std."""
    rows = []
    for (channel, metric), value in values.items():
        rows.append(
            {
                "dataset": "digits",
                "role": role,
                "arch": arch,
                "teacher": teacher,
                "method": method,
                "variant": "default",
                "label": label,
                "seed": seed,
                "stage": 3,
                "definition": "corrected",
                "channel": channel,
                "metric": metric,
                "value": value,
            }
        )
    return rows


def test_rank_affected_by_hand():
    # teacher and vanilla differ on channel 0; σ over channels of (teacher ∪ vanilla) values
    t = {(0, "mean"): 4.0, (1, "mean"): 1.0, (0, "std"): 2.0, (1, "std"): 2.0}
    v = {(0, "mean"): 0.0, (1, "mean"): 1.0, (0, "std"): 2.0, (1, "std"): 2.0}
    towards = {(0, "mean"): 3.0, (1, "mean"): 1.0, (0, "std"): 2.0, (1, "std"): 2.0}
    away = {(0, "mean"): 0.0, (1, "mean"): 3.0, (0, "std"): 2.0, (1, "std"): 2.0}
    rows = channel_rows("teacher", "teacher", "teacher", "resnet20", "none", t)
    rows += channel_rows("vanilla", "vanilla", "student", "resnet8", "none", v)
    rows += channel_rows("vanilla", "vanilla", "student", "resnet8", "none", v, seed=1)
    rows += channel_rows("kd", "kd", "student", "resnet8", "resnet20", towards)
    rows += channel_rows("ft", "ft", "student", "resnet8", "resnet20", away)
    ranking = analysis.rank_affected(pd.DataFrame(rows), "resnet20", "resnet8")
    sigma = np.std([4.0, 1.0, 0.0, 1.0])  # "mean" over channels of teacher and vanilla
    kd = ranking[(ranking.label == "kd") & (ranking.level == "channel")].set_index("channel")
    # channel 0: mean moved 0 → 3 (teacher 4): shift 3/σ, toward (4 − 1)/σ; std is constant (σ=1)
    assert kd.loc[0, "affected"] == pytest.approx((3 / sigma + 0) / 2)
    assert kd.loc[0, "toward"] == pytest.approx((3 / sigma + 0) / 2)
    assert (
        kd.loc[0, "rank"] == 1 and kd.loc[1, "affected"] == 0 and kd.loc[0, "top_metric"] == "mean"
    )
    ft = ranking[(ranking.label == "ft") & (ranking.level == "channel")].set_index("channel")
    # channel 1: mean moved 1 → 3 while the teacher's is 1: away from it
    assert ft.loc[1, "rank"] == 1 and ft.loc[1, "toward"] == pytest.approx(-(2 / sigma) / 2)
    stage = ranking[(ranking.label == "kd") & (ranking.level == "stage")]
    assert stage.affected.item() == pytest.approx(kd.affected.mean())
    assert stage.channel.isna().all() and set(ranking.n_seeds) == {1}
    assert list(dict.fromkeys(ranking.label)) == ["kd", "ft"]  # input order is kept


def test_rank_affected_needs_the_references():
    v = {(0, "mean"): 0.0}
    rows = channel_rows("vanilla", "vanilla", "student", "resnet8", "none", v)
    with pytest.raises(KdbenchError, match="teacher resnet20"):
        analysis.rank_affected(pd.DataFrame(rows), "resnet20", "resnet8")
    rows = channel_rows("teacher", "teacher", "teacher", "resnet20", "none", v)
    with pytest.raises(KdbenchError, match="vanilla resnet8"):
        analysis.rank_affected(pd.DataFrame(rows), "resnet20", "resnet8")


def stage_table(n=6):
    rows = []
    for seed in range(n):
        acc = 80.0 + seed
        for stage in (1, 2, 3):
            for definition in ("corrected", "legacy"):
                values = {key: 1.0 for key in metrics.KEYS}
                values.update(mean=2 * acc, std=-acc, kurtosis=float((seed * 7) % 5))
                for metric, value in values.items():
                    rows.append(
                        {
                            **INFO,
                            "seed": seed,
                            "test_acc": acc,
                            "stage": stage,
                            "definition": definition,
                            "metric": metric,
                            "value": value,
                        }
                    )
    return pd.DataFrame(rows, columns=analysis.STAGE_COLUMNS)


def test_correlations_with_accuracy_and_between_metrics():
    corr = analysis.correlations(stage_table())
    acc = corr[
        (corr.kind == "metric~accuracy") & (corr.stage == 1) & (corr.definition == "corrected")
    ]
    acc = acc.set_index("x")
    assert acc.loc["mean", "pearson_r"] == pytest.approx(1.0)
    assert acc.loc["mean", "spearman_r"] == pytest.approx(1.0)
    assert acc.loc["std", "pearson_r"] == pytest.approx(-1.0)
    assert acc.loc["mean", "n"] == 6
    assert math.isnan(acc.loc["iqr", "pearson_r"])  # constant metric: undefined, not an error
    x = np.arange(6.0)
    expected = np.corrcoef(x, (x * 7) % 5)[0, 1]
    assert acc.loc["kurtosis", "pearson_r"] == pytest.approx(expected)
    mm = corr[(corr.kind == "metric~metric") & (corr.stage == 3) & (corr.definition == "legacy")]
    k = len(metrics.KEYS)
    assert len(mm) == k * (k - 1) // 2
    pair = mm[(mm.x == "mean") & (mm.y == "std")]
    assert pair.pearson_r.item() == pytest.approx(-1.0)


def test_summary_and_metric_table():
    stages = stage_table(3)
    summary = analysis.summarise_stages(stages)
    row = summary[
        (summary.metric == "mean") & (summary.stage == 2) & (summary.definition == "corrected")
    ]
    assert row["mean"].item() == pytest.approx(162.0) and row["n"].item() == 3
    assert row["std"].item() == pytest.approx(2.0)
    assert row.column.item() == "resnet20→resnet8 kd"
    wide = analysis.metric_table(summary)
    assert list(wide.columns) == ["stage", "definition", "metric", "resnet20→resnet8 kd"]
    assert len(wide) == 3 * 2 * len(metrics.KEYS)
    assert wide.metric.tolist()[: len(metrics.KEYS)] == list(metrics.KEYS)
    cell = wide[(wide.stage == 2) & (wide.definition == "corrected") & (wide.metric == "mean")]
    assert cell.iloc[0, -1] == "162 ± 2"


def test_attention_map():
    fmap = torch.rand(2, 3, 4, 5)
    att = diagnostics.attention_map(fmap, tau=0.5)
    assert att.shape == (2, 4, 5)
    assert att.sum(dim=(1, 2)) == pytest.approx(torch.full((2,), 20.0))
    expected = torch.softmax(fmap.mean(1).flatten(1) / 0.5, dim=1).view(2, 4, 5) * 20
    assert torch.allclose(att, expected)
    assert torch.allclose(diagnostics.attention_map(torch.ones(1, 2, 3, 3)), torch.ones(1, 3, 3))
    with pytest.raises(KdbenchError, match="temperature"):
        diagnostics.attention_map(fmap, tau=0)


def test_channel_grid_and_spectra():
    fmap = torch.zeros(16, 3, 3)
    fmap[1, 0, 0] = 5.0
    grid = diagnostics.channel_grid(fmap)
    assert grid.shape == (4 * 4 - 1, 4 * 4 - 1)
    assert grid[0, 4] == 1.0 and np.nanmax(grid) == 1.0 and np.isnan(grid[3, 0])
    spectra = diagnostics.log_spectra(torch.ones(2, 1, 4, 4))
    assert spectra.shape == (1, 4, 4)
    assert spectra[0, 2, 2] == pytest.approx(math.log1p(16))  # DC at the centre after fftshift
    assert spectra.sum() == pytest.approx(math.log1p(16))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet20 teacher, two vanilla students and one kd student, 1 epoch each, measured."""
    root = tmp_path_factory.mktemp("analysis")
    runs = {
        "teacher": {"role": "teacher", "arch": "resnet20", "variant": "teacher"},
        "vanilla0": {},
        "vanilla1": {"seed": 1},
        "kd0": {"method": "kd", "teacher": "resnet20"},
    }
    paths = {}
    for name, overrides in runs.items():
        directory = root / name
        if name == "kd0":
            overrides["teacher_weights"] = paths["teacher"] / "model_best.pt"
        train_digits(directory, **overrides)
        analysis.extract(
            dataset="digits",
            data=DATA,
            weights=directory / "model_best.pt",
            run_metrics=directory / "metrics.json",
            n_images=100,
            checkpoint="best",
            batch_size=64,
            channels_table=directory / "features" / "channels.parquet",
            stages_table=directory / "features" / "stages.csv",
        )
        paths[name] = directory
    return root, paths


def test_extract_writes_tidy_tables(trained):
    _, paths = trained
    channels = pd.read_parquet(paths["kd0"] / "features" / "channels.parquet")
    stages = pd.read_csv(paths["teacher"] / "features" / "stages.csv")
    assert list(channels.columns) == analysis.CHANNEL_COLUMNS
    assert list(stages.columns) == analysis.STAGE_COLUMNS
    assert set(channels.method) == {"kd"} and set(channels.teacher) == {"resnet20"}
    assert set(stages.role) == {"teacher"} and set(stages.label) == {"teacher"}
    assert set(stages.arch) == {"resnet20"} and stages.test_acc.between(0, 100).all()
    assert len(channels) == 112 * len(metrics.KEYS) * 2 and np.isfinite(channels.value).all()


def png_size(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image[..., :3].std() > 0.01, f"{path} is blank"
    return image.shape[0], image.shape[1]


def test_most_affected_analyse_and_diagnose_figures(trained, tmp_path):
    _, paths = trained
    order = ["teacher", "vanilla0", "vanilla1", "kd0"]
    ranking = analysis.most_affected(
        channel_tables=[paths[k] / "features" / "channels.parquet" for k in order],
        teacher="resnet20",
        student="resnet8",
        top_k=4,
        table=tmp_path / "most_affected.csv",
        stages_plot=tmp_path / "stages.png",
        channels_plot=tmp_path / "channels.png",
    )
    assert set(ranking.label) == {"kd"} and set(ranking.n_seeds) == {1}
    channel_level = ranking[(ranking.level == "channel") & (ranking.definition == "corrected")]
    assert sorted(channel_level["rank"]) == list(range(1, 113))
    assert png_size(tmp_path / "stages.png")[0] > 150
    assert png_size(tmp_path / "channels.png")[0] > 150

    analysis.analyse(
        stage_tables=[paths[k] / "features" / "stages.csv" for k in order],
        summary_table=tmp_path / "stage_metrics.csv",
        method_table=tmp_path / "metric_table.csv",
        correlation_table=tmp_path / "correlations.csv",
        accuracy_plot=tmp_path / "corr_acc.png",
        metrics_plot=tmp_path / "corr_metrics.png",
    )
    table = pd.read_csv(tmp_path / "metric_table.csv")
    assert list(table.columns[3:]) == ["resnet20 teacher", "resnet8 vanilla", "resnet20→resnet8 kd"]
    corr = pd.read_csv(tmp_path / "correlations.csv")
    assert set(corr.n[corr.kind == "metric~accuracy"]) == {3}  # three student runs
    h, w = png_size(tmp_path / "corr_acc.png")
    assert h > 300 and w > 400
    h, w = png_size(tmp_path / "corr_metrics.png")
    assert h > 600 and w > 900

    outputs = {k: tmp_path / f"{k}.png" for k in ("attention", "spectra", "changed_spectra")}
    outputs |= {k: tmp_path / f"{k}.png" for k in ("histograms", "channels")}
    shown = ["teacher", "vanilla0", "kd0"]
    diagnostics.diagnose(
        dataset="digits",
        data=DATA,
        weights=[paths[k] / "model_best.pt" for k in shown],
        run_metrics=[paths[k] / "metrics.json" for k in shown],
        affected_table=tmp_path / "most_affected.csv",
        checkpoint="best",
        n_images=50,
        images=[0, 5],
        tau=0.5,
        spectra_channels=2,
        batch_size=32,
        outputs=outputs,
    )
    sizes = {k: png_size(p) for k, p in outputs.items()}
    # one row per model (+ the input images) of cells about plots.CELL pixels high
    assert sizes["attention"][0] >= 4 * diagnostics.plots.CELL
    assert sizes["spectra"][0] >= 3 * diagnostics.plots.CELL
    assert sizes["channels"][0] >= 3 * 2 * diagnostics.plots.CELL
    assert sizes["changed_spectra"][1] >= 4 * diagnostics.plots.CELL  # 2 channels × 2 models
    assert sizes["histograms"][0] > 200


def test_diagnose_rejects_bad_input(trained, tmp_path):
    _, paths = trained
    kwargs = {
        "dataset": "digits",
        "data": DATA,
        "weights": [paths["teacher"] / "model_best.pt", paths["kd0"] / "model_best.pt"],
        "run_metrics": [paths["teacher"] / "metrics.json", paths["kd0"] / "metrics.json"],
        "affected_table": tmp_path / "missing.csv",
        "checkpoint": "best",
        "n_images": 20,
        "images": [0, 10_000],
        "tau": 0.5,
        "spectra_channels": 2,
        "batch_size": 32,
        "outputs": {},
    }
    with pytest.raises(KdbenchError, match=r"analysis.images: \[10000\] out of range"):
        diagnostics.diagnose(**kwargs)
    kwargs["run_metrics"] = kwargs["run_metrics"][::-1]
    kwargs["images"] = [0]
    with pytest.raises(KdbenchError, match="teacher first"):
        diagnostics.diagnose(**kwargs)


def test_model_info_refuses_unfinished_runs(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"status": "running", "run": {}}')
    with pytest.raises(KdbenchError, match="not a finished run"):
        analysis.model_info(path)


def test_feature_extraction_does_not_import_scipy():
    # scipy.stats and scipy.ndimage took a fifth of each extraction job; numpy and torch do it
    then = "kdbench.metrics.per_channel_metrics(torch.rand(2, 3, 5, 4), 'legacy')"
    held = fresh_imports("torch", "kdbench.jobs", "kdbench.analysis", then=then)
    assert "kdbench.metrics" in held and not {"scipy.stats", "scipy.ndimage"} & held


def test_heatmap_numbers_are_white_on_dark_cells_and_black_on_light_ones():
    from kdbench import plots

    fig, ax = plots.plt.subplots()
    values = np.array([[0.0, 1.0], [-1.0, np.nan]])
    analysis._heatmap(ax, values, ["a", "b"], ["x", "y"], vmin=-1, vmax=1, cmap="RdBu")
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    # RdBu: near white in the middle, dark red and dark blue at the ends; a missing value grey
    assert colours == {"0.00": "black", "1.00": "white", "-1.00": "white", "–": "black"}
    ax.clear()
    analysis._heatmap(ax, values[:1], ["a"], ["x", "y"], vmin=0, vmax=1, cmap="viridis")
    # viridis: dark purple at 0, yellow at 1
    assert [t.get_color() for t in ax.texts] == ["white", "black"]
    plots.plt.close(fig)
