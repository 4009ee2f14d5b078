"""The demo workflow end to end in a temporary directory (a few minutes on 2 cores)."""

import json
import os
import shutil
import subprocess

import matplotlib.image
import pandas as pd
import pytest
import yaml
from conftest import REPO, job_counts, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    shutil.copy(REPO / "config" / "demo.yaml", work / "demo.yaml")
    proc = snakemake("--cores", "2", "--configfile", "demo.yaml", cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


def test_every_output_is_written(demo):
    results = demo / "results"
    runs = sorted(results.glob("digits/teachers/**/metrics.json"))
    runs += sorted(results.glob("digits/students/**/metrics.json"))
    # teacher + (vanilla, kd, featuremap, ft, tucker × 2, tucker_recomp × 3) × 2 seeds
    assert len(runs) == 1 + 9 * 2
    for metrics in runs:
        doc = json.loads(metrics.read_text())
        assert doc["status"] == "complete"
        for name in ("model_final.pt", "model_best.pt", "Loss.png", "Accuracy.png"):
            assert (metrics.parent / name).stat().st_size > 0
    assert not list((results / "state").rglob("*.pt"))  # no leftover training state
    summary = pd.read_csv(results / "summary" / "summary.csv")
    students = summary[summary.role == "student"]
    methods = {"vanilla", "kd", "featuremap", "ft", "tucker", "tucker_recomp"}
    assert set(students.method) == methods
    assert set(students[students.method == "tucker"].variant) == {
        "full-teacher-r16",
        "sample-teacher-r16",
    }
    # digits is learnt in a few epochs by every method
    assert (students.best_val_mean > 80).all()
    assert set(students.n) == {2} and students.best_val_ci95.notna().all()
    kd = students[students.method == "kd"].iloc[0]
    assert kd.vs_vanilla_n == 2 and kd.teacher_acc > 80
    table = pd.read_csv(results / "summary" / "runs.csv")
    assert len(table) == 19 and table.commit.notna().all()
    assert (table.seconds_per_epoch > 0).all() and (table.peak_rss_mb > 0).all()
    cost = pd.read_csv(results / "summary" / "cost.csv")
    assert (cost.job_seconds_total > 0).all() and set(cost.device) == {table.device.iloc[0]}
    provenance = pd.read_csv(results / "summary" / "provenance.csv")
    assert provenance["item"].str.startswith("config hash").any()
    anchors = pd.read_csv(results / "summary" / "anchors.csv")
    assert len(anchors) == 34 and (anchors.protocol_differences == "not run here").all()
    for name in ("accuracy_by_method", "accuracy_by_rank", "cost_accuracy"):
        assert (results / "summary" / f"{name}.png").stat().st_size > 10_000
    curves = results / "summary" / "digits" / "resnet20-resnet8" / "learning_curves.png"
    assert curves.stat().st_size > 10_000
    paraphraser = json.loads(
        (results / "digits/paraphrasers/resnet20/seed0/metrics.json").read_text()
    )
    assert paraphraser["status"] == "complete" and paraphraser["final"]["selected_epoch"] >= 1
    assert (results / "digits/paraphrasers/resnet20/seed0/Paraphraser_Loss.png").stat().st_size > 0
    log = (results / "logs" / "digits" / "teachers" / "resnet20-seed0.log").read_text()
    assert "epoch 1/" in log and "ETA" in log


def test_feature_analysis_is_written(demo):
    results = demo / "results" / "digits"
    models = sorted(results.glob("*/**/features/channels.parquet"))
    assert len(models) == 1 + 9 * 2  # every trained model, every seed
    channels = pd.concat([pd.read_parquet(p) for p in models])
    assert set(channels.definition) == {"corrected", "legacy"}
    assert channels.groupby(["label", "seed"]).ngroups == 1 + 9 * 2
    stages = pd.read_csv(results / "analysis" / "stage_metrics.csv")
    assert set(stages.stage) == {1, 2, 3} and set(stages[stages.role == "student"].n) == {2}
    table = pd.read_csv(results / "analysis" / "metric_table.csv")
    assert "resnet20 teacher" in table.columns and "resnet8 vanilla" in table.columns
    corr = pd.read_csv(results / "analysis" / "correlations.csv")
    assert set(corr.n[corr.kind == "metric~accuracy"]) == {18}
    ranking = pd.read_csv(results / "analysis" / "resnet20-resnet8" / "most_affected.csv")
    assert set(ranking.method) == {"kd", "featuremap", "ft", "tucker", "tucker_recomp"}
    pair = results / "analysis" / "resnet20-resnet8"
    for name in ("affected_stages", "affected_channels"):
        assert (pair / f"{name}.png").stat().st_size > 10_000
    for name in ("attention", "spectra", "changed_spectra", "histograms", "channels"):
        assert (pair / "diagnostics" / f"{name}.png").stat().st_size > 10_000


def test_second_run_has_nothing_to_do(demo):
    proc = snakemake("--cores", "2", "--configfile", "demo.yaml", cwd=demo)
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_one_method_setting_reruns_only_that_method(demo):
    cfg = yaml.safe_load((demo / "demo.yaml").read_text())
    cfg["methods"]["kd"]["T"] = 4.0
    (demo / "changed.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "changed.yaml", cwd=demo)
    assert proc.returncode == 0, proc.stderr
    assert job_counts(proc.stdout) == {
        "distill": 2,
        "aggregate": 1,
        "rank_chart": 1,
        "learning_curves": 1,
        "extract_features_metrics": 2,
        "most_affected": 1,
        "diagnose": 1,
        "analyse_features": 1,
        "all": 1,
    }
    assert (
        "/kd/default/seed0" in proc.stdout and "/vanilla/" not in proc.stdout.split("Job stats")[0]
    )
    assert proc.stdout.count("reason: Params have changed since last execution") == 2
    assert "'T': 4.0" in proc.stdout


def test_changing_the_teacher_recipe_reruns_the_teacher_and_its_students(demo):
    cfg = yaml.safe_load((demo / "demo.yaml").read_text())
    cfg["teacher"]["label_smoothing"] = 0.0
    (demo / "changed.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "changed.yaml", cwd=demo)
    assert job_counts(proc.stdout) == {
        "train_teacher": 1,
        "train_paraphraser": 1,
        "distill": 8 * 2,  # every student that learns from the teacher, not the vanilla ones
        "aggregate": 1,
        "rank_chart": 1,
        "learning_curves": 1,
        "extract_features_metrics": 1 + 8 * 2,
        "most_affected": 1,
        "diagnose": 1,
        "analyse_features": 1,
        "all": 1,
    }


def test_changing_the_diagnostic_images_reruns_only_the_diagnostics(demo):
    cfg = yaml.safe_load((demo / "demo.yaml").read_text())
    cfg["analysis"] = {"images": [3, 4]}
    (demo / "changed.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", "changed.yaml", cwd=demo)
    assert job_counts(proc.stdout) == {"diagnose": 1, "all": 1}


@pytest.fixture(scope="module")
def report_html(demo):
    proc = snakemake("--configfile", "demo.yaml", "--report", "results/report.html", cwd=demo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return demo / "results" / "report.html"


def test_report_is_generated(report_html):
    html = report_html.read_text()
    assert "Learning curves" in html and "Results" in html and "summary.csv" in html
    assert "Feature analysis" in html and "attention.png" in html and "metric_table.csv" in html
    assert "Cost" in html and "Provenance" in html and "anchors.csv" in html


def chromium(*args, timeout=180):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("chromium is not installed: apt-get install chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    cmd += ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_opens_in_headless_chromium(report_html, tmp_path):
    uri = report_html.as_uri()
    shot = tmp_path / "report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1400,1800", uri)
    assert shot.is_file(), proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    errors = [line for line in console if "error" in line.lower() or "uncaught" in line.lower()]
    assert not errors, errors
    image = matplotlib.image.imread(shot)
    assert image.shape[0] >= 1000 and image[..., :3].std() > 0.02  # not a blank page
    dom = chromium("--dump-dom", uri).stdout
    assert "How every number here was obtained" in dom
    # the headline table of the first page carries the summary's numbers
    headline = pd.read_csv(report_html.parent / "summary" / "headline.csv")
    kd = headline[headline.method == "kd"].iloc[0]
    assert kd["test acc. % (best-val epoch, 95% CI)"] in dom
    assert kd["vs vanilla (paired)"].split(" (")[0] in dom
    teacher = headline[headline.model.str.startswith("teacher")].iloc[0]
    assert teacher.iloc[4] in dom
