"""Named kill points, for testing that a run killed anywhere loses nothing (tests/faults.py).

Training calls :func:`point` at every batch and every file write, and :func:`phase` when an
epoch or the final writes begin; a point's id is ``<name>:<phase>``, e.g. ``step3:e2`` (batch 3
of epoch 2), ``write:seed0.pt:e2`` (the state written after epoch 2, before its rename) or
``write:metrics.json:final``. Each id occurs once in an uninterrupted run. Two environment
variables, unset in normal use, act on them:

* ``KDBENCH_FAULT=<id>``: at that point the process group (the job and the Snakemake that
  started it) is killed with SIGKILL, as a node failure or walltime kill would, or sent the
  signal ``KDBENCH_FAULT_SIGNAL`` names instead (``TERM``: a batch system's time limit or
  cancellation, which a job answers by stopping once its state in flight is on disk);
* ``KDBENCH_FAULT_LOG=<file>``: every id reached is appended to the file, one per line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

_phase = "start"
_thread = threading.local()  # a thread's own phase (:func:`in_phase`)


def phase(name: str) -> None:
    """Name the part of the run that follows (``e<epoch>`` or ``final``)."""
    global _phase
    _phase = name


def current_phase() -> str:
    """The phase that this thread's points are named after."""
    return getattr(_thread, "phase", None) or _phase


@contextlib.contextmanager
def in_phase(name: str) -> Iterator[None]:
    """Name this thread's points after phase ``name`` meanwhile, whatever :func:`phase` says (a
    background write of the state saved in that phase: ``kdbench.io.StateWriter``)."""
    _thread.phase = name
    try:
        yield
    finally:
        _thread.phase = None


def point(name: str) -> None:
    """A place where the run may be killed; does nothing unless the variables above are set."""
    fault = os.environ.get("KDBENCH_FAULT")
    record = os.environ.get("KDBENCH_FAULT_LOG")
    if not fault and not record:
        return
    ident = f"{name}:{current_phase()}"
    if record:
        with open(record, "a") as fh:
            fh.write(ident + "\n")
    if ident == fault:
        name = os.environ.get("KDBENCH_FAULT_SIGNAL") or "KILL"
        os.killpg(os.getpgrp(), signal.Signals[f"SIG{name.upper()}"])
