"""The production SLURM profile against a real SLURM controller (tests/slurm/cluster.sh).

The demo runs through `snakemake --profile profiles/slurm` on the local single-node cluster; the
teacher's SLURM job is cancelled with scancel after its first epoch, and the retry must resume
from the saved state to the same result as an uninterrupted run. Skipped where no cluster
answers, unless KDBENCH_REQUIRE_SLURM=1 (CI as root), where that is a failure.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, mps_stub, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILE = REPO / "profiles" / "slurm"
TEACHER_STATE = "results/state/digits/teachers/resnet20/seed0.pt"
TEACHER_RUN = "results/digits/teachers/resnet20/seed0"
RUN_TIMEOUT = 1500  # seconds for the whole demo on the cluster: a hard kill after that


def _cluster_problem() -> str | None:
    """Why no cluster can be used here, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch is not installed"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"SLURM does not answer ({exc})"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return "slurmctld does not answer"
    if not re.search(r"^(idle|mix|alloc)", nodes.stdout, re.M):
        return "no SLURM node is up"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        message = f"no SLURM cluster: {problem} (as root: tests/slurm/cluster.sh up)"
        if os.environ.get("KDBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _profile_run(work: Path) -> list[str]:
    return [
        # snakemake with status checks at most 2 s apart (head.py: a test-only speed-up)
        sys.executable,
        str(REPO / "tests" / "slurm" / "head.py"),
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(work),
        "--profile",
        str(PROFILE),
        "--configfile",
        "demo.yaml",
        # a test-only speed-up: status queries from 2 s after a submission on, not 40 s
        "--slurm-init-seconds-before-status-checks",
        "2",
    ]


def _jobs(work: Path) -> list[dict[str, str]]:
    """The SLURM jobs submitted from ``work`` that slurmctld still knows (MinJobAge)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True, timeout=30
    ).stdout
    jobs = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        if fields.get("WorkDir") == str(work):
            jobs.append(fields)
    return jobs


def _submitted(output: str) -> set[str]:
    """The SLURM job ids that a head process's output says it submitted."""
    return set(re.findall(r"submitted with SLURM jobid (\d+)", output))


def _students_per_job(work: Path) -> dict[str, int]:
    """SLURM job id → how many students' training logs name it."""
    sizes: dict[str, int] = {}
    for log in (work / "results/logs/digits/students").rglob("*.log"):
        (job,) = set(re.findall(r"SLURM_JOB_ID=(\d+)", log.read_text()))
        sizes[job] = sizes.get(job, 0) + 1
    return sizes


def _minutes(limit: str) -> int:
    """A SLURM time limit ("[D-]HH:MM:SS") in whole minutes."""
    days, _, clock = limit.rpartition("-")
    h, m, _ = (int(x) for x in clock.split(":"))
    return (24 * int(days or 0) + h) * 60 + m


def _cancel_all(work: Path) -> None:
    for job in _jobs(work):
        if job.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"):
            subprocess.run(["scancel", job["JobId"]], timeout=30)


@pytest.fixture(scope="module")
def slurm_demo(cluster, tmp_path_factory):
    """The demo through the profile; the teacher's job is cancelled after epoch 1."""
    work = tmp_path_factory.mktemp("slurm")
    # the demo with one student seed: every rule and request, half the jobs; what the
    # jobs compute is cut down (the teacher keeps enough epochs to be cancelled mid-run)
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    assert demo["seeds"] == [0, 1] and demo["teacher"]["train"]["epochs"] > 5
    demo["seeds"] = [0]
    demo["methods"]["tucker"]["decomposition"] = ["full"]  # one variant of each: 6 students
    demo["methods"]["tucker_recomp"]["targets"] = ["both"]
    demo["teacher"]["train"]["epochs"] = 5
    demo["train"]["epochs"] = 2
    demo["methods"]["ft"]["paraphraser"]["epochs"] = 2
    demo["analysis"]["n_images"] = 100
    # device auto (the CPU here too): a run on train.device cpu does not ask for MPS
    assert demo["train"]["device"] == "cpu"
    demo["train"]["device"] = "auto"
    # 2 threads per training job
    assert demo["train_threads"] == 1
    demo["train_threads"] = 2
    (work / "demo.yaml").write_text(yaml.safe_dump(demo, sort_keys=False))
    # every training job a client of an MPS daemon per SLURM job (a stand-in for NVIDIA's):
    # KDBENCH_MPS=auto, the default, where the node has the control program
    stub, _ = mps_stub(work / "mps")
    # the jobs' temporary directory (the MPS daemons' folders, one per SLURM job) in the test's
    # folder, not /tmp, where each run left one folder per SLURM job
    (work / "tmp").mkdir()
    log = (work / "head.log").open("w")
    proc = subprocess.Popen(
        _profile_run(work),
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # students grouped 4 to a SLURM job (the default is 1)
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "KDBENCH_SLURM_STUDENTS_PER_JOB": "4",
            "KDBENCH_MPS": "auto",
            "PATH": f"{stub}:{os.environ['PATH']}",
            "TMPDIR": str(work / "tmp"),
        },
    )
    cancelled = None
    try:
        deadline = time.monotonic() + 600
        while cancelled is None and proc.poll() is None and time.monotonic() < deadline:
            if (work / TEACHER_STATE).exists():
                teacher = [
                    j
                    for j in _jobs(work)
                    if j.get("Comment", "").startswith("rule_train_teacher")
                    and j.get("JobState") == "RUNNING"
                ]
                if teacher:
                    cancelled = teacher[0]["JobId"]
                    subprocess.run(["scancel", cancelled], check=True, timeout=30)
            time.sleep(0.2)
        proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _cancel_all(work)
        pytest.fail(f"the SLURM run took over {RUN_TIMEOUT} s: killed")
    finally:
        log.close()
    output = (work / "head.log").read_text()
    assert proc.returncode == 0, output[-5000:]
    assert cancelled, "the teacher's job was never seen running with a saved state"
    return work, output, cancelled


