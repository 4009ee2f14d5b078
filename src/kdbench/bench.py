"""Benchmarks: ``python -m kdbench.bench {epochs,concurrent,grid,spread,graphs,methods,state}
[options]``.

``epochs`` times whole training epochs of kdbench's trainer (``kdbench.train.train_epoch``, the
loop ``fit`` runs; warm-up epochs excluded) for a dataset shape, an architecture pair and a list
of methods, and reports images/s, seconds per epoch (training, and evaluation of the validation
and test splits), and peak memory. In the same run it times the reference loop of
:mod:`kdbench.reference` (the originals' way of training) and prints every figure also as a ratio
to it. ``--ablation`` switches the speed options on one at a time.

``grid`` estimates the GPU-hours of a config's whole grid from the epoch times of ``epochs``
JSON files. ``spread`` trains real runs (digits) to measure run-to-run and seed spread of the
fast, plain and deterministic settings.

``graphs`` trains each method twice from the same weights and data, eagerly and from CUDA
graphs, and compares the curves and weights (exit status 1 if they differ beyond a tolerance, or
if a graph fell back to eager steps on CUDA).

``concurrent`` runs N copies of ``epochs`` on one device at once (N = 1, 2, 4, 8 by default) and
reports their total throughput; ``--mps`` runs them as clients of an NVIDIA MPS daemon of its
own, so that their kernels can run side by side instead of taking turns.

``methods`` times one training step (``kdbench.train.train_step``: forward, losses, backward, the
optimizer steps) of every method on the same student, teacher and batch, and prints each as a
ratio to ``featuremap``. It also times ``kdbench.tucker.decompose`` against tensorly's ``tucker``
(pytorch backend, HOOI, SVD init, 100 iterations, tol 1e-4, as the original projects called it)
on a 128×64×8×8 tensor with ranks (128, 32, 8, 8), and compares their reconstructions; and
the sample-wise decomposition by each ``train.samplewise_solver`` (``eigh``; ``svd``, one
batched SVD of the unfoldings, cuSOLVER's ``gesvda`` on CUDA; on CUDA ``jacobi``,
:mod:`kdbench.jacobi`'s kernel), each against LAPACK's in double precision
(``--decomposition-only``: the decompositions alone). Warm-up steps are excluded;
CUDA timings are synchronised. ``--json`` saves every figure.

``state`` times what saving the training state after every epoch costs the training loop: the
snapshot it waits for (:class:`kdbench.io.StateWriter`), the write that then runs beside
training, and the synchronous write kdbench did before, for one student and a cohort's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch
from torch import Tensor

from kdbench import io, jacobi, methods, models, mps, provenance, reference, tucker
from kdbench.cohort import Cohort
from kdbench.data import Dataset, Split
from kdbench.errors import KdbenchError, one_line
from kdbench.methods.ft import Paraphraser
from kdbench.train import (
    TrainConfig,
    cohort_stacking,
    cpu_state_dict,
    evaluate,
    evaluate_runs,
    make_eval_batch,
    make_loaders,
    make_schedule,
    make_sgd,
    make_step,
    memory_format,
    prepare,
    resolve_device,
    rng_state,
    train_epoch,
    train_step,
)

#: (method, parameters) timed by ``methods``: every method, the Tucker variants included
CASES: list[tuple[str, dict[str, Any]]] = [
    ("featuremap", {}),
    ("vanilla", {}),
    ("kd", {}),
    ("ft", {}),
    ("tucker", {"rank": 32}),
    ("tucker", {"rank": 32, "decomposition": "sample"}),
    ("tucker", {"rank": 32, "basis": "own"}),
    ("tucker_recomp", {"rank": 32, "target": "teacher"}),
    ("tucker_recomp", {"rank": 32, "target": "student"}),
    ("tucker_recomp", {"rank": 32, "target": "both"}),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _label(name: str, params: dict[str, Any]) -> str:
    cls = methods.get(name)
    variant = cls.variant_name(cls.resolve_params(params)) if cls.grid else ""
    return f"{name} {variant}".strip()


def bench_methods(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    if args.decomposition_only:
        return {"decomposition": bench_decomposition(device, args)}
    cfg = TrainConfig.from_config({"epochs": 1, "batch_size": args.batch, "device": args.device})
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(*shape, generator=g).to(device)
    yb = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    xb = xb.contiguous(memory_format=memory_format(cfg))
    teacher = models.build(args.teacher, args.classes, args.channels)
    steps: list[Callable[[], Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paraphraser = Path(tmp) / "paraphraser.pt"
        io.save_torch(paraphraser, Paraphraser(64, 0.5).state_dict())
        for name, params in CASES:
            torch.manual_seed(0)
            student = models.build(args.student, args.classes, args.channels)
            cls = methods.get(name)
            assets = {"paraphraser": paraphraser} if "paraphraser" in cls.requires else {}
            method = cls(student, teacher if cls.needs_teacher else None, params, assets).to(device)
            method.to(memory_format=memory_format(cfg))
            method.train()
            optimizers = {k: make_sgd(m, cfg) for k, m in method.trainable().items()}

            def step(method: Any = method, optimizers: Any = optimizers) -> None:
                train_step(method, optimizers, xb, yb, device, cfg)

            _time(step, device, args.warmup, 0)
            steps.append(step)
    # Interleaved rounds (one step of each method per round) so that drift in clock speed or
    # load affects every method alike; the median over rounds is reported.
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.steps):
        for i, step in enumerate(steps):
            times[i] += _time(step, device, 0, 1)
    results = [
        {"method": _label(name, params), "seconds": statistics.median(t)}
        for (name, params), t in zip(CASES, times, strict=True)
    ]
    for r in results:
        print(f"  {r['method']:<28} {r['seconds'] * 1e3:9.2f} ms/step", flush=True)
    base = results[0]["seconds"]
    for r in results:
        r["ratio_to_featuremap"] = r["seconds"] / base
    return {"steps": results, "decomposition": bench_decomposition(device, args)}


def _samplewise_agreement(
    got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]]
) -> dict[str, float]:
    """How far a sample-wise decomposition ``got`` is from ``want``: the largest difference of
    the projections onto their channel subspaces (``U Uᵀ``: none within a degenerate
    eigenspace), and the cores' relative difference with each factor column's sign aligned."""
    (core, (factor, *_)), (ref_core, (ref, *_)) = got, want
    core, factor = core.double().cpu(), factor.double().cpu()
    ref_core, ref = ref_core.double().cpu(), ref.double().cpu()
    projector = (factor @ factor.mT - ref @ ref.mT).abs().amax()
    sign = torch.sign((factor * ref).sum(-2))  # (B, r)
    aligned = core * sign.where(sign != 0, torch.ones_like(sign))[..., None, None]
    return {
        "projector_max_difference": float(projector),
        "core_relative_difference": float((aligned - ref_core).norm() / ref_core.norm()),
    }


def bench_samplewise_solvers(
    x: Tensor, ranks: Sequence[int], device: torch.device, repeats: int
) -> dict[str, dict[str, Any]]:
    """Seconds (median of ``repeats``) of the sample-wise decomposition of ``x`` by each of
    the solvers of :data:`kdbench.tucker.SAMPLEWISE_SOLVERS` that runs on ``device``
    (``eigh``: block Jacobi on CUDA, LAPACK on the host; ``svd``: one batched SVD, cuSOLVER's
    ``gesvda`` on CUDA; ``jacobi``, on CUDA only: :mod:`kdbench.jacobi`'s kernel, with the
    most sweeps a sample took), and how far each is from LAPACK's decomposition in double
    precision."""
    unfolded = tucker._unfold(x.detach().double().cpu(), 1, batched=True)
    ref_factor = tucker._top(torch.linalg.eigh(unfolded @ unfolded.mT)[1], ranks[0])
    ref_core = (ref_factor.mT @ unfolded).reshape(x.shape[0], ranks[0], *x.shape[2:])
    out: dict[str, dict[str, Any]] = {}
    for solver in ("eigh", "svd", "jacobi"):
        with tucker.solving(samplewise_solver=solver):
            if tucker.samplewise_solver_on(device) != solver:
                continue  # jacobi where it comes to eigh
            times = _time(lambda: tucker.decompose_samplewise(x, ranks), device, 1, repeats)
            got = tucker.decompose_samplewise(x, ranks)
        driver = tucker.SVD_DRIVERS.get(device.type) if solver == "svd" else None
        out[solver] = {
            "seconds": statistics.median(times),
            **({"driver": driver} if driver else {}),
            **_samplewise_agreement(got, (ref_core, [ref_factor])),
        }
        if solver == "jacobi":
            sweeps = jacobi.solve(tucker._unfold(x.detach(), 1, batched=True), ranks[0])[2]
            out[solver]["sweeps_max"] = int(sweeps.max())
    return out


def bench_decomposition(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    torch.manual_seed(0)
    x = torch.relu(torch.randn(128, 64, 8, 8, device=device))
    ranks = (128, 32, 8, 8)
    ours = _time(lambda: tucker.decompose(x, ranks), device, 3, args.decomp_repeats)
    core, factors = tucker.decompose(x, ranks)
    mine = tucker.recompose(core, factors)
    tl.set_backend("pytorch")
    try:
        theirs_times = _time(
            lambda: tl_tucker(x, rank=list(ranks), init="svd", n_iter_max=100, tol=1e-4),
            device,
            1,
            args.tensorly_repeats,
        )
        tl_core, tl_factors = tl_tucker(x, rank=list(ranks), init="svd", n_iter_max=100, tol=1e-4)
        ref = tl.tucker_to_tensor((tl_core, tl_factors)).float()
    finally:
        tl.set_backend("numpy")
    out = {
        "shape": list(x.shape),
        "ranks": list(ranks),
        "kdbench_seconds": statistics.median(ours),
        "tensorly_seconds": statistics.median(theirs_times),
        "reconstruction_relative_difference": float((mine - ref).norm() / ref.norm()),
        "kdbench_relative_error": float(tucker.relative_error(x, mine)),
        "tensorly_relative_error": float(tucker.relative_error(x, ref)),
    }
    out["speedup"] = out["tensorly_seconds"] / out["kdbench_seconds"]
    # where the eigendecompositions run (train.eigh_on_host), whole-tensor and sample-wise
    placements = [False, True] if device.type == "cuda" else [False]
    sample_ranks = ranks[1:]
    for on_host in placements:
        with tucker.solving(eigh_on_host=on_host, samplewise_solver="eigh"):
            where = "host" if on_host else "device"
            full = _time(lambda: tucker.decompose(x, ranks), device, 3, args.decomp_repeats)
            sample = _time(
                lambda: tucker.decompose_samplewise(x, sample_ranks), device, 1, args.decomp_repeats
            )
        out[f"eigh_on_{where}"] = {
            "full_seconds": statistics.median(full),
            "samplewise_seconds": statistics.median(sample),
        }
    out["samplewise_solvers"] = bench_samplewise_solvers(
        x, sample_ranks, device, args.decomp_repeats
    )
    return out


#: dataset shapes for ``epochs``: (channels, image size, classes, train, validation, test size)
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "cifar100": (3, 32, 100, 45000, 5000, 10000),
    "cifar10": (3, 32, 10, 45000, 5000, 10000),
    "fashion_mnist": (1, 28, 10, 55000, 5000, 10000),
    "digits": (1, 16, 10, 1150, 270, 360),
}

#: ``--ablation``: the speed switches, switched on one at a time from the plain path. Not
#: ``cudnn_benchmark`` (off on every rung): cuDNN keeps, per process and thread, the algorithm it
#: first chose for each convolution (keyed by shapes, dtype and layout, not by autotuning), so
#: in one process a rung that turns autotuning on would reuse the choices of the rungs before
#: it. Compare it in two processes (``epochs --set cudnn_benchmark=false`` and ``=true``).
LADDER: list[tuple[str, dict[str, Any]]] = [
    (
        "plain",
        {
            "data_on_device": False,
            "bf16": False,
            "channels_last": False,
            "fused": False,
            "check_every_step": True,
            "compile": "none",
            "cuda_graphs": False,
            "cudnn_benchmark": False,
            "fold_teacher": False,
            "overlap_teacher": False,
            "pipeline_targets": False,
        },
    ),
    ("+ data on device", {"data_on_device": True}),
    ("+ bf16 autocast", {"bf16": True}),
    ("+ channels_last", {"channels_last": True}),
    ("+ fused SGD", {"fused": True}),
    ("+ no host sync per step", {"check_every_step": False}),
    ("+ CUDA graphs", {"cuda_graphs": True}),
    ("+ teacher BN folded", {"fold_teacher": True}),
    ("+ teacher overlapped", {"overlap_teacher": True}),
    ("+ teacher two batches ahead", {"pipeline_targets": True}),
]


def _cases(selected: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    if not selected:
        return CASES
    cases = [c for c in CASES if c[0] in selected or _label(*c) in selected]
    unknown = set(selected) - {c[0] for c in cases} - {_label(*c) for c in cases}
    if unknown:
        known = ", ".join(dict.fromkeys([c[0] for c in CASES] + [_label(*c) for c in CASES]))
        raise KdbenchError(f"bench: unknown method(s) {', '.join(sorted(unknown))} ({known})")
    return cases


def _synthetic(n: int, shape: tuple[int, ...], classes: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8).float() / 255
    return Split(x, torch.randint(0, classes, (n,), generator=g))


def _synthetic_data(channels: int, size: int, classes: int, sizes: tuple[int, int, int]) -> Dataset:
    """Random images of one shape: train, validation and test splits of ``sizes``."""
    splits = [_synthetic(n, (channels, size, size), classes, seed) for seed, n in enumerate(sizes)]
    return Dataset("bench", *splits, classes, (0.5,) * channels, (0.25,) * channels)


def _build(
    case: tuple[str, dict[str, Any]],
    teacher: torch.nn.Module,
    student_arch: str,
    classes: int,
    channels: int,
    paraphraser: Path,
) -> methods.Method:
    name, params = case
    torch.manual_seed(0)
    student = models.build(student_arch, classes, channels)
    cls = methods.get(name)
    assets = {"paraphraser": paraphraser} if "paraphraser" in cls.requires else {}
    return cls(student, teacher if cls.needs_teacher else None, params, assets)


class _Run(NamedTuple):
    """What ``fit`` sets up for a run: the train loader, the validation and test loaders, the
    optimizers and their learning-rate schedules, the step and the evaluation of a batch."""

    train: Any
    evals: list[Any]
    optimizers: dict[str, torch.optim.Optimizer]
    schedules: list[Any]
    step_fn: Any
    eval_fn: Any

    def next_lr(self) -> None:
        """The schedules' step at the end of an epoch, as in ``fit``."""
        for schedule in self.schedules:
            schedule.step()


