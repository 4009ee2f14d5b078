"""The training loop shared by teachers and every distillation method.

``fit`` trains ``method.trainable()`` (one SGD optimizer and one schedule per module), evaluates
the student on the validation and test splits after every epoch, and after each epoch writes

* a resumable state (weights, optimizers, schedules, RNG state, metrics so far) to ``state_path``,
  which lies outside the declared outputs, atomically, from a background thread while the next
  epoch trains (:class:`kdbench.io.StateWriter`);
* then ``metrics.json`` (status ``running``) atomically, so a walltime kill loses nothing.

At the end it writes the final and the best-by-validation weights, ``Loss.png`` and
``Accuracy.png``, and ``metrics.json`` with status ``complete`` last; then it deletes the state.
A re-run whose state matches the run's fingerprint continues from the epoch after the last one
saved; on CPU the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench import faults, io, jacobi, models, provenance, tucker
from kdbench.cohort import Cohort
from kdbench.data import Dataset, Loader
from kdbench.errors import KdbenchError, one_line
from kdbench.methods.base import Method

log = logging.getLogger("kdbench")

STATE_VERSION = 1

#: ``train.compile`` values: ``auto`` (``default`` on CUDA, ``none`` on CPU and with
#: ``deterministic``), ``none`` (eager) or a ``torch.compile`` mode (``reduce-overhead`` adds
#: CUDA graphs)
COMPILE_MODES = (
    "auto",
    "none",
    "default",
    "reduce-overhead",
    "max-autotune-no-cudagraphs",
    "max-autotune",
)


#: ``TrainConfig`` settings added after the first release (see :meth:`TrainConfig.record`)
LATER_SETTINGS = (
    "skip_nonfinite",
    "data_on_device",
    "fused",
    "compile",
    "cuda_graphs",
    "check_every_step",
    "deterministic",
    "cudnn_benchmark",
    "fold_teacher",
    "eigh_on_host",
    "prefetch_targets",
    "overlap_teacher",
    "pipeline_targets",
    "cohort_streams",
    "priority_targets",
    "cohort_stack",
    "samplewise_solver",
    "targets_thread",
    "train_size",
)


@dataclass
class TrainConfig:
    """The training recipe; the defaults are the original projects' "seed protocol"."""

    epochs: int = 150
    batch_size: int = 128
    eval_batch_size: int = 512
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    eta_min: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    drop_last: bool = False
    #: train on a stratified subset of this many of the training split's images (per class
    #: its share, drawn with the dataset's ``split_seed``: the same images for every seed and
    #: method), or on all of them (None, the default); validation and test stay whole
    train_size: int | None = None
    device: str = "auto"
    bf16: bool = True
    channels_last: bool = True
    # batches with a non-finite loss or gradient that may be skipped (not stepped on) per run;
    # 0: the first one stops the run
    skip_nonfinite: int = 0
    # Speed switches. None changes the recipe, the data order or the augmentation.
    #: keep each split on the training device and augment it there (else: on the host, each
    #: batch copied over)
    data_on_device: bool = True
    #: fused SGD (one kernel per step; skips a non-finite step on the device): true, false
    #: (foreach), or auto: fused on CUDA, foreach on CPU (bit-identical to the plain loop there)
    fused: bool | str = "auto"
    #: ``torch.compile`` mode for student and teacher (:data:`COMPILE_MODES`); ``none``: eager;
    #: ``auto``: ``default`` on CUDA (1.06-1.21x on top of CUDA graphs on an H200, results
    #: within seed noise, README Performance), ``none`` on CPU and with ``deterministic``
    compile: str = "auto"
    #: capture the whole training step as one CUDA graph and replay it (:mod:`kdbench.graphs`);
    #: CUDA only (ignored on CPU). On by default: KD resnet110 → resnet56 3.4× faster on an H200,
    #: the same losses and weights as eager steps (README, Performance)
    cuda_graphs: bool = True
    #: read every step's finite check on the host (one synchronisation per step; the run stops
    #: at the bad step itself); false: the checks stay on the device and are read once per epoch
    check_every_step: bool = False
    #: deterministic kernels on CUDA (``torch.use_deterministic_algorithms``, no cuDNN
    #: autotuning, a fixed cuBLAS workspace); slower (see README, Determinism). CPU runs are
    #: deterministic either way.
    deterministic: bool = False
    #: let cuDNN time its convolution algorithms for each new input shape and keep the fastest
    #: (``torch.backends.cudnn.benchmark``); the choice can differ between runs, and with it
    #: the last bits of the results. true excludes ``deterministic``; ``auto``: on CUDA unless
    #: ``deterministic`` (compiled, graphed steps 1.18-1.21x faster on an H200: cuDNN's
    #: heuristics picked slow weight-gradient kernels for the 16-channel stage), off on CPU
    cudnn_benchmark: bool | str = "auto"
    #: run the frozen teacher with its batch norms folded into its convolutions
    #: (:func:`kdbench.models.fold_batchnorm`; fewer kernels per step, same outputs up to
    #: rounding) and, with bf16 on CUDA, its weights kept in bf16 (none cast per step)
    fold_teacher: bool = False
    #: solve the Tucker methods' small symmetric eigendecompositions of CUDA tensors on the
    #: host (:func:`kdbench.tucker.set_eigh_on_host`); CPU runs are not affected
    eigh_on_host: bool = False
    #: with ``cuda_graphs``, the Tucker methods (split graphs) compute the next batch's teacher
    #: targets (its decomposition) while the GPU runs this batch's student step
    #: (:mod:`kdbench.graphs`, ``prefetch``); same targets, same order
    prefetch_targets: bool = True
    #: with ``cuda_graphs``, replay the teacher's forward pass for the next batch on a second
    #: CUDA stream while the GPU runs this batch's student step (:mod:`kdbench.graphs`,
    #: ``overlap``): the two overlap on the GPU. Every method with a teacher; same targets,
    #: same order, the same weights as eager steps; 1.17x on KD resnet110 -> resnet56 (H200)
    overlap_teacher: bool = True
    #: with ``overlap_teacher``, run the teacher's pass two batches ahead and the methods'
    #: targets (Tucker's decomposition) one batch ahead on a third CUDA stream, beside it
    #: (:mod:`kdbench.graphs`, ``pipeline``); same targets, same order, the same weights as
    #: eager steps; full-tensor Tucker resnet110 -> resnet20 1.50x, at 1.04x featuremap (H200)
    pipeline_targets: bool = True
    #: in a cohort (:class:`kdbench.cohort.Cohort`), each member's forward and backward pass on
    #: a CUDA stream of its own, so that the GPU can run the members' small kernels side by side
    #: (a captured step holds them as parallel branches); the same kernels per member, in the
    #: same order; the same weights as eager steps (``bench graphs``). A cohort of 7 resnet20
    #: students of resnet110 1.28x (0.53x its members one by one, against 0.68x without)
    #: (H200, README Performance); no effect on a CPU
    cohort_streams: bool = True
    #: with ``pipeline_targets``, the methods' targets (Tucker's decomposition, which the host
    #: waits for) on a CUDA stream of high priority, so that the GPU runs their kernels before
    #: the waiting ones of the student's and teacher's graphs (:mod:`kdbench.graphs`,
    #: ``priority``); the same targets. No gain measured: on an H200 the resnet20 Tucker rows
    #: took 1.03-1.09x longer with it over three epochs (README Performance); no effect on a CPU
    priority_targets: bool = False
    #: in a cohort, the students of each architecture that two or more members share trained
    #: as one network of grouped convolutions (:func:`kdbench.models.stack`): one kernel per
    #: layer for all of them instead of one each; the same recipe, each student's gradients
    #: from its own loss alone, its weights those of its own run up to rounding (on CPU, tested).
    #: ``auto``: on CUDA (a cohort of 7 resnet20 students of resnet110 1.50x, of 7 resnet56
    #: students 1.42x, against the same cohort on streams; H200, README Performance), off on
    #: CPU (1.43x slower there: a convolution on a CPU is bound by arithmetic, not latency)
    cohort_stack: bool | str = "auto"
    #: how sample-wise Tucker (``decomposition: sample``) finds each sample's factors
    #: (:func:`kdbench.tucker.set_samplewise_solver`): ``eigh`` of the samples' Gram matrices
    #: (block Jacobi on CUDA), or ``svd``, one batched SVD of their unfoldings (cuSOLVER's
    #: ``gesvda`` on CUDA, one call per batch: 8.6x faster than block Jacobi on an H200;
    #: LAPACK's on the host, 11x slower there than eigh); the same factors up to rounding.
    #: ``auto``: svd on CUDA, eigh elsewhere. ``jacobi``: on CUDA :mod:`kdbench.jacobi`'s
    #: Triton kernel, which never waits for the host (svd and eigh check their result there),
    #: eigh elsewhere; slower than svd in training on an H200 (docs/speed.md). ``bench
    #: methods`` times each on a stage-3 batch
    samplewise_solver: str = "auto"
    #: with ``pipeline_targets``, the methods' targets (Tucker's decomposition) made two batches
    #: ahead on a host thread of their own (:mod:`kdbench.graphs`, ``thread``), so that the
    #: decomposition's host synchronisation (its convergence check) no longer holds up the
    #: launches of the student's and teacher's graphs; the same targets, made by the same
    #: kernels on the same stream, in the same order (on CPU stand-ins the weights of eager
    #: steps, bit for bit, tested). Off: on an H200 it made the Tucker methods' resnet20 epochs
    #: 1.24-1.36x slower (README Performance, eighth session)
    targets_thread: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None) -> TrainConfig:
        """Build from the config's ``train`` block (nested ``optimizer`` and ``schedule`` maps)
        or from the flat form ``dataclasses.asdict`` gives."""
        flat: dict[str, Any] = {}
        for key, value in (cfg or {}).items():
            if key == "optimizer" and isinstance(value, dict):
                flat.update(value)
            elif key == "schedule" and isinstance(value, dict):
                for sk, sv in value.items():
                    flat["schedule" if sk == "name" else sk] = sv
            else:
                flat[key] = value
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise KdbenchError(f"train: unknown setting(s) {', '.join(unknown)}")
        tc = cls(**flat)
        tc.validate()
        return tc

    def validate(self) -> None:
        if self.epochs < 1:
            raise KdbenchError(f"train.epochs must be positive, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise KdbenchError("train.batch_size must be positive")
        if self.schedule not in ("cosine", "multistep"):
            raise KdbenchError(
                f"train.schedule.name must be cosine or multistep, got {self.schedule!r}"
            )
        if self.lr <= 0:
            raise KdbenchError(f"train.optimizer.lr must be positive, got {self.lr}")
        if self.train_size is not None and (
            isinstance(self.train_size, bool)
            or not isinstance(self.train_size, int)
            or self.train_size < 1
        ):
            raise KdbenchError(
                f"train.train_size must be a positive integer or null, got {self.train_size!r}"
            )
        if self.skip_nonfinite < 0:
            raise KdbenchError(f"train.skip_nonfinite must be >= 0, got {self.skip_nonfinite}")
        if self.fused not in (True, False, "auto"):
            raise KdbenchError(
                f"train.optimizer.fused must be true, false or auto, got {self.fused!r}"
            )
        if self.cudnn_benchmark not in (True, False, "auto"):
            raise KdbenchError(
                f"train.cudnn_benchmark must be true, false or auto, got {self.cudnn_benchmark!r}"
            )
        if self.cohort_stack not in (True, False, "auto"):
            raise KdbenchError(
                f"train.cohort_stack must be true, false or auto, got {self.cohort_stack!r}"
            )
        if self.cudnn_benchmark is True and self.deterministic:
            raise KdbenchError(
                "train.cudnn_benchmark and train.deterministic cannot both be true "
                "(autotuned cuDNN algorithms are not deterministic)"
            )
        if self.samplewise_solver not in tucker.SAMPLEWISE_SOLVERS:
            raise KdbenchError(
                "train.samplewise_solver must be one of "
                f"{', '.join(tucker.SAMPLEWISE_SOLVERS)}, got {self.samplewise_solver!r}"
            )
        if self.compile not in COMPILE_MODES:
            raise KdbenchError(
                f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}"
            )

    def state_record(self) -> dict[str, Any]:
        """What a training state's fingerprint covers: :meth:`record`, plus ``skip_nonfinite``,
        which the fingerprint has covered since that setting arrived (states saved since then
        stay valid)."""
        return {**self.record(), "skip_nonfinite": self.skip_nonfinite}

    def record(self) -> dict[str, Any]:
        """The settings as a flat dict, without the :data:`LATER_SETTINGS` that are at their
        defaults: what identifies a recipe (job params, the state's fingerprint), so that
        settings added in a later release change neither while they are not used."""
        fields = self.__dataclass_fields__
        return {
            k: v
            for k, v in asdict(self).items()
            if not (k in LATER_SETTINGS and v == fields[k].default)
        }


