"""Logit knowledge distillation (Hinton et al.), REFERENCE §4.

loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) (batch mean) + (1 − α)·CE(s, y)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdbench.methods import register
from kdbench.methods.base import Method


def kd_loss_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    T: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The hard part (1 − α)·CE and the soft part α·T²·KL of the KD loss."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)
    hard = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    return (1.0 - alpha) * hard, alpha * soft


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, T: float, alpha: float
) -> Tensor:
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) (batchmean) + (1 − α)·CE(s, targets)."""
    hard, soft = kd_loss_parts(student_logits, teacher_logits, targets, T, alpha)
    return hard + soft


@register
class KD(Method):
    name = "kd"
    defaults: ClassVar[dict[str, Any]] = {"T": 2.0, "alpha": 0.9, "label_smoothing": 0.0}
    params_schema: ClassVar[dict[str, Any]] = {
        "T": {"type": "number", "exclusiveMinimum": 0},
        "alpha": {"type": "number", "minimum": 0, "maximum": 1},
        "label_smoothing": {"type": "number", "minimum": 0, "maximum": 1},
    }

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_logits = self.teacher_outputs(x)[-1]
        logits = self.student_outputs(x)[-1]
        hard, soft = kd_loss_parts(
            logits,
            teacher_logits,
            y,
            float(self.params["T"]),
            float(self.params["alpha"]),
            float(self.params["label_smoothing"]),
        )
        return logits, {"hard": hard, "soft": soft}
