"""``snakemake`` for the SLURM tests: the head process, its job status checks at most
``KDBENCH_TEST_STATUS_SECONDS`` (default 2) seconds apart.

The SLURM executor plugin (2.8.0) waits 10 s longer after each status check that saw no job end,
up to 180 s, and again from its initial wait once one has: right for a cluster, where jobs take
hours, but the test's jobs take 15-75 s, so each one's end went unseen for up to 40 s: the demo
through the profile took 365 s alone, and 272 s with checks 2 s apart. Only how often the head
process asks changes; the profile, the plugin and what the jobs run do not. Run as
``python tests/slurm/head.py ARGS``, as ``snakemake ARGS``.
"""

from __future__ import annotations

import os
import sys

from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor

CAP = float(os.environ.get("KDBENCH_TEST_STATUS_SECONDS", "2"))
_interval = RemoteExecutor.next_seconds_between_status_checks


def _capped(self: RemoteExecutor, seconds: float | None) -> None:
    _interval.fset(self, seconds if seconds is None else min(seconds, CAP))


RemoteExecutor.next_seconds_between_status_checks = _interval.setter(_capped)

if __name__ == "__main__":
    from snakemake.cli import main

    sys.exit(main())
