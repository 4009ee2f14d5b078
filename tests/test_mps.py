"""kdbench.mps: the workflow's training jobs as clients of one NVIDIA MPS daemon (KDBENCH_MPS),
with a stand-in for nvidia-cuda-mps-control (conftest.mps_stub)."""

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, mps_stub, run_gpu_script, snakemake

from kdbench import mps, runs
from kdbench.errors import KdbenchError


@pytest.fixture
def stub(tmp_path, monkeypatch):
    path, calls = mps_stub(tmp_path / "stub")
    monkeypatch.setenv("PATH", f"{path}:{os.environ['PATH']}")
    for name in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "KDBENCH_MPS"):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize("value, want", [("0", False), ("no", False), ("1", True), ("True", True)])
def test_kdbench_mps_asks_for_it(monkeypatch, value, want):
    monkeypatch.setenv("KDBENCH_MPS", value)
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # on or off whether in a SLURM job or not
    assert mps.wanted() is want
    monkeypatch.delenv("SLURM_JOB_ID")
    assert mps.wanted() is want


@pytest.mark.parametrize("value", [None, "auto", " AUTO "])
def test_kdbench_mps_auto_is_mps_in_a_slurm_job_on_a_node_with_the_control_program(
    stub, monkeypatch, value
):
    if value is not None:
        monkeypatch.setenv("KDBENCH_MPS", value)
    assert mps.setting() == "auto"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not mps.wanted()  # not in a SLURM job: a workstation or the CI machine
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert mps.wanted()
    monkeypatch.setenv("PATH", "/nonexistent")  # a node without NVIDIA's driver tools
    assert not mps.wanted()


def test_a_bad_kdbench_mps_is_one_line(monkeypatch):
    monkeypatch.setenv("KDBENCH_MPS", "mps")
    with pytest.raises(KdbenchError, match="KDBENCH_MPS must be 1, 0 or auto, got 'mps'"):
        mps.wanted()
    with pytest.raises(SystemExit, match="^kdbench: error: KDBENCH_MPS must be 1, 0 or auto"):
        mps.wanted_or_exit()


def test_a_bad_kdbench_mps_stops_the_workflow_before_any_job(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_MPS", "mps")
    (tmp_path / "demo.yaml").write_text((REPO / "config" / "demo.yaml").read_text())
    proc = snakemake("-n", "--configfile", "demo.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == "kdbench: error: KDBENCH_MPS must be 1, 0 or auto, got 'mps'\n"
    assert not (tmp_path / "results").exists()


def test_the_daemon_is_per_slurm_job_or_else_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert mps.job_directory() == tmp_path / "kdbench-mps-1234"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert mps.job_directory() == tmp_path / f"kdbench-mps-uid{os.getuid()}"


def test_joining_starts_the_daemon_once_and_makes_this_process_its_client(stub, tmp_path):
    directory = tmp_path / "mps"
    assert mps.join(directory) == directory
    pipe = str(directory / "pipe")
    assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == pipe
    assert os.environ["CUDA_MPS_LOG_DIRECTORY"] == str(directory / "log")
    mps.join(directory)  # running: not started again
    assert stub.read_text().splitlines() == [
        f"get_server_list {pipe}",
        f"start {pipe}",
        f"get_server_list {pipe}",
    ]
    assert mps.stop(directory) and not mps.running(directory)
    assert not mps.stop(directory)  # nothing left to stop
    assert stub.read_text().splitlines()[3:] == [
        f"get_server_list {pipe}",
        f"quit {pipe}",
        f"get_server_list {pipe}",
        f"get_server_list {pipe}",
    ]


def _squeue_stub(bin_dir: Path, states: Path) -> None:
    """A stand-in for SLURM's ``squeue -h -j ID -o %T``: prints ``states/ID``'s state; an
    ``invalid`` or ``down`` one is slurmctld's error for a job it no longer knows or its own
    failure; no file, nothing (a job that has ended)."""
    squeue = bin_dir / "squeue"
    squeue.write_text(
        f"""#!/bin/sh
state=$(cat "{states}/$3" 2>/dev/null)
case "$state" in
invalid) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
down) echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1 ;;
esac
[ -z "$state" ] || echo "$state"
"""
    )
    squeue.chmod(0o755)


def test_a_slurm_job_clears_what_ended_jobs_left_before_it_joins(stub, tmp_path, monkeypatch):
    tmp, states = tmp_path / "tmp", tmp_path / "states"
    states.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)
    for name in ("11", "12", "13", "14", "uid0", "x1"):
        (tmp / f"kdbench-mps-{name}" / "pipe").mkdir(parents=True)
    (tmp / "kdbench-mps-15").write_text("")  # not a folder
    (tmp / "kdbench-mps-11" / "pipe" / "running").touch()  # its daemon outlived job 11
    (states / "12").write_text("RUNNING")
    (states / "13").write_text("down")  # SLURM cannot tell
    (states / "14").write_text("invalid")  # purged from slurmctld
    _squeue_stub(stub.parent / "bin", states)
    monkeypatch.setenv("SLURM_JOB_ID", "20")
    assert mps.join() == tmp / "kdbench-mps-20"
    left = sorted(p.name.removeprefix("kdbench-mps-") for p in tmp.iterdir())
    assert left == ["12", "13", "15", "20", "uid0", "x1"]
    calls = stub.read_text().splitlines()
    ended = tmp / "kdbench-mps-11" / "pipe"
    assert calls[:2] == [f"get_server_list {ended}", f"quit {ended}"]  # stopped, then removed
    assert f"start {tmp / 'kdbench-mps-20' / 'pipe'}" in calls
    # without squeue, or for a folder that join() is given, nothing is cleared
    (tmp / "kdbench-mps-16").mkdir()
    which = shutil.which
    with monkeypatch.context() as m:
        m.setattr(shutil, "which", lambda name: None if name == "squeue" else which(name))
        mps.join()
    assert (tmp / "kdbench-mps-16").exists()
    mps.join(tmp / "kdbench-mps-20")
    assert (tmp / "kdbench-mps-16").exists()
    assert mps.clear_ended() == [tmp / "kdbench-mps-16"]


def _join(directory: Path) -> str:
    mps.join(directory)
    return os.environ["CUDA_MPS_PIPE_DIRECTORY"]


def test_jobs_that_start_at_once_start_one_daemon(stub, tmp_path):
    directory = tmp_path / "mps"
    with ProcessPoolExecutor(4) as pool:
        pipes = list(pool.map(_join, [directory] * 8))
    assert pipes == [str(directory / "pipe")] * 8
    assert [c for c in stub.read_text().splitlines() if c.startswith("start")] == [
        f"start {directory / 'pipe'}"
    ]


def test_without_the_control_program_mps_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KdbenchError, match="MPS needs nvidia-cuda-mps-control"):
        mps.join(tmp_path / "mps")
    assert not mps.stop(tmp_path / "mps")  # the workflow's end: nothing to stop, no error


