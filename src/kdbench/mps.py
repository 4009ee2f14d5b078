"""NVIDIA MPS (Multi-Process Service): several training processes on one GPU at once.

Without MPS the CUDA processes on one GPU take turns (time slicing), so graphed runs, which each
keep the GPU busy with small kernels, gain nothing from sharing it. As clients of one MPS daemon
their kernels run side by side: 4 compiled, graphed KD runs on an H200 gave 1.54x the throughput
of one (uncompiled, 8 gave 1.98x; README, Performance).

``KDBENCH_MPS=1`` makes every training job of the workflow a client of an MPS daemon that the
first of them starts: one per SLURM job (the students of a ``students`` group job join it in
turn: the SLURM plugin runs them one after another; it ends with that job, and what it leaves
behind is cleared by the next such job on the node, :func:`clear_ended`), or, outside SLURM,
one per user on the machine, which the workflow stops when it ends (:func:`stop`).
``KDBENCH_MPS=auto``, the default, does so inside a SLURM job whose node has NVIDIA's control
program, and goes on without MPS where its daemon does not start; ``0`` never.
:func:`daemon` is the ``with``-block daemon of ``python -m kdbench.bench concurrent --mps``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kdbench.errors import KdbenchError

#: NVIDIA's MPS control program (driver tools)
CONTROL = "nvidia-cuda-mps-control"
#: the environment variable that asks for MPS in the workflow's training jobs
VARIABLE = "KDBENCH_MPS"
#: the name of a daemon's folder (:func:`job_directory`) before its owner
PREFIX = "kdbench-mps-"


def setting() -> str:
    """``KDBENCH_MPS`` as ``on`` (``1``/``true``/``yes``), ``off`` (``0``/``false``/``no``) or
    ``auto`` (``auto``, or unset: the default)."""
    value = os.environ.get(VARIABLE, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "no"):
        return "off"
    if value in ("1", "true", "yes"):
        return "on"
    raise KdbenchError(f"{VARIABLE} must be 1, 0 or auto, got {os.environ[VARIABLE]!r}")


def wanted() -> bool:
    """Whether the training jobs join an MPS daemon: ``KDBENCH_MPS=1``, or ``auto`` (the
    default) inside a SLURM job (``SLURM_JOB_ID``) with :data:`CONTROL` on the PATH."""
    mode = setting()
    if mode == "auto":
        return bool(os.environ.get("SLURM_JOB_ID")) and shutil.which(CONTROL) is not None
    return mode == "on"


def wanted_or_exit() -> bool:
    """:func:`wanted`, a bad value being one line on stderr and exit status 1 (the workflow
    checks it before any job starts)."""
    try:
        return wanted()
    except KdbenchError as exc:
        raise SystemExit(f"kdbench: error: {exc}") from None


def job_directory() -> Path:
    """Where the workflow's MPS daemon keeps its pipes and logs: per SLURM job inside one,
    else per user, under the temporary directory."""
    owner = os.environ.get("SLURM_JOB_ID") or f"uid{os.getuid()}"
    return Path(tempfile.gettempdir()) / f"{PREFIX}{owner}"


def slurm_job_ended(job: str) -> bool | None:
    """Whether SLURM says its job ``job`` has ended (``True``: ``squeue`` lists it no more, or
    no longer knows it), is queued or running (``False``), or cannot tell (``None``: no
    ``squeue``, or it failed otherwise)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        proc = subprocess.run(
            [squeue, "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode == 0:
        return not proc.stdout.strip()  # squeue -j leaves out a job that has ended
    return True if "invalid job id" in proc.stderr.lower() else None


def clear_ended(parent: Path | None = None) -> list[Path]:
    """Remove the folders (:func:`job_directory`) of this user's SLURM jobs that have ended,
    from ``parent`` (default: the temporary directory), first stopping any daemon that still
    answers in one; the folders removed. SLURM does not remove them where a node's temporary
    directory is not the job's own, nor, where it does not track a job's background processes
    (``ProctrackType=proctrack/linuxproc``), the daemon that the job started. A folder whose
    job SLURM cannot tell about stays."""
    parent = parent or Path(tempfile.gettempdir())
    own = os.environ.get("SLURM_JOB_ID")
    removed = []
    for folder in sorted(parent.glob(f"{PREFIX}*")):
        job = folder.name.removeprefix(PREFIX)
        try:
            mine = (
                folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid()
            )
        except OSError:
            continue
        if not job.isdigit() or job == own or not mine or slurm_job_ended(job) is not True:
            continue
        stop(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def client_env(directory: Path) -> dict[str, str]:
    """The variables that make a CUDA process a client of the daemon of ``directory``
    (creating its pipe and log folders)."""
    env = {}
    for name, sub in (("CUDA_MPS_PIPE_DIRECTORY", "pipe"), ("CUDA_MPS_LOG_DIRECTORY", "log")):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(directory / sub)
    return env


def _control(
    directory: Path, *args: str, command: str | None = None
) -> subprocess.CompletedProcess:
    control = shutil.which(CONTROL)
    if control is None:
        raise KdbenchError(f"MPS needs {CONTROL} (NVIDIA's driver tools) on the PATH")
    return subprocess.run(
        [control, *args],
        env={**os.environ, **client_env(directory)},
        input=f"{command}\n" if command else None,
        stdin=None if command else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def running(directory: Path) -> bool:
    """Whether the MPS daemon of ``directory`` answers."""
    return _control(directory, command="get_server_list").returncode == 0


def start(directory: Path) -> dict[str, str]:
    """Start an MPS control daemon with its pipes and logs under ``directory``; its clients'
    environment (:func:`client_env`)."""
    started = _control(directory, "-d")
    if started.returncode:
        why = (started.stderr or started.stdout).strip().splitlines()
        raise KdbenchError(f"the MPS daemon did not start: {why[-1] if why else '?'}")
    return client_env(directory)


def stop(directory: Path | None = None) -> bool:
    """Stop the MPS daemon of ``directory`` (default :func:`job_directory`) if one answers
    there; whether one did."""
    directory = directory or job_directory()
    try:
        if shutil.which(CONTROL) is None or not running(directory):
            return False
        _control(directory, command="quit")
    except (OSError, subprocess.SubprocessError):  # nothing to stop, or it hung: leave it
        return False
    return True


@contextlib.contextmanager
def daemon(directory: Path) -> Iterator[dict[str, str]]:
    """An MPS control daemon of this process's own under ``directory``, running for the
    ``with`` block; yields the environment of its clients."""
    env = start(directory)
    try:
        yield env
    finally:
        _control(directory, command="quit")


def join(directory: Path | None = None) -> Path:
    """Make this process a client of the MPS daemon of ``directory`` (default
    :func:`job_directory`), starting it unless it runs: the jobs that start at once take turns
    under a file lock, so that one starts it. Call it before CUDA is initialised. In a SLURM
    job, for the default directory, it first clears what this user's ended SLURM jobs left on
    the node (:func:`clear_ended`)."""
    if directory is None and os.environ.get("SLURM_JOB_ID"):
        with contextlib.suppress(OSError):
            clear_ended()
    directory = directory or job_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not running(directory):
            start(directory)
    os.environ.update(client_env(directory))
    return directory
