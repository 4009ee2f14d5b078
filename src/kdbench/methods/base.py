"""The interface every distillation method implements.

A method owns the student (and, if it needs one, the frozen teacher and any auxiliary modules
such as a translator). The trainer only calls :meth:`Method.forward_train`, sums the returned loss
parts, and steps one optimizer per entry of :meth:`Method.trainable`; it knows nothing else about
methods, so adding one never touches the trainer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdbench.errors import KdbenchError

VARIANT_NAME = re.compile(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$")


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

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self._teacher:
            self._teacher[0].eval()
        return self

    def teacher_outputs(self, x: Tensor) -> list[Tensor]:
        """The teacher's ``[stage1, stage2, stage3, logits]``, computed under inference mode.

        The results are cloned outside inference mode so that losses may combine them with the
        student's tensors; no gradient ever reaches the teacher.
        """
        with torch.inference_mode():
            outs = self.teacher(x)
        return [t.clone() for t in outs]

    def trainable(self) -> dict[str, nn.Module]:
        """Modules that get their own optimizer and schedule (the student first)."""
        return {"student": self.student}

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits and the named loss parts for one batch (their sum is minimised)."""
        raise NotImplementedError

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

    @classmethod
    def expand_variants(cls, config: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Variant name → full parameters, from the method's config block.

        The block holds parameters plus an optional ``variants`` mapping of name → overrides;
        without it the method has one variant, ``default``. Methods with a natural grid (ranks,
        targets) override this to name their variants themselves.
        """
        config = dict(config or {})
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
