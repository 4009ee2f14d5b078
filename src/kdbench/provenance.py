"""What produced a result: package versions, git commit, device, host, scheduler job."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "kdbench",
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "scikit-learn",
    "pandas",
    "tensorly",
    "PyWavelets",
    "matplotlib",
    "snakemake",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info() -> dict[str, Any]:
    """Commit of the kdbench checkout (or of the working directory), and whether it is dirty."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        commit = _git(["rev-parse", "HEAD"], where)
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], where)
            return {"commit": commit, "dirty": bool(status)}
    return {"commit": "unknown", "dirty": None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["name"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    else:
        info["name"] = info["cpu"]
    return info


SLURM_VARIABLES = {
    "job_id": "SLURM_JOB_ID",
    "node": "SLURMD_NODENAME",
    "partition": "SLURM_JOB_PARTITION",
    "restart_count": "SLURM_RESTART_COUNT",
    "cpus_per_task": "SLURM_CPUS_PER_TASK",
    "cuda_visible_devices": "CUDA_VISIBLE_DEVICES",
}


def slurm_info() -> dict[str, str | None] | None:
    """The SLURM job this process runs in (None outside SLURM)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    return {key: os.environ.get(var) for key, var in SLURM_VARIABLES.items()}


def collect(device: torch.device) -> dict[str, Any]:
    """Everything needed to say how and where a run was made."""
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "git": git_info(),
        "device": device_info(device),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm": slurm_info(),
        # the NVIDIA MPS daemon this process is a client of (KDBENCH_MPS, kdbench.mps)
        "mps_pipe_directory": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
    }
