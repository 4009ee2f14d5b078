"""Feature-map distillation: β·D(N(t_stage), N(s_stage)) + CE (REFERENCE §4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdbench.methods import register
from kdbench.methods.base import FeatureMethod


@register
class FeatureMap(FeatureMethod):
    name = "featuremap"

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        t, s, logits = self.stages(x)
        return logits, {"ce": F.cross_entropy(logits, y), "feature": self.feature_loss(t, s)}