def _trainer(method: methods.Method, cfg: TrainConfig, data: Dataset, device: torch.device) -> _Run:
    """:class:`_Run` of ``method`` (prepared) under ``cfg`` on ``data``, seed 0."""
    train, *evals = make_loaders(data, cfg, device, seed=0)
    prepare(method, cfg, device)
    optimizers = {k: make_sgd(m, cfg) for k, m in method.trainable().items()}
    return _Run(
        train,
        evals,
        optimizers,
        [make_schedule(o, cfg) for o in optimizers.values()],
        make_step(method, optimizers, device, cfg),
        make_eval_batch(device, cfg),
    )


def time_epochs(
    method: methods.Method,
    cfg: TrainConfig,
    data: Dataset,
    device: torch.device,
    epochs: int,
    warmup: int,
    before_timing: Any = None,
) -> dict[str, Any]:
    """Median training and evaluation seconds per epoch of ``method`` under ``cfg``.

    The learning-rate schedule steps after every epoch, as in ``fit``, so that an epoch's time
    includes what a new learning rate costs the next one (with CUDA graphs, writing it into the
    tensor the captured update reads; a new capture before the tenth session of 2026-11-26).
    ``peak_cuda_mb`` counts what earlier rows of the process still hold (``cuda_mb_before``,
    allocated before this row's trainer was built), ``peak_cuda_mb_row`` only this row's."""
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    run = _trainer(method, cfg, data, device)
    train = run.train
    train_times: list[float] = []
    eval_times: list[float] = []
    warmup_seconds = 0.0
    for epoch in range(warmup + epochs):
        if epoch == warmup:
            if before_timing is not None:
                before_timing()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.time()
        _sync(device)
        t0 = time.perf_counter()
        train_epoch(method, run.optimizers, train, epoch, device, cfg, step_fn=run.step_fn)
        _sync(device)
        t1 = time.perf_counter()
        # as fit does: a stacked cohort's stacks once for all their students
        evaluate_runs(method, len(method.students()), tuple(run.evals), device, cfg, run.eval_fn)
        t2 = time.perf_counter()
        run.next_lr()
        if epoch >= warmup:
            train_times.append(t1 - t0)
            eval_times.append(t2 - t1)
        else:
            warmup_seconds += t2 - t0
    seconds = statistics.median(train_times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "train_seconds": seconds,
        "eval_seconds": statistics.median(eval_times),
        "epoch_seconds": seconds + statistics.median(eval_times),
        "images_per_second": train.num_samples / seconds,
        "train_images": train.num_samples,
        "timed_epochs": epochs,
        # the untimed first epochs, training and evaluation: compilation, graph capture
        "warmup_seconds": warmup_seconds,
        "warmup_epochs": warmup,
        "started": started,
        "ended": time.time(),
        "peak_cuda_mb": peak,
        "cuda_mb_before": before,
        "peak_cuda_mb_row": None if peak is None else peak - before,
        **_how_ran(run.step_fn, run.eval_fn),
    }


def _how_ran(step_fn: Any, eval_fn: Any) -> dict[str, str]:
    """How a run's steps and evaluations ran: ``eager``, or the status of its CUDA graphs
    (:class:`kdbench.graphs.GraphedStep`, :class:`kdbench.graphs.GraphedEval`)."""
    return {
        "steps": getattr(step_fn, "status", "eager"),
        "evaluation": getattr(eval_fn, "status", "eager"),
    }


