from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")


def snakemake(
    *args: str, cwd: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the project's Snakefile with ``args`` (working directory ``cwd``, default the repo)."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args]
    if cwd is not None:
        cmd += ["-d", str(cwd)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run, as rule → count."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    except StopIteration:
        return counts
    for line in lines[start + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
