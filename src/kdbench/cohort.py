"""Several students trained on one teacher pass per batch: :class:`Cohort`.

Students of one dataset and seed see the same batches, whatever their method, so the frozen
teacher's forward pass on a batch is the same for all of them. A cohort runs it once and hands
its outputs to every member: each member's ``teacher_targets`` (the Tucker decompositions, for
instance; members that ask for the same decomposition share one) and then its ``student_loss``.
To the trainer a cohort is one method whose loss parts are the members' (named
``<member>/<part>``) and whose trainable modules are all of theirs, each with its own optimizer
and schedule; so ``kdbench.train`` and ``kdbench.graphs`` run it unchanged: one teacher graph and
one student graph that steps every member. A member's gradients come from its own loss alone
(the members share no parameters), so on CPU each member's weights are those of its own run, bit
for bit (tested). One difference: a non-finite loss or gradient in any member skips the step for
all of them.

With ``streams`` (``train.cohort_streams``) each member runs its forward pass on a CUDA stream
of its own, forked from the step's stream and joined back to it. Autograd runs each backward op
on the stream of its forward op, so the members' backward passes run on their streams too, and a
captured step (:mod:`kdbench.graphs`) holds the members as parallel branches of one graph. A
small student's step is bound by kernel latency rather than arithmetic, so the GPU can run the
members' kernels side by side, as it runs separate processes' under MPS. Each member runs the
same kernels in the same order as without streams. On a CPU the streams are torch's no-op
stand-ins.

With ``stack`` (``train.cohort_stack``) the members' students of one architecture (two or more)
become one network (:func:`kdbench.models.stack`): each convolution grouped, one group per
student, so that a layer of all of them is one kernel instead of one per student. The stack
holds the weights and is what trains (one optimizer for all its students: they share the
recipe, and SGD's update is elementwise); each member's student keeps its modules, its weights
pointing at its share of the stack's (:func:`kdbench.models.alias`), so that it is saved as
before; the stack is evaluated once for all its students (:meth:`evaluated`). A member's loss
reads its share of the stack's outputs (:meth:`Method.student_outputs`), and its gradients
still come from its own loss alone. On CPU a stacked cohort's members train to their own runs'
weights up to rounding (tested).

``python -m kdbench.bench epochs --cohort`` times a cohort of the chosen methods against their
runs one by one (README, Performance).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from kdbench import models
from kdbench.errors import KdbenchError
from kdbench.methods.base import Method, sharing


def _trained_alone(method: str, student: nn.Module, args: Any) -> None:
    """A stacked student run in training mode: its method did not ask for its outputs through
    :meth:`Method.student_outputs`, and the student would not train (its stack does)."""
    if student.training:
        raise KdbenchError(
            f"method {method!r} runs its student itself, which a stacked cohort cannot train "
            "(train.cohort_stack): call self.student_outputs(x) instead of self.student(x)"
        )


class Cohort(Method):
    """``members`` (labelled by ``labels``) trained together on one pass of their shared teacher."""

    name = "cohort"

    def __init__(
        self, members: list[Method], labels: list[str], streams: bool = False, stack: bool = False
    ) -> None:
        teachers = {id(m.teacher) for m in members if m.needs_teacher}
        if len(teachers) != 1:
            raise KdbenchError(
                "a cohort needs members that share one teacher "
                f"(got {len(teachers)} teachers among {len(members)} members)"
            )
        if len(set(labels)) != len(labels) or len(labels) != len(members):
            raise KdbenchError(f"a cohort needs one distinct label per member, got {labels}")
        teacher = next(m.teacher for m in members if m.needs_teacher)
        super().__init__(members[0].student, teacher, {})
        self.members = nn.ModuleList(members)
        self.labels = list(labels)
        #: each member's forward (and so backward) pass on a stream of its own
        self.streams = streams
        self._streams: tuple[torch.device, list[Any]] | None = None
        #: the stacks of the members' students (:meth:`set_stack`) and each one's members
        self.stacks = nn.ModuleList()
        self._stacked: list[list[int]] = []
        self._guards: list[Any] = []  # the stacked students' hooks (:meth:`set_stack`)
        self.set_stack(stack)

    def students(self) -> list[nn.Module]:
        return [m.student for m in self.members]

    def compiled(self) -> list[nn.Module]:
        return [*self.stacks, *self.students()]

    def evaluated(self) -> list[tuple[nn.Module, list[int]]]:
        stacked = self._in_stacks
        alone = [(m.student, [i]) for i, m in enumerate(self.members) if i not in stacked]
        return [*zip(self.stacks, self._stacked, strict=True), *alone]

    @property
    def stacked(self) -> bool:
        """Whether the members' students train as stacks (:meth:`set_stack`)."""
        return bool(self._stacked)

    @property
    def _in_stacks(self) -> set[int]:
        """The members whose students are in a stack."""
        return {i for group in self._stacked for i in group}

    def set_stack(self, on: bool) -> None:
        """Train the students of each architecture that two or more members share as one
        stack (see the module docstring), or, with ``on`` false, each on its own again (its
        weights copied out of the stack). Call it before the optimizers are made."""
        if on == self.stacked:
            return
        if not on:
            for m in self.members:
                for t in [*m.student.parameters(), *m.student.buffers()]:
                    t.data = t.detach().clone()
            for guard in self._guards:
                guard.remove()
            self.stacks, self._stacked, self._guards = nn.ModuleList(), [], []
            return
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, m in enumerate(self.members):
            if (key := models.stack_key(m.student)) is not None:
                groups.setdefault(key, []).append(i)
        self._stacked = [group for group in groups.values() if len(group) > 1]
        self.stacks = nn.ModuleList(
            models.stack([self.members[i].student for i in group]) for group in self._stacked
        )
        self._alias()
        for group in self._stacked:  # a stacked student trains only through its stack
            for i in group:
                guard = functools.partial(_trained_alone, self.members[i].name)
                self._guards.append(self.members[i].student.register_forward_pre_hook(guard))

    def _alias(self) -> None:
        """Point each stacked student's weights at its share of its stack's (again: moving or
        converting modules gives them tensors of their own)."""
        for stack, group in zip(self.stacks, self._stacked, strict=True):
            for j, i in enumerate(group):
                models.alias(stack, self.members[i].student, j)

    def _apply(self, *args: Any, **kwargs: Any) -> Cohort:
        super()._apply(*args, **kwargs)
        self._alias()
        return self

    def to(self, *args: Any, **kwargs: Any) -> Cohort:  # type: ignore[override]
        super().to(*args, **kwargs)
        for m in self.members:  # what a member keeps outside its modules (FT's paraphraser)
            m.to(*args, **kwargs)
        self._alias()
        return self

    def trainable(self) -> dict[str, nn.Module]:
        """The stacks first (``stack<k>/student``), then every member's modules but a stacked
        student, ``<label>/<key>``."""
        stacked = self._in_stacks
        own = {
            f"{label}/{key}": module
            for i, (label, m) in enumerate(zip(self.labels, self.members, strict=True))
            for key, module in m.trainable().items()
            if not (key == "student" and i in stacked)
        }
        return {**{f"stack{k}/student": s for k, s in enumerate(self.stacks)}, **own}

    def graph_mode(self) -> str:
        modes = {m.graph_mode() for m in self.members}
        return "none" if "none" in modes else "split" if "split" in modes else "whole"

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.student_loss(x, y, self.teacher_targets(self.teacher_outputs(x)))

    def teacher_targets(self, teacher_outputs: list[Tensor]) -> tuple[Any, ...]:
        """Every member's targets from the one teacher pass (none for a member without a
        teacher); work that several members do alike on it is done once (``sharing``: the
        Tucker decomposition of one stage at one rank, for instance)."""
        with sharing():
            return tuple(
                m.teacher_targets(teacher_outputs) if m.needs_teacher else () for m in self.members
            )

    def student_loss(self, x: Tensor, y: Tensor, targets: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Every member's logits, stacked (members, batch, classes), and every member's loss
        parts, ``<label>/<part>``."""
        parts: dict[str, Tensor] = {}
        logits = []
        given = self.stack_outputs(x)
        streams = self.member_streams(x.device)
        backend = torch.get_device_module(x.device)
        main = backend.current_stream() if streams else None
        # eager CUDA steps tell the caching allocator which tensors cross streams (a captured
        # step's order is the graph's)
        crossing = bool(streams) and x.is_cuda and not torch.cuda.is_current_stream_capturing()
        for i, (label, m, t) in enumerate(zip(self.labels, self.members, targets, strict=True)):
            if streams:
                streams[i].wait_stream(main)  # the inputs and targets, made on the step's stream
            if crossing:  # read on the member's stream, in its backward pass too
                for v in [x, y, *tree_flatten(t)[0], *given.get(i, [])]:
                    if isinstance(v, Tensor) and v.is_cuda:
                        v.record_stream(streams[i])
            with contextlib.ExitStack() as scope:
                if streams:
                    scope.enter_context(backend.stream(streams[i]))
                if i in given:
                    scope.enter_context(m.given_student(given[i]))
                own_logits, own = m.student_loss(x, y, t)
                logits.append(own_logits.detach().float())
            parts.update({f"{label}/{k}": v for k, v in own.items()})
        if streams:
            for s in streams:
                main.wait_stream(s)
        if crossing:  # made on a member's stream and read on the step's
            for v in [*logits, *parts.values()]:
                v.record_stream(main)
        return torch.stack(logits), parts

    def stack_outputs(self, x: Tensor) -> dict[int, list[Tensor]]:
        """Each stacked member's share of its stack's outputs on ``x``, by member index."""
        given: dict[int, list[Tensor]] = {}
        for stack, group in zip(self.stacks, self._stacked, strict=True):
            for i, outs in zip(group, models.unstacked(stack(x), len(group)), strict=True):
                given[i] = outs
        return given

    def member_streams(self, device: torch.device) -> list[Any]:
        """One stream per member on ``device`` (made once) with :attr:`streams`, else none."""
        if not self.streams:
            return []
        if self._streams is None or self._streams[0] != device:
            backend = torch.get_device_module(device)
            if device.type == "cuda":
                made = [backend.Stream(device) for _ in self.members]
            else:
                made = [backend.Stream() for _ in self.members]
            self._streams = (device, made)
        return self._streams[1]

    def _labelled(self, per_member: Callable[[Method], dict[str, Any]]) -> dict[str, Any]:
        """Every member's ``per_member(member)`` entries, keyed ``<label>/<key>``."""
        return {
            f"{label}/{k}": v
            for label, m in zip(self.labels, self.members, strict=True)
            for k, v in per_member(m).items()
        }

    def provenance(self, device: torch.device) -> dict[str, Any]:
        return self._labelled(lambda m: m.provenance(device))

    def pop_stats(self) -> dict[str, Tensor]:
        return self._labelled(lambda m: m.pop_stats())
