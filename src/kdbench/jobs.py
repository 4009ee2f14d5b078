"""How a workflow job runs: :func:`run_job` wraps its one entry point.

It sends kdbench's log to the job's log file, sets the job's thread count, and handles errors:
a problem with the input is one line on stderr and exit status 1; an unexpected error keeps its
traceback in the log file and prints one line that points there. SIGTERM (a batch system's time
limit or cancellation) and SIGINT stop a job in one line too, with exit status 143 and 130, once
the training state in flight is on disk, so that running the job again loses no finished epoch.

This module does not import torch (about 2 s): the jobs that do not need it (the tables, the
plots, a cohort member's links) start without it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdbench import mps
from kdbench.errors import KdbenchError, Terminated, one_line, sigterm_raises

log = logging.getLogger("kdbench")


def setup_logging(log_path: str | Path | None) -> None:
    """Send kdbench's log to ``log_path`` (appending, so a resumed job keeps its history)."""
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_path, mode="a")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False


def set_threads(threads: int) -> int:
    """Give the job's torch ``threads`` threads: torch's own setting where torch is imported,
    else ``OMP_NUM_THREADS``, which torch reads when it is. Returns torch's thread count, or
    ``threads`` where torch is not imported. Also bounds ``torch.compile``'s worker processes."""
    # torch.compile's worker processes: as many as the job's threads, not one per CPU of the
    # node (8 students of a SLURM job would otherwise start 8 each); read when torch._inductor
    # is first imported, which no kdbench import does
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        return threads
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def run_job(
    func: Callable[..., Any],
    log_path: str | Path | None,
    threads: int | None = None,
    *,
    gpu: bool = False,
    **kwargs: Any,
) -> Any:
    """Run ``func(**kwargs)`` as a workflow job (see the module docstring). A ``gpu`` job (a
    training run) becomes a client of the workflow's NVIDIA MPS daemon first when
    :func:`kdbench.mps.wanted` (``KDBENCH_MPS``), unless its ``train["device"]`` is ``cpu``;
    under ``KDBENCH_MPS=auto`` a daemon that does not start is a warning, not an error."""
    setup_logging(log_path)
    if threads:
        threads = set_threads(int(threads))
    elif "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    log.info(
        "job %s on %s (SLURM_JOB_ID=%s, node %s, CUDA_VISIBLE_DEVICES=%s, %s threads)",
        func.__name__,
        socket.gethostname(),
        os.environ.get("SLURM_JOB_ID", "-"),
        os.environ.get("SLURMD_NODENAME", "-"),
        os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
        threads or "-",
    )
    try:
        with sigterm_raises():
            if gpu and mps.wanted():
                if (kwargs.get("train") or {}).get("device") == "cpu":
                    log.info("MPS: not for a run on the CPU (train.device: cpu)")
                else:
                    _join_mps()
            return func(**kwargs)
    except (Terminated, KeyboardInterrupt) as exc:
        why = str(exc) if isinstance(exc, Terminated) else "interrupted (SIGINT)"
        log.error("%s; a training run's state saved last is kept: running it again resumes", why)
        print(
            f"kdbench: {why}; run the job again to finish it (a training run resumes after its "
            "last saved epoch)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None
    except KdbenchError as exc:
        log.error("%s", one_line(exc))
        print(f"kdbench: error: {one_line(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except Exception as exc:
        log.error("unexpected error:\n%s", traceback.format_exc())
        where = f" (traceback in {log_path})" if log_path else ""
        print(f"kdbench: unexpected error: {one_line(exc)}{where}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _join_mps() -> None:
    try:
        log.info("MPS: a client of the daemon in %s", mps.join())
    except KdbenchError as exc:
        if mps.setting() == "on":
            raise
        log.warning("MPS: not used (KDBENCH_MPS=auto): %s", one_line(exc))