@dataclass
class RunOutputs:
    """Where a run writes its declared outputs."""

    metrics: Path
    final_weights: Path
    best_weights: Path
    loss_plot: Path
    accuracy_plot: Path

    @classmethod
    def from_mapping(cls, paths: dict[str, Any]) -> RunOutputs:
        return cls(**{k: Path(str(paths[k])) for k in cls.__dataclass_fields__})

    def paths(self) -> list[Path]:
        return [getattr(self, k) for k in self.__dataclass_fields__]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdbenchError(f"train.device is {name!r} but no CUDA device is available")
    return device


def fingerprint(record: dict[str, Any]) -> str:
    """A stable hash of everything that determines a run's result."""
    blob = json.dumps(record, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_schedule(
    opt: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=cfg.epochs, eta_min=cfg.eta_min
        )
    return torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=list(cfg.milestones), gamma=cfg.gamma
    )


class SGD(torch.optim.SGD):
    """``torch.optim.SGD``, the same update bit for bit, without importing ``torch._dynamo``.

    torch.optim wraps ``step``, ``zero_grad``, ``add_param_group``, ``state_dict`` and
    ``load_state_dict`` so that ``torch.compile`` does not trace into them; each wrapper imports
    ``torch._dynamo`` on its first call, about 2 s at the start of every training job (a
    quarter of a demo student's job on CPU). kdbench compiles models, never an optimizer, so
    this class calls the methods themselves; ``Optimizer.step``'s hooks and profiler range,
    and the schedules' step tracking, are as for ``torch.optim.SGD``.
    """

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        # what torch's wrapper does but for its two torch._dynamo.graph_break() calls
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return _SGD_STEP(self, closure)

    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)