def test_every_output_is_written_through_slurm(slurm_demo):
    work, output, _ = slurm_demo
    results = work / "results"
    runs = sorted(results.glob("digits/*/**/metrics.json"))
    assert len(runs) == 1 + 1 + 6  # teacher, paraphraser, 6 students (seed 0)
    for metrics in runs:
        assert json.loads(metrics.read_text())["status"] == "complete"
    assert len(sorted(results.glob("digits/*/**/features/channels.parquet"))) == 1 + 6
    for name in ("summary.csv", "headline.csv", "provenance.csv", "accuracy_by_method.png"):
        assert (results / "summary" / name).stat().st_size > 0
    for name in ("stage_metrics.csv", "correlations.csv", "resnet20-resnet8/most_affected.csv"):
        assert (results / "digits" / "analysis" / name).stat().st_size > 0
    assert not list((results / "state").rglob("*.pt"))
    assert "steps (100%) done" in output


def test_sbatch_requests_gpu_and_partition(slurm_demo):
    work, output, cancelled = slurm_demo
    jobs = [job for job in _jobs(work) if job["JobId"] in _submitted(output)]
    assert jobs, "slurmctld has no record of this run's jobs"
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job in jobs:
        # "rule_<rule>_wildcards_<values>", or "rule_<group>_<rules>" for a group job
        rule = job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        for group in ("features", "students"):
            if rule.startswith(f"{group}_"):
                rule = group
        by_rule.setdefault(rule, []).append(job)
    assert {"train_teacher", "train_paraphraser", "students", "features"} <= set(by_rule)
    # the teacher's job cancelled after its first epoch, and its retry
    assert sorted(j["JobId"] == cancelled for j in by_rule["train_teacher"]) == [False, True]
    for rule in ("train_teacher", "train_paraphraser", "students"):
        for job in by_rule[rule]:
            assert job["Partition"] == "gpu", job
            # what the job was allocated; slurmctld can drop the GPU from the TRES of a job
            # cancelled (CI, once: the teacher's job that ran on CUDA_VISIBLE_DEVICES=0), whose
            # request is checked below and whose retry's allocation here
            assert "gres/gpu=1" in job["TRES"] or job["JobId"] == cancelled, job
    for rule in ("train_teacher", "train_paraphraser"):  # --gpus=1 (resource gpu: 1)
        for job in by_rule[rule]:
            assert job.get("TresPerJob") == "gres:gpu:1" and "mem=16000M" in job["TRES"], job
    for job in by_rule["students"]:  # --gres=gpu:1 (resource gres: "gpu:1")
        assert job.get("TresPerNode") == "gres:gpu:1", job
    # the 6 students went out up to 4 to a job holding one GPU (KDBENCH_SLURM_STUDENTS_PER_JOB),
    # which runs them one after another: the CPUs (train_threads, 2) and memory (8 GB) of one
    # student, the sum of their runtimes (6 h each)
    sizes = _students_per_job(work)
    assert sum(sizes.values()) == 6 and max(sizes.values()) == 4, sizes
    assert sorted(sizes) == sorted(job["JobId"] for job in by_rule["students"])
    for job in by_rule["students"]:
        assert _minutes(job["TimeLimit"]) == 360 * sizes[job["JobId"]], job["TimeLimit"]
        assert "cpu=2," in job["TRES"] and "mem=8000M" in job["TRES"], job
    for rule in ("features", "most_affected", "diagnose", "analyse_features"):
        for job in by_rule[rule]:
            assert job["Partition"] == "cpu", job
            assert "gpu" not in job.get("TresPerJob", ""), job
    # the 7 extraction jobs went out as one grouped SLURM job: one at a time, 10 min each
    (group,) = by_rule["features"]
    assert "cpu=1," in group["TRES"] and "mem=8000M" in group["TRES"], group
    assert _minutes(group["TimeLimit"]) == 70, group["TimeLimit"]
    # local rules never reach SLURM
    assert not {"aggregate", "learning_curves", "rank_chart"} & set(by_rule)


