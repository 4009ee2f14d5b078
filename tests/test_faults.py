"""Kill anywhere: 3 SIGKILLs per method family (ft: 4), through Snakemake (tests/faults.py)."""

from __future__ import annotations

import faults
import pytest

pytestmark = pytest.mark.slow


def test_runs_killed_anywhere_complete_with_the_uninterrupted_result(tmp_path):
    chains = faults.run(tmp_path, list(faults.FAMILIES), kills=3, seed=0)
    report = "\n".join(f"{c.family}: {p}" for c in chains for p in c.problems)
    assert not report, report
    kills = [point for chain in chains for point in chain.kills]
    assert len(kills) >= 12
    # every kind of kill point was hit: mid-epoch, mid-state-write, mid-final-write
    assert any(p.startswith("step") for p in kills)
    assert any(p.startswith(("write:seed0.pt", "rotate:seed0.pt")) for p in kills)
    assert any(p.endswith(":final") for p in kills)
    ft = next(c for c in chains if c.family == "ft")
    assert any("paraphraser" in p for p in ft.kills)
