"""Statistics over seeds, paired differences, the anchor table, cost and provenance."""

import json
import math

import pandas as pd
import pytest
import scipy.stats
import yaml
from conftest import REPO, fresh_imports
from matplotlib.container import ErrorbarContainer

from kdbench import anchors, config, stats, summary
from kdbench import plots as summary_plots
from kdbench.errors import KdbenchError


def test_describe_by_hand():
    d = stats.describe([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)  # squares of deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 over n − 1 = 3
    assert d["n"] == 4 and d["mean"] == 2.5 and d["std"] == pytest.approx(sd)
    assert d["ci95"] == pytest.approx(3.182446305284263 * sd / 2)  # t(0.975, 3)
    one = stats.describe([70.0])
    assert one["n"] == 1 and one["mean"] == 70.0
    assert math.isnan(one["std"]) and math.isnan(one["ci95"])
    same = stats.describe([5.0, 5.0, 5.0])
    assert same["std"] == 0.0 and same["ci95"] == 0.0
    assert stats.describe([])["n"] == 0


def test_paired_difference_by_hand():
    d = stats.paired_difference([1.0, 2.0, 4.0], [0.0, 1.0, 1.0])  # differences 1, 1, 3
    sd = math.sqrt(((1 - 5 / 3) ** 2 * 2 + (3 - 5 / 3) ** 2) / 2)
    t = (5 / 3) / (sd / math.sqrt(3))
    assert d["n"] == 3 and d["diff"] == pytest.approx(5 / 3)
    assert d["ci95"] == pytest.approx(4.302652729911275 * sd / math.sqrt(3))  # t(0.975, 2)
    assert t == pytest.approx(2.5)
    assert d["p"] == pytest.approx(2 * scipy.stats.t.sf(2.5, 2))
    constant = stats.paired_difference([2.0, 3.0], [1.0, 2.0])  # differences do not vary
    assert constant["diff"] == 1.0 and constant["ci95"] == 0.0 and math.isnan(constant["p"])
    single = stats.paired_difference([2.0], [1.0])
    assert single["diff"] == 1.0 and math.isnan(single["ci95"]) and math.isnan(single["p"])
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_difference([1.0], [1.0, 2.0])


def run(
    method, seed, acc, *, role="student", teacher="resnet20", arch="resnet8", variant="default"
):
    return {
        "role": role,
        "dataset": "digits",
        "teacher": teacher if role == "student" else "",
        "student": arch if role == "student" else "",
        "arch": arch,
        "method": method,
        "variant": variant,
        "seed": seed,
        "epochs": 4,
        "best_epoch": 4,
        "test_acc_last": acc - 1.0,
        "test_acc_best_val": acc,
        "val_acc_best": acc,
        "rank": 16.0 if method == "tucker" else math.nan,
        "batch_size": 64,
        "train_images": 1168,
        "lr": 0.05,
        "schedule": "cosine",
        "label_smoothing": 0.0,
        "T": 2.0 if method == "kd" else math.nan,
        "alpha": math.nan,
        "beta": 125.0 if method == "tucker" else math.nan,
        "train_seconds": 10.0,
        "seconds_per_epoch": 2.5,
        "peak_rss_mb": 500.0,
        "peak_cuda_mb": math.nan,
        "device": "cpu",
        "host": "h",
        "commit": "abc",
        "path": f"/r/{method}/{variant}/{seed}/metrics.json",
    }


def runs_table():
    rows = [run("vanilla", "teacher", 97.0, role="teacher", arch="resnet20")]
    rows[0]["seed"] = 0
    rows += [run("vanilla", s, a, teacher="none") for s, a in ((2, 90.0), (0, 91.0), (1, 93.0))]
    rows += [run("kd", s, a) for s, a in ((0, 92.0), (1, 95.0), (2, 90.5))]
    rows += [run("tucker", 0, 80.0, variant="full-teacher-r16")]
    return pd.DataFrame(rows, columns=summary.RUN_COLUMNS)


def test_summary_pairs_by_seed_and_marks_single_runs():
    table = summary.summarize(runs_table(), "best_val")
    kd = table[table.method == "kd"].iloc[0]
    assert kd.n == 3 and kd.seeds == "0 1 2" and kd.note == ""
    assert kd.best_val_mean == pytest.approx((92 + 95 + 90.5) / 3)
    assert kd.last_mean == pytest.approx((92 + 95 + 90.5) / 3 - 1)
    # differences by seed: 92 − 91, 95 − 93, 90.5 − 90 (not by row order)
    expected = stats.paired_difference([92, 95, 90.5], [91, 93, 90])
    assert kd.vs_vanilla == pytest.approx(expected["diff"])
    assert kd.vs_vanilla_p == pytest.approx(expected["p"])
    assert kd.vs_vanilla_n == 3 and math.isnan(kd.vs_kd)
    assert kd.teacher_acc == 97.0
    tucker = table[table.method == "tucker"].iloc[0]
    assert tucker.n == 1 and tucker.note.startswith("n < 2") and math.isnan(tucker.best_val_ci95)
    assert tucker.vs_vanilla == pytest.approx(80 - 91) and tucker.vs_vanilla_n == 1
    assert tucker.vs_kd == pytest.approx(80 - 92) and math.isnan(tucker.vs_kd_p)
    vanilla = table[table.method == "vanilla"].iloc[0]
    assert math.isnan(vanilla.vs_vanilla) and vanilla.vs_kd_n == 0  # vanilla has no teacher
    last = summary.summarize(runs_table(), "last")
    assert set(last.accuracy) == {"last"}
    assert last[last.method == "kd"].vs_vanilla.item() == pytest.approx(expected["diff"])
    with pytest.raises(KdbenchError, match="best_val or last"):
        summary.summarize(runs_table(), "max")


ANCHORS = {
    "protocols": {
        "paper": {
            "source": "a paper",
            "epochs": 240,
            "schedule": "cosine",
            "batch_size": 64,
            "train_images": 1168,
            "lr": 0.05,
            "T": 4,
            "beta": None,
            "selection": "last epoch",
            "runs": None,
        },
    },
    "rows": [
        {
            "protocol": "paper",
            "dataset": "digits",
            "teacher": "resnet20",
            "student": "resnet8",
            "method": "teacher",
            "accuracy": 98.0,
        },
        {
            "protocol": "paper",
            "dataset": "digits",
            "teacher": "resnet56",
            "student": "resnet8",
            "method": "vanilla",
            "accuracy": 90.0,
        },
        {
            "protocol": "paper",
            "dataset": "cifar100",
            "teacher": "resnet56",
            "student": "resnet20",
            "method": "kd",
            "accuracy": 70.66,
        },
        {
            "protocol": "paper",
            "dataset": "digits",
            "teacher": "resnet20",
            "student": "resnet8",
            "method": "kd",
            "accuracy": 94.0,
            "teacher_acc": 99.0,
        },
        {
            "protocol": "paper",
            "dataset": "digits",
            "teacher": "resnet20",
            "student": "resnet8",
            "method": "tucker",
            "variant": "full-teacher-r16",
            "accuracy": 85.0,
        },
    ],
}


def test_anchor_table_joins_the_right_rows(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(yaml.safe_dump(ANCHORS))
    runs = runs_table()
    table = anchors.anchor_table(path, summary.summarize(runs, "best_val"), runs)
    assert list(table.columns) == anchors.COLUMNS
    assert table.protocol_differences.iloc[-1] == "not run here"  # cifar100 last
    rows = table[table.dataset == "digits"].set_index(["method", "variant"])
    teacher = rows.loc[("teacher", "default")]
    assert teacher.measured == pytest.approx(96.0) and teacher.measured_at == "last epoch"
    # vanilla is teacher-free: the published resnet56 pair's vanilla row is our vanilla resnet8
    vanilla = rows.loc[("vanilla", "default")]
    assert vanilla.measured == pytest.approx((90 + 91 + 93) / 3 - 1) and vanilla.n == 3
    kd = rows.loc[("kd", "default")]
    assert kd.difference == pytest.approx(kd.measured - 94.0)
    assert kd.measured_teacher == pytest.approx(96.0)
    text = kd.protocol_differences
    assert "epochs: 240 there, 4 here" in text and "batch_size" not in text  # both 64
    assert "T: 4 there, 2 here" in text and "runs: not stated there, 3 here" in text
    assert "teacher accuracy: 99.00 there, 96.00 here" in text and "lr" not in text
    assert "train_images" not in text  # both 1168
    tucker = rows.loc[("tucker", "full-teacher-r16")]
    assert tucker.n == 1 and "beta: not stated there, 125 here" in tucker.protocol_differences
    # runs on a subset (train.train_size): the training images differ
    runs.loc[runs.method == "kd", "train_images"] = 300
    table = anchors.anchor_table(path, summary.summarize(runs, "best_val"), runs)
    (text,) = table[(table.dataset == "digits") & (table.method == "kd")].protocol_differences
    assert "train_images: 1168 there, 300 here" in text


def test_anchors_file_errors(tmp_path):
    path = tmp_path / "anchors.yaml"
    bad = {"protocols": {}, "rows": [{**ANCHORS["rows"][0]}]}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(KdbenchError, match="unknown protocol 'paper'"):
        anchors.load(path)
    path.write_text(yaml.safe_dump({"protocols": {}, "rows": [{"method": "kd"}]}))
    with pytest.raises(KdbenchError, match=r"rows\[0\] lacks accuracy, dataset"):
        anchors.load(path)
    with pytest.raises(KdbenchError, match="cannot read the anchors file"):
        anchors.load(tmp_path / "missing.yaml")


def test_shipped_anchors_name_known_protocols_and_variants():
    protocols, rows = anchors.load(REPO / "config" / "anchors.yaml")
    assert set(rows.protocol) <= set(protocols)
    assert len(rows) == 18 + 12 + 4
    tucker = rows[rows.method == "tucker"]
    assert set(tucker.variant) == {f"full-teacher-r{r}" for r in (32, 24, 16, 8)}


def test_protocols_fill_only_what_the_config_leaves_out():
    cfg = {"methods": {"kd": {"alpha": 0.5}, "vanilla": None}, "train": {"epochs": 3}}
    crd = config.resolve({**cfg, "protocol": "crd"})
    assert crd["train"]["epochs"] == 3 and crd["train"]["batch_size"] == 64
    assert crd["train"]["schedule"]["milestones"] == [150, 180, 210]
    assert crd["methods"]["kd"] == {"T": 4.0, "alpha": 0.5}
    assert crd["methods"]["vanilla"] == {"label_smoothing": 0.0} and "ft" not in crd["methods"]
    assert crd["accuracy"] == "last" and crd["teacher"]["label_smoothing"] == 0.0
    seed = config.resolve(cfg)
    assert seed["protocol"] == "seed" and seed["accuracy"] == "best_val"
    assert seed["methods"]["kd"]["T"] == 2.0 and seed["train"]["batch_size"] == 128
    assert config.resolve({**cfg, "accuracy": "last"})["accuracy"] == "last"
    with pytest.raises(KdbenchError, match="protocol: 'xyz' is not one of seed, crd"):
        config.resolve({**cfg, "protocol": "xyz"})


def test_cost_table_joins_benchmarks(tmp_path):
    runs = runs_table()
    directory = tmp_path / "kd"
    directory.mkdir()
    runs.loc[runs.method == "kd", "path"] = str(directory / "metrics.json")
    (directory / "benchmark.tsv").write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        "12.5\t0:00:12\t812.3\t900\t800\t805\t0\t1\t95.0\t11.0\n"
    )
    cost = summary.cost_table(runs, [directory / "benchmark.tsv"])
    kd = cost[cost.method == "kd"].iloc[0]
    assert kd.runs == 3 and kd.seconds_per_epoch == 2.5 and kd.train_seconds_total == 30.0
    # the three kd rows share one directory here, so each joins the same benchmark
    assert kd.job_seconds_total == pytest.approx(3 * 12.5) and kd.cpu_seconds_total == 33.0
    assert kd.peak_rss_mb == 500.0
    assert math.isnan(cost[cost.method == "tucker"].job_seconds_total.iloc[0])  # no benchmark


def test_cost_table_shares_a_cohorts_benchmark_among_its_members(tmp_path):
    runs = runs_table()
    kd = runs.index[runs.method == "kd"]
    members = [tmp_path / "students" / f"kd{i}" for i in range(len(kd))] + [tmp_path / "tucker"]
    runs.loc[kd, "path"] = [str(d / "metrics.json") for d in members[:3]]
    runs.loc[runs.method == "tucker", "path"] = str(members[3] / "metrics.json")
    bench = tmp_path / "cohorts" / "c0.benchmark.tsv"
    bench.parent.mkdir()
    bench.write_text("s\tmax_rss\tcpu_time\n40.0\t900.0\t36.0\n")
    cost = summary.cost_table(runs, [], {bench: members})
    row = cost[cost.method == "kd"].iloc[0]
    # 4 members: each a quarter of the job's seconds, the 3 kd runs 3 quarters
    assert row.job_seconds_total == pytest.approx(30.0) and row.cpu_seconds_total == 27.0
    assert cost[cost.method == "tucker"].job_seconds_total.item() == pytest.approx(10.0)
    assert math.isnan(cost[cost.method == "vanilla"].job_seconds_total.iloc[0])
    with pytest.raises(KdbenchError, match="cannot read benchmark"):
        summary.cost_table(runs, [], {tmp_path / "missing.tsv": members})


def test_provenance_table(tmp_path):
    paths = []
    for i, dirty in enumerate((False, True)):
        p = tmp_path / f"m{i}.json"
        prov = {
            "versions": {"torch": "2.14.1"},
            "git": {"commit": "abc", "dirty": dirty},
            "device": {"name": "AMD EPYC"},
            "host": "vm",
        }
        if dirty:  # a sample-wise Tucker run records the solver that ran
            prov["samplewise_solver"] = "svd"
        p.write_text(json.dumps({"provenance": prov, "config": {"train": {"epochs": 3}}}))
        paths.append(p)
    table = summary.provenance_table(paths)
    values = dict(zip(table["item"] + "=" + table["value"], table["runs"], strict=True))
    assert values["version: torch=2.14.1"] == 2 and values["device=AMD EPYC"] == 2
    assert values["git commit=abc"] == 1 and values["git commit=abc (uncommitted changes)"] == 1
    assert values["sample-wise Tucker solver=svd"] == 1
    digest = table[table["item"].str.startswith("config hash")]
    assert digest.runs.item() == 2 and len(digest.value.item()) == 32
    assert summary.provenance_table(paths[::-1]).value.iloc[0] == digest.value.item()
    assert config.config_hash({"a": 1, "b": 2}) == config.config_hash({"b": 2, "a": 1})


def test_correlation_against_scipy_and_undefined_cases():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.5, 5.0, 9.0]
    c = stats.correlation(x, y)
    assert c["n"] == 4 and c["pearson_r"] == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert c["spearman_r"] == pytest.approx(1.0)
    assert math.isnan(stats.correlation([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])["pearson_r"])
    short = stats.correlation([1.0, 2.0, float("nan")], [1.0, 2.0, 3.0])
    assert short["n"] == 2 and math.isnan(short["spearman_p"])