def test_training_log_shows_the_slurm_job(slurm_demo):
    work, _, _ = slurm_demo
    log = (work / "results/logs/digits/students/resnet20-resnet8/kd-default-seed0.log").read_text()
    job = re.search(r"SLURM_JOB_ID=(\d+), node kdnode, CUDA_VISIBLE_DEVICES=(\d+)", log)
    assert job, log[:2000]
    # the config's train_threads
    assert re.search(r"device cpu: .+, 2 threads", log)
    run = work / "results/digits/students/resnet20-resnet8/kd/default/seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    slurm = metrics["provenance"]["slurm"]
    assert slurm["job_id"] == job.group(1) and slurm["node"] == "kdnode"


def test_the_students_of_one_slurm_job_run_in_turn_and_share_one_mps_daemon(slurm_demo):
    work, _, _ = slurm_demo
    calls = (work / "mps" / "calls").read_text().splitlines()
    clients: dict[str, list[str]] = {}
    spans: dict[str, list[tuple[str, str]]] = {}
    for log in (work / "results/logs/digits/students").rglob("*.log"):
        text = log.read_text()
        (job,) = set(re.findall(r"SLURM_JOB_ID=(\d+)", text))
        (directory,) = set(re.findall(r"MPS: a client of the daemon in (\S+)", text))
        assert directory == f"{work}/tmp/kdbench-mps-{job}", (log, directory)
        clients.setdefault(directory, []).append(log.name)
        # from the job's first line to "done" (HH:MM:SS, all on one day)
        (done,) = re.findall(r"^(\S+) INFO done:", text, re.M)
        spans.setdefault(job, []).append((text[:8], done))
    # the plugin runs a SLURM job's students one after another (which the profile sizes the job
    # for: the sum of their runtimes); if it ever runs them at once, revisit profiles/slurm
    for job, runs in spans.items():
        runs.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(runs)), (job, runs)
    # the students of each SLURM job (up to 4), each job's started its one daemon
    sizes = _students_per_job(work)
    assert sorted(len(logs) for logs in clients.values()) == sorted(sizes.values()), clients
    for directory in clients:
        assert calls.count(f"start {directory}/pipe") == 1, calls
    run = work / "results/digits/students/resnet20-resnet8/kd/default/seed0"
    provenance = json.loads((run / "metrics.json").read_text())["provenance"]
    assert provenance["mps_pipe_directory"].endswith(
        f"kdbench-mps-{provenance['slurm_job_id']}/pipe"
    )


def test_later_jobs_clear_the_mps_folder_and_daemon_of_the_cancelled_job(slurm_demo):
    work, _, cancelled = slurm_demo
    # scancel left the stand-in daemon of the teacher's first job running (as a real one stays
    # on a node whose SLURM does not track a job's background processes) and its folder in the
    # node's temporary directory: a training job that started after it ended cleared both
    folder = work / "tmp" / f"kdbench-mps-{cancelled}"
    assert not folder.exists()
    calls = (work / "mps" / "calls").read_text().splitlines()
    assert f"start {folder}/pipe" in calls and f"quit {folder}/pipe" in calls, calls


def test_cancelled_training_resumes_to_the_uninterrupted_result(slurm_demo, tmp_path):
    work, _, cancelled = slurm_demo
    resumed = json.loads((work / TEACHER_RUN / "metrics.json").read_text())
    assert resumed["final"]["resumed_after_epochs"], "the retry did not resume from the state"
    assert resumed["provenance"]["slurm"]["job_id"] != cancelled
    assert resumed["provenance"]["previous_sessions"][-1]["slurm_job_id"] == cancelled
    # Snakemake starts a retried job's log afresh: the retry's log names the cancelled job
    log = (work / "results/logs/digits/teachers/resnet20-seed0.log").read_text()
    assert re.search(rf"resuming from .* \(saved by job {cancelled} on ", log), log[:2000]
    # the same teacher (the same config: 2 threads), uninterrupted, without SLURM
    shutil.copy(work / "demo.yaml", tmp_path / "demo.yaml")
    target = f"{TEACHER_RUN}/metrics.json"
    proc = snakemake("--cores", "2", target, "--configfile", "demo.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads((tmp_path / target).read_text())
    assert not plain["final"]["resumed_after_epochs"]
    for a, b in zip(resumed["epochs"], plain["epochs"], strict=True):
        a.pop("epoch_seconds")
        b.pop("epoch_seconds")
        assert a == b
    for key in ("test_acc_last", "test_acc_best_val", "best_epoch", "val_acc_best"):
        assert resumed["final"][key] == plain["final"][key]


def test_second_invocation_has_nothing_to_do(slurm_demo):
    work, _, _ = slurm_demo
    proc = subprocess.run(_profile_run(work), cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr
