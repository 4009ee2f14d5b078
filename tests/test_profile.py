"""profiles/slurm without a cluster: what it plans and what it asks SLURM for (dry runs)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yte
from conftest import REPO, job_counts, snakemake

PROFILE = REPO / "profiles" / "slurm"
SITE_VARIABLES = (
    "KDBENCH_SLURM_PARTITION",
    "KDBENCH_SLURM_GPU_PARTITION",
    "KDBENCH_SLURM_ACCOUNT",
    "KDBENCH_SLURM_GPU_MODEL",
    "KDBENCH_SLURM_JOBS",
    "KDBENCH_SLURM_STATUS",
    "KDBENCH_SLURM_STUDENTS_PER_JOB",
    "KDBENCH_SLURM_RUNS_PER_GPU",
)


def _profile(monkeypatch, **env: str) -> dict:
    """The profile as Snakemake reads it, under the given site variables."""
    for name in SITE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with (PROFILE / "config.yaml").open() as stream:
        return yte.process_yaml(stream, require_use_yte=True)


def _resources(output: str) -> dict[str, set[str]]:
    """rule → the set of `resources:` lines a dry run printed for its jobs."""
    found: dict[str, set[str]] = {}
    rule = None
    for line in output.splitlines():
        if m := re.match(r"\s*(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif rule and line.strip().startswith("resources:"):
            found.setdefault(rule, set()).add(line.strip())
    return found


def _dry_run(tmp_path: Path, configfile: str, env: dict[str, str] | None = None, *extra: str):
    old = dict(os.environ)
    for name in SITE_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(env or {})
    try:
        proc = snakemake(
            "--profile",
            str(PROFILE),
            "-n",
            "--configfile",
            str(REPO / configfile),
            *extra,
            cwd=tmp_path,
            timeout=300,
        )
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_one_profile_file_with_the_required_keys(monkeypatch):
    assert sorted(p.name for p in PROFILE.iterdir()) == ["config.yaml"]
    profile = _profile(monkeypatch)
    assert profile["executor"] == "slurm"
    for key in ("jobs", "latency-wait", "retries", "rerun-incomplete", "keep-going"):
        assert profile[key], key
    assert profile["show-failed-logs"] and profile["slurm-status-command"] == "squeue"
    assert "slurm-array-jobs" not in profile  # job arrays deadlock the plugin
    defaults = profile["default-resources"]
    assert defaults["slurm_partition"] == "'cpu'" and "attempt" in str(defaults["runtime"])
    for rule in ("train_teacher", "train_paraphraser", "distill"):
        res = profile["set-resources"][rule]
        assert res["slurm_partition"] == "'gpu'" and "gpu_model" not in res
        assert "attempt" in str(res["runtime"])
    for rule in ("train_teacher", "train_paraphraser", "distill_cohort"):
        assert profile["set-resources"][rule]["gpu"] == 1
    assert profile["set-resources"]["distill_cohort"]["slurm_partition"] == "'gpu'"
    # a SLURM job per student by default; the GPU as a string, which a group shares
    distill = profile["set-resources"]["distill"]
    assert distill["gres"] == "'gpu:1'" and "gpu" not in distill
    assert profile["group-components"] == {"features": 20, "students": 1}
    assert "set-threads" not in profile  # students get train_threads, as the teacher does
    # a SLURM job runs its group's jobs one after another: each grouped job takes the job's one
    # step (a local resource), so Snakemake sizes the job for one member and sums the runtimes
    assert profile["resources"] == {"job_steps": 1}
    assert profile["set-resource-scopes"] == {"job_steps": "local"}
    for rule in ("distill", "extract_features_metrics"):
        assert profile["set-resources"][rule]["job_steps"] == 1


def test_every_profile_key_is_commented():
    lines = (PROFILE / "config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"[\w-]+:", line) and not line.startswith("__"):
            assert lines[i - 1].startswith("#"), f"profile key without a comment: {line}"


def test_site_settings_come_from_the_environment(monkeypatch):
    profile = _profile(
        monkeypatch,
        KDBENCH_SLURM_PARTITION="short",
        KDBENCH_SLURM_GPU_PARTITION="a100",
        KDBENCH_SLURM_ACCOUNT="kd-lab",
        KDBENCH_SLURM_GPU_MODEL="a100",
        KDBENCH_SLURM_JOBS="7",
        KDBENCH_SLURM_STATUS="sacct",
        KDBENCH_SLURM_STUDENTS_PER_JOB="8",
    )
    assert profile["jobs"] == 7 and profile["slurm-status-command"] == "sacct"
    assert profile["group-components"]["students"] == 8
    assert profile["set-resources"]["distill"]["gres"] == "'gpu:a100:1'"
    assert profile["default-resources"]["slurm_partition"] == "'short'"
    assert profile["default-resources"]["slurm_account"] == "'kd-lab'"
    for rule in ("train_teacher", "distill_cohort"):
        res = profile["set-resources"][rule]
        assert res["slurm_partition"] == "'a100'" and res["gpu_model"] == "'a100'"


def test_students_per_job_keeps_its_old_name(monkeypatch):
    old = _profile(monkeypatch, KDBENCH_SLURM_RUNS_PER_GPU="4")
    assert old["group-components"]["students"] == 4
    both = _profile(monkeypatch, KDBENCH_SLURM_RUNS_PER_GPU="4", KDBENCH_SLURM_STUDENTS_PER_JOB="2")
    assert both["group-components"]["students"] == 2


@pytest.mark.slow
def test_dry_run_plans_the_full_benchmark(tmp_path):
    """`snakemake --profile profiles/slurm -n` of config/config.yaml, no cluster needed."""
    output = _dry_run(tmp_path, "config/config.yaml")
    counts = job_counts(output)
    assert counts["distill"] == 12 and counts["train_teacher"] == 2  # vanilla: no teacher pass
    assert counts["distill_cohort"] == 30 and counts["cohort_member"] == 228  # cohorts of 8
    assert counts["train_paraphraser"] == 2 and counts["extract_features_metrics"] == 242
    resources = _resources(output)
    for rule in ("train_teacher", "train_paraphraser"):
        for line in resources[rule]:
            assert "slurm_partition=gpu" in line and "gpu=1" in line, line
    for rule in ("train_teacher", "train_paraphraser", "distill"):  # `--resources gpu_runs=N`
        assert all("gpu_runs=1" in line for line in resources[rule])
    for line in resources["distill"]:
        assert "slurm_partition=gpu" in line and "gres=gpu:1" in line and "mem_mb=8000" in line
    (line,) = resources["train_teacher"]
    assert "runtime=480" in line and "mem_mb=16000" in line
    for line in resources["most_affected"] | resources["extract_features_metrics"]:
        assert "slurm_partition=cpu" in line and "gpu" not in line.replace("partition=", "")


@pytest.mark.slow
def test_dry_run_passes_site_settings_to_the_jobs(tmp_path):
    env = {"KDBENCH_SLURM_GPU_PARTITION": "a100", "KDBENCH_SLURM_ACCOUNT": "kd-lab"}
    resources = _resources(_dry_run(tmp_path, "config/demo.yaml", env))
    (line,) = resources["train_teacher"]
    assert "slurm_partition=a100" in line and "slurm_account=kd-lab" in line


@pytest.mark.slow
def test_dry_run_of_cohorts_puts_each_on_a_gpu(tmp_path):
    output = _dry_run(tmp_path, "config/demo.yaml", None, "--config", "cohort_size=4")
    counts = job_counts(output)
    # 8 distilling students per seed, 4 to a cohort; vanilla alone
    assert counts["distill_cohort"] == 4 and counts["cohort_member"] == 16
    assert counts["distill"] == 2
    resources = _resources(output)
    (line,) = resources["distill_cohort"]
    assert "slurm_partition=gpu" in line and "gpu=1" in line and "runtime=1440" in line
