"""The demo workflow end to end in a temporary directory (a few minutes on 2 cores)."""

import json
import shutil

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
    # teacher + (vanilla, kd, featuremap, ft, tucker × 4, tucker_recomp × 3) × 2 seeds
    assert len(runs) == 1 + 11 * 2
    for metrics in runs:
        doc = json.loads(metrics.read_text())
        assert doc["status"] == "complete"
        for name in ("model_final.pt", "model_best.pt", "Loss.png", "Accuracy.png"):
            assert (metrics.parent / name).stat().st_size > 0
    assert not list((results / "state").rglob("*.pt"))  # no leftover training state
    summary = pd.read_csv(results / "summary" / "summary.csv")
    students = summary[summary.role == "student"]
    methods = {"vanilla", "kd", "featuremap", "ft", "tucker", "tucker_recomp"}
    assert set(students.method) == methods and set(students.n) == {2}
    assert set(students[students.method == "tucker"].variant) == {
        "full-teacher-r16",
        "full-own-r16",
        "sample-teacher-r16",
        "sample-own-r16",
    }
    # digits is learnt in a few epochs by every well-posed method (own-basis Tucker is not one)
    well_posed = students[~students.variant.str.contains("own")]
    assert (well_posed.test_acc_best_val_mean > 80).all()
    table = pd.read_csv(results / "summary" / "runs.csv")
    assert len(table) == 23 and table.commit.notna().all()
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
    assert len(models) == 1 + 11 * 2  # every trained model, every seed
    channels = pd.concat([pd.read_parquet(p) for p in models])
    assert set(channels.definition) == {"corrected", "legacy"}
    assert channels.groupby(["label", "seed"]).ngroups == 1 + 11 * 2
    stages = pd.read_csv(results / "analysis" / "stage_metrics.csv")
    assert set(stages.stage) == {1, 2, 3} and set(stages[stages.role == "student"].n) == {2}
    table = pd.read_csv(results / "analysis" / "metric_table.csv")
    assert "resnet20 teacher" in table.columns and "resnet8 vanilla" in table.columns
    corr = pd.read_csv(results / "analysis" / "correlations.csv")
    assert set(corr.n[corr.kind == "metric~accuracy"]) == {22}
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
        "distill": 10 * 2,  # every student that learns from the teacher, not the vanilla ones
        "aggregate": 1,
        "extract_features_metrics": 1 + 10 * 2,
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


def test_report_is_generated(demo):
    proc = snakemake("--configfile", "demo.yaml", "--report", "results/report.html", cwd=demo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (demo / "results" / "report.html").read_text()
    assert "Learning curves" in html and "Results" in html and "summary.csv" in html
    assert "Feature analysis" in html and "attention.png" in html and "metric_table.csv" in html