def test_the_jobs_that_write_tables_plots_and_links_start_without_torch(tmp_path):
    # importing torch is about 2 s of each job that does; a cohort member's job only links
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "metrics.json").write_text("{}")
    link = (
        "kdbench.jobs.run_job(kdbench.io.link_outputs, None, 1, "
        f"source={str(tmp_path / 'cohort')!r}, outputs=[{str(tmp_path / 'metrics.json')!r}])"
    )
    held = fresh_imports(
        "kdbench.jobs", "kdbench.summary", "kdbench.plots", "kdbench.io", then=link
    )
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert "torch" not in held and "kdbench" in held


def test_rank_chart_draws_each_spatial_truncation_as_a_line_of_its_own(monkeypatch, tmp_path):
    assert summary.rank_family("full-teacher-r16") == "full-teacher"
    assert summary.rank_family("both-r8x2x2") == "both, spatial 2×2"
    assert summary.rank_family("default") == "default"
    runs = [("tucker", "full-teacher-r4", 4), ("tucker", "full-teacher-r8", 8),
            ("tucker", "full-teacher-r8x2x2", 8), ("tucker", "full-teacher-r16x2x2", 16),
            ("tucker_recomp", "both-r8", 8), ("vanilla", "default", None)]  # fmt: skip
    table = pd.DataFrame(
        [{"dataset": "digits", "teacher": "resnet20" if m != "vanilla" else "", "arch": "resnet8",
          "role": "student", "method": m, "variant": v, "rank": r, "accuracy": "last",
          "last_mean": 90.0 + i, "last_ci95": 1.0 + 4 * i} for i, (m, v, r) in enumerate(runs)]
    )  # fmt: skip
    # a teacher of the students' architecture (of another pair), trained as vanilla is
    teacher = {**table.iloc[-1].to_dict(), "role": "teacher", "last_mean": 80.0}
    table = pd.concat([table, pd.DataFrame([teacher])], ignore_index=True)
    drawn = {}

    def save(fig, path):
        (ax,) = fig.axes
        drawn["y"] = list(ax.get_ylim())
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            line = handle[0] if isinstance(handle, tuple) else handle  # an errorbar's data line
            drawn[name] = [float(x) for x in line.get_xdata()]
        summary_plots.plt.close(fig)

    monkeypatch.setattr(summary_plots, "save", save)
    summary.rank_chart(table, tmp_path / "chart.png")
    assert drawn["tucker full-teacher"] == [4, 8]
    assert drawn["tucker full-teacher, spatial 2×2"] == [8, 16]
    assert drawn["tucker_recomp both"] == [8]
    assert [name for name in drawn if name.startswith("vanilla")] == ["vanilla resnet8: 95.00%"]
    assert 0 < drawn["y"][0] < 77 and drawn["y"][1] == 102  # 94 ± 17 cut at 100 % (+ 2)
    # more families than colours: every one drawn
    many = pd.concat([table.iloc[[0]].assign(variant=f"v{i}-r4") for i in range(25)])
    drawn.clear()
    summary.rank_chart(many, tmp_path / "chart.png")
    assert len([name for name in drawn if name.startswith("tucker v")]) == 25


