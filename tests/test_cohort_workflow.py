"""`cohort_size`: the workflow trains the students of a teacher and seed together, on one
teacher pass per batch, and gives each its own outputs (a small digits config, about a minute)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import yaml
from conftest import REPO, job_counts, snakemake

pytestmark = pytest.mark.slow

SUMMARY = "results/summary/summary.csv"
STUDENTS = "results/digits/students/resnet20-resnet8"
COHORTS = "results/digits/cohorts/resnet20-seed0"
# the 5 students that learn from the teacher, in config order: 3 in c0, 2 in c1
MEMBERS = {
    "kd/default": 0,
    "featuremap/default": 0,
    "ft/default": 0,
    "tucker/full-teacher-r16": 1,
    "tucker_recomp/student-r16": 1,
}


def _config(work, **changes):
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["seeds"] = [0]
    cfg["teacher"]["train"]["epochs"] = 2
    cfg["train"]["epochs"] = 2
    cfg["methods"]["ft"]["paraphraser"]["epochs"] = 1
    cfg["methods"]["tucker"]["decomposition"] = ["full"]
    cfg["methods"]["tucker_recomp"]["targets"] = ["student"]
    cfg["cohort_size"] = 3
    cfg["train"]["cohort_stack"] = True  # each cohort's students as one network, end to end
    for key, value in changes.items():
        cfg["methods"][key].update(value)
    (work / "cohort.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cohorts")
    _config(work)
    args = ("--cores", "2", SUMMARY, "--configfile", "cohort.yaml")
    proc = snakemake(*args, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, job_counts(proc.stdout + proc.stderr)


def test_each_student_gets_its_own_outputs_from_its_cohort(cohort_run):
    work, counts = cohort_run
    # the vanilla student alone, the 5 others in 2 cohort jobs, then linked out one by one
    assert counts["distill"] == 1 and counts["distill_cohort"] == 2
    assert counts["cohort_member"] == 5
    for member, index in MEMBERS.items():
        run = work / STUDENTS / member / "seed0"
        doc = json.loads((run / "metrics.json").read_text())
        assert doc["status"] == "complete" and len(doc["epochs"]) == 2
        assert doc["cohort"]["name"] == f"resnet20-seed0-c{index}"
        assert doc["run"]["method"] == member.split("/")[0]
        for name in ("metrics.json", "model_final.pt", "model_best.pt", "Loss.png"):
            source = work / COHORTS / f"c{index}" / "resnet8" / member / name
            assert os.path.samefile(run / name, source), name  # a hard link, not a copy
    c0 = json.loads((work / STUDENTS / "kd/default/seed0/metrics.json").read_text())["cohort"]
    assert c0["members"] == [
        "resnet8-kd-default",
        "resnet8-featuremap-default",
        "resnet8-ft-default",
    ]
    log = (work / "results/logs/digits/cohorts/resnet20-seed0-c0.log").read_text()
    assert "cohort resnet20-seed0-c0: 3 students on one teacher pass" in log
    assert "cohort: 3 students as one network (train.cohort_stack)" in log
    assert doc["config"]["train"]["cohort_stack"] is True  # the last member's metrics.json
    summary = pd.read_csv(work / SUMMARY)
    assert set(summary[summary.role == "student"].method) == {
        "vanilla", "kd", "featuremap", "ft", "tucker", "tucker_recomp",
    }  # fmt: skip
    assert not list((work / "results" / "state").rglob("*.pt"))
    # runs.csv names each student's cohort (none for the vanilla one)
    runs = pd.read_csv(work / "results/summary/runs.csv", keep_default_na=False)
    cohort = dict(zip(runs.method + "/" + runs.variant, runs.cohort, strict=True))
    assert cohort["vanilla/default"] == "" and cohort["vanilla/teacher"] == ""
    for member, index in MEMBERS.items():
        assert cohort[member] == f"resnet20-seed0-c{index}"
    # the cost table shares each cohort job's seconds among its members (c1: 2 members)
    cost = pd.read_csv(work / "results/summary/cost.csv").set_index("method")
    c1 = pd.read_csv(work / f"{COHORTS}/c1.benchmark.tsv", sep="\t").s.iloc[-1]
    assert cost.job_seconds_total["tucker"] == pytest.approx(c1 / 2, abs=0.01)
    assert cost.job_seconds_total.notna().all()


def test_a_second_run_has_nothing_to_do(cohort_run):
    work, _ = cohort_run
    proc = snakemake("-n", SUMMARY, "--configfile", "cohort.yaml", cwd=work)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_one_member_reruns_its_cohort_only(cohort_run):
    work, _ = cohort_run
    _config(work, kd={"T": 3.0})
    try:
        proc = snakemake("-n", SUMMARY, "--configfile", "cohort.yaml", cwd=work)
    finally:
        _config(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["distill_cohort"] == 1 and counts["cohort_member"] == 3
    assert "distill" not in counts and "train_teacher" not in counts
