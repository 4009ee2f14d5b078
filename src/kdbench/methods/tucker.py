"""Tucker distillation (REFERENCE §4): compare Tucker cores of teacher and student features.

Under no grad, the teacher's stage tensor is decomposed with ranks (B, r, h, w), where
``rank`` is r, or [r, h, w] to truncate the spatial modes too. The student's tensor is projected on
the teacher's factors, and the loss is β·D(N(core_t), N(core_s)) + CE. The batch mode is always
kept at full rank, so each batch's rank equals its own size: a smaller last batch keeps the
channel rank r and the same per-sample meaning of the core's rows (no clamping).

Variants (the product of the config lists ``ranks``, ``decomposition``, ``basis``) are named
``<decomposition>-<basis>-r<rank>``, e.g. ``full-teacher-r32``:

* ``decomposition: full`` decomposes the whole B×C×H×W batch tensor. ``sample`` decomposes each
  sample's C×H×W tensor with ranks (r, h, w) and stacks the cores.
* ``basis: teacher`` projects the student on the teacher's factors (the default). ``own``
  decomposes the student independently, as the first original did. Its cores live in another
  basis (sign and rotation ambiguity), so the comparison is ill-posed. A guard replaces a
  non-finite feature loss with zero for that batch, and ``method_stats.guard_fired`` in
  metrics.json counts how often it did.

With ``decomposition: sample``, ``method_stats.svd_fallbacks`` counts the modes of batches whose
batched SVD failed and whose factors ``eigh`` gave instead (``train.samplewise_solver``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench import tucker
from kdbench.methods import register
from kdbench.methods.base import FeatureMethod, shared

RANK_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "integer", "minimum": 1},
        {"type": "array", "items": {"type": "integer"}},
    ]
}


def rank_name(rank: int | list[int]) -> str:
    return f"r{rank}" if isinstance(rank, int) else "r" + "x".join(str(r) for r in rank)


def sample_ranks(rank: int | list[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample ranks (r, h, w) for a C×H×W stage from ``rank`` (r or [r, h, w])."""
    if isinstance(rank, int):
        return (rank, *shape[1:])
    return tuple(rank)