def _job(**kwargs) -> str:
    return os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "-")


def test_run_job_joins_for_gpu_jobs_when_asked(stub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert runs.run_job(_job, None, gpu=True) == "-"  # auto, outside SLURM
    monkeypatch.setenv("KDBENCH_MPS", "1")
    assert runs.run_job(_job, None) == "-"  # not a training job
    assert runs.run_job(_job, None, gpu=True, train={"device": "cpu"}) == "-"  # on the CPU
    assert stub.read_text() == ""
    pipe = str(mps.job_directory() / "pipe")
    assert runs.run_job(_job, None, gpu=True) == pipe
    assert f"start {pipe}" in stub.read_text().splitlines()
    # a daemon that does not start: the job's one line, exit status 1
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    mps.stop()
    (stub.parent / "fail").touch()
    with pytest.raises(SystemExit) as exit_:
        runs.run_job(_job, None, gpu=True)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.splitlines()  # the log, then the one line
    assert err[-1] == "kdbench: error: the MPS daemon did not start: no GPU"


def test_under_auto_a_slurm_job_joins_or_goes_on_without_mps(stub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    log = tmp_path / "job.log"
    pipe = str(tmp_path / "kdbench-mps-42" / "pipe")
    assert runs.run_job(_job, log, gpu=True) == pipe  # KDBENCH_MPS unset: auto
    assert stub.read_text().splitlines()[-1] == f"start {pipe}"
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    mps.stop()
    (stub.parent / "fail").touch()  # a daemon that does not start: the job goes on without
    assert runs.run_job(_job, log, gpu=True) == "-"
    assert "MPS: not used (KDBENCH_MPS=auto): the MPS daemon did not start: no GPU" in (
        log.read_text()
    )
    assert "kdbench: error" not in capsys.readouterr().err


@pytest.mark.slow
def test_the_workflow_trains_under_mps_and_stops_the_daemon_at_its_end(stub, tmp_path, monkeypatch):
    """One demo teacher through the workflow with KDBENCH_MPS=1."""
    work = tmp_path / "work"
    work.mkdir()
    # device auto, not the demo's cpu (no MPS for a run on the CPU; auto is the CPU here too)
    demo = (REPO / "config" / "demo.yaml").read_text()
    (work / "demo.yaml").write_text(demo.replace("  device: cpu\n", "  device: auto\n"))
    monkeypatch.setenv("KDBENCH_MPS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    target = "results/digits/teachers/resnet20/seed0/metrics.json"
    proc = snakemake(target, "--cores", "1", "--configfile", "demo.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = str(tmp_path / f"kdbench-mps-uid{os.getuid()}" / "pipe")
    log = (work / "results/logs/digits/teachers/resnet20-seed0.log").read_text()
    assert f"MPS: a client of the daemon in {Path(pipe).parent}" in log
    metrics = json.loads((work / target).read_text())
    assert metrics["provenance"]["mps_pipe_directory"] == pipe
    calls = stub.read_text().splitlines()
    assert calls.count(f"start {pipe}") == 1 and calls[-1] == f"quit {pipe}"


@pytest.mark.slow
def test_the_gpu_check_of_the_workflow_jobs_under_mps_runs(stub, tmp_path):
    """tests/gpu/mps_jobs.py (measure.sh mps-jobs) on the CPU: two jobs join one daemon."""
    out = tmp_path / "mps-jobs.json"
    argv = ["--device", "auto", "--jobs", "2", "--epochs", "1", "--json", str(out)]
    run_gpu_script("mps_jobs.py", *argv)
    doc = json.loads(out.read_text())
    assert doc["weights_identical_per_job"] == [True, True] and doc["daemon_stopped"]
    assert doc["max_weight_difference_per_job"] == [0.0, 0.0] and doc["warmup_wall_seconds"] > 0
    assert [r["mps"] for r in doc["rounds"]] == [False, True]
    assert all(run["mps_pipe_directory"] for run in doc["rounds"][1]["runs"])
    assert not any(run["mps_pipe_directory"] for run in doc["rounds"][0]["runs"])
    assert sum(c.startswith("start ") for c in stub.read_text().splitlines()) == 1
