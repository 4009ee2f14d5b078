"""The training step and the evaluation as CUDA graphs (``train.cuda_graphs``).

A CIFAR ResNet step launches well over a thousand small kernels, and on a fast GPU the host
cannot launch them as fast as the GPU runs them. :class:`GraphedStep` captures the step once
and then replays it for every batch of the same shape: one launch instead of a thousand.

* What is captured is the eager step itself (``kdbench.train.optimise`` of the method's
  forward pass): forward passes, losses, backward, the finite check and the fused SGD update,
  in the same kernels as an eager step.
* ``Method.graph_mode()`` says how: ``whole`` captures the step as one graph. ``split`` (the
  Tucker methods, whose ``torch.linalg.eigh`` checks its result on the host) captures the
  teacher's forward pass as one graph and the student's step as another, and runs the method's
  ``teacher_targets`` (the decomposition) eagerly between them, under the step's autocast as
  in an eager step. ``none`` runs eagerly.
* Before the first capture a few steps run eagerly on a side stream (real training steps of the
  epoch: CUDA's libraries and autograd set themselves up there).
* The captured update reads each parameter group's learning rate from a tensor of its own on
  the device, which the step fills before a replay whenever the schedule has changed the rate
  (once per epoch): one capture serves the whole run. The optimizers themselves keep plain
  float rates (the schedule's arithmetic, the logs and the saved states are those of an eager
  run); the tensors stand in for them during the capture only. The tensor holds the rate
  rounded to float32 (fused SGD's only rate tensor type): on the CPU the update is the eager
  one bit for bit (its kernel rounds a float rate so too), on CUDA, whose kernel multiplies in
  double, a weight can differ from the eager update's in its last bit.
* A batch smaller than the captured one (the last batch of an epoch) runs eagerly.
* An unfused optimizer, or a capture that fails for any reason, falls back to eager steps,
  with one warning.
* ``prefetch`` (``train.prefetch_targets``; ``split`` only): a step that is told the next
  batch (``upcoming``) replays the teacher's graph on it *before* its own student graph, then
  computes the next batch's targets on a side stream while the GPU runs the student's step,
  and copies them into the student graph's inputs behind it. The targets' synchronisation
  (``eigh``) then waits for the teacher's forward pass only, and the decomposition overlaps
  the student's step instead of standing between the two graphs. Every batch gets the
  targets of its own teacher outputs, as before.
* ``overlap`` (``train.overlap_teacher``): the teacher's graph for the next batch is replayed on
  the side stream, beside this batch's student graph on the main one, so that the GPU runs the
  two at once instead of one after the other. It implies ``prefetch``, and every method with a
  teacher is captured ``split`` for it (a ``whole`` one through ``Method.teacher_targets`` and
  ``Method.student_loss``'s defaults: the teacher's outputs themselves are the targets). The
  teacher's graph is captured on the side stream, so that the two graphs' cuBLAS calls do not
  share the capture stream's workspace while they run at once.
* ``pipeline`` (``train.pipeline_targets``; with ``overlap``): two batches ahead. A step told
  the next two batches (``upcoming`` and ``after``) replays its student graph first, then the
  teacher's graph on ``after`` on the side stream (its outputs copied into one of two slots),
  then computes ``upcoming``'s targets from its slot, filled a step earlier, on a third stream.
  The decomposition's synchronisation then finds the teacher's pass done, and the side stream
  runs the teacher passes back to back while the third runs the decompositions beside them,
  instead of one after the other on one stream (where on a short student step, resnet20's,
  their sum made the step). The same targets for every batch, in the same order.
* ``priority`` (``train.priority_targets``; with ``pipeline``): the third stream at a higher
  CUDA priority than the other two, so that the GPU schedules the decomposition's kernels,
  which the host waits for (``eigh``), before the waiting ones of the student's and the
  teacher's graphs. The same kernels in the same order on each stream: the same targets.
* ``thread`` (``train.targets_thread``; with ``pipeline``): the targets on a host thread of their
  own (:func:`targets_worker`), two batches ahead. The decomposition checks its result on the
  host (a synchronisation: ``linalg.svd``'s and ``linalg.eigh``'s convergence checks), and on
  the main thread that wait stood in every step between the launches of the student's graph and
  the next batch's, so that a short student step (resnet20's) waited for the host. A step
  replays its student graph, replays the teacher's graph on ``after`` and hands that batch's
  targets to the worker, which queues them on the third stream behind that teacher pass and
  waits there; then the step takes ``upcoming``'s targets, handed over a step earlier (waiting
  only if the worker has not finished them), and copies them into the student graph's inputs
  behind this step. The same targets for every batch, in the same order, made by the same
  kernels on the same stream. Off by default: on an H200 it made the Tucker methods' resnet20
  epochs 1.24-1.36x slower (the two threads' Python takes turns on the interpreter lock).

:class:`GraphedEval` does the same for the evaluation of a batch (see its docstring).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from kdbench.errors import one_line
from kdbench.methods.base import Method
from kdbench.train import StepResult, _fused, eval_batch

log = logging.getLogger("kdbench")

#: eager steps on a side stream before the first capture
WARMUP_STEPS = 3


def _record(graph: torch.cuda.CUDAGraph, fn: Callable[[], Any], stream: Any = None) -> Any:
    """Capture ``fn()`` into ``graph`` (on ``stream``, default torch's capture stream); its
    result's tensors are the graph's outputs."""
    with torch.cuda.graph(graph, stream=stream):
        return fn()


@functools.cache
def _worker(pid: int) -> ThreadPoolExecutor:
    """The targets thread of process ``pid`` (a forked child does not inherit its parent's)."""
    return ThreadPoolExecutor(1, thread_name_prefix="kdbench-targets")


def targets_worker() -> ThreadPoolExecutor:
    """The one host thread that computes the methods' targets ahead (``thread``): one for the
    process, whose runs train one after the other."""
    return _worker(os.getpid())


def _on_side_stream(fn: Callable[[], Any]) -> Any:
    """``fn()`` eagerly on a side stream, ordered after and before the current stream's work:
    the warm-up before a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


class GraphedStep:
    """``(xb, yb, upcoming=None, after=None) -> (logits, loss parts, ok)`` from replayed CUDA
    graphs; see the module docstring. ``optimise(forward)`` is the eager step around a forward
    pass, ``autocast()`` the step's autocast context, ``prefetch`` ``train.prefetch_targets``,
    ``overlap`` ``train.overlap_teacher``, ``pipeline`` ``train.pipeline_targets``,
    ``priority`` ``train.priority_targets``, ``thread`` ``train.targets_thread``."""

    def __init__(
        self,
        method: Method,
        optimizers: dict[str, torch.optim.Optimizer],
        optimise: Callable[[Callable[[], Any]], StepResult],
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
        prefetch: bool = False,
        overlap: bool = False,
        pipeline: bool = False,
        priority: bool = False,
        thread: bool = False,
    ) -> None:
        self.method = method
        self.optimizers = optimizers
        self.optimise = optimise
        self.autocast = autocast
        self.mode = method.graph_mode()
        #: the next batch's teacher graph on the side stream, beside this batch's student graph
        self.overlap = overlap and method.needs_teacher and self.mode in ("whole", "split")
        if self.overlap:
            self.mode = "split"
        self.prefetch = (prefetch or self.overlap) and self.mode == "split"
        #: the teacher two batches ahead, the targets one ahead on a third stream
        self.pipeline = pipeline and self.overlap
        #: the targets' stream at a high priority
        self.priority = priority and self.pipeline
        #: the targets made on a host thread of their own, two batches ahead
        self.thread = thread and self.pipeline
        #: teacher passes run ahead and not yet turned into targets: (batch, slot, done event,
        #: the worker's future of (targets, their event) with ``thread``, else None)
        self.pending: list[tuple[Tensor, int, Any, Future[Any] | None]] = []
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.key: tuple[Any, ...] | None = None
        #: every parameter group with the device tensor its captured update reads the rate
        #: from, and the rate last written into it
        self.lrs: list[tuple[dict[str, Any], Tensor, float]] = []
        self.warm = 0
        #: the batch whose targets are already in the student graph's inputs
        self.targets_for: Tensor | None = None
        self.disabled = self._why_not()
        if self.disabled:
            log.warning("CUDA graphs off: %s; training eagerly", self.disabled)

    @property
    def status(self) -> str:
        """``whole``, ``split``, ``split, prefetch``, ``split, prefetch, overlap``, ``split,
        prefetch, overlap, pipeline``, followed by ``, priority`` and ``, thread`` where those
        are on (how steps are captured), or ``eager: <why>``."""
        if self.disabled:
            return f"eager: {self.disabled}"
        status = f"{self.mode}, prefetch" if self.prefetch else self.mode
        status = f"{status}, overlap" if self.overlap else status
        status = f"{status}, pipeline" if self.pipeline else status
        status = f"{status}, priority" if self.priority else status
        return f"{status}, thread" if self.thread else status

    def _why_not(self) -> str | None:
        unfused = [name for name, opt in self.optimizers.items() if not _fused({name: opt})]
        if unfused:
            return f"optimizer(s) {', '.join(unfused)} not fused (train.optimizer.fused)"
        if self.mode == "none":
            return f"method {self.method.name!r} ({self.method.params}) cannot be captured"
        if self.mode not in ("whole", "split"):
            return f"method {self.method.name!r}: unknown graph mode {self.mode!r}"
        return None

    def eager(self, xb: Tensor, yb: Tensor) -> StepResult:
        _wait_for(self.pending)  # the method's targets are not made on two threads at once
        return self.optimise(functools.partial(self.method.forward_train, xb, yb))

    def _groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    @contextlib.contextmanager
    def _rate_tensors(self) -> Any:
        """Inside: each parameter group's rate is a float32 tensor on its parameters' device
        (what a capture then reads from); outside, the float again."""
        self.lrs = [
            (g, torch.tensor(float(g["lr"]), dtype=torch.float32, device=g["params"][0].device),
             float(g["lr"]))
            for g in self._groups()
        ]  # fmt: skip
        try:
            for g, tensor, _ in self.lrs:
                g["lr"] = tensor
            yield
        finally:
            for g, _, rate in self.lrs:
                g["lr"] = rate

    def _write_rates(self) -> None:
        """Fill the rate tensors the captured update reads with the groups' rates where the
        schedule changed them (on the current stream, before the replay that reads them)."""
        for i, (g, tensor, written) in enumerate(self.lrs):
            if g["lr"] != written:
                tensor.fill_(g["lr"])
                self.lrs[i] = (g, tensor, g["lr"])

    def _fits(self, x: Tensor | None) -> bool:
        """Whether ``x`` is a batch the captured graphs take."""
        return x is not None and (tuple(x.shape), x.stride()) == self.key[:2]

    def __call__(
        self, xb: Tensor, yb: Tensor, upcoming: Tensor | None = None, after: Tensor | None = None
    ) -> StepResult:
        """One step on ``(xb, yb)``; ``upcoming`` is the next batch's input and ``after`` the
        one after it, if known."""
        if self.disabled:
            return self.eager(xb, yb)
        if self.warm < WARMUP_STEPS:
            self.warm += 1
            return _on_side_stream(functools.partial(self.eager, xb, yb))
        key = (tuple(xb.shape), xb.stride(), tuple(yb.shape))
        if key != self.key:
            if self.key is not None and xb.shape[0] < self.key[0][0]:
                return self.eager(xb, yb)  # the last, smaller batch
            self._capture(xb, yb, key)
            if self.disabled:
                return self.eager(xb, yb)
        self._write_rates()
        if self.mode == "split" and self.targets_for is not xb:
            self._drain()  # no teacher pass may still run ahead on the side stream
            self.static_tx.copy_(xb)
            self.graphs[0].replay()  # the teacher's forward pass
            self._set_targets(self._targets())
        self.targets_for = None
        self.static_x.copy_(xb)
        self.static_y.copy_(yb)
        ahead = self.prefetch and self._fits(upcoming)
        if ahead and self.pipeline:
            assert upcoming is not None
            self._pipelined(upcoming, after if self._fits(after) else None)
            return self.static_out
        if ahead:  # the next batch's teacher pass first: its targets overlap this step
            done = torch.cuda.Event()
            if self.overlap:  # on the side stream, beside this batch's student graph
                self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side) if self.overlap else contextlib.nullcontext():
                self.static_tx.copy_(upcoming)
                self.graphs[0].replay()
                done.record()
        self.graphs[-1].replay()
        if ahead:
            self._prefetch(done, upcoming)
        return self.static_out

    def _prefetch(self, teacher_done: Any, upcoming: Tensor) -> None:
        """The targets of ``upcoming`` (whose teacher pass ``teacher_done`` follows) on the
        side stream, copied into the student graph's inputs behind the step just replayed.
        A failure turns prefetching off, with one warning; the next step computes its own."""
        try:
            main = torch.cuda.current_stream()
            self.side.wait_event(teacher_done)
            with torch.cuda.stream(self.side):
                targets = self._targets()
            # copied behind this step, which reads the current targets. The side stream's
            # memory is only reused by its own later work, which waits for a later teacher
            # pass, so for these copies too
            main.wait_stream(self.side)
            self._set_targets(targets)
        except Exception as exc:
            self._stop_prefetching(exc)
            return
        self.targets_for = upcoming

    def _pipelined(self, upcoming: Tensor, after: Tensor | None) -> None:
        """This batch's student graph, then the teacher's pass on ``after`` (and on
        ``upcoming`` if none ran ahead for it) on the side stream, then ``upcoming``'s targets
        on the third stream, copied into the student graph's inputs behind this step. A failure
        turns the pipeline and prefetching off, with one warning."""
        main = torch.cuda.current_stream()
        batches_ready = torch.cuda.Event()  # the loader's batches, made before this step
        batches_ready.record()
        self.graphs[-1].replay()
        try:
            # a pass run ahead for a batch that did not come next (none in an epoch's order)
            _wait_for([p for p in self.pending if p[0] is not upcoming and p[0] is not after])
            self.pending = [p for p in self.pending if p[0] is upcoming or p[0] is after]
            pending = next((p for p in self.pending if p[0] is upcoming), None)
            if pending is None:
                pending = self._teacher_ahead(upcoming, batches_ready, thread=self.thread)
            if after is not None:
                self._teacher_ahead(after, batches_ready, thread=self.thread)
            _, slot, done, future = pending
            self.pending.remove(pending)
            if future is None:
                targets, read = self._targets_from(slot, done)
            else:  # handed to the worker a step ago (or just now: the epoch's first)
                targets, read = future.result()
            self.slot_read[slot] = read  # the slot may be filled again after this
            for t in tree_flatten(targets)[0]:
                if isinstance(t, Tensor) and t.is_cuda:  # made on the third stream, read here
                    t.record_stream(main)
            if future is None:
                main.wait_stream(self.targets_stream)
            else:  # not after what the worker queued since
                main.wait_event(read)
            self._set_targets(targets)
        except Exception as exc:
            self._stop_prefetching(exc)
            return
        self.targets_for = upcoming

    def _targets_from(self, slot: int, done: Any) -> tuple[Any, Any]:
        """The targets of the teacher outputs in ``slot`` (filled by the pass that ``done``
        follows) on the third stream, and the event that follows them."""
        self.targets_stream.wait_event(done)
        with torch.cuda.stream(self.targets_stream):
            targets = self._targets(tree_unflatten(self.slots[slot], self.slot_spec))
            made = torch.cuda.Event()
            made.record()
        return targets, made

    def _stop_prefetching(self, exc: Exception) -> None:
        """After a failure computing targets ahead: order the current stream after the side
        streams' work and compute each step's targets in it from now on, with one warning."""
        with contextlib.suppress(Exception):  # nothing later may overtake the side streams
            self._drain()
        self.prefetch = self.overlap = self.pipeline = self.priority = self.thread = False
        log.warning("CUDA graphs: prefetching targets off: %s", one_line(exc))

    def _teacher_ahead(
        self, x: Tensor, batches_ready: Any, thread: bool
    ) -> tuple[Tensor, int, Any, Future[Any] | None]:
        """Replay the teacher's graph on ``x`` on the side stream, after the loader made it,
        into a free slot, and with ``thread`` hand its targets to the worker; the pending
        entry."""
        used = {p[1] for p in self.pending}
        slot = next(i for i in range(len(self.slots)) if i not in used)
        self.side.wait_event(batches_ready)
        if self.slot_read[slot] is not None:  # the targets of the slot's last batch are made
            self.side.wait_event(self.slot_read[slot])
        with torch.cuda.stream(self.side):
            if x.is_cuda:  # made on the main stream, read on this one
                x.record_stream(self.side)
            self.static_tx.copy_(x)
            self.graphs[0].replay()
            outputs = tree_flatten(self.static_teacher)[0]
            for dst, src in zip(self.slots[slot], outputs, strict=True):
                dst.copy_(src)
            done = torch.cuda.Event()
            done.record()
        future = targets_worker().submit(self._targets_from, slot, done) if thread else None
        entry = (x, slot, done, future)
        self.pending.append(entry)
        return entry

    def _drain(self) -> None:
        """Order the current stream after all work of the side streams (and of the worker,
        which it waits for); forget what ran ahead."""
        _wait_for(self.pending)
        self.pending = []
        if self.mode == "split" and self.graphs:
            main = torch.cuda.current_stream()
            main.wait_stream(self.side)
            if self.pipeline:
                main.wait_stream(self.targets_stream)

    def _teacher_pass(self, x: Tensor) -> list[Tensor]:
        with self.autocast():
            return self.method.teacher_outputs(x)

    def _targets(self, outputs: Any = None) -> Any:
        """The method's teacher targets from ``outputs`` (default: the teacher graph's),
        eagerly, under the step's autocast (as in an eager step, where they are computed
        inside it)."""
        with self.autocast():
            return self.method.teacher_targets(self.static_teacher if outputs is None else outputs)

    def _set_targets(self, targets: Any) -> None:
        """Copy ``targets`` into the student graph's inputs, on the current stream."""
        flat, _ = tree_flatten(targets)
        for static, value in zip(self.static_targets, flat, strict=True):
            if isinstance(static, Tensor):
                static.copy_(value)
            elif static != value:
                raise RuntimeError(f"a constant teacher target changed ({static} → {value})")

    def _capture(self, xb: Tensor, yb: Tensor, key: tuple[Any, ...]) -> None:
        self._drain()
        self.graphs = []  # frees the previous captures' memory
        self.targets_for = None
        self.static_x = xb.clone(memory_format=torch.preserve_format)
        self.static_y = yb.clone()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        x, y = self.static_x, self.static_y
        graphs = []
        try:
            if self.mode == "split":
                # the teacher's graph has an input of its own: with prefetch it runs a batch
                # ahead of the student's
                self.static_tx = xb.clone(memory_format=torch.preserve_format)
                self.side = torch.cuda.Stream()
                teacher = torch.cuda.CUDAGraph()
                self.static_teacher = _record(
                    teacher,
                    functools.partial(self._teacher_pass, self.static_tx),
                    self.side if self.overlap else None,
                )
                teacher.replay()
                graphs.append(teacher)
                if self.pipeline:  # two slots for teacher outputs run ahead, a third stream
                    flat, self.slot_spec = tree_flatten(self.static_teacher)
                    self.slots = [[t.clone() for t in flat] for _ in range(2)]
                    self.slot_read: list[Any] = [None, None]
                    # (a lower number is a higher priority; torch's streams default to 0)
                    priority = -1 if self.priority else 0
                    self.targets_stream = torch.cuda.Stream(priority=priority)
                flat, spec = tree_flatten(self._targets())
                self.static_targets = [
                    v.clone(memory_format=torch.preserve_format) if isinstance(v, Tensor) else v
                    for v in flat
                ]
                targets = tree_unflatten(self.static_targets, spec)
                forward = functools.partial(self.method.student_loss, x, y, targets)
            else:
                forward = functools.partial(self.method.forward_train, x, y)
            step = torch.cuda.CUDAGraph()
            with self._rate_tensors():
                self.static_out = _record(step, functools.partial(self.optimise, forward))
            graphs.append(step)
        except Exception as exc:  # a step that cannot be captured trains eagerly
            self.disabled = f"capture failed ({one_line(exc)})"
            log.warning("CUDA graphs off: %s; training eagerly", self.disabled)
            torch.cuda.synchronize()
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            return
        self.graphs, self.key = graphs, key
        if self.mode == "split":  # its targets are in the graph's inputs: not computed again
            self.targets_for = xb