_SGD_STEP = inspect.unwrap(torch.optim.SGD.step)


def make_sgd(module: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD over ``module``'s parameters (build it after moving the module to its device).

    Fused SGD starts from zero momentum buffers: the first step then gives the same buffer
    (0·m + g = g) as an unfused first step, and a first step skipped on the device (non-finite)
    leaves no uninitialised buffer behind.
    """
    params = list(module.parameters())
    fused = cfg.fused is True or (
        cfg.fused == "auto" and bool(params) and params[0].device.type == "cuda"
    )
    opt = SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        **({"fused": True} if fused else {"foreach": True}),
    )
    if fused and cfg.momentum:
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt


def lay_out_like_parameters(opt: torch.optim.Optimizer) -> None:
    """Give each of ``opt``'s per-parameter tensors (SGD's momenta) its parameter's memory
    layout. A training state holds them packed, contiguous (:func:`kdbench.io.pack_tensors`),
    and fused SGD steps a channels_last weight with a momentum element by element in memory
    order: resumed so, a fused run's curves left the uninterrupted run's (tested)."""
    for p, state in opt.state.items():
        for key, value in state.items():
            per_element = isinstance(value, Tensor) and value.shape == p.shape
            if per_element and value.stride() != p.stride():
                state[key] = torch.empty_like(p).copy_(value)


def compile_mode(cfg: TrainConfig, device: torch.device) -> str:
    """The ``torch.compile`` mode a run on ``device`` uses: ``cfg.compile``, with ``auto``
    resolved (``default`` on CUDA unless ``cfg.deterministic``, else ``none``)."""
    if cfg.compile != "auto":
        return cfg.compile
    return "default" if device.type == "cuda" and not cfg.deterministic else "none"


def cudnn_autotuning(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a run on ``device`` lets cuDNN autotune (``train.cudnn_benchmark``, ``auto``
    resolved: on CUDA unless ``cfg.deterministic``)."""
    if cfg.cudnn_benchmark != "auto":
        return bool(cfg.cudnn_benchmark)
    return device.type == "cuda" and not cfg.deterministic


