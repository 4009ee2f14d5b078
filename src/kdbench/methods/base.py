"""The interface every distillation method implements.

A method owns the student (and, if it needs one, the frozen teacher and any auxiliary modules
such as a translator). The trainer only calls :meth:`Method.forward_train`, sums the returned loss
parts, and steps one optimizer per entry of :meth:`Method.trainable`; it knows nothing else about
methods, so adding one never touches the trainer.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.errors import KdbenchError

VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$")
T = TypeVar("T")
_LOCAL = threading.local()  # .scopes: this thread's open scopes of sharing(), innermost last


def _scopes() -> list[dict[Hashable, Any]]:
    if not hasattr(_LOCAL, "scopes"):
        _LOCAL.scopes = []
    return _LOCAL.scopes


@contextlib.contextmanager
def sharing() -> Iterator[None]:
    """A scope in which methods that work on one teacher pass (a :class:`kdbench.cohort.Cohort`'s
    members) do identical work on it once: :func:`shared` computes each key once inside it. A
    scope is its thread's (``train.targets_thread`` makes targets on another)."""
    scopes = _scopes()
    scopes.append({})
    try:
        yield
    finally:
        scopes.pop()


def shared(key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``; inside :func:`sharing`, the result of the scope's first call with ``key``
    (which must identify the work: the tensors it reads by ``id``, its parameters)."""
    scopes = _scopes()
    if not scopes:
        return compute()
    scope = scopes[-1]
    if key not in scope:
        scope[key] = compute()
    return scope[key]


class Method(nn.Module):
    """Base class of a distillation method (subclass, set ``name``, register)."""

    #: method name used in configs, paths and tables
    name: ClassVar[str] = ""
    #: whether the method consumes a trained teacher
    needs_teacher: ClassVar[bool] = True
    #: parameter defaults; a config may override exactly these keys
    defaults: ClassVar[dict[str, Any]] = {}
    #: JSON schema of the method's parameters (merged into the config schema)
    params_schema: ClassVar[dict[str, Any]] = {}
    #: config list key → parameter: the method's variants are the product of these lists
    grid: ClassVar[dict[str, str]] = {}
    #: files the method needs from the workflow besides the teacher (passed as ``assets``)
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        params: dict[str, Any],
        assets: dict[str, Path] | None = None,
    ) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise KdbenchError(f"method {self.name!r} needs a teacher")
        self.student = student
        self.params = self.resolve_params(params)
        self.assets = dict(assets or {})
        #: the teacher's outputs that :meth:`teacher_outputs` returns instead of running it
        #: (:meth:`student_loss`)
        self._given: list[Tensor] | None = None
        #: the student's outputs that :meth:`student_outputs` returns instead of running it (a
        #: stacked cohort's, :meth:`kdbench.cohort.Cohort.student_loss`)
        self._given_student: list[Tensor] | None = None
        # The teacher is frozen: eval mode, no gradients, not a trainable submodule.
        self._teacher = [teacher] if teacher is not None else []
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    @property
    def teacher(self) -> nn.Module:
        if not self._teacher:
            raise KdbenchError(f"method {self.name!r} has no teacher")
        return self._teacher[0]

    def to(self, *args: Any, **kwargs: Any) -> Method:  # type: ignore[override]
        super().to(*args, **kwargs)
        if self._teacher:
            self._teacher[0] = self._teacher[0].to(*args, **kwargs)
        return self

    def replace_teacher(self, teacher: nn.Module) -> None:
        """Use ``teacher`` (frozen here) in place of the teacher, e.g. its folded copy
        (:func:`kdbench.models.fold_batchnorm`); it must give the same outputs."""
        if not self._teacher:
            raise KdbenchError(f"method {self.name!r} has no teacher")
        self._teacher[0] = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self._teacher:
            self._teacher[0].eval()
        return self

    def teacher_outputs(self, x: Tensor) -> list[Tensor]:
        """The teacher's ``[stage1, stage2, stage3, logits]``, computed under inference mode.

        The results are cloned outside inference mode so that losses may combine them with the
        student's tensors; no gradient ever reaches the teacher. Inside :meth:`student_loss`
        the given outputs are returned instead (the teacher is not run).
        """
        if self._given is not None:
            return list(self._given)
        with torch.inference_mode():
            outs = self.teacher(x)
        return [t.clone() for t in outs]

    def student_outputs(self, x: Tensor) -> list[Tensor]:
        """The student's ``[stage1, stage2, stage3, logits]`` for ``x``; what methods call
        instead of the student itself, so that a stacked cohort (:mod:`kdbench.cohort`) can
        hand each member its share of one pass of all its students."""
        if self._given_student is not None:
            return list(self._given_student)
        return self.student(x)

    def given_student(self, outputs: list[Tensor]) -> contextlib.AbstractContextManager[None]:
        """A scope in which :meth:`student_outputs` returns ``outputs``."""
        return self._giving("_given_student", outputs)

    @contextlib.contextmanager
    def _giving(self, attr: str, outputs: list[Tensor]) -> Iterator[None]:
        """A scope in which ``attr`` (``_given``: the teacher's outputs, ``_given_student``: the
        student's) holds ``outputs``."""
        setattr(self, attr, list(outputs))
        try:
            yield
        finally:
            setattr(self, attr, None)

    def students(self) -> list[nn.Module]:
        """The networks compiled and evaluated as students: this method's student (a
        :class:`kdbench.cohort.Cohort`'s: every member's)."""
        return [self.student]

    def trainable(self) -> dict[str, nn.Module]:
        """Modules that get their own optimizer and schedule (the student first)."""
        return {"student": self.student}

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits and the named loss parts for one batch (their sum is minimised)."""
        raise NotImplementedError

    def graph_mode(self) -> str:
        """How kdbench.graphs may capture this method's training step as CUDA graphs:

        * ``whole``: ``forward_train`` never synchronises with the host (the default);
        * ``split``: ``forward_train`` is ``student_loss(x, y, teacher_targets(teacher
          outputs))``, where only ``teacher_targets`` may synchronise: the teacher's forward
          pass and the student's step are captured, ``teacher_targets`` runs eagerly between;
        * ``none``: the step runs eagerly.

        With ``train.overlap_teacher`` a ``whole`` method with a teacher is captured as
        ``split`` too, through the defaults of :meth:`teacher_targets` and
        :meth:`student_loss`, so that the teacher's pass can run on a stream of its own.
        """
        return "whole"

    def teacher_targets(self, teacher_outputs: list[Tensor]) -> Any:
        """What the loss needs from the teacher's ``[stage1, stage2, stage3, logits]``,
        without gradient: tensors (and constants), nested in tuples or lists. ``split``
        methods compute theirs here; by default, the outputs themselves."""
        return teacher_outputs

    def student_loss(self, x: Tensor, y: Tensor, targets: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """``forward_train`` given :meth:`teacher_targets`' result. ``split`` methods write
        theirs; by default, ``forward_train`` with :meth:`teacher_outputs` returning
        ``targets`` (the teacher's outputs) instead of running the teacher."""
        with self._giving("_given", targets):
            return self.forward_train(x, y)

    def evaluated(self) -> list[tuple[nn.Module, list[int]]]:
        """The networks evaluated after each epoch, each with the indices (in
        :meth:`students`) of the students whose scores it gives, in its output order: each
        student alone (a stacked cohort's stacks give all their students' at once)."""
        return [(student, [i]) for i, student in enumerate(self.students())]

    def compiled(self) -> list[nn.Module]:
        """The networks that ``train.compile`` compiles besides the teacher: the students (and
        a stacked cohort's stacks)."""
        return self.students()

    def checkpoint_extras(self) -> dict[str, nn.Module]:
        """Auxiliary modules whose weights are saved beside the student's."""
        return {k: v for k, v in self.trainable().items() if k != "student"}

    @classmethod
    def resolve_params(cls, params: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults updated with ``params``; unknown keys are an error."""
        resolved = dict(cls.defaults)
        for key, value in (params or {}).items():
            if key not in resolved:
                known = ", ".join(resolved) or "none"
                raise KdbenchError(
                    f"methods.{cls.name}: unknown parameter {key!r} (known: {known})"
                )
            resolved[key] = value
        return resolved

    def pop_stats(self) -> dict[str, Tensor]:
        """Per-epoch counters (e.g. how often a guard fired), read and reset by the trainer."""
        return {}

    def provenance(self, device: torch.device) -> dict[str, Any]:
        """What metrics.json's ``provenance`` records of how this method runs on ``device``
        beyond the trainer's own entries (e.g. the solver that a setting's ``auto`` comes to)."""
        return {}

    @classmethod
    def check(cls, params: dict[str, Any], stage_shape: Any) -> None:
        """Validate ``params`` at workflow start; ``stage_shape(stage)`` gives the per-sample
        (C, H, W) shape of a feature stage for the run's dataset and architectures."""

    @classmethod
    def variant_name(cls, params: dict[str, Any]) -> str:
        """The name of a grid variant (methods with a ``grid`` override this)."""
        return "default"

    @classmethod
    def config_schema(cls) -> dict[str, Any]:
        """JSON schema of the method's config block."""
        params = {k: v for k, v in cls.params_schema.items() if k not in cls.grid.values()}
        lists = {
            key: {"type": "array", "minItems": 1, "uniqueItems": True, "items": item}
            for key, item in ((k, cls.params_schema[p]) for k, p in cls.grid.items())
        }
        variant = {"type": "object", "additionalProperties": False, "properties": cls.params_schema}
        props: dict[str, Any] = {**params, **lists}
        if not cls.grid:
            props["variants"] = {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": variant,
            }
        return {"type": ["object", "null"], "additionalProperties": False, "properties": props}

    @classmethod
    def expand_variants(cls, config: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Variant name → full parameters, from the method's config block.

        The block holds parameters plus an optional ``variants`` mapping of name → overrides;
        without it the method has one variant, ``default``. Methods with a natural grid (ranks,
        targets) override this to name their variants themselves.
        """
        config = dict(config or {})
        if cls.grid:
            lists = {p: list(config.pop(key, [cls.defaults[p]])) for key, p in cls.grid.items()}
            base = cls.resolve_params(config)
            out = {}
            for values in itertools.product(*lists.values()):
                params = cls.resolve_params({**base, **dict(zip(lists, values, strict=True))})
                out[cls.variant_name(params)] = params
            return out
        variants = config.pop("variants", None) or {"default": {}}
        base = cls.resolve_params(config)
        out = {}
        for vname, overrides in variants.items():
            if not VARIANT_NAME.match(str(vname)):
                raise KdbenchError(
                    f"methods.{cls.name}.variants: bad name {vname!r} "
                    "(letters, digits, '_', '.', '-' only)"
                )
            out[str(vname)] = cls.resolve_params({**base, **(overrides or {})})
        return out


def normalise(x: Tensor) -> Tensor:
    """N(x): each sample's flattened tensor scaled to unit L2 norm (fp32; zero stays zero)."""
    return F.normalize(x.flatten(1).float(), dim=1, eps=1e-12)


class FeatureMethod(Method):
    """Base of the feature methods: β·D(N(a), N(b)) + CE on one feature stage.

    ``beta``, ``distance`` (mean ``l1`` or mean squared ``l2``) and ``stage`` (1–3) are shared
    by every feature method.
    """

    defaults: ClassVar[dict[str, Any]] = {"beta": 125.0, "distance": "l1", "stage": 3}
    params_schema: ClassVar[dict[str, Any]] = {
        "beta": {"type": "number", "minimum": 0},
        "distance": {"enum": ["l1", "l2"]},
        "stage": {"enum": [1, 2, 3]},
    }

    @classmethod
    def check(cls, params: dict[str, Any], stage_shape: Any) -> None:
        """The chosen stage must have one shape in teacher and student (else stage_shape
        raises)."""
        stage_shape(int(params["stage"]))

    def feature_loss(self, a: Tensor, b: Tensor) -> Tensor:
        na, nb = normalise(a), normalise(b)
        dist = F.l1_loss(na, nb) if self.params["distance"] == "l1" else F.mse_loss(na, nb)
        return float(self.params["beta"]) * dist

    def stages(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher stage (no grad), student stage and student logits for one batch."""
        i = int(self.params["stage"]) - 1
        t = self.teacher_outputs(x)[i]
        outs = self.student_outputs(x)
        return t, outs[i], outs[-1]