def time_reference(
    case: tuple[str, dict[str, Any]],
    teacher: torch.nn.Module,
    teacher_arch: str,
    args: argparse.Namespace,
    student_arch: str,
    train: Split,
    paraphraser: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Seconds per epoch of the reference loop (median step time × steps per epoch)."""
    channels, _, classes = args.shape[:3]
    # a fresh copy of the teacher's weights: fp32, contiguous, never compiled
    plain = models.build(teacher_arch, classes, channels)
    plain.load_state_dict({k: v.detach().cpu() for k, v in teacher.state_dict().items()})
    method = _build(case, plain, student_arch, classes, channels, paraphraser)
    method.to(device)
    extras = {}
    if case[0] == "ft":
        extras = {"paraphraser": method._paraphraser[0], "translator": method.translator}
    images = (train.x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    loader = reference.make_loader(
        images,
        train.y.numpy(),
        args.batch,
        (0.5,) * channels,
        (0.25,) * channels,
        args.reference_workers,
        device.type == "cuda",
    )
    teacher_model = method.teacher if method.needs_teacher else None
    if teacher_model is not None:  # eval mode, but with autograd, as the originals ran it
        teacher_model.eval().requires_grad_(True)
    method.student.train()
    loss_fn = functools.partial(
        reference.step_loss, case[0], method.params, method.student, teacher_model, extras
    )
    trainable = [method.student, *([method.translator] if case[0] == "ft" else [])]
    steps, warmup = args.reference_steps, args.reference_warmup
    if case[1].get("decomposition") == "sample":  # one tensorly call per sample: fewer steps
        steps, warmup = max(1, steps // 10), min(warmup, 1)
    out = reference.time_steps(loss_fn, trainable, loader, device, warmup, steps)
    out["train_seconds"] = out["step_seconds"] * -(-len(train) // args.batch)
    out["images_per_second"] = len(train) / out["train_seconds"]
    return out


def _parse_sets(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise KdbenchError(f"bench: --set wants KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _train_config(args: argparse.Namespace) -> TrainConfig:
    base = {"epochs": 1, "batch_size": args.batch, "device": args.device}
    return TrainConfig.from_config({**base, **_parse_sets(args.set)})


def bench_epochs(
    args: argparse.Namespace,
    device: torch.device,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every row of ``epochs``; ``progress(partial result)`` is called after each row."""
    channels, size, classes, n_train, n_val, n_test = args.shape
    if args.train_size:
        n_train, n_val, n_test = args.train_size, args.train_size // 9, args.train_size // 5
    data = _synthetic_data(channels, size, classes, (n_train, n_val, n_test))
    cfg = _train_config(args)
    cases = _cases(args.methods)
    results: list[dict[str, Any]] = []
    barrier = _barrier(args.barrier) if args.barrier else None
    with tempfile.TemporaryDirectory() as tmp:
        paraphraser = Path(tmp) / "paraphraser.pt"
        io.save_torch(paraphraser, Paraphraser(64, 0.5).state_dict())
        for pair in args.pairs:
            teacher_arch, student_arch = pair.split(":")
            torch.manual_seed(1)
            teacher = models.build(teacher_arch, classes, channels)
            rows = [] if args.only_cohort else [(c, student_arch, cfg, "") for c in cases]
            if args.teachers:
                rows.insert(0, (("vanilla", {}), teacher_arch, cfg, "teacher"))
            if args.ablation:
                base = asdict(cfg)
                steps = list(LADDER)
                if args.ablation_compile != "none":
                    steps.append(
                        (f"+ compile {args.ablation_compile}", {"compile": args.ablation_compile})
                    )
                acc: dict[str, Any] = {}
                first = next((c for c in cases if c[0] == "kd"), cases[0])
                for label, change in steps:
                    acc.update(change)
                    rows.append(
                        (first, student_arch, TrainConfig.from_config({**base, **acc}), label)
                    )
            plain = replace(cfg, cohort_stack=False) if args.cohort_stack else cfg
            if args.cohort_streams:  # without member streams, then with them
                for on in (False, True):
                    rows.append((None, student_arch, replace(plain, cohort_streams=on), "cohort"))
            elif args.cohort or args.cohort_stack:  # as the settings say
                rows.append((None, student_arch, plain, "cohort"))
            if args.cohort_stack:  # and stacked
                rows.append((None, student_arch, replace(cfg, cohort_stack=True), "cohort"))
            for case, arch, row_cfg, tag in rows:
                if case is None:  # every chosen method, on one teacher pass per batch
                    labels = [_label(*c) for c in cases]
                    members = [
                        _build(c, teacher, arch, classes, channels, paraphraser) for c in cases
                    ]
                    method: methods.Method = Cohort(members, labels)
                    # auto resolved, so that the row says what it timed (and `grid` reads it)
                    row_cfg = replace(row_cfg, cohort_stack=cohort_stacking(row_cfg, device))
                    name = _cohort_name(len(labels), row_cfg, device)
                else:
                    method = _build(case, teacher, arch, classes, channels, paraphraser)
                    name = _label(*case) if tag != "teacher" else "teacher"
                r = time_epochs(method, row_cfg, data, device, args.epochs, args.warmup, barrier)
                r.update(
                    pair=f"{teacher_arch}:{arch}" if tag != "teacher" else f"none:{arch}",
                    method=name,
                    setting=tag or "default",
                    train_config=asdict(row_cfg),
                )
                if case is None:
                    r.update(_cohort_ratio(labels, r, results))
                if args.reference and not tag:
                    ref = time_reference(
                        case, teacher, teacher_arch, args, arch, data.train, paraphraser, device
                    )
                    r["reference"] = ref
                    r["speedup_vs_reference"] = ref["train_seconds"] / r["train_seconds"]
                _print_row(r)
                results.append(r)
                if progress is not None:
                    progress({"epochs": results, "complete": False})
                del method
                if device.type == "cuda":  # the row's graphs and their memory pools, too,
                    torch._dynamo.reset()  # and the compiled code that refers to its modules
                    gc.collect()
                    torch.cuda.empty_cache()
    doc: dict[str, Any] = {"epochs": results, "complete": True}
    for pair in args.pairs:
        same = [r for r in results if r["pair"] == pair and r["setting"] == "default"]
        base = next((r for r in same if r["method"] == "featuremap"), None)
        if base:
            for r in same:
                r["ratio_to_featuremap"] = r["train_seconds"] / base["train_seconds"]
    return doc


def _cohort_name(members: int, cfg: TrainConfig, device: torch.device) -> str:
    """A cohort row's method: ``cohort of N``, and ``on streams`` with ``cfg.cohort_streams``,
    ``stacked`` where ``cfg.cohort_stack`` stacks on ``device``."""
    return (
        f"cohort of {members}"
        + (" on streams" if cfg.cohort_streams else "")
        + (", stacked" if cohort_stacking(cfg, device) else "")
    )


def _cohort_ratio(
    labels: list[str], row: dict[str, Any], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """A cohort row's members, and its training time against the sum of theirs timed one by
    one in the same run (when every member has a row)."""
    own = {
        r["method"]: r["train_seconds"]
        for r in results
        if r["pair"] == row["pair"] and r["setting"] == "default"
    }
    out: dict[str, Any] = {"members": labels}
    if all(label in own for label in labels):
        out["members_train_seconds"] = sum(own[label] for label in labels)
        out["ratio_to_members"] = row["train_seconds"] / out["members_train_seconds"]
    return out


def _print_row(r: dict[str, Any]) -> None:
    name = r["method"] if r["setting"] == "default" else f"{r['method']} [{r['setting']}]"
    mem = "-"
    if r["peak_cuda_mb"] is not None:
        mem = f"{r['peak_cuda_mb_row']:.0f} MiB (+{r['cuda_mb_before']:.0f} held before)"
    line = (
        f"  {r['pair']:<20} {name:<40} train {r['train_seconds']:7.3f} s/epoch "
        f"({r['images_per_second']:8.0f} img/s), eval {r['eval_seconds']:6.3f} s, peak {mem}"
    )
    if "ratio_to_members" in r:
        line += (
            f"; its members one by one {r['members_train_seconds']:.3f} s/epoch, "
            f"ratio {r['ratio_to_members']:.2f}"
        )
    if "reference" in r:
        line += (
            f"; reference {r['reference']['train_seconds']:8.2f} s/epoch, "
            f"speed-up {r['speedup_vs_reference']:.1f}×"
        )
    if r["train_config"]["cuda_graphs"]:
        line += f"; CUDA graphs: steps {r['steps']}, evaluation {r['evaluation']}"
    print(line, flush=True)


def _barrier(directory: str) -> Any:
    """A file barrier for ``concurrent``: ``N/ID`` waits until N workers reached it."""
    root, count, me = Path(directory), int(Path(directory).name.split("-")[0]), os.getpid()

    def wait() -> None:
        (root / f"ready-{me}").touch()
        deadline = time.time() + 900
        while len(list(root.glob("ready-*"))) < count:
            if time.time() > deadline:
                raise KdbenchError(f"bench: barrier {root}: the other workers never arrived")
            time.sleep(0.05)

    return wait


#: an NVIDIA MPS daemon for the ``with`` block (kept here for ``bench concurrent --mps``)
mps_daemon = mps.daemon


def bench_concurrent(
    args: argparse.Namespace,
    device: torch.device,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Total throughput of N simultaneous ``epochs`` runs on one device, for each N (under an
    MPS daemon with ``args.mps``): each run trains ``args.method``, or with ``args.cohort``
    those methods as one cohort; ``progress(partial result)`` is called after each N."""
    if args.mps and device.type != "cuda":
        raise KdbenchError(f"bench concurrent: --mps needs a CUDA device, not {device}")
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        mps_daemon(Path(tmp) / "mps") if args.mps else contextlib.nullcontext() as env,
    ):
        for n in args.runs:
            barrier = Path(tmp) / f"{n}-runs"
            barrier.mkdir()
            cmd = [
                sys.executable,
                "-m",
                "kdbench.bench",
                "epochs",
                "--no-reference",
                "--device",
                str(device),
                "--methods",
                *(args.cohort or [args.method]),
                *(["--cohort", "--only-cohort"] if args.cohort else []),
                "--pair",
                args.pair,
                "--dataset",
                args.dataset,
                "--batch",
                str(args.batch),
                "--epochs",
                str(args.epochs),
                "--warmup",
                str(args.warmup),
                "--barrier",
                str(barrier),
                *(["--train-size", str(args.train_size)] if args.train_size else []),
                *(x for kv in args.set for x in ("--set", kv)),
            ]
            procs = [
                subprocess.Popen(
                    [*cmd, "--json", str(barrier / f"run{i}.json")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=None if env is None else {**os.environ, **env},
                )
                for i in range(n)
            ]
            errors = [p.communicate()[1] for p in procs]
            if any(p.returncode for p in procs):
                bad = next(e for p, e in zip(procs, errors, strict=True) if p.returncode)
                raise KdbenchError(f"bench concurrent: a worker failed: {bad.strip()[-500:]}")
            runs = [
                json.loads((barrier / f"run{i}.json").read_text())["epochs"][0] for i in range(n)
            ]
            wall = max(r["ended"] for r in runs) - min(r["started"] for r in runs)
            images = sum(r["train_images"] * r["timed_epochs"] for r in runs)
            row = {
                "runs": n,
                **({"cohort": args.cohort} if args.cohort else {}),
                "mps": env is not None,
                "wall_seconds": wall,
                "images_per_second": images / wall,
                "epoch_seconds_per_run": statistics.median(r["epoch_seconds"] for r in runs),
                "peak_cuda_mb_per_run": max(r["peak_cuda_mb"] or 0 for r in runs) or None,
            }
            row["throughput_vs_one"] = (
                row["images_per_second"] / rows[0]["images_per_second"] if rows else 1.0
            )
            print(
                f"  {n} concurrent{' cohorts' if args.cohort else ''}: "
                f"{row['images_per_second']:8.0f} img/s in total "
                f"({row['throughput_vs_one']:.2f}× one run), "
                f"{row['epoch_seconds_per_run']:.2f} s per epoch per run",
                flush=True,
            )
            rows.append(row)
            if progress is not None:
                progress({"concurrent": rows, "complete": False})
    return {"concurrent": rows, "complete": True}


#: the kinds of run whose training settings (``train_size``, ``batch_size``) may differ; the
#: paraphrasers train as the students do
ROLES = ("student", "teacher")


def at_train_size(rows: list[dict[str, Any]], size: int | None) -> list[dict[str, Any]]:
    """``epochs`` rows as if each had trained on ``size`` images an epoch (``train.train_size``;
    None: as measured): their training seconds (``train_seconds``, a cohort row's
    ``members_train_seconds`` too) in proportion to the images, evaluation as it was (the
    validation split stays whole), ``epoch_seconds`` the sum. An epoch's steps take the same
    time whatever the subset, so only the number of steps changes (the last, partial one
    costed as its share of a full one)."""
    if size is None:
        return rows
    out = []
    for r in rows:
        if "train_images" not in r or "train_seconds" not in r or "eval_seconds" not in r:
            raise KdbenchError(
                f"bench grid: the row of {r.get('method')} for {r.get('pair')} does not record "
                "its training images and seconds apart, which a config with train.train_size "
                "needs (time it again with this version's epochs)"
            )
        scale = size / r["train_images"]
        row = {**r, "train_images": size, "train_seconds": r["train_seconds"] * scale}
        if "members_train_seconds" in r:
            row["members_train_seconds"] = r["members_train_seconds"] * scale
        row["epoch_seconds"] = row["train_seconds"] + r["eval_seconds"]
        out.append(row)
    return out


def _variant_cost(
    measured: dict[tuple[str, str], float], pair: str, label: str, batch: int | None = None
) -> float:
    """The seconds ``measured`` for ``label`` on ``pair``, else for the same variant at another
    rank; ``batch``: the batch size the rows were picked at (named in the error)."""
    import re

    if (pair, label) in measured:
        return measured[(pair, label)]
    stem = re.sub(r"r\d+(x\d+)*$", "", label)  # the rank does not change the cost materially
    for (p, lab), sec in measured.items():
        if p == pair and re.sub(r"r\d+(x\d+)*$", "", lab) == stem:
            return sec
    at = f" at batch {batch}" if batch else ""
    raise KdbenchError(
        f"bench grid: no measurement of {label} for {pair}{at} (time it with epochs "
        + (f"--batch {batch} " if batch else "")
        + "--pair/--methods/--teachers)"
    )


def at_batch(rows: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """The ``epochs`` rows trained with batches of ``batch`` (rows that do not record their
    ``train_config`` are taken as they are)."""
    return [r for r in rows if int((r.get("train_config") or {}).get("batch_size", batch)) == batch]


def cohort_savings(
    results: list[dict[str, Any]], streams: bool = False, by: str = "teacher", stack: bool = False
) -> dict[str, float]:
    """Per teacher architecture (``by="pair"``: per ``teacher:student`` pair), the training
    seconds per epoch that a cohort saves for each member beyond the first that learns from the
    teacher (the teacher's pass and the shared decompositions done once; with ``streams``, the
    members run side by side as well), from ``epochs --cohort`` rows trained with
    ``train.cohort_streams`` = ``streams`` and ``train.cohort_stack`` = ``stack``: their
    members' seconds one by one (in the same run, else the files' last rows of them) less the
    cohort's, over those members less one; the mean where several rows have one."""
    if by not in ("teacher", "pair"):
        raise ValueError(f"cohort_savings: by must be 'teacher' or 'pair', not {by!r}")
    return _mean_by(_cohort_gains(results, streams, stack), by)


def _mean_by(gains: list[tuple[str, float]], by: str) -> dict[str, float]:
    """The mean of ``gains`` ((pair, value) pairs) per pair, or per its teacher."""
    grouped: dict[str, list[float]] = {}
    for pair, gain in gains:
        grouped.setdefault(pair if by == "pair" else pair.split(":")[0], []).append(gain)
    return {key: sum(v) / len(v) for key, v in grouped.items()}


def _cohort_gains(
    results: list[dict[str, Any]], streams: bool, stack: bool
) -> list[tuple[str, float]]:
    """(pair, seconds saved per taught member beyond the first) of every cohort row of
    :func:`cohort_savings`."""
    # a row of `epochs --only-cohort` (no members' rows beside it): its members' rows in the
    # files, the last of each
    own = {
        (r["pair"], r["method"]): r["train_seconds"]
        for r in results
        if r.get("setting") == "default" and "train_seconds" in r
    }
    gains = []
    for r in results:
        if r.get("setting") != "cohort":
            continue
        if "members_train_seconds" not in r:
            alone = [own.get((r["pair"], m)) for m in r.get("members", [])]
            if not alone or None in alone:
                continue
            r = {**r, "members_train_seconds": sum(alone)}
        row_cfg = r.get("train_config", {})
        if bool(row_cfg.get("cohort_streams")) != streams:
            continue
        if bool(row_cfg.get("cohort_stack")) != stack:
            continue
        taught = [m for m in r["members"] if methods.get(m.split()[0]).needs_teacher]
        if len(taught) > 1:
            gain = r["members_train_seconds"] - r["train_seconds"]
            gains.append((r["pair"], gain / (len(taught) - 1)))
    return gains


def _cohort_estimate(
    cfg: dict[str, Any],
    dataset: str,
    results: list[dict[str, Any]],
    total: float,
    cohort_size: int,
    explicit: bool,
    cohort_streams: bool | None,
    cohort_stack: bool | None,
    cohort_concurrency: Path | None,
) -> dict[str, Any]:
    """:func:`grid_estimate`'s figures for ``cfg``'s grid in cohorts of ``cohort_size``, from
    the grid's ``total`` seconds one run at a time; where the files hold no row to cost them,
    ``cohorts_not_estimated`` (why, also printed), or an error when ``explicit`` (the size asked
    for) or ``cohort_concurrency`` wants them."""
    from kdbench import config as kdconfig

    recipe = TrainConfig.from_config(kdconfig.train_params(cfg, "student"))
    student_epochs = recipe.epochs
    streams = recipe.cohort_streams if cohort_streams is None else cohort_streams
    stack = (  # a GPU's grid: auto as on CUDA
        cohort_stacking(recipe, torch.device("cuda")) if cohort_stack is None else cohort_stack
    )
    gains = _cohort_gains(results, streams, stack)  # one scan for both means
    saved = _mean_by(gains, "teacher")
    cohorts = [
        c for c in kdconfig.cohorts({**cfg, "cohort_size": cohort_size}) if c.dataset == dataset
    ]
    missing = sorted({c.teacher for c in cohorts} - set(saved))
    if missing:
        why = (
            f"bench grid: cohorts of {cohort_size} need an `epochs --cohort` row of at least "
            f"2 taught members with teacher {', '.join(missing)} in the files"
            + (
                " trained with cohort_streams (--cohort-streams)"
                if streams
                else " trained without cohort_streams (--no-cohort-streams)"
            )
            + (
                " and cohort_stack (--cohort-stack)"
                if stack
                else " and without cohort_stack (--no-cohort-stack)"
            )
        )
        if explicit or cohort_concurrency:
            raise KdbenchError(why)
        # the config's cohort_size, which these files cannot cost: the grid without them
        print(f"{why}; the estimate leaves the config's cohorts out", file=sys.stderr)
        return {"cohorts_not_estimated": why.removeprefix("bench grid: ")}
    by_pair = _mean_by(gains, "pair")

    def saving(run: kdconfig.StudentRun) -> float:  # the pair's, else the teacher's
        return by_pair.get(f"{run.teacher}:{run.student}", saved[run.teacher])

    # every member but one saves: the one that would save most, if they differ, pays
    each = [[saving(m) for m in c.members] for c in cohorts]
    cut = student_epochs * sum(sum(s) - max(s) for s in each)
    out: dict[str, Any] = {
        "cohort_size": cohort_size,
        "cohort_streams": streams,
        "cohort_stack": stack,
        "cohorts": len(cohorts),
        "cohort_saving_seconds_per_member_epoch": saved,
        "cohort_saving_seconds_per_member_epoch_by_pair": by_pair,
        "gpu_hours_total_cohorts": (total - cut) / 3600,
    }
    if cohort_concurrency:
        best = _best_concurrency(cohort_concurrency, cohorts=True)
        out["cohorts_per_gpu"] = best["runs"]
        out["gpu_hours_total_cohorts_concurrent"] = (
            out["gpu_hours_total_cohorts"] / best["throughput_vs_one"]
        )
    return out


def state_wait(rows: list[dict[str, Any]], arch: str, students: int) -> float | None:
    """Seconds that saving the training state of ``students`` students of ``arch`` keeps the
    loop waiting after an epoch, from ``bench state`` rows (``blocking_seconds``): the row of
    that many students, else the line through the two rows of ``arch`` nearest in students
    (the state grows with them: weights, momenta, best weights), or one row's per-student
    share; None where no row has ``arch``."""
    measured = {int(r["students"]): float(r["blocking_seconds"]) for r in rows if r["arch"] == arch}
    if not measured:
        return None
    near = sorted(measured.items(), key=lambda m: (abs(m[0] - students), m[0]))[:2]
    if len(near) == 1 or near[0][0] == students:
        n, sec = near[0]
        return sec * students / n
    (n0, s0), (n1, s1) = sorted(near)
    return max(0.0, s0 + (s1 - s0) * (students - n0) / (n1 - n0))


def _state_saving(
    cfg: dict[str, Any], dataset: str, rows: list[dict[str, Any]], cohort_size: int
) -> dict[str, Any]:
    """:func:`grid_estimate`'s GPU-hours of saving the training state after every epoch
    (:func:`state_wait` of each run, its epochs), one run at a time and, with ``cohort_size``,
    in the config's cohorts (one state a cohort: its students of each architecture; the
    teacher-free students alone); and the runs no row costs, by kind and architecture."""
    from kdbench import config as kdconfig

    teacher_epochs, student_epochs = (
        int(kdconfig.train_params(cfg, kind)["epochs"]) for kind in ("teacher", "student")
    )

    def cost(arch: str, students: int = 1, epochs: int = student_epochs) -> float:
        wait = state_wait(rows, arch, students)
        return 0.0 if wait is None else wait * epochs

    teachers = [t.arch for t in kdconfig.teacher_runs(cfg) if t.dataset == dataset]
    students = [r for r in kdconfig.student_runs(cfg) if r.dataset == dataset]
    fixed = sum(cost(arch, epochs=teacher_epochs) for arch in teachers)
    runs = [f"teacher {a}" for a in teachers] + [f"student {r.student}" for r in students]
    not_costed = Counter(run for run in runs if state_wait(rows, run.split()[1], 1) is None)
    paraphrasers = len({r.teacher for r in students if r.method == "ft"})
    if paraphrasers:  # a paraphraser's state is not a network of models.py
        not_costed["paraphraser"] = paraphrasers
    out: dict[str, Any] = {
        "state_saving_gpu_hours": (fixed + sum(cost(r.student) for r in students)) / 3600
    }
    if cohort_size > 0:
        cohorts = [
            c for c in kdconfig.cohorts({**cfg, "cohort_size": cohort_size}) if c.dataset == dataset
        ]
        members = {m for c in cohorts for m in c.members}
        seconds = fixed + sum(cost(r.student) for r in students if r not in members)
        for c in cohorts:
            archs = [m.student for m in c.members]
            seconds += sum(cost(a, archs.count(a)) for a in dict.fromkeys(archs))
        out["state_saving_gpu_hours_cohorts"] = seconds / 3600
    out["state_saving_not_costed"] = dict(not_costed)
    return out


def grid_estimate(
    config_path: Path,
    dataset: str | None,
    results: list[dict[str, Any]],
    concurrency: Path | None,
    cohort_size: int | None = None,
    cohort_streams: bool | None = None,
    cohort_concurrency: Path | None = None,
    cohort_stack: bool | None = None,
    state: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """GPU-hours of ``dataset``'s whole grid in ``config_path`` (None: the config's first
    dataset) from measured epoch seconds
    (training + evaluation): teachers, FT paraphrasers (costed as a featuremap epoch of the
    pair, an upper bound: the paraphraser is far smaller than a student) and every student.
    Apart from that total, ``startup_gpu_hours``: each run's start (compilation, graph
    capture) as its row's warm-up took beyond the epochs it ran, where every row recorded one.
    With cohorts (``cohort_size``, else the config's), also ``gpu_hours_total_cohorts``: the
    config's cohorts of that size (:func:`kdbench.config.cohorts`), each saving per epoch what
    :func:`cohort_savings` measured for each member's pair (else for its teacher) for every
    member but the one that would save most, from rows trained with ``cohort_streams`` and
    ``cohort_stack`` (else the config's ``train.cohort_streams`` and ``train.cohort_stack``,
    ``auto`` as on CUDA);
    with ``cohort_concurrency`` (a ``concurrent --cohort`` file),
    ``gpu_hours_total_cohorts_concurrent`` too: the cohorts with the best measured number of
    them at once on each GPU. With ``state`` (``bench state`` rows), apart too, what saving
    the training state after every epoch keeps each run waiting (:func:`_state_saving`).
    Where the config sets ``train.train_size``, the runs' epochs are on their subsets
    (:func:`at_train_size`)."""
    import yaml

    from kdbench import config as kdconfig

    cfg = kdconfig.resolve(yaml.safe_load(Path(config_path).read_text()))
    if dataset is None:
        dataset = cfg["datasets"][0]
    elif dataset not in cfg["datasets"]:
        raise KdbenchError(
            f"bench grid: {config_path} trains nothing on {dataset} (its datasets: "
            f"{', '.join(cfg['datasets'])})"
        )
    explicit = cohort_size is not None  # else the config's, which the files may not cost
    if cohort_size is None:
        cohort_size = int(cfg.get("cohort_size") or 0)
    # the rows of the batch size each role trains with, and train.train_size: the students'
    # (and the paraphrasers') epochs and the teachers' on their subsets
    batches = {role: int(kdconfig.train_params(cfg, role)["batch_size"]) for role in ROLES}
    sizes = {role: kdconfig.train_params(cfg, role).get("train_size") for role in ROLES}
    used = {
        role: at_batch([r for r in results if r["setting"] == setting], batches[role])
        for role, setting in zip(ROLES, ("default", "teacher"), strict=True)
    }
    # what a row's warm-up took beyond its epochs: a run's start (rows of older files lack it)
    startup = {
        (r["pair"], r["method"]): max(
            0.0, r["warmup_seconds"] - r["warmup_epochs"] * r["epoch_seconds"]
        )
        for rows in used.values()
        for r in rows
        if "warmup_seconds" in r
    }
    measured, taught = (
        {(r["pair"], r["method"]): r["epoch_seconds"] for r in at_train_size(used[role], size)}
        for role, size in sizes.items()
    )
    # the rows that cost cohorts (:func:`_cohort_gains`)
    cohort_rows = [r for r in results if r.get("setting") in ("default", "cohort")]
    cohort_rows = at_train_size(at_batch(cohort_rows, batches["student"]), sizes["student"])
    started: list[tuple[str, str]] = []  # (pair, label) of every run
    student_epochs = int(kdconfig.train_params(cfg, "student")["epochs"])
    teacher_epochs = int(kdconfig.train_params(cfg, "teacher")["epochs"])
    seconds = {"teachers": 0.0, "paraphrasers": 0.0, "students": 0.0}
    counts = {"teachers": 0, "paraphrasers": 0, "students": 0}
    for t in kdconfig.teacher_runs(cfg):
        if t.dataset == dataset:
            seconds["teachers"] += teacher_epochs * _variant_cost(
                taught, f"none:{t.arch}", "teacher", batches["teacher"]
            )
            started.append((f"none:{t.arch}", "teacher"))
            counts["teachers"] += 1
    ft = (cfg["methods"].get("ft") or {}) if "ft" in cfg["methods"] else None
    para_pairs = set()
    for r in kdconfig.student_runs(cfg):
        if r.dataset != dataset:
            continue
        label = f"{r.method} {r.variant}" if methods.get(r.method).grid else r.method
        pair = f"{r.teacher}:{r.student}" if r.teacher != "none" else None
        if pair is None:
            pair = next(
                p for p, _ in measured if p.endswith(f":{r.student}") and not p.startswith("none")
            )
        seconds["students"] += student_epochs * _variant_cost(
            measured, pair, label, batches["student"]
        )
        started.append((pair, label))
        counts["students"] += 1
        if r.method == "ft" and r.teacher not in para_pairs:  # one per teacher (its seed)
            para_pairs.add(r.teacher)
            epochs = int(((ft or {}).get("paraphraser") or {}).get("epochs", 25))
            seconds["paraphrasers"] += epochs * _variant_cost(
                measured, pair, "featuremap", batches["student"]
            )
            started.append((pair, "featuremap"))
            counts["paraphrasers"] += 1
    total = sum(seconds.values())
    try:  # null unless every run's row recorded its warm-up
        startup_hours = sum(_variant_cost(startup, p, label) for p, label in started) / 3600
    except KdbenchError:
        startup_hours = None
    out: dict[str, Any] = {
        "config": str(config_path),
        "dataset": dataset,
        "runs": counts,
        "train_size": sizes,
        "gpu_hours": {k: v / 3600 for k, v in seconds.items()},
        "gpu_hours_total": total / 3600,
        "startup_gpu_hours": startup_hours,
    }
    if concurrency:
        best = _best_concurrency(concurrency, cohorts=False)
        out["runs_per_gpu"] = best["runs"]
        out["gpu_hours_total_concurrent"] = total / 3600 / best["throughput_vs_one"]
    if cohort_concurrency and cohort_size <= 0:
        raise KdbenchError("bench grid: --cohort-concurrency needs cohorts (--cohort-size N)")
    if cohort_size > 0:
        out |= _cohort_estimate(
            cfg,
            dataset,
            cohort_rows,
            total,
            cohort_size,
            explicit,
            cohort_streams,
            cohort_stack,
            cohort_concurrency,
        )
    if state is not None:
        out |= _state_saving(cfg, dataset, state, cohort_size if "cohorts" in out else 0)
    subsets = ", ".join(
        f"{role}s on {size} images" for role, size in sizes.items() if size is not None
    )
    print(
        f"\n{dataset} grid of {config_path}: {counts['students']} students, "
        f"{counts['teachers']} teacher(s), {counts['paraphrasers']} paraphraser(s)"
        + (f" ({subsets})" if subsets else "")
        + ": "
        f"{out['gpu_hours_total']:.2f} GPU-hours one run at a time"
        + (
            f", {out['gpu_hours_total_concurrent']:.2f} with {out['runs_per_gpu']} per GPU"
            if concurrency
            else ""
        )
        + (
            f"; runs' starts (compilation, graph capture) {out['startup_gpu_hours']:.2f} more"
            if out["startup_gpu_hours"] is not None
            else ""
        )
        + (
            f"; {out['gpu_hours_total_cohorts']:.2f} in {out['cohorts']} cohorts of up to "
            f"{cohort_size}, one at a time"
            if "cohorts" in out
            else ""
        )
        + (
            f", {out['gpu_hours_total_cohorts_concurrent']:.2f} with {out['cohorts_per_gpu']} "
            "per GPU"
            if "cohorts_per_gpu" in out
            else ""
        )
        + (_state_line(out) if state is not None else ""),
        flush=True,
    )
    return out


def _state_line(out: dict[str, Any]) -> str:
    """The printed words of :func:`_state_saving`'s figures in ``out``."""
    line = f"; saving the training state {out['state_saving_gpu_hours']:.2f} more one at a time"
    if "state_saving_gpu_hours_cohorts" in out:
        line += f", {out['state_saving_gpu_hours_cohorts']:.2f} in the cohorts"
    left = out["state_saving_not_costed"]
    if left:
        line += (
            " (no `bench state` row for "
            + ", ".join(f"{k} ({n} run{'s' if n > 1 else ''})" for k, n in left.items())
            + ")"
        )
    return line


#: ``spread``: the settings compared (changes to the train defaults)
SPREAD_SETTINGS: dict[str, dict[str, Any]] = {
    "fast": {},
    "plain": dict(LADDER[0][1]),
    "deterministic": {**LADDER[0][1], "deterministic": True},
}


def bench_spread(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Run-to-run and seed spread of real training on digits: a teacher, then KD students.

    Per setting, seed 0 runs twice (run-to-run difference of the curves and weights) and the
    other seeds once (seed spread of the final accuracies)."""
    from kdbench import runs

    rows: dict[str, Any] = {}
    data = {"image_size": 16}
    recipe = {"batch_size": 64, "device": str(device), "lr": 0.05}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def run(
            name: str,
            method: str,
            arch: str,
            seed: int,
            epochs: int,
            change: dict,
            teacher: Path | None = None,
        ) -> dict[str, Any]:
            outputs = _spread_outputs(root / name)
            doc = runs.train(
                role="student" if teacher else "teacher",
                dataset="digits",
                data=data,
                arch=arch,
                seed=seed,
                method=method,
                variant="default",
                method_params={},
                train={**recipe, "epochs": epochs, **change},
                outputs=outputs,
                state=root / f"{name}.state",
                teacher="resnet20" if teacher else None,
                teacher_weights=teacher,
            )
            doc["weights"] = torch.load(outputs["final_weights"], weights_only=True)
            return doc

        def cohort(seed: int, change: dict, teacher: Path) -> list[dict[str, Any]]:
            """KD and featuremap students of ``seed`` as one cohort (their metrics, KD's
            first), with their final weights."""
            members = [
                {
                    "arch": "resnet8",
                    "method": method,
                    "variant": "default",
                    "method_params": {},
                    "outputs": _spread_outputs(root / f"cohort-s{seed}" / method),
                }
                for method in ("kd", "featuremap")
            ]
            docs = runs.train_cohort(
                name=f"s{seed}",
                dataset="digits",
                data=data,
                teacher="resnet20",
                teacher_weights=teacher,
                seed=seed,
                members=members,
                train={**recipe, "epochs": args.epochs, **change},
                state=root / f"cohort-s{seed}.state",
            )
            for doc, m in zip(docs, members, strict=True):
                doc["weights"] = torch.load(m["outputs"]["final_weights"], weights_only=True)
            return docs

        run("teacher", "vanilla", "resnet20", 0, args.teacher_epochs, {})
        teacher = root / "teacher" / "final.pt"
        settings = dict(SPREAD_SETTINGS)
        settings["fast"] = {**settings["fast"], **_parse_sets(args.set)}
        fast: list[dict[str, Any]] = []  # the fast setting's KD runs, per seed
        for setting, change in settings.items():
            t0 = time.perf_counter()
            docs = [
                run(f"{setting}-s{s}", "kd", "resnet8", s, args.epochs, change, teacher)
                for s in range(args.seeds)
            ]
            again = run(f"{setting}-s0-again", "kd", "resnet8", 0, args.epochs, change, teacher)
            row = {
                "train_config": {k: v for k, v in docs[0]["config"]["train"].items()},
                **_final_accuracies(docs),
                "repeat_max_abs_diff": _curves_apart([(docs[0], again)]),
                "repeat_weights_identical": all(
                    torch.equal(docs[0]["weights"][k], again["weights"][k])
                    for k in docs[0]["weights"]
                ),
                "seconds": time.perf_counter() - t0,
            }
            rows[setting] = row
            fast = docs if setting == "fast" else fast
            diff = row["repeat_max_abs_diff"]
            print(
                f"  {setting:<14} test acc {row['test_acc_last_mean']:.2f} ± "
                f"{row['test_acc_last_std']:.2f} % over {args.seeds} seeds; same seed twice: "
                f"max |Δ test acc| {diff['test_acc']:.3f} pts, |Δ train loss| "
                f"{diff['train_loss']:.2e}, weights identical: "
                f"{row['repeat_weights_identical']}",
                flush=True,
            )
        if args.cohort:  # the fast runs' KD students again, each in a stacked cohort
            t0 = time.perf_counter()
            change = {**settings["fast"], "cohort_stack": True}
            kd = [cohort(s, change, teacher)[0] for s in range(args.seeds)]
            rows["cohort"] = row = _spread_cohort_row(kd, fast)
            row["seconds"] = time.perf_counter() - t0
            diff = row["vs_fast_max_abs_diff"]
            print(
                f"  {'cohort':<14} test acc {row['test_acc_last_mean']:.2f} ± "
                f"{row['test_acc_last_std']:.2f} % over {args.seeds} seeds (KD, stacked with "
                f"featuremap); against the fast runs: max |Δ test acc| {diff['test_acc']:.3f} "
                f"pts, |Δ train loss| {diff['train_loss']:.2e}, |Δ weight| "
                f"{row['vs_fast_weights_max_abs_diff']:.2e}",
                flush=True,
            )
    torch.use_deterministic_algorithms(False)
    return {"spread": rows}


def _spread_outputs(d: Path) -> dict[str, Path]:
    """A ``spread`` run's outputs, in ``d``."""
    names = ("metrics.json", "final.pt", "best.pt", "Loss.png", "Accuracy.png")
    keys = ("metrics", "final_weights", "best_weights", "loss_plot", "accuracy_plot")
    return {k: d / n for k, n in zip(keys, names, strict=True)}


def _final_accuracies(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' last-epoch test accuracies (one per seed), their mean and spread."""
    finals = [d["final"]["test_acc_last"] for d in docs]
    return {
        "test_acc_last_per_seed": finals,
        "test_acc_last_mean": statistics.mean(finals),
        "test_acc_last_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
    }


def _curves_apart(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, float]:
    """The largest difference between the curves of each pair of runs' metrics, per curve."""
    return {
        key: max(
            abs(x[key] - y[key])
            for a, b in pairs
            for x, y in zip(a["epochs"], b["epochs"], strict=True)
        )
        for key in ("train_loss", "test_loss", "test_acc", "val_acc")
    }


def _spread_cohort_row(kd: list[dict[str, Any]], fast: list[dict[str, Any]]) -> dict[str, Any]:
    """``spread --cohort``'s row: the KD members of the stacked cohorts (one per seed) against
    the fast setting's KD runs of the same seeds (the same initial weights and data order)."""
    return {
        "train_config": dict(kd[0]["config"]["train"]),
        "members": list(kd[0]["cohort"]["members"]),
        "cohort_stack": kd[0]["provenance"]["cohort_stack"],
        **_final_accuracies(kd),
        "vs_fast_max_abs_diff": _curves_apart(list(zip(kd, fast, strict=True))),
        "vs_fast_weights_max_abs_diff": max(
            float((a["weights"][k].float() - b["weights"][k].float()).abs().max())
            for a, b in zip(kd, fast, strict=True)
            for k in a["weights"]
        ),
    }


#: ``graphs``: the methods checked by default (one of each graph mode and target kind)
GRAPH_CHECKS = [
    "kd",
    "featuremap",
    "tucker full-teacher-r32",
    "tucker sample-teacher-r32",
    "tucker_recomp both-r32",
]


def _train_briefly(
    cases: list[tuple[str, dict[str, Any]]],
    cohort: bool,
    cfg: TrainConfig,
    data: Dataset,
    device: torch.device,
    paraphraser: Path,
) -> dict[str, Any]:
    """``cfg.epochs`` epochs of ``cases`` (resnet20 → resnet8; one, or with ``cohort`` as one
    cohort) on ``data`` from fixed weights: the curves, every student's weights and how the
    steps and evaluations ran."""
    torch.manual_seed(1)
    teacher = models.build("resnet20", 100, 3)
    built = [_build(case, teacher, "resnet8", 100, 3, paraphraser) for case in cases]
    method = Cohort(built, [_label(*c) for c in cases]) if cohort else built[0]
    run = _trainer(method, cfg, data, device)
    train, (val, _) = run.train, run.evals
    curve = []
    for epoch in range(cfg.epochs):
        totals = train_epoch(method, run.optimizers, train, epoch, device, cfg, step_fn=run.step_fn)
        run.next_lr()
        val_loss, val_acc = evaluate(method.student, val, device, cfg, run.eval_fn)
        curve.append(
            {
                "train_loss": sum(totals.parts.values()) / train.num_samples,
                "train_correct": totals.correct,
                "val_loss": val_loss,
                "val_acc": val_acc,
            }
        )
    return {
        "curve": curve,
        "weights": {
            f"{i}/{k}": v.detach().float().cpu()
            for i, student in enumerate(method.students())
            for k, v in student.state_dict().items()
        },
        **_how_ran(run.step_fn, run.eval_fn),
    }


def bench_graphs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train each method twice from the same weights and data, eagerly and from CUDA graphs
    (``cuda_graphs`` and ``prefetch_targets`` on), and compare: the check that the graphs train
    as the eager steps do, and that nothing fell back to eager on CUDA. Both uncompiled unless
    ``--set compile=MODE`` asks (a compiled step's kernels are its own). ``--cohort`` also
    trains the methods as one cohort, eagerly without member streams and from graphs with the
    settings' ``cohort_streams``, and compares every member's weights."""
    base = {
        "epochs": 2,
        "batch_size": 128,
        "device": str(device),
        "compile": "none",
        **_parse_sets(args.set),
    }
    # CIFAR-100 shape, 1,000 training images by default: the last batch of 128 is smaller
    n_eval = max(1, round(0.3 * args.train_size))
    data = _synthetic_data(3, 32, 100, (args.train_size, n_eval, n_eval))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paraphraser = Path(tmp) / "paraphraser.pt"
        io.save_torch(paraphraser, Paraphraser(64, 0.5).state_dict())
        cases = _cases(args.methods or GRAPH_CHECKS)
        graphed_cfg = TrainConfig.from_config(base)  # what a cohort's member streams follow
        for group, cohort in [([c], False) for c in cases] + [(cases, True)] * args.cohort:
            settings = {
                "eager": {"cuda_graphs": False, "prefetch_targets": False},
                "graphs": {"cuda_graphs": True, "prefetch_targets": True},
            }
            if cohort:  # the cohort's reference: eager, one member after the other
                settings["eager"]["cohort_streams"] = False
            runs = {
                name: _train_briefly(
                    group,
                    cohort,
                    TrainConfig.from_config({**base, **on}),
                    data,
                    device,
                    paraphraser,
                )
                for name, on in settings.items()
            }
            eager, graphed = runs["eager"], runs["graphs"]
            diff = max(
                abs(a[k] - b[k]) / max(abs(a[k]), 1e-12)
                for a, b in zip(eager["curve"], graphed["curve"], strict=True)
                for k in ("train_loss", "val_loss")
            )
            weights = max(
                float((eager["weights"][k] - graphed["weights"][k]).abs().max())
                for k in eager["weights"]
            )
            fell_back = device.type == "cuda" and (
                graphed["steps"].startswith("eager") or graphed["evaluation"].startswith("eager")
            )
            row = {
                "method": _cohort_name(len(group), graphed_cfg, device)
                if cohort
                else _label(*group[0]),
                "steps": graphed["steps"],
                "evaluation": graphed["evaluation"],
                "max_relative_loss_difference": diff,
                "max_weight_difference": weights,
                "curves": {k: v["curve"] for k, v in runs.items()},
                "ok": not fell_back and diff <= args.tolerance,
            }
            rows.append(row)
            print(
                f"  {row['method']:<32} {'ok  ' if row['ok'] else 'FAIL'} steps {row['steps']}, "
                f"evaluation {row['evaluation']}; losses differ by at most {diff:.1e} "
                f"(relative), weights by {weights:.1e}",
                flush=True,
            )
    return {"graphs": rows, "ok": all(r["ok"] for r in rows)}


def _rows(path: str | Path, command: str, key: str | None = None) -> list[dict[str, Any]]:
    """The rows of a ``command --json`` file (``epochs`` or ``concurrent``; ``state``'s under
    ``key`` ``states``); one line if it cannot be read or is not such a file."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise KdbenchError(f"bench grid: cannot read {path}: {one_line(exc)}") from None
    rows = doc.get(key or command) if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise KdbenchError(f"bench grid: {path} has no rows of `{command} --json`")
    return rows


def _state_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``state --json`` file, each with the fields :func:`state_wait` reads."""
    rows = _rows(path, "state", "states")
    for r in rows:
        if not {"arch", "students", "blocking_seconds"} <= set(r):
            raise KdbenchError(f"bench grid: {path} has no rows of `state --json`")
    return rows


def _best_concurrency(path: Path, cohorts: bool) -> dict[str, Any]:
    """The row of a ``concurrent --json`` file with the best throughput against one run: of
    runs of one method (``--concurrency``), or of cohorts (``--cohort-concurrency``)."""
    rows = _rows(path, "concurrent")
    if any("cohort" in r for r in rows) != cohorts:
        raise KdbenchError(
            f"bench grid: {path} is a `concurrent --cohort` file: pass it as --cohort-concurrency"
            if not cohorts
            else f"bench grid: {path} is not a `concurrent --cohort` file (--cohort-concurrency)"
        )
    return max(rows, key=lambda r: r["throughput_vs_one"])


def _grid_from_files(args: argparse.Namespace) -> dict[str, Any]:
    results = [r for f in args.files for r in _rows(f, "epochs")]
    return {
        "grid": grid_estimate(
            args.config,
            args.dataset,
            results,
            args.concurrency,
            args.cohort_size,
            args.cohort_streams,
            args.cohort_concurrency,
            args.cohort_stack,
            None if args.state is None else [r for f in args.state for r in _state_rows(f)],
        )
    }


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return _at_least(text, 1)


def _natural(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is less than {low}")
    return value


def _save_state_as_before(path: Path, obj: dict[str, Any]) -> None:
    """How kdbench wrote a training state before :class:`kdbench.io.StateWriter`: each module
    tensor copied to the host on its own, ``torch.save`` of every tensor as a record of its
    own (the optimizers' moved from the GPU one by one), the checksum, the write and the sync
    to disk, all before the next epoch began. The reference that ``bench state`` times
    against (it writes a file that :func:`kdbench.io.load_state_file` reads)."""
    modules = {
        k: {n: t.to("cpu", copy=True) for n, t in m.items()} for k, m in obj["modules"].items()
    }
    io.write_state_file(path, {**obj, "modules": modules})


def bench_state(
    args: argparse.Namespace, device: torch.device, info: dict[str, Any]
) -> dict[str, Any]:
    """Seconds per epoch that saving the training state of ``--students`` students of
    ``--arch`` costs (a cohort's, as ``fit`` saves it after every epoch: their weights and
    SGD momenta, their best weights on the host, the RNG state and curves): how long the
    training loop waits for :class:`kdbench.io.StateWriter` to take its snapshot, how long the
    write then runs beside training, and the previous synchronous write
    (:func:`_save_state_as_before`), which the loop waited for whole; median of ``--rounds``."""
    cuda = device.type == "cuda"
    args.arch = models.canonical_arch(args.arch)
    print(
        f"kdbench bench state: the training state of {args.arch} students ({args.classes} "
        f"classes) on {info['name']} ({info['threads']} threads), torch {torch.__version__}",
        flush=True,
    )
    rows = []
    with contextlib.ExitStack() as stack:
        where = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cfg = TrainConfig.from_config({"epochs": 1, "device": args.device})
        for n in args.students:
            torch.manual_seed(0)
            students = [models.build(args.arch, args.classes, 3).to(device) for _ in range(n)]
            optimizers = [make_sgd(m, cfg) for m in students]
            x = torch.randn(2, 3, 32, 32, device=device)
            for m, opt in zip(students, optimizers, strict=True):
                m(x)[-1].sum().backward()  # momenta exist after a first step
                opt.step()
            state = {
                "version": 1,
                "modules": {f"s{i}": m.state_dict() for i, m in enumerate(students)},
                "optimizers": {f"s{i}": o.state_dict() for i, o in enumerate(optimizers)},
                "rng": rng_state(device),
                "epochs": {
                    f"s{i}": [{"epoch": e, "val_acc": 1.0} for e in range(200)] for i in range(n)
                },
                "best": {
                    f"s{i}": {"epoch": 1, "weights": cpu_state_dict(m)}
                    for i, m in enumerate(students)
                },
            }
            path = where / f"bench-{args.arch}-x{n}.state"
            times: dict[str, list[float]] = {"before": [], "blocking": [], "write": [], "load": []}
            with io.StateWriter() as writer:
                for _ in range(args.rounds):
                    _sync(device)
                    t0 = time.perf_counter()
                    _save_state_as_before(path, state)
                    t1 = time.perf_counter()
                    writer.save(path, state)
                    t2 = time.perf_counter()
                    writer.wait()
                    t3 = time.perf_counter()
                    io.load_state_file(path)
                    t4 = time.perf_counter()
                    for key, seconds in zip(
                        times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True
                    ):
                        times[key].append(seconds)
            row = {
                "arch": args.arch,
                "students": n,
                "megabytes": path.stat().st_size / 2**20,
                **{f"{k}_seconds": statistics.median(v) for k, v in times.items()},
            }
            row["before_over_blocking"] = row["before_seconds"] / row["blocking_seconds"]
            io.remove_state(path)
            rows.append(row)
            print(
                f"  {args.arch} ×{n} ({row['megabytes']:.1f} MB): the loop waits "
                f"{row['blocking_seconds'] * 1e3:.1f} ms (before: {row['before_seconds'] * 1e3:.1f}"
                f" ms, {row['before_over_blocking']:.1f}×); the write then takes "
                f"{row['write_seconds'] * 1e3:.1f} ms beside training; loading "
                f"{row['load_seconds'] * 1e3:.1f} ms",
                flush=True,
            )
            del students, optimizers, state
            if cuda:
                torch.cuda.empty_cache()
    return {"where": str(args.dir or "a temporary directory"), "states": rows}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--batch", type=_count, default=128)
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")


def _epoch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar100", choices=sorted(SHAPES), help="the data's shape")
    p.add_argument(
        "--train-size",
        type=_count,
        default=None,
        help="training images (default: the dataset's; validation and test scale with it)",
    )
    p.add_argument("--epochs", type=_count, default=2, help="timed epochs (default 2)")
    p.add_argument("--warmup", type=_natural, default=1, help="untimed epochs first (default 1)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a train setting, e.g. compile=default or bf16=false (repeatable)",
    )


class _Parser(argparse.ArgumentParser):
    """An argument error is one line (not argparse's usage first), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (--help lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m kdbench.bench",
        description="kdbench's benchmarks (README, Performance): each command below times or "
        "checks one thing and saves its figures as JSON (--json).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("epochs", help="time training epochs against the reference loop")
    _common(e)
    _epoch_args(e)
    e.add_argument(
        "--pair",
        dest="pairs",
        action="append",
        default=None,
        metavar="TEACHER:STUDENT",
        help="default resnet110:resnet56 on CUDA, resnet20:resnet8 on CPU (repeatable)",
    )
    e.add_argument("--methods", nargs="+", default=None, help="method names or labels")
    e.add_argument("--no-reference", dest="reference", action="store_false")
    e.add_argument(
        "--reference-steps",
        type=_count,
        default=None,
        help="timed reference steps (default 40 on CUDA, 3 on CPU)",
    )
    e.add_argument("--reference-warmup", type=_natural, default=3)
    e.add_argument(
        "--reference-workers",
        type=_natural,
        default=None,
        help="DataLoader workers of the reference (default 4 on CUDA, 0 on CPU)",
    )
    e.add_argument(
        "--teachers", action="store_true", help="also time training each pair's teacher (vanilla)"
    )
    e.add_argument(
        "--ablation",
        action="store_true",
        help="switch the speed options on one by one (for kd, else the first method)",
    )
    e.add_argument(
        "--ablation-compile",
        default="none",
        help="last ablation step: this train.compile mode (default none: no step)",
    )
    e.add_argument(
        "--cohort",
        action="store_true",
        help="also train the chosen methods together on one teacher pass per batch "
        "(kdbench.cohort; its members on CUDA streams of their own as train.cohort_streams "
        "says) and compare with their own rows",
    )
    e.add_argument(
        "--cohort-streams",
        action="store_true",
        help="--cohort twice: without train.cohort_streams, then with it (each member on a "
        "CUDA stream of its own)",
    )
    e.add_argument(
        "--cohort-stack",
        action="store_true",
        help="--cohort unstacked (or --cohort-streams' two rows), then once more with "
        "train.cohort_stack (the students of one architecture as one network of grouped "
        "convolutions)",
    )
    e.add_argument(
        "--only-cohort",
        action="store_true",
        help="with --cohort: time the cohort alone, not its members one by one as well",
    )
    e.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    c = sub.add_parser("concurrent", help="total throughput of N runs sharing one device")
    _common(c)
    _epoch_args(c)
    c.add_argument("--runs", type=_count, nargs="+", default=[1, 2, 4, 8])
    c.add_argument("--method", default="kd")
    c.add_argument(
        "--cohort",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="each run trains these methods as one cohort (kdbench.cohort; its members on "
        "streams of their own as train.cohort_streams says), instead of --method",
    )
    c.add_argument("--pair", default=None, help="default as for epochs")
    c.add_argument(
        "--mps",
        action="store_true",
        help="run the N processes under an NVIDIA MPS daemon of their own (CUDA)",
    )
    sp = sub.add_parser("spread", help="run-to-run and seed spread of real training (digits)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--epochs", type=_count, default=30, help="student epochs (default 30)")
    sp.add_argument("--teacher-epochs", type=_count, default=30)
    sp.add_argument("--seeds", type=_count, default=3)
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a train setting of the fast runs, e.g. cuda_graphs=true (repeatable)",
    )
    sp.add_argument(
        "--cohort",
        action="store_true",
        help="also each seed's KD student in a stacked cohort with a featuremap student "
        "(train.cohort_stack), against the fast runs",
    )
    sp.add_argument("--json", type=Path, default=None)
    gr = sub.add_parser(
        "graphs", help="check that CUDA graphs train as eager steps do (each method, twice)"
    )
    gr.add_argument("--device", default="auto")
    gr.add_argument("--methods", nargs="+", default=None, help="method names or labels")
    gr.add_argument(
        "--train-size",
        type=_count,
        default=1000,
        help="training images (default 1000); validation and test: 30%% of that each",
    )
    gr.add_argument(
        "--cohort",
        action="store_true",
        help="also the methods as one cohort (kdbench.cohort; graphed with --set "
        "cohort_streams=true: its members on streams of their own)",
    )
    gr.add_argument(
        "--tolerance",
        type=float,
        default=1e-2,
        help="largest relative difference of a loss between the two runs (default 1e-2)",
    )
    gr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    gr.add_argument("--json", type=Path, default=None)
    g = sub.add_parser("grid", help="GPU-hours of a config's grid from `epochs` JSON files")
    g.add_argument("files", nargs="+", type=Path, help="`epochs --teachers --json` outputs")
    g.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    g.add_argument(
        "--dataset", default=None, help="one of the config's datasets (default: its first)"
    )
    g.add_argument("--concurrency", type=Path, default=None, help="a `concurrent` JSON")
    g.add_argument(
        "--cohort-concurrency",
        type=Path,
        default=None,
        help="a `concurrent --cohort` JSON: also the cohorts with several to a GPU",
    )
    g.add_argument(
        "--cohort-size",
        type=_natural,
        default=None,
        help="also the grid in cohorts of N (default: the config's cohort_size; 0: none), "
        "from the files' `epochs --cohort` rows",
    )
    g.add_argument(
        "--cohort-streams",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the cohorts with their members on CUDA streams of their own, from the rows "
        "trained so (`epochs --cohort-streams`), or not (default: the config's "
        "train.cohort_streams)",
    )
    g.add_argument(
        "--cohort-stack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the cohorts' students of one architecture as one network, from the rows "
        "trained so (`epochs --cohort-stack`), or not (default: the config's "
        "train.cohort_stack, auto as on CUDA)",
    )
    g.add_argument(
        "--state",
        nargs="+",
        type=Path,
        default=None,
        help="`state --json` outputs: also what saving the training state after every epoch "
        "adds (state_saving_gpu_hours)",
    )
    g.add_argument("--json", type=Path, default=None)
    g.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    st = sub.add_parser(
        "state", help="what saving a run's training state after each epoch costs its loop"
    )
    st.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    st.add_argument("--arch", default="resnet56", help="default resnet56")
    st.add_argument(
        "--students",
        type=_count,
        nargs="+",
        default=[1, 8],
        help="students in one state, a cohort's (default 1 8)",
    )
    st.add_argument("--classes", type=_count, default=100)
    st.add_argument("--rounds", type=_count, default=7, help="timed saves (default 7)")
    st.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="write there, e.g. the file system of results/state (default: a temporary one)",
    )
    st.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    m = sub.add_parser(
        "methods", help="time a training step of every method, and Tucker vs tensorly"
    )
    _common(m)
    m.add_argument("--teacher", default=None, help="default resnet110 on CUDA, resnet20 on CPU")
    m.add_argument("--student", default=None, help="default resnet56 on CUDA, resnet8 on CPU")
    m.add_argument("--image-size", type=_count, default=32)
    m.add_argument("--channels", type=_count, default=3)
    m.add_argument("--classes", type=_count, default=100)
    m.add_argument(
        "--steps", type=_count, default=None, help="timed rounds (default 50 on CUDA, 20 on CPU)"
    )
    m.add_argument("--warmup", type=_natural, default=5)
    m.add_argument(
        "--decomposition-only",
        action="store_true",
        help="time the Tucker decompositions only (kdbench, tensorly, sample-wise solvers)",
    )
    m.add_argument("--decomp-repeats", type=_count, default=50)
    m.add_argument("--tensorly-repeats", type=_count, default=5)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KdbenchError as exc:
        print(f"kdbench bench: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    info = provenance.device_info(device)
    if args.command in ("epochs", "concurrent"):
        default_pair = "resnet110:resnet56" if cuda else "resnet20:resnet8"
        if args.command == "epochs":
            if args.only_cohort and not (args.cohort or args.cohort_streams or args.cohort_stack):
                raise KdbenchError(
                    "bench epochs: --only-cohort needs --cohort, --cohort-streams or --cohort-stack"
                )
            args.pairs = args.pairs or [default_pair]
            args.reference_steps = args.reference_steps or (40 if cuda else 3)
            if args.reference_workers is None:
                args.reference_workers = 4 if cuda else 0
        else:
            args.pair = args.pair or default_pair
        args.shape = SHAPES[args.dataset]
        for pair in [*(getattr(args, "pairs", None) or []), getattr(args, "pair", None)]:
            if pair is not None and (pair.count(":") != 1 or not all(pair.split(":"))):
                raise KdbenchError(f"bench: --pair wants TEACHER:STUDENT, got {pair!r}")
        if args.command == "concurrent" or not args.barrier:
            print(
                f"kdbench bench {args.command}: {args.dataset} shape, batch {args.batch}, "
                f"on {info['name']} ({info['threads']} threads), torch {torch.__version__}",
                flush=True,
            )
        # saved a row at a time: a run cut short keeps its rows
        timed = bench_epochs if args.command == "epochs" else bench_concurrent
        result = timed(args, device, functools.partial(_save, args, info))
    elif args.command == "spread":
        result = bench_spread(args, device)
    elif args.command == "grid":
        result = _grid_from_files(args)
    elif args.command == "state":
        result = bench_state(args, device, info)
    elif args.command == "graphs":
        print(
            f"kdbench bench graphs: resnet20 → resnet8, eager and CUDA graphs, on {info['name']}, "
            f"torch {torch.__version__}",
            flush=True,
        )
        result = bench_graphs(args, device)
    else:
        result = _run_methods(args, device, info)
    _save(args, info, result)
    return 0 if result.get("ok", True) else 1


def _save(args: argparse.Namespace, info: dict[str, Any], result: dict[str, Any]) -> None:
    """Write ``result`` with the command, device, versions and date to ``--json``, if given
    (atomically)."""
    if not args.json:
        return
    doc = {
        "command": args.command,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": info,
        "date": time.strftime("%Y-%m-%d"),
        "platform": platform.platform(),
        "versions": provenance.package_versions(),
        **result,
    }
    with io.atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def _run_methods(args: argparse.Namespace, device: torch.device, info: dict[str, Any]) -> dict:
    cuda = device.type == "cuda"
    args.teacher = args.teacher or ("resnet110" if cuda else "resnet20")
    args.student = args.student or ("resnet56" if cuda else "resnet8")
    args.steps = args.steps or (50 if cuda else 20)
    print(
        f"kdbench bench methods: {args.teacher} → {args.student}, "
        f"batch {args.batch}×{args.channels}×{args.image_size}×{args.image_size}, "
        f"{args.classes} classes, on {info['name']} "
        f"({info['threads']} threads), torch {torch.__version__}",
        flush=True,
    )
    result = bench_methods(args)
    if "steps" in result:
        print("\nstep time relative to featuremap:")
        for r in result["steps"]:
            print(f"  {r['method']:<28} {r['ratio_to_featuremap']:6.3f}×")
    d = result["decomposition"]
    print(
        f"\nTucker {tuple(d['shape'])} ranks {tuple(d['ranks'])}: "
        f"kdbench {d['kdbench_seconds'] * 1e3:.3f} ms, "
        f"tensorly {d['tensorly_seconds'] * 1e3:.1f} ms → {d['speedup']:.0f}× faster; "
        f"reconstructions differ by {d['reconstruction_relative_difference']:.1e} (relative), "
        f"errors {d['kdbench_relative_error']:.5f} vs {d['tensorly_relative_error']:.5f}"
    )
    for key in ("eigh_on_device", "eigh_on_host"):
        if key in d:
            print(
                f"  {key}: whole tensor {d[key]['full_seconds'] * 1e3:.3f} ms, sample-wise "
                f"(ranks {tuple(d['ranks'][1:])}) {d[key]['samplewise_seconds'] * 1e3:.3f} ms"
            )
    print("  sample-wise solvers (train.samplewise_solver; against LAPACK in double precision):")
    for name, r in d["samplewise_solvers"].items():
        name += f" ({r['driver']})" if "driver" in r else ""
        name += f" ({r['sweeps_max']} sweeps)" if "sweeps_max" in r else ""
        print(
            f"    {name:<14} {r['seconds'] * 1e3:9.3f} ms, subspace projections differ by "
            f"{r['projector_max_difference']:.1e}, cores by {r['core_relative_difference']:.1e} "
            "(relative)"
        )
    return result


if __name__ == "__main__":
    raise SystemExit(main())