def cohort_stacking(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a cohort on ``device`` stacks its students (``train.cohort_stack``, ``auto``
    resolved: on CUDA)."""
    if cfg.cohort_stack != "auto":
        return bool(cfg.cohort_stack)
    return device.type == "cuda"


def compile_models(method: Method, cfg: TrainConfig, device: torch.device | None = None) -> None:
    """``torch.compile`` the student and the teacher in place (``train.compile``, ``auto``
    resolved for ``device``, by default the student's; state-dict keys unchanged). The compiled
    code is cached in ``TORCHINDUCTOR_CACHE_DIR``."""
    if device is None:
        device = next(method.student.parameters()).device
    mode = compile_mode(cfg, device)
    if mode == "none":
        return
    for network in method.compiled():
        network.compile(mode=mode)
    if method.needs_teacher:
        method.teacher.compile(mode=mode)


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The layout of the networks' weights and the batches (``train.channels_last``), on CUDA
    and on the CPU alike: oneDNN's channels_last convolutions made a resnet20 -> resnet8
    training epoch on digits 1.18-1.46x faster on one CPU thread (docs/speed.md)."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def prepare(method: Method, cfg: TrainConfig, device: torch.device) -> None:
    """Move ``method`` to ``device`` (in :func:`memory_format`), fold its teacher's batch norms
    and compile it per ``cfg``; set the process's deterministic-algorithms, cuDNN autotuning
    and Tucker solver switches from ``cfg.deterministic``, ``cfg.cudnn_benchmark``,
    ``cfg.eigh_on_host`` and ``cfg.samplewise_solver``; a cohort's member streams and stacks
    from ``cfg.cohort_streams`` and ``cfg.cohort_stack``."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != cfg.deterministic:
        # (the call imports torch._inductor and so torch._dynamo, about 2 s: only when it
        # changes something)
        torch.use_deterministic_algorithms(cfg.deterministic)
    torch.backends.cudnn.benchmark = cudnn_autotuning(cfg, device)
    tucker.set_eigh_on_host(cfg.eigh_on_host)
    tucker.set_samplewise_solver(cfg.samplewise_solver)
    if "jacobi" in method.provenance(device).values():  # a method that will run the kernel
        jacobi.require()
    if isinstance(method, Cohort):
        method.set_stack(cohort_stacking(cfg, device))
        for stack in method.stacks:
            log.info("cohort: %d students as one network (train.cohort_stack)", stack.n)
    method.to(device)
    if cfg.fold_teacher and method.needs_teacher:
        dtype = torch.bfloat16 if device.type == "cuda" and cfg.bf16 else None
        method.replace_teacher(models.fold_batchnorm(method.teacher, dtype))
    if isinstance(method, Cohort):
        method.streams = cfg.cohort_streams
    method.to(memory_format=memory_format(cfg))
    compile_models(method, cfg, device)


def make_loaders(
    data: Dataset, cfg: TrainConfig, device: torch.device, seed: int
) -> tuple[Loader, Loader, Loader]:
    """Train (shuffled and augmented per ``seed`` and epoch; ``cfg.train_size`` of its images),
    validation and test loaders."""
    data = data.with_train_size(cfg.train_size)
    train = Loader(
        data.train,
        cfg.batch_size,
        device,
        data.mean,
        data.std,
        train=True,
        seed=seed,
        crop_padding=data.crop_padding,
        flip=data.flip,
        drop_last=cfg.drop_last,
        channels_last=cfg.channels_last,
        resident=cfg.data_on_device,
    )
    if len(train) == 0:
        raise KdbenchError(
            f"batch size {cfg.batch_size} with drop_last leaves no batch "
            f"of {len(data.train)} samples"
        )
    val, test = (
        Loader(
            s,
            cfg.eval_batch_size,
            device,
            data.mean,
            data.std,
            channels_last=cfg.channels_last,
            resident=cfg.data_on_device,
        )
        for s in (data.val, data.test)
    )
    return train, val, test


def autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA per ``cfg.bf16``. Its weight-cast cache is off: every weight is
    cast once per forward pass anyway, and CUDA graph capture requires it off."""
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


#: a training step's result: (logits, loss parts, ok), ``ok`` a bool tensor on the device;
#: logits None for a step that classifies nothing (the FT paraphraser's reconstruction)
StepResult = tuple[Tensor | None, dict[str, Tensor], Tensor]


def _fused(optimizers: dict[str, torch.optim.Optimizer]) -> bool:
    return all(g.get("fused") for o in optimizers.values() for g in o.param_groups)


def train_step_async(
    method: Method,
    optimizers: dict[str, torch.optim.Optimizer],
    xb: Tensor,
    yb: Tensor,
    device: torch.device,
    cfg: TrainConfig,
    *,
    host_check: bool = False,
) -> StepResult:
    """One optimisation step of every trainable module on one batch, without a host
    synchronisation: (logits, loss parts, ok).

    ``ok`` (a bool tensor on the device) is False when the loss or a gradient is not finite;
    the step is then not taken. Fused optimizers skip it on the device; others need the host to
    read ``ok`` first, which ``host_check`` asks for (else they take the step).
    """
    forward = functools.partial(method.forward_train, xb, yb)
    return optimise(forward, optimizers, device, cfg, host_check=host_check)


def optimise(
    forward: Callable[[], tuple[Tensor, dict[str, Tensor]]],
    optimizers: dict[str, torch.optim.Optimizer],
    device: torch.device,
    cfg: TrainConfig,
    *,
    host_check: bool = False,
) -> StepResult:
    """:func:`train_step_async` for any ``forward() -> (logits, loss parts)``."""
    with autocast(device, cfg):
        logits, parts = forward()
    loss = torch.stack([p.float() for p in parts.values()]).sum()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [
        p.grad
        for opt in optimizers.values()
        for group in opt.param_groups
        for p in group["params"]
        if p.grad is not None
    ]
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)]) if grads else loss
    ok = torch.isfinite(loss) & torch.isfinite(norms).all()
    if _fused(optimizers):
        found_inf = (~ok).float()
        for opt in optimizers.values():
            opt.found_inf = found_inf  # type: ignore[attr-defined]  # read by fused SGD
    elif host_check and not bool(ok):
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        return logits, parts, ok
    for opt in optimizers.values():
        opt.step()
    return logits, parts, ok


def train_step(
    method: Method,
    optimizers: dict[str, torch.optim.Optimizer],
    xb: Tensor,
    yb: Tensor,
    device: torch.device,
    cfg: TrainConfig,
) -> tuple[Tensor, dict[str, Tensor]] | None:
    """One optimisation step of every trainable module on one batch: (logits, loss parts).

    None, with no step taken, if the loss or a gradient is not finite (one host sync)."""
    logits, parts, ok = train_step_async(method, optimizers, xb, yb, device, cfg, host_check=True)
    return (logits, parts) if bool(ok) else None


#: ``(xb, yb, upcoming=None, after=None) -> StepResult``; ``upcoming`` is the next batch's input
#: and ``after`` the one after it, if any
Step = Callable[..., StepResult]


def _host_check(optimizers: dict[str, torch.optim.Optimizer], cfg: TrainConfig) -> bool:
    return cfg.check_every_step or (cfg.skip_nonfinite > 0 and not _fused(optimizers))


def graphed(device: torch.device, cfg: TrainConfig) -> bool:
    """Whether a run replays its steps and evaluations from kdbench's CUDA graphs: with
    ``cfg.cuda_graphs`` on CUDA, unless a ``torch.compile`` mode brings graphs of its own."""
    own_graphs = compile_mode(cfg, device) in ("reduce-overhead", "max-autotune")
    return cfg.cuda_graphs and device.type == "cuda" and not own_graphs


def make_step(
    method: Method,
    optimizers: dict[str, torch.optim.Optimizer],
    device: torch.device,
    cfg: TrainConfig,
) -> Step:
    """The training step ``(xb, yb) -> (logits, loss parts, ok)`` of a run: eager, or replayed
    from a CUDA graph (``cfg.cuda_graphs`` on CUDA). Make it once per run: a graphed step keeps
    its capture from epoch to epoch."""
    host_check = _host_check(optimizers, cfg)

    def run(forward: Callable[[], tuple[Tensor, dict[str, Tensor]]]) -> StepResult:
        return optimise(forward, optimizers, device, cfg, host_check=host_check)

    if graphed(device, cfg):
        from kdbench.graphs import GraphedStep

        return GraphedStep(
            method,
            optimizers,
            run,
            lambda: autocast(device, cfg),
            cfg.prefetch_targets,
            cfg.overlap_teacher,
            cfg.pipeline_targets,
            cfg.priority_targets,
            cfg.targets_thread,
        )

    def step(
        xb: Tensor, yb: Tensor, upcoming: Tensor | None = None, after: Tensor | None = None
    ) -> StepResult:
        return run(functools.partial(method.forward_train, xb, yb))

    return step


@dataclass
class EpochTotals:
    """What one training epoch accumulated on the device, read once at its end."""

    #: loss part → its sum over the epoch's samples (skipped batches excluded)
    parts: dict[str, float]
    #: correctly classified training samples (skipped batches excluded); one count per
    #: student for logits stacked as (students, batch, classes) (:class:`kdbench.cohort.Cohort`)
    correct: int | list[int]
    #: steps (from 0) whose loss or gradient was not finite, in order
    bad_steps: list[int]


def _with_next(items: Iterator[Any], ahead: int = 2) -> Iterator[tuple[Any, list[Any]]]:
    """``(item, the next ahead items, fewer at the end)``: so that a step may prepare the
    next ones."""
    window = list(itertools.islice(items, ahead + 1))
    while window:
        yield window[0], window[1:]
        window = window[1:]
        window.extend(itertools.islice(items, 1))


def train_epoch(
    method: Method,
    optimizers: dict[str, torch.optim.Optimizer],
    loader: Loader,
    epoch: int,
    device: torch.device,
    cfg: TrainConfig,
    on_bad_step: Callable[[int], None] | None = None,
    step_fn: Step | None = None,
) -> EpochTotals:
    """Train one epoch; metrics accumulate on the device and are read once, at the end.

    ``on_bad_step(step)`` is called for every step whose loss or gradient was not finite, in
    order: at that step when the host checks every step (``cfg.check_every_step``, or skipping
    allowed with an unfused optimizer), else after the last step. It may raise to stop the run.
    ``step_fn`` is the run's :func:`make_step` (made here if not given).
    """
    host_check = _host_check(optimizers, cfg)
    step_fn = step_fn or make_step(method, optimizers, device, cfg)
    method.train()
    sums: dict[str, Tensor] = {}
    correct: Tensor = torch.zeros((), device=device, dtype=torch.int64)
    bad = torch.zeros(max(len(loader), 1), device=device, dtype=torch.bool)
    for step, ((xb, yb), following) in enumerate(_with_next(loader.epoch(epoch))):
        faults.point(f"step{step}")
        logits, parts, ok = step_fn(xb, yb, *(x for x, _ in following))
        if host_check and not bool(ok) and on_bad_step is not None:
            on_bad_step(step)
        with torch.no_grad():
            bad[step] = ~ok
            n = yb.shape[0]
            for key, value in parts.items():
                term = torch.where(ok, value.detach().float() * n, 0.0)
                acc = sums.get(key)
                sums[key] = term if acc is None else acc + term
            if logits is not None:
                hits = (logits.detach().argmax(-1) == yb).sum(-1)  # one per stacked student
                correct = correct + torch.where(ok, hits, 0)
    bad_steps = bad.nonzero().flatten().tolist()  # the epoch's one host synchronisation
    if not host_check and on_bad_step is not None:
        for step in bad_steps:
            on_bad_step(step)
    return EpochTotals({k: float(v) for k, v in sums.items()}, correct.tolist(), bad_steps)


def eval_batch(model: nn.Module, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and correct predictions of ``model`` (in eval mode, under inference
    mode and the run's autocast) on one batch, on the device; of a stack of students
    (:func:`kdbench.models.stack`, logits (students, batch, classes)), one of each per student."""
    logits = model(xb)[-1].float()
    if logits.dim() == 3:  # each student's sum as its own network's would be
        losses = [F.cross_entropy(own, yb, reduction="sum") for own in logits]
        return torch.stack(losses), (logits.argmax(-1) == yb).sum(-1)
    return F.cross_entropy(logits, yb, reduction="sum"), (logits.argmax(1) == yb).sum()


#: ``(model, xb, yb) -> (summed loss, correct)`` on the device: :func:`eval_batch`, or replayed
#: from a CUDA graph (:class:`kdbench.graphs.GraphedEval`)
EvalBatch = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


def evaluate(
    model: nn.Module,
    loader: Loader,
    device: torch.device,
    cfg: TrainConfig,
    batch_fn: EvalBatch | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` over ``loader`` (one host sync).
    ``batch_fn`` is the run's :func:`make_eval_batch` (default: eager :func:`eval_batch`)."""
    (result,) = evaluate_each(model, loader, device, cfg, batch_fn)
    return result


def evaluate_each(
    model: nn.Module,
    loader: Loader,
    device: torch.device,
    cfg: TrainConfig,
    batch_fn: EvalBatch | None = None,
) -> list[tuple[float, float]]:
    """:func:`evaluate` of each student that ``model`` computes: one for a network, one per
    student for a stack of them (:func:`kdbench.models.stack`), from one pass (one host sync)."""
    batch_fn = batch_fn or eval_batch
    model.eval()
    loss_sum = correct = None
    with torch.inference_mode(), autocast(device, cfg):
        for xb, yb in loader.epoch():
            loss, right = batch_fn(model, xb, yb)
            if loss_sum is None or correct is None:
                loss_sum, correct = torch.zeros_like(loss), torch.zeros_like(right)
            loss_sum += loss
            correct += right
    if loss_sum is None or correct is None:
        raise KdbenchError("evaluate: the loader has no batch")
    n = len(loader.y)
    losses, hits = loss_sum.reshape(-1).tolist(), correct.reshape(-1).tolist()
    return [(total / n, 100.0 * right / n) for total, right in zip(losses, hits, strict=True)]


def make_eval_batch(device: torch.device, cfg: TrainConfig) -> EvalBatch:
    """A run's evaluation of one batch: eager, or with ``cfg.cuda_graphs`` on CUDA replayed
    from CUDA graphs (one per model and batch shape, kept for the whole run). Make it once per
    run."""
    if graphed(device, cfg):
        from kdbench.graphs import GraphedEval

        return GraphedEval()
    return eval_batch


def evaluate_runs(
    method: Method,
    runs: int,
    loaders: tuple[Loader, Loader],
    device: torch.device,
    cfg: TrainConfig,
    batch_fn: EvalBatch | None = None,
) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Each of ``method``'s ``runs`` students (:meth:`Method.students`, in order) evaluated on
    the validation and test ``loaders``: :func:`evaluate`'s results for each, evaluating the
    networks of :meth:`Method.evaluated` (a stacked cohort's stacks once for all their
    students)."""
    val, test = loaders
    scores: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {}
    for network, which in method.evaluated():
        on_val = evaluate_each(network, val, device, cfg, batch_fn)
        on_test = evaluate_each(network, test, device, cfg, batch_fn)
        scores.update(zip(which, zip(on_val, on_test, strict=True), strict=True))
    if sorted(scores) != list(range(runs)):
        raise KdbenchError(f"evaluate_runs: {runs} runs, but the method evaluates {sorted(scores)}")
    return [scores[i] for i in range(runs)]


def rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def cpu_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """A copy of ``module``'s state on the CPU (from a GPU: one copy for all its tensors)."""
    return io.unpack_tensors(io.pack_tensors(module.state_dict()))


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory of this process and, on CUDA, peak allocated GPU memory (MiB)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    cuda = None
    if device.type == "cuda":
        cuda = torch.cuda.max_memory_allocated(device) / 2**20
    return {
        "peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10),
        "peak_cuda_mb": cuda,
    }


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def load_state(path: Path, expected: str) -> dict[str, Any] | None:
    """The latest good training state of this configuration: ``path``, else the one before it.

    A damaged file (checksum or load failure), another format or another configuration is
    skipped with a warning; None (start from scratch) when neither is usable."""
    candidates = [c for c in (path, io.previous_state(path)) if c.exists()]
    for candidate in candidates:
        try:
            state = io.load_state_file(candidate)
        except Exception as exc:  # never load garbage: skip it
            log.warning("ignoring damaged training state %s (%s)", candidate, one_line(exc))
            continue
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            log.warning("ignoring training state %s of another format", candidate)
        elif state.get("fingerprint") != expected:
            log.warning("ignoring training state %s of a different configuration", candidate)
        else:
            return state
    if candidates:
        log.warning("no usable training state in %s; starting from scratch", path.parent)
    return None


def nonfinite_batch(where: str, skipped: int, limit: int, saved: int, state: Path) -> None:
    """The ``skipped``-th batch with a non-finite loss or gradient: a warning while ``limit``
    allows skipping it, else a KdbenchError naming ``where`` and the last good state."""
    if skipped > limit:
        raise KdbenchError(
            f"{where}: non-finite loss or gradient; the last good state (epoch {saved}) is "
            f"kept in {state}"
            + (f"; {skipped - 1} bad batch(es) were skipped before" if skipped > 1 else "")
        )
    log.warning(
        "%s: non-finite loss or gradient, batch skipped (%d of at most %d, train.skip_nonfinite)",
        where,
        skipped,
        limit,
    )


@dataclass
class Run:
    """One student that :func:`fit_runs` trains and writes out: its record (what metrics.json
    says of it), outputs and where its loss parts, statistics and modules lie in the method."""

    student: nn.Module
    record: dict[str, Any]
    outputs: RunOutputs
    #: its keys' prefix in the method's loss parts, statistics and trainable modules:
    #: ``""`` alone, ``"<label>/"`` in a :class:`kdbench.cohort.Cohort`
    prefix: str = ""
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(
        default_factory=lambda: {"epoch": 0, "val_acc": -math.inf, "weights": None}
    )
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """What starts this run's log lines: ``"<label>: "`` in a cohort, else nothing."""
        return f"{self.prefix[:-1]}: " if self.prefix else ""

    def own(self, values: dict[str, Any]) -> dict[str, Any]:
        """This run's entries of a method-wide mapping, without the prefix."""
        n = len(self.prefix)
        return {k[n:]: v for k, v in values.items() if k.startswith(self.prefix)}


def fit(
    method: Method,
    data: Dataset,
    cfg: TrainConfig,
    *,
    seed: int,
    outputs: RunOutputs,
    state_path: str | Path,
    record: dict[str, Any],
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``method`` on ``data``; write the outputs; return the final metrics document.

    ``record`` describes the run (dataset, models, method, variant, every setting); it goes into
    metrics.json and its hash guards the resumable state. ``on_epoch_end(epoch)`` is called
    after an epoch's state is handed to the writer (tests use it to interrupt a run: the state
    is on disk once the exception has left ``fit``)."""
    (doc,) = fit_runs(
        method,
        data,
        cfg,
        seed=seed,
        runs=[Run(method.student, record, outputs)],
        state_path=state_path,
        record=record,
        on_epoch_end=on_epoch_end,
    )
    return doc


def fit_runs(
    method: Method,
    data: Dataset,
    cfg: TrainConfig,
    *,
    seed: int,
    runs: list[Run],
    state_path: str | Path,
    record: dict[str, Any],
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`fit` for the students of ``runs``, trained together as ``method`` (one run: the
    method's student; several: the members of a :class:`kdbench.cohort.Cohort`, whose logits
    come stacked). Each run gets its own curves, best epoch and outputs; they share the steps,
    the resumable state (guarded by the hash of ``record``) and the epoch time, which each run
    records as its share (the epoch's seconds over the number of runs). Returns their final
    metrics documents."""
    state_path = Path(state_path)
    data = data.with_train_size(cfg.train_size)  # once: make_loaders and the summary use it
    device = resolve_device(cfg.device)
    prepare(method, cfg, device)
    stacked = isinstance(method, Cohort) and method.stacked
    # train.cohort_stack as the cohort trains on this device (a stacked cohort's state holds its
    # stacks' weights), recorded only when true, as before auto was the default
    train_record = {k: v for k, v in cfg.state_record().items() if k != "cohort_stack"}
    if stacked:
        train_record["cohort_stack"] = True
    fp = fingerprint({"record": record, "seed": seed, "train": train_record})
    modules = method.trainable()
    optimizers = {name: make_sgd(mod, cfg) for name, mod in modules.items()}
    schedules = {name: make_schedule(opt, cfg) for name, opt in optimizers.items()}
    train_loader, val_loader, test_loader = make_loaders(data, cfg, device, seed)
    step_fn = make_step(method, optimizers, device, cfg)
    eval_fn = make_eval_batch(device, cfg)
    alone = len(runs) == 1

    resumed: list[int] = []
    skipped = 0  # batches skipped for a non-finite loss or gradient (train.skip_nonfinite)
    # the earlier processes (SLURM jobs) that trained this run: host, job id, epochs they reached
    sessions: list[dict[str, Any]] = []
    io.remove_stale_temps(state_path, *(p for run in runs for p in run.outputs.paths()))
    state = load_state(state_path, fp)
    if state is not None:
        for name, mod in modules.items():
            mod.load_state_dict(state["modules"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            lay_out_like_parameters(opt)
        for name, sched in schedules.items():
            sched.load_state_dict(state["schedules"][name])
        set_rng_state(state["rng"], device)
        for run in runs:
            run.epochs = list(state["epochs"] if alone else state["epochs"][run.prefix])
            run.best = dict(state["best"] if alone else state["best"][run.prefix])
        skipped = sum(e.get("skipped_batches", 0) for e in runs[0].epochs)
        resumed = list(state.get("resumed", [])) + [len(runs[0].epochs)]
        sessions = list(state.get("sessions", []))
        writer = sessions[-1] if sessions else {}
        log.info(
            "resuming from %s after epoch %d/%d (saved by job %s on %s)",
            state_path,
            len(runs[0].epochs),
            cfg.epochs,
            writer.get("slurm_job_id") or "-",
            writer.get("host", "?"),
        )

    shared = {
        **provenance.collect(device),
        "cudnn_benchmark": cudnn_autotuning(cfg, device),
        "previous_sessions": sessions,
    }
    if isinstance(method, Cohort):  # whether its students trained as stacks on this device
        shared["cohort_stack"] = stacked
    data_summary, train_config = data.summary(), asdict(cfg)
    method_provenance = method.provenance(device)  # e.g. the solver a method's auto came to
    for run in runs:
        run.doc = {
            "status": "running",
            "run": run.record.get("run", {}),
            "seed": seed,
            "config": {**run.record.get("config", {}), "train": train_config},
            "data": data_summary,
            "epochs": run.epochs,
            "provenance": {**shared, **run.own(method_provenance)},
        }
        if "cohort" in run.record:
            run.doc["cohort"] = run.record["cohort"]
    me = {"host": shared["host"], "slurm_job_id": shared["slurm_job_id"]}
    dev = shared["device"]
    log.info("device %s: %s, %d threads", device, dev["name"], dev["threads"])
    session_seconds: list[float] = []
    # each epoch's state is written while the next one trains; leaving the block waits for the
    # last, so a run that stops (an error, the end) leaves its latest state on disk
    with io.StateWriter() as states:
        for epoch in range(len(runs[0].epochs), cfg.epochs):
            t0 = time.perf_counter()
            lr = next(iter(optimizers.values())).param_groups[0]["lr"]  # the student's first
            faults.phase(f"e{epoch + 1}")

            def on_bad_step(step: int, epoch: int = epoch) -> None:
                nonlocal skipped
                skipped += 1
                where = f"{_describe(record)} epoch {epoch + 1} step {step + 1}"
                nonfinite_batch(where, skipped, cfg.skip_nonfinite, epoch, state_path)

            totals = train_epoch(
                method,
                optimizers,
                train_loader,
                epoch,
                device,
                cfg,
                on_bad_step=on_bad_step,
                step_fn=step_fn,
            )
            for sched in schedules.values():
                sched.step()
            n_train = train_loader.num_samples
            scores = evaluate_runs(
                method, len(runs), (val_loader, test_loader), device, cfg, eval_fn
            )
            stats = {k: float(v) for k, v in method.pop_stats().items()}
            seconds = time.perf_counter() - t0
            correct = [totals.correct] if isinstance(totals.correct, int) else totals.correct
            for run, hits, ((val_loss, val_acc), (test_loss, test_acc)) in zip(
                runs, correct, scores, strict=True
            ):
                parts_mean = {k: v / n_train for k, v in run.own(totals.parts).items()}
                entry = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": sum(parts_mean.values()),
                    "train_loss_parts": parts_mean,
                    "train_acc": 100.0 * hits / n_train,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "epoch_seconds": seconds / len(runs),
                }
                own_stats = run.own(stats)
                if own_stats:
                    entry["method_stats"] = own_stats
                if totals.bad_steps:
                    entry["skipped_batches"] = len(totals.bad_steps)
                if not all(math.isfinite(v) for v in (entry["train_loss"], val_loss, test_loss)):
                    raise KdbenchError(
                        f"{_describe(run.record)}: non-finite loss at epoch {epoch + 1} "
                        f"(train {entry['train_loss']}, val {val_loss}); "
                        f"last good state kept in {state_path}"
                    )
                run.epochs.append(entry)
                if val_acc > run.best["val_acc"]:
                    run.best = {
                        "epoch": epoch + 1,
                        "val_acc": val_acc,
                        "weights": cpu_state_dict(run.student),
                    }
            states.save(
                state_path,
                {
                    "version": STATE_VERSION,
                    "fingerprint": fp,
                    "modules": {k: m.state_dict() for k, m in modules.items()},
                    "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                    "schedules": {k: s.state_dict() for k, s in schedules.items()},
                    "rng": rng_state(device),
                    "epochs": runs[0].epochs if alone else {r.prefix: r.epochs for r in runs},
                    "best": runs[0].best if alone else {r.prefix: r.best for r in runs},
                    "resumed": resumed,
                    "sessions": [*sessions, {**me, "epochs": epoch + 1}],
                },
                then_json=[(run.outputs.metrics, run.doc) for run in runs],
            )
            session_seconds.append(seconds)
            remaining = (cfg.epochs - epoch - 1) * sum(session_seconds) / len(session_seconds)
            for run in runs:
                entry = run.epochs[-1]
                parts_txt = " ".join(f"{k} {v:.4f}" for k, v in entry["train_loss_parts"].items())
                # the method's counters that are not zero (a guard that fired, SVD fallbacks)
                counted = [f"{k} {v:g}" for k, v in entry.get("method_stats", {}).items() if v]
                log.info(
                    "%sepoch %d/%d loss %.4f (%s%s) train %.2f%% val %.2f%% test %.2f%% lr %.4g "
                    "%.1fs ETA %s",
                    run.tag,
                    epoch + 1,
                    cfg.epochs,
                    entry["train_loss"],
                    parts_txt,
                    "; " + ", ".join(counted) if counted else "",
                    entry["train_acc"],
                    entry["val_acc"],
                    entry["test_acc"],
                    lr,
                    seconds,
                    fmt_duration(remaining),
                )
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)

    faults.phase("final")
    memory = peak_memory(device)
    for run in runs:
        _finish(run, resumed, memory)
    io.remove_state(state_path)
    return [run.doc for run in runs]


def _finish(run: Run, resumed: list[int], memory: dict[str, float | None]) -> None:
    """Write ``run``'s weights and curves, then its complete metrics.json."""
    epochs, best, doc = run.epochs, run.best, run.doc
    best_entry = epochs[best["epoch"] - 1]
    last = epochs[-1]
    doc["final"] = {
        "epochs": len(epochs),
        "test_acc_last": last["test_acc"],
        "val_acc_last": last["val_acc"],
        "best_epoch": best["epoch"],
        "val_acc_best": best_entry["val_acc"],
        "test_acc_best_val": best_entry["test_acc"],
        "train_seconds": sum(e["epoch_seconds"] for e in epochs),
        "seconds_per_epoch": sum(e["epoch_seconds"] for e in epochs) / len(epochs),
        **memory,
        "resumed_after_epochs": resumed,
    }
    totals: dict[str, float] = {}
    for e in epochs:
        for key, value in e.get("method_stats", {}).items():
            totals[key] = totals.get(key, 0.0) + value
    if totals:
        doc["final"]["method_stats"] = totals
    io.save_torch(run.outputs.final_weights, cpu_state_dict(run.student))
    io.save_torch(run.outputs.best_weights, best["weights"])
    from kdbench import plots  # matplotlib: only where a plot is drawn

    plots.learning_curves(
        epochs,
        best["epoch"],
        run.outputs.loss_plot,
        run.outputs.accuracy_plot,
        _describe(run.record),
    )
    doc["status"] = "complete"
    io.write_json(run.outputs.metrics, doc)
    log.info(
        "%sdone: test %.2f%% at the last epoch, %.2f%% at the best validation epoch (%d)",
        run.tag,
        last["test_acc"],
        best_entry["test_acc"],
        best["epoch"],
    )


def _describe(record: dict[str, Any]) -> str:
    """A run as ``dataset=… teacher=… …``; a cohort's record (``cohort``, ``members``) as
    ``cohort NAME (dataset=… teacher=… seed=…)``."""
    if "members" in record:
        shared = _fields(record["members"][0], ("dataset", "teacher", "seed"))
        return f"cohort {record['cohort']} ({shared})"
    return _fields(record, ("dataset", "teacher", "student", "method", "variant", "seed"))


def _fields(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    run = record.get("run", {})
    return " ".join(f"{k}={run[k]}" for k in keys if run.get(k) is not None)
