"""Entry points of the workflow's scripts: one call per job.

``train`` trains a teacher (``role="teacher"``) or distils a student, ``train_cohort`` several
students on one teacher pass (:mod:`kdbench.cohort`); ``run_job`` wraps any entry
point with logging to the job's log file, the thread count, and error handling: a problem with
the input is one line on stderr and exit status 1; an unexpected error keeps its traceback in the
log file and prints one line that points there. SIGTERM (a batch system's time limit or
cancellation) and SIGINT stop a job in one line too, with exit status 143 and 130, once the
training state in flight is on disk, so that running the job again loses no finished epoch.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdbench import io, methods, models, mps
from kdbench.cohort import Cohort
from kdbench.data import Dataset, load_dataset
from kdbench.errors import KdbenchError, Terminated, one_line, sigterm_raises
from kdbench.train import Run, RunOutputs, TrainConfig, file_sha256, fit, fit_runs

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
        torch.set_num_threads(int(threads))
        # torch.compile's worker processes: as many as the job's threads, not one per CPU of
        # the node (8 students of a SLURM job would otherwise start 8 each); read when
        # torch._inductor is first imported, which no kdbench import does
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(int(threads)))
    log.info(
        "job %s on %s (SLURM_JOB_ID=%s, node %s, CUDA_VISIBLE_DEVICES=%s, %d threads)",
        func.__name__,
        socket.gethostname(),
        os.environ.get("SLURM_JOB_ID", "-"),
        os.environ.get("SLURMD_NODENAME", "-"),
        os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
        torch.get_num_threads(),
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


def train(
    *,
    role: str,
    dataset: str,
    data: dict[str, Any],
    arch: str,
    seed: int,
    method: str,
    variant: str,
    method_params: dict[str, Any],
    train: dict[str, Any],
    outputs: dict[str, Any],
    state: str | Path,
    teacher: str | None = None,
    teacher_weights: str | Path | None = None,
    assets: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train a teacher or a student; write metrics.json, weights and curves to ``outputs``.

    ``assets`` are the extra files a method requires (e.g. ft's ``paraphraser``)."""
    cfg = TrainConfig.from_config(train)
    io.check_writable(state, *outputs.values())
    ds = load_dataset(dataset, **data)
    log.info("data %s: %s", dataset, ds.summary()["sizes"])
    m, record = _build_run(
        role, dataset, data, ds, arch, seed, method, variant, method_params, teacher,
        teacher_weights, assets,
    )  # fmt: skip
    return fit(
        m,
        ds,
        cfg,
        seed=int(seed),
        outputs=RunOutputs.from_mapping(outputs),
        state_path=state,
        record=record,
    )


def train_cohort(
    *,
    name: str,
    dataset: str,
    data: dict[str, Any],
    teacher: str,
    teacher_weights: str | Path,
    seed: int,
    members: list[dict[str, Any]],
    train: dict[str, Any],
    state: str | Path,
) -> list[dict[str, Any]]:
    """Train the students ``members`` of one dataset, teacher and seed together, on one pass
    of the teacher per batch (:class:`kdbench.cohort.Cohort`). A member is a mapping with the
    keys ``arch``, ``method``, ``variant``, ``method_params``, ``outputs`` and ``assets``, as
    :func:`train` takes them; each member's outputs are those of its own run (on CPU its weights
    and curves are, bit for bit), its metrics.json names the cohort (``cohort``) and its epoch
    times are its share of the cohort's. One resumable ``state`` serves them all."""
    cfg = TrainConfig.from_config(train)
    io.check_writable(state, *(p for m in members for p in m["outputs"].values()))
    ds = load_dataset(dataset, **data)
    log.info("data %s: %s", dataset, ds.summary()["sizes"])
    labels = [f"{m['arch']}-{m['method']}-{m['variant']}" for m in members]
    built, shared = [], None
    for member in members:
        m, record = _build_run(
            "student", dataset, data, ds, member["arch"], seed, member["method"],
            member["variant"], member["method_params"], teacher, teacher_weights,
            member.get("assets"), shared,
        )  # fmt: skip
        if not m.needs_teacher:
            raise KdbenchError(f"cohort {name}: method {member['method']!r} has no teacher")
        shared = m.teacher
        record["cohort"] = {"name": name, "members": labels}
        built.append((m, record))
    cohort = Cohort([m for m, _ in built], labels)
    log.info("cohort %s: %d students on one teacher pass: %s", name, len(labels), ", ".join(labels))
    runs = [
        Run(m.student, record, RunOutputs.from_mapping(member["outputs"]), f"{label}/")
        for (m, record), member, label in zip(built, members, labels, strict=True)
    ]
    return fit_runs(
        cohort,
        ds,
        cfg,
        seed=int(seed),
        runs=runs,
        state_path=state,
        record={"cohort": name, "members": [record for _, record in built]},
    )


def _build_run(
    role: str,
    dataset: str,
    data: dict[str, Any],
    ds: Dataset,
    arch: str,
    seed: int,
    method: str,
    variant: str,
    method_params: dict[str, Any],
    teacher: str | None,
    teacher_weights: str | Path | None,
    assets: dict[str, str] | None,
    shared_teacher: nn.Module | None = None,
) -> tuple[methods.Method, dict[str, Any]]:
    """A run's method, its models built as :func:`train` builds them, and its record.

    The student is built first, right after seeding: the same seed gives the same initial
    weights whatever the method. With ``shared_teacher`` (a cohort's, already loaded) the
    teacher is still built, so that the method starts from the same random state as in a run
    of its own, but the method gets the shared one."""
    method_cls = methods.get(method)
    torch.manual_seed(int(seed))
    student = models.build(arch, ds.num_classes, ds.in_channels)
    teacher_model = None
    teacher_hash = None
    if method_cls.needs_teacher:
        if not teacher or not teacher_weights:
            raise KdbenchError(f"method {method!r} needs a teacher checkpoint")
        teacher_model = models.build(teacher, ds.num_classes, ds.in_channels)
        if shared_teacher is None:
            models.load_weights(teacher_model, teacher_weights, f"teacher {teacher}")
        else:
            teacher_model = shared_teacher
        teacher_hash = _sha256(str(teacher_weights))
    assets = {k: str(v) for k, v in (assets or {}).items()}
    missing = [k for k in method_cls.requires if k not in assets]
    if missing:
        raise KdbenchError(f"method {method!r} needs {', '.join(missing)}")
    m = method_cls(student, teacher_model, method_params, {k: Path(v) for k, v in assets.items()})
    run = {
        "role": role,
        "dataset": dataset,
        "teacher": teacher if role == "student" else None,
        "student": models.canonical_arch(arch) if role == "student" else None,
        "arch": models.canonical_arch(arch),
        "method": method,
        "variant": variant,
        "seed": int(seed),
    }
    record = {
        "run": run,
        "config": {
            "data": data,
            "method": {"name": method, "variant": variant, "params": m.params},
            "teacher_weights": {"path": str(teacher_weights), "sha256": teacher_hash}
            if teacher_hash
            else None,
            "assets": {k: {"path": v, "sha256": _sha256(v)} for k, v in assets.items()},
        },
    }
    return m, record


def _sha256(path: str) -> str:
    """:func:`kdbench.train.file_sha256`, read once per file version (a cohort's members share
    the teacher's checkpoint and assets)."""
    stat = os.stat(path)
    return _sha256_of(path, stat.st_mtime_ns, stat.st_size)


@functools.cache
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)
