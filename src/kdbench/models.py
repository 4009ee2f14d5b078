"""CIFAR ResNets (BasicBlock, option-B shortcuts) returning every stage's features.

``build(arch, num_classes, in_channels)`` gives resnet8/20/56/110 exactly as the original projects
defined them, and resnet32 (5 blocks per stage, a student of the CRD protocol) alike;
``forward(x)`` returns ``[stage1, stage2, stage3, logits]``. ``fold_batchnorm`` gives a frozen
model's inference copy with each batch norm folded into the convolution before it.

``stack(students)`` makes one network of several students of one architecture (a cohort's,
:mod:`kdbench.cohort`): grouped convolutions, so that one kernel runs a layer of every student;
``alias(stacked, student, i)`` points a student's weights at its share of the stack's.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kdbench import io
from kdbench.errors import KdbenchError, one_line

#: Blocks per stage for each architecture.
DEPTHS: dict[str, int] = {
    "resnet8": 1,
    "resnet20": 3,
    "resnet32": 5,
    "resnet56": 9,
    "resnet110": 18,
}
#: Names the original projects used.
ALIASES: dict[str, str] = {"resnetbaby": "resnet8", "resnet112": "resnet110"}
WIDTHS = (16, 32, 64)
STRIDES = (1, 2, 2)


def canonical_arch(arch: str) -> str:
    """Map an architecture name or alias (case-insensitive) to its canonical name."""
    key = arch.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DEPTHS:
        known = ", ".join(sorted(DEPTHS) + ["ResNetBaby", "ResNet112"])
        raise KdbenchError(f"unknown architecture {arch!r} (known: {known})")
    return key


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and a shortcut; ``n`` such blocks side by side as grouped
    convolutions with ``n > 1`` (:func:`stack`)."""

    def __init__(self, in_planes: int, planes: int, stride: int, n: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes * n, planes * n, 3, stride, 1, bias=False, groups=n)
        self.bn1 = nn.BatchNorm2d(planes * n)
        self.conv2 = nn.Conv2d(planes * n, planes * n, 3, 1, 1, bias=False, groups=n)
        self.bn2 = nn.BatchNorm2d(planes * n)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes * n, planes * n, 1, stride, bias=False, groups=n),
                nn.BatchNorm2d(planes * n),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class StackedLinear(nn.Module):
    """``n`` linear layers, one per group of ``in_features`` inputs: (batch, n·in) → (n,
    batch, out); ``weight`` is (n, out, in) and ``bias`` (n, out), each ``[i]`` an
    ``nn.Linear``'s."""

    def __init__(self, n: int, in_features: int, out_features: int) -> None:
        super().__init__()
        layers = [nn.Linear(in_features, out_features) for _ in range(n)]
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]))

    def forward(self, x: Tensor) -> Tensor:
        n, _, features = self.weight.shape
        x = x.reshape(x.shape[0], n, features).transpose(0, 1)  # (n, batch, in)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class CifarResNet(nn.Module):
    """Stem conv → three stages of BasicBlocks (16/32/64) → global pool → linear.

    With ``n > 1``, ``n`` such networks side by side on one input (:func:`stack`): every width
    ``n`` times, grouped convolutions, and logits (n, batch, classes)."""

    def __init__(self, blocks: int, num_classes: int, in_channels: int = 3, n: int = 1) -> None:
        super().__init__()
        self.blocks = blocks
        self.n = n
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0] * n, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0] * n)
        stages = []
        in_planes = WIDTHS[0]
        for planes, stride in zip(WIDTHS, STRIDES, strict=True):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, n))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        width = WIDTHS[-1]
        self.linear: nn.Module = (
            nn.Linear(width, num_classes) if n == 1 else StackedLinear(n, width, num_classes)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        out = torch.relu(self.bn1(self.conv1(x)))
        s1 = self.layer1(out)
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        logits = self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(s3, 1), 1))
        return [s1, s2, s3, logits]


def stack_key(model: nn.Module) -> tuple[int, int, int] | None:
    """What students must share to be stacked together (:func:`stack`): their blocks per
    stage, classes and input channels; None for a model that cannot be stacked."""
    if type(model) is not CifarResNet or model.n != 1:
        return None
    return (model.blocks, model.linear.out_features, model.conv1.in_channels)


def stack(students: list[nn.Module]) -> CifarResNet:
    """One network that computes every one of ``students`` (CIFAR ResNets of one architecture
    and dataset) on one input, starting from their weights and batch-norm statistics: each
    convolution grouped, one group per student. Its outputs hold theirs side by side: student
    ``i``'s stage maps are channels ``[i·C, (i+1)·C)`` of its stage maps (:func:`unstacked`),
    its logits ``[i]`` of its logits. Each student's outputs are computed from its own weights
    alone, so its gradients are those of its own loss. The global random state is not used."""
    keys = {stack_key(s) for s in students}
    if len(students) < 2 or None in keys:
        raise KdbenchError("models.stack needs two or more CIFAR ResNets")
    if len(keys) > 1:
        raise KdbenchError("models.stack needs students of one architecture and dataset")
    (shape,) = keys
    with torch.random.fork_rng(devices=[]):
        stacked = CifarResNet(*shape, n=len(students))
    with torch.no_grad():
        for i, student in enumerate(students):
            for name, tensor, share in _shares(stacked, student, i):
                own = tensor.detach().to(share.device)
                counted = name.endswith("num_batches_tracked")  # one for all: the largest
                share.copy_(torch.maximum(share, own) if counted else own)
    return stacked.to(students[0].conv1.weight.device)