def _wait_for(pending: list[tuple[Tensor, int, Any, Future[Any] | None]]) -> None:
    """Wait until the worker has queued all the targets of ``pending`` (whatever it raised:
    the caller gives them up), so that nothing more comes onto the third stream."""
    wait([p[3] for p in pending if p[3] is not None])


class GraphedEval:
    """:func:`kdbench.train.eval_batch` replayed from CUDA graphs, one per model and batch shape.

    The graph reads the model's weights and batch-norm statistics where they are, so one
    capture serves every later evaluation of the run, however the weights changed. The first
    batch of each shape runs eagerly on a side stream (the warm-up), the second is captured;
    batches of another shape (the smaller last one) run eagerly until they come round again.
    A capture that fails falls back to eager evaluation, with one warning. Call it under
    inference mode and the run's autocast, as :func:`kdbench.train.evaluate` does.
    """

    def __init__(self) -> None:
        #: (model id, shapes, strides) → (graph, static input, static labels, static outputs),
        #: or None after the warm-up
        self.graphs: dict[tuple[Any, ...], Any] = {}
        self.disabled: str | None = None

    @property
    def status(self) -> str:
        """``graphs``, or ``eager: <why>``."""
        return f"eager: {self.disabled}" if self.disabled else "graphs"

    def __call__(self, model: nn.Module, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        if self.disabled:
            return eval_batch(model, xb, yb)
        key = (id(model), tuple(xb.shape), xb.stride(), tuple(yb.shape))
        if key not in self.graphs:  # warm-up
            self.graphs[key] = None
            return _on_side_stream(functools.partial(eval_batch, model, xb, yb))
        if self.graphs[key] is None:
            static_x = xb.clone(memory_format=torch.preserve_format)
            static_y = yb.clone()
            graph = torch.cuda.CUDAGraph()
            try:
                out = _record(graph, functools.partial(eval_batch, model, static_x, static_y))
            except Exception as exc:
                self.disabled = f"capture failed ({one_line(exc)})"
                log.warning("CUDA graphs off for evaluation: %s", self.disabled)
                torch.cuda.synchronize()
                self.graphs.clear()
                return eval_batch(model, xb, yb)
            self.graphs[key] = (graph, static_x, static_y, out)
        graph, static_x, static_y, out = self.graphs[key]
        static_x.copy_(xb)
        static_y.copy_(yb)
        graph.replay()
        return out