class TuckerBase(FeatureMethod):
    """Shared decomposition of the teacher stage; subclasses turn it into a loss in
    :meth:`student_loss`."""

    defaults: ClassVar[dict[str, Any]] = {**FeatureMethod.defaults, "rank": 32, "n_iter": 0}
    params_schema: ClassVar[dict[str, Any]] = {
        **FeatureMethod.params_schema,
        "rank": RANK_SCHEMA,
        "n_iter": {"type": "integer", "minimum": 0},
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = torch.zeros((), dtype=torch.int64)
        #: modes of batches whose sample-wise SVD failed, solved by eigh instead (this epoch)
        self._fallbacks = 0

    def graph_mode(self) -> str:
        # torch.linalg.eigh checks its result on the host (a synchronisation): the teacher's
        # decomposition runs between two CUDA graphs (eagerly, even where it does not
        # synchronise: samplewise_solver jacobi); the own basis decomposes the student too
        return "split" if self.params.get("basis", "teacher") == "teacher" else "none"

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.student_loss(x, y, self.teacher_targets(self.teacher_outputs(x)))

    def teacher_targets(
        self, teacher_outputs: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[Tensor], list[int]]:
        """The teacher's stage, its Tucker core, factors and truncated modes."""
        t = teacher_outputs[int(self.params["stage"]) - 1]
        sample = self.params.get("decomposition", "full") == "sample"
        return (t, *self.decompose_teacher(t, sample))

    def decompose_teacher(self, t: Tensor, sample: bool) -> tuple[Tensor, list[Tensor], list[int]]:
        """The decomposition of the teacher's stage ``t``, done once for all the members of a
        cohort that ask for the same one (:func:`kdbench.methods.base.shared`); each of them
        counts its SVD fallbacks."""
        ranks = sample_ranks(self.params["rank"], tuple(t.shape[1:]))
        key = ("tucker", id(t), sample, ranks, int(self.params["n_iter"]))
        core, factors, modes, fallbacks = shared(key, lambda: self._decomposition(t, sample))
        self._fallbacks += fallbacks
        return core, factors, modes

    def _decomposition(
        self, x: Tensor, sample: bool
    ) -> tuple[Tensor, list[Tensor], list[int], int]:
        """``x``'s decomposition with the method's ranks (whole, or each sample's): its core,
        factors, truncated modes, and how many SVD fallbacks it took."""
        ranks = sample_ranks(self.params["rank"], tuple(x.shape[1:]))
        if not sample:
            full = (x.shape[0], *ranks)
            core, factors = tucker.decompose(x, full, int(self.params["n_iter"]))
            return core, factors, tucker.truncated_modes(x.shape, full), 0
        before = tucker.svd_fallbacks()
        core, factors = tucker.decompose_samplewise(x, ranks)
        modes = tucker.truncated_modes(x.shape[1:], ranks)
        return core, factors, modes, tucker.svd_fallbacks() - before

    @classmethod
    def check(cls, params: dict[str, Any], stage_shape: Any) -> None:
        shape = stage_shape(int(params["stage"]))
        tucker.check_ranks(shape, sample_ranks(params["rank"], shape))

    def provenance(self, device: torch.device) -> dict[str, Any]:
        if self.params.get("decomposition", "full") != "sample":
            return {}
        return {"samplewise_solver": tucker.samplewise_solver_on(device)}

    def pop_stats(self) -> dict[str, Tensor]:
        stats = {"guard_fired": self._guard}
        self._guard = torch.zeros((), dtype=torch.int64, device=self._guard.device)
        if self.params.get("decomposition", "full") == "sample":
            stats["svd_fallbacks"] = torch.tensor(self._fallbacks, dtype=torch.int64)
        self._fallbacks = 0
        return stats

    def guarded_own_loss(self, core_t: Tensor, s: Tensor, sample: bool) -> Tensor:
        """The own-basis feature loss, guarded (no host synchronisation).

        The student's own factors and the teacher's core are checked for non-finite values;
        the loss is computed from sanitised copies, so that every value in its graph, and so
        every gradient, is finite. Where anything was not finite the batch's feature loss is
        zero and ``guard_fired`` counts it. (``torch.where`` over a NaN loss is not enough:
        its backward multiplies the NaN branch's gradient by zero, which is NaN.)
        """
        _, factors, modes, fallbacks = self._decomposition(s, sample)
        self._fallbacks += fallbacks
        checked = [core_t, *factors]
        ok = torch.stack([torch.isfinite(t).all() for t in checked]).all()
        safe = [torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0) for f in factors]
        core_s = tucker.project(s, safe, modes)
        loss = self.feature_loss(torch.nan_to_num(core_t, nan=0.0, posinf=0.0, neginf=0.0), core_s)
        ok = ok & torch.isfinite(loss)
        self._guard = self._guard.to(loss.device) + (~ok).long()
        return torch.where(ok, loss, torch.zeros_like(loss))


@register
class Tucker(TuckerBase):
    name = "tucker"
    defaults: ClassVar[dict[str, Any]] = {
        **TuckerBase.defaults,
        "decomposition": "full",
        "basis": "teacher",
    }
    params_schema: ClassVar[dict[str, Any]] = {
        **TuckerBase.params_schema,
        "decomposition": {"enum": ["full", "sample"]},
        "basis": {"enum": ["teacher", "own"]},
    }
    grid: ClassVar[dict[str, str]] = {
        "ranks": "rank",
        "decomposition": "decomposition",
        "basis": "basis",
    }

    @classmethod
    def variant_name(cls, params: dict[str, Any]) -> str:
        return f"{params['decomposition']}-{params['basis']}-{rank_name(params['rank'])}"

    def student_loss(self, x: Tensor, y: Tensor, targets: Any) -> tuple[Tensor, dict[str, Tensor]]:
        _, core_t, factors, modes = targets
        outs = self.student_outputs(x)
        s, logits = outs[int(self.params["stage"]) - 1], outs[-1]
        sample = self.params["decomposition"] == "sample"
        if self.params["basis"] == "teacher":
            core_s = tucker.project(s, factors, modes)
            feature = self.feature_loss(core_t, core_s)
        else:
            feature = self.guarded_own_loss(core_t, s, sample)
        return logits, {"ce": F.cross_entropy(logits, y), "feature": feature}