def unstacked(outputs: list[Tensor], n: int) -> list[list[Tensor]]:
    """The outputs of a stack of ``n`` (:func:`stack`) as each student's ``[stage1, stage2,
    stage3, logits]`` (views)."""
    *maps, logits = outputs
    splits = [m.tensor_split(n, dim=1) for m in maps]
    return [[split[i] for split in splits] + [logits[i]] for i in range(n)]


def _shares(
    stacked: CifarResNet, student: nn.Module, i: int
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Each weight and batch-norm statistic of ``student``, the ``i``-th of :func:`stack`'s
    students, with its share of ``stacked``'s (a view): ``[i]`` of a stacked linear layer's,
    the ``i``-th block of channels of the others, and the one batch counter of all."""
    whole = dict(itertools.chain(stacked.named_parameters(), stacked.named_buffers()))
    for name, tensor in itertools.chain(student.named_parameters(), student.named_buffers()):
        all_of_them = whole[name].detach()
        if name.endswith("num_batches_tracked"):
            share = all_of_them
        elif all_of_them.dim() == tensor.dim() + 1:
            share = all_of_them[i]
        else:
            size = tensor.shape[0]
            share = all_of_them[i * size : (i + 1) * size]
        yield name, tensor, share


def alias(stacked: CifarResNet, student: nn.Module, i: int) -> None:
    """Point every weight and batch-norm statistic of ``student``, the ``i``-th of
    :func:`stack`'s students, at its share of ``stacked``'s, in place: what trains the stack
    trains the student, and the student (evaluated, saved) shows it."""
    for _, tensor, share in _shares(stacked, student, i):
        tensor.data = share


def build(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a CIFAR ResNet: ``resnet8/20/56/110`` or the aliases ``ResNetBaby``/``ResNet112``."""
    if num_classes < 2:
        raise KdbenchError(f"num_classes must be at least 2, got {num_classes}")
    return CifarResNet(DEPTHS[canonical_arch(arch)], num_classes, in_channels)


def fold_batchnorm(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """An inference copy of a CIFAR ResNet: each batch norm, with its running statistics,
    folded into the convolution before it (a convolution with a bias, and no batch-norm kernel
    at run time); ``dtype`` casts the copy (e.g. bfloat16, so that autocast has no weight to
    cast). The copy is in eval mode without gradients; its outputs equal ``model``'s in eval
    mode up to rounding. ``model`` is not changed."""
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        if isinstance(module, CifarResNet | BasicBlock):
            pairs = [("conv1", "bn1")]
            if isinstance(module, BasicBlock):
                pairs.append(("conv2", "bn2"))
                if isinstance(module.shortcut, nn.Sequential):
                    conv, bn = module.shortcut
                    module.shortcut = fuse_conv_bn_eval(conv, bn)
            for conv_name, bn_name in pairs:
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()):
        raise KdbenchError(f"cannot fold the batch norms of {type(model).__name__}")
    if dtype is not None:
        folded = folded.to(dtype)
    return folded.requires_grad_(False)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_shape(arch: str, stage: int, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) of feature stage ``stage`` (1–3) of ``arch`` for images of ``image_shape``."""
    canonical_arch(arch)
    if stage not in (1, 2, 3):
        raise KdbenchError(f"{arch} has feature stages 1, 2 and 3, not {stage!r}")
    _, h, w = image_shape
    for _ in range(stage - 1):  # 3×3 convolutions with stride 2 and padding 1
        h, w = (h + 1) // 2, (w + 1) // 2
    return (WIDTHS[stage - 1], h, w)


def load_weights(model: nn.Module, path: str | Path, what: str) -> None:
    """Load a state dict saved by kdbench into ``model``, with one-line errors."""
    try:
        state = io.load_torch(path)
    except Exception as exc:
        raise KdbenchError(f"cannot load {what} weights {path}: {one_line(exc)}") from None
    if not isinstance(state, dict):
        raise KdbenchError(f"{what} weights {path} hold no state dict")
    saved, expected = state.get("linear.weight"), model.state_dict().get("linear.weight")
    if isinstance(saved, torch.Tensor) and expected is not None and saved.shape != expected.shape:
        raise KdbenchError(
            f"{what} weights {path} are for {saved.shape[0]} classes and {saved.shape[1]} "
            f"features; the dataset and model here have {expected.shape[0]} and "
            f"{expected.shape[1]}"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise KdbenchError(
            f"{what} weights {path} do not fit the model: {one_line(exc)[:200]}"
        ) from None