def test_learning_curves_put_their_legend_below_the_panels(monkeypatch, tmp_path):
    paths = []
    for i, (method, variant) in enumerate([("kd", "default")] * 2 + [("tucker", "full-own-r4")]):
        epochs = [{"test_acc": 50.0 + e + i, "val_acc": 50.0 + e, "train_loss": 1.0 / (e + 1)}
                  for e in range(3)]  # fmt: skip
        path = tmp_path / f"run{i}.json"
        path.write_text(
            json.dumps({"run": {"method": method, "variant": variant}, "epochs": epochs})
        )
        paths.append(path)
    seen = {}

    def save(fig, path):
        seen["axes"] = [ax.get_legend() for ax in fig.axes]
        seen["figure"] = [[t.get_text() for t in legend.get_texts()] for legend in fig.legends]
        summary_plots.plt.close(fig)

    monkeypatch.setattr(summary_plots, "save", save)
    summary.learning_curves_overlay(paths, tmp_path / "curves.png", "digits")
    assert seen["axes"] == [None, None, None]
    assert seen["figure"] == [["kd (n=2)", "tucker full-own-r4 (n=1)"]]


def test_charts_of_one_epoch_show_their_points_at_epoch_1(monkeypatch, tmp_path):
    figures = []

    def save(fig, path):
        figures.append(
            [
                (list(ax.get_xticks()), [line.get_marker() for line in ax.get_lines()])
                for ax in fig.axes
            ]
        )
        summary_plots.plt.close(fig)

    monkeypatch.setattr(summary_plots, "save", save)
    for epochs in (1, 3):
        doc = [{"epoch": e + 1, "test_acc": 50.0 + e, "val_acc": 40.0 + e, "train_acc": 45.0,
                "train_loss": 1.0 / (e + 1), "val_loss": 0.9, "test_loss": 0.8}
               for e in range(epochs)]  # fmt: skip
        path = tmp_path / f"run{epochs}.json"
        path.write_text(json.dumps({"run": {"method": "kd", "variant": "default"}, "epochs": doc}))
        summary.learning_curves_overlay([path], tmp_path / "curves.png", "digits")
        summary_plots.learning_curves(doc, 1, tmp_path / "Loss.png", tmp_path / "Accuracy.png")
    one, three = figures[:3], figures[3:]
    for fig in one:  # the overlay's 3 panels, Loss.png, Accuracy.png
        for ticks, markers in fig:
            assert ticks == [1.0]
            # a line of one point needs a marker to show (the best-epoch rules need none)
            assert "o" in markers
    for fig in three:
        for ticks, markers in fig:
            assert ticks and all(t == int(t) for t in ticks), ticks  # whole epochs only
            assert "o" not in markers


