"""The whole training step as one CUDA graph (``train.cuda_graphs``).

A CIFAR ResNet step launches well over a thousand small kernels, and on a fast GPU the host
cannot launch them as fast as the GPU runs them. :class:`GraphedStep` captures the step —
teacher and student forward passes, losses, backward, the finite check and the fused SGD
update — once, and then replays it for every batch of the same shape: one launch per step.

* The step is :func:`kdbench.train.train_step_async`, unchanged: the graph computes exactly what
  the eager step computes, in the same kernels.
* Before the first capture a few steps run eagerly on a side stream (real training steps of the
  epoch: CUDA's libraries and autograd set themselves up there).
* The learning rate is baked into the captured update, so the step is captured again whenever
  a schedule has changed it (once per epoch).
* A batch smaller than the captured one (the last batch of an epoch) runs eagerly.
* A method that cannot be captured (``Method.capturable`` false: the Tucker methods, whose
  ``torch.linalg.eigh`` checks its result on the host), one with per-step counters, an unfused
  optimizer, or a capture that fails for any other reason fall back to eager steps, with one
  warning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from kdbench.errors import one_line
from kdbench.methods.base import Method

log = logging.getLogger("kdbench")

#: eager steps on a side stream before the first capture
WARMUP_STEPS = 3


class GraphedStep:
    """Replays one captured training step per batch; see the module docstring."""

    def __init__(self, step: Any, method: Method, optimizers: dict[str, torch.optim.Optimizer]):
        self.step = step  # (xb, yb) -> (logits, parts, ok), the eager step
        self.method = method
        self.optimizers = optimizers
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple[Any, ...] | None = None
        self.warm = 0
        self.disabled = self._why_not()
        if self.disabled:
            log.warning("CUDA graphs off: %s; training eagerly", self.disabled)

    def _why_not(self) -> str | None:
        unfused = [
            name
            for name, opt in self.optimizers.items()
            if not all(g.get("fused") for g in opt.param_groups)
        ]
        if unfused:
            return f"optimizer(s) {', '.join(unfused)} not fused (train.optimizer.fused)"
        if not self.method.capturable:
            return f"method {self.method.name!r} synchronises with the host inside its step"
        if type(self.method).pop_stats is not Method.pop_stats:
            # per-epoch counters accumulate by reassignment, which a replay cannot repeat
            return f"method {self.method.name!r} keeps per-step counters"
        return None

    def _lrs(self) -> tuple[float, ...]:
        return tuple(g["lr"] for o in self.optimizers.values() for g in o.param_groups)

    def __call__(self, xb: Tensor, yb: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        if self.disabled:
            return self.step(xb, yb)
        key = (tuple(xb.shape), xb.stride(), tuple(yb.shape), self._lrs())
        if self.warm < WARMUP_STEPS:
            self.warm += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(xb, yb)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if key != self.key:
            if self.key is not None and xb.shape[0] < self.key[0][0]:
                return self.step(xb, yb)  # the last, smaller batch
            self._capture(xb, yb, key)
            if self.disabled:
                return self.step(xb, yb)
        self.static_x.copy_(xb)
        self.static_y.copy_(yb)
        assert self.graph is not None
        self.graph.replay()
        return self.static_out

    def _capture(self, xb: Tensor, yb: Tensor, key: tuple[Any, ...]) -> None:
        self.graph = None  # frees the previous capture's memory
        self.static_x = xb.clone(memory_format=torch.preserve_format)
        self.static_y = yb.clone()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_out = self.step(self.static_x, self.static_y)
        except Exception as exc:  # a step that cannot be captured trains eagerly
            self.disabled = f"capture failed ({one_line(exc)})"
            log.warning("CUDA graphs off: %s; training eagerly", self.disabled)
            torch.cuda.synchronize()
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            return
        self.graph, self.key = graph, key
