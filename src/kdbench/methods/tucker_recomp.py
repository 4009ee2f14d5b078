"""Tucker recomposition (REFERENCE §4): compare reconstructions instead of cores.

The teacher's stage tensor is decomposed as for ``tucker`` (ranks (B, r, h, w), teacher basis),
and U are its factors. The loss is β·D(N(a), N(b)) + CE, with (a, b) chosen by ``target``:

* ``teacher``: (recompose(core_t, U), s)
* ``student``: (t, recompose(project(s, U), U))
* ``both``: (recompose(core_t, U), recompose(project(s, U), U))

Variants are ``<target>-r<rank>``, the product of the config lists ``targets`` and ``ranks``.
The teacher's side, a, is computed with the decomposition (``teacher_targets``), not in the
student's step: under CUDA graphs it then runs beside the student's step (``pipeline_targets``)
instead of inside it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench import tucker
from kdbench.methods import register
from kdbench.methods.tucker import TuckerBase, rank_name


@register
class TuckerRecomp(TuckerBase):
    name = "tucker_recomp"
    defaults: ClassVar[dict[str, Any]] = {**TuckerBase.defaults, "target": "teacher"}
    params_schema: ClassVar[dict[str, Any]] = {
        **TuckerBase.params_schema,
        "target": {"enum": ["teacher", "student", "both"]},
    }
    grid: ClassVar[dict[str, str]] = {"targets": "target", "ranks": "rank"}

    @classmethod
    def variant_name(cls, params: dict[str, Any]) -> str:
        return f"{params['target']}-{rank_name(params['rank'])}"

    def teacher_targets(  # type: ignore[override]
        self, teacher_outputs: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[int]]:
        """a (the teacher's stage, recomposed from its core for ``teacher`` and ``both``), the
        factors and the truncated modes."""
        t, core_t, factors, modes = super().teacher_targets(teacher_outputs)
        if self.params["target"] in ("teacher", "both"):
            t = tucker.recompose(core_t, factors, modes)
        return t, factors, modes

    def student_loss(self, x: Tensor, y: Tensor, targets: Any) -> tuple[Tensor, dict[str, Tensor]]:
        a, factors, modes = targets
        outs = self.student_outputs(x)
        s, logits = outs[int(self.params["stage"]) - 1], outs[-1]
        target = self.params["target"]
        if target in ("student", "both"):
            b = tucker.recompose(tucker.project(s, factors, modes), factors, modes)
        else:
            b = s
        return logits, {"ce": F.cross_entropy(logits, y), "feature": self.feature_loss(a, b)}