def _chart_summary(rows):
    """A summary table (headline accuracy last) of (role, arch, teacher, method, mean) rows."""
    return pd.DataFrame(
        [{"dataset": "digits", "role": role, "arch": arch, "teacher": teacher, "method": method,
          "variant": "default", "n": 2, "accuracy": "last", "last_mean": mean, "last_ci95": 1.0,
          "seconds_per_epoch": 1.0 + i}
         for i, (role, arch, teacher, method, mean) in enumerate(rows)]
    )  # fmt: skip


def test_accuracy_and_cost_charts_tell_the_teachers_of_a_student_apart(monkeypatch, tmp_path):
    table = _chart_summary(
        [("teacher", "resnet20", "", "vanilla", 90.0), ("teacher", "resnet8", "", "vanilla", 70.0),
         ("teacher", "resnet56", "", "vanilla", 93.0),
         ("student", "resnet8", "none", "vanilla", 80.0),
         ("student", "resnet8", "resnet20", "kd", 82.0),
         ("student", "resnet8", "resnet8", "kd", 81.0),
         ("student", "resnet20", "resnet56", "kd", 88.0)]
    )  # fmt: skip
    table.loc[table.method == "vanilla", "last_ci95"] = math.nan  # n < 2: no interval
    panels, intervals, dots, limits = {}, {}, {}, {}

    def save(fig, path):
        for ax in fig.axes:
            if ax.get_title():
                handles, names = ax.get_legend_handles_labels()
                panels[ax.get_title()] = dict(zip(names, handles, strict=True))
                limits[ax.get_title()] = ax.get_xlim()
                for whiskers in ax.containers:  # the accuracy chart's intervals, lowest first
                    assert isinstance(whiskers, ErrorbarContainer)  # no bars
                    segments = whiskers.lines[2][0].get_segments()
                    widths = [float(s[1][0] - s[0][0]) if len(s) else 0 for s in segments]
                    intervals[ax.get_title()] = [round(w, 6) for w in widths]
                if ax.collections and ax.containers:
                    dots[ax.get_title()] = ax.collections[-1].get_offsets()[:, 0].tolist()
        summary_plots.plt.close(fig)

    monkeypatch.setattr(summary_plots, "save", save)
    summary.accuracy_chart(table, tmp_path / "accuracy.png")
    # each panel the teachers of its own students, each in a colour of its own
    resnet8 = panels.pop("digits: resnet8")
    assert set(resnet8) == {"teacher resnet20: 90.00%", "teacher resnet8: 70.00%"}
    assert len({line.get_color() for line in resnet8.values()}) == 2
    assert set(panels.pop("digits: resnet20")) == {"teacher resnet56: 93.00%"}
    # vanilla 80 (no interval), kd ← resnet8 81, kd ← resnet20 82: a dot at each mean, ±1
    # whiskers, none of width 0 for vanilla
    assert dots == {"digits: resnet8": [80.0, 81.0, 82.0], "digits: resnet20": [88.0]}
    assert intervals == {"digits: resnet8": [0, 2.0, 2.0], "digits: resnet20": [2.0]}
    # from 5 below the lowest interval or teacher line: the resnet8 teacher's 70, 88 - 1
    assert limits == {"digits: resnet8": (65.0, 100.0), "digits: resnet20": (82.0, 100.0)}
    cost = pd.DataFrame([{"dataset": "digits", "device": "cpu"}])
    summary.cost_chart(cost, table, tmp_path / "cost.png")
    # a panel per student: its teachers by marker, its methods by colour (alike in both panels)
    resnet8 = {k: v[0] for k, v in panels.pop("digits: resnet8 (cpu)").items()}
    assert set(resnet8) == {"vanilla", "kd ← resnet20", "kd ← resnet8"}
    assert resnet8["kd ← resnet20"].get_marker() != resnet8["kd ← resnet8"].get_marker()
    assert resnet8["kd ← resnet20"].get_color() == resnet8["kd ← resnet8"].get_color()
    resnet20 = {k: v[0] for k, v in panels.pop("digits: resnet20 (cpu)").items()}
    assert set(resnet20) == {"kd"}  # one teacher: no arrow
    assert resnet20["kd"].get_color() == resnet8["kd ← resnet20"].get_color()
    assert not panels


