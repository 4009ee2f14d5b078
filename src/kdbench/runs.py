"""Entry points of the workflow's training scripts: one call per job.

``train`` trains a teacher (``role="teacher"``) or distils a student, ``train_cohort`` several
students on one teacher pass (:mod:`kdbench.cohort`). The scripts run them through
:func:`kdbench.jobs.run_job` (logging, threads, one-line errors), which this module still
exports as ``run_job`` and ``setup_logging``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdbench import io, methods, models
from kdbench.cohort import Cohort
from kdbench.data import Dataset, load_dataset
from kdbench.errors import KdbenchError
from kdbench.jobs import run_job, setup_logging
from kdbench.train import Run, RunOutputs, TrainConfig, file_sha256, fit, fit_runs

log = logging.getLogger("kdbench")

__all__ = ["run_job", "setup_logging", "train", "train_cohort"]


def _load(dataset: str, data: dict[str, Any], cfg: TrainConfig) -> Dataset:
    """Dataset ``dataset`` with the config's ``data`` settings, on ``cfg.train_size`` of its
    training images (all where unset); its split sizes logged."""
    ds = load_dataset(dataset, **data).with_train_size(cfg.train_size)
    log.info("data %s: %s", dataset, ds.summary()["sizes"])
    return ds


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
    ds = _load(dataset, data, cfg)
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
    ds = _load(dataset, data, cfg)
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
