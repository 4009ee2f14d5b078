"""Vanilla training: cross-entropy with label smoothing, no teacher (REFERENCE §4)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench.methods import register
from kdbench.methods.base import Method


@register
class Vanilla(Method):
    name = "vanilla"
    needs_teacher = False
    defaults: ClassVar[dict[str, Any]] = {"label_smoothing": 0.1}
    params_schema: ClassVar[dict[str, Any]] = {
        "label_smoothing": {"type": "number", "minimum": 0, "maximum": 1},
    }

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student_outputs(x)[-1]
        ce = F.cross_entropy(logits, y, label_smoothing=float(self.params["label_smoothing"]))
        return logits, {"ce": ce}