@pytest.mark.parametrize(
    ("losses", "labels"),
    [
        ([7.0, 3.5, 1.2], {"2", "3", "4", "5", "6", "7"}),  # less than a decade: minor ticks too
        ([3.0, 0.05, 0.004], {"0.01", "0.1", "1"}),  # decades: 10^k only
    ],
)
def test_the_train_loss_panel_is_labelled_in_plain_numbers(monkeypatch, tmp_path, losses, labels):
    epochs = [{"test_acc": 50.0, "val_acc": 50.0, "train_loss": v} for v in losses]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"run": {"method": "kd", "variant": "default"}, "epochs": epochs}))
    seen = {}

    def save(fig, path):
        fig.canvas.draw()
        ax = fig.axes[2]
        seen["labels"] = {t.get_text() for t in ax.yaxis.get_ticklabels(which="both")} - {""}
        seen["limits"] = ax.get_ylim()
        summary_plots.plt.close(fig)

    monkeypatch.setattr(summary_plots, "save", save)
    summary.learning_curves_overlay([path], tmp_path / "curves.png", "digits")
    # "6", not "6×10⁰"; "0.01", not "10⁻²"
    assert all(not any(c in x for c in "$^×") for x in seen["labels"]), seen
    low, high = seen["limits"]
    assert labels <= {x for x in seen["labels"] if low <= float(x) <= high}, seen
