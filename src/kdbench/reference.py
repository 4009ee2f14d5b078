"""The reference training loop of ``python -m kdbench.bench epochs``: a step written the way the
original projects trained, to time kdbench's trainer against.

A torchvision ``DataLoader`` with per-sample PIL transforms (random crop with padding, horizontal
flip, ``ToTensor``, ``Normalize``) and worker processes; fp32, eager, contiguous tensors; the
teacher run with autograd (its parameters require gradients; nothing stops the graph); a
for-loop SGD; Tucker methods call ``tensorly.decomposition.tucker`` (pytorch backend, HOOI, SVD
init, 100 iterations, tol 1e-4) on the teacher's stage every step, sample-wise variants once per
sample. Only the step's cost is modelled; the losses are the methods' own formulas.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.methods.base import normalise
from kdbench.methods.kd import kd_loss


class _PilImages(torch.utils.data.Dataset):
    """uint8 H×W×C images served as PIL images through per-sample transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        img = self.images[i]
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        return self.transform(pil), int(self.labels[i])


def make_loader(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    workers: int,
    pin_memory: bool,
) -> torch.utils.data.DataLoader:
    """The originals' training loader over uint8 N×H×W×C ``images``."""
    from torchvision import transforms

    size = images.shape[1]
    transform = transforms.Compose(
        [
            transforms.RandomCrop(size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    return torch.utils.data.DataLoader(
        _PilImages(images, labels, transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )


def _tensorly_tucker(x: Tensor, ranks: list[int]) -> tuple[Tensor, list[Tensor]]:
    from tensorly.decomposition import tucker

    core, factors = tucker(x, rank=ranks, init="svd", n_iter_max=100, tol=1e-4)
    return core, list(factors)


def _multi_mode(x: Tensor, factors: list[Tensor], transpose: bool) -> Tensor:
    import tensorly as tl

    return tl.tenalg.multi_mode_dot(x, factors, transpose=transpose)


def feature_loss(name: str, params: dict[str, Any], t: Tensor, s: Tensor) -> Tensor:
    """The feature term of ``name`` on teacher stage ``t`` and student stage ``s``, computed
    the originals' way (tensorly for Tucker, with autograd through the teacher)."""
    beta = float(params.get("beta", 125.0))
    if name == "featuremap":
        return beta * F.l1_loss(normalise(t), normalise(s))
    rank = int(params["rank"])
    if params.get("decomposition", "full") == "sample":
        cores_t, cores_s = [], []
        for ti, si in zip(t, s, strict=True):
            ct, fs = _tensorly_tucker(ti, [rank, *ti.shape[1:]])
            cores_t.append(ct)
            cores_s.append(_multi_mode(si, fs, transpose=True))
        core_t, core_s = torch.stack(cores_t), torch.stack(cores_s)
        return beta * F.l1_loss(normalise(core_t), normalise(core_s))
    core_t, factors = _tensorly_tucker(t, [t.shape[0], rank, *t.shape[2:]])
    if name == "tucker":
        if params.get("basis", "teacher") == "own":
            core_s, _ = _tensorly_tucker(s, [s.shape[0], rank, *s.shape[2:]])
        else:
            core_s = _multi_mode(s, factors, transpose=True)
        return beta * F.l1_loss(normalise(core_t), normalise(core_s))
    # tucker_recomp
    target = params.get("target", "teacher")
    rec_t = _multi_mode(core_t, factors, transpose=False)
    rec_s = _multi_mode(_multi_mode(s, factors, transpose=True), factors, transpose=False)
    a = rec_t if target in ("teacher", "both") else t
    b = rec_s if target in ("student", "both") else s
    return beta * F.l1_loss(normalise(a), normalise(b))


def step_loss(
    name: str,
    params: dict[str, Any],
    student: nn.Module,
    teacher: nn.Module | None,
    extras: dict[str, nn.Module],
    x: Tensor,
    y: Tensor,
) -> Tensor:
    """The loss of one reference step: every forward in fp32 eager, the teacher with autograd."""
    outs = student(x)
    logits = outs[-1]
    if name == "vanilla" or teacher is None:
        return F.cross_entropy(logits, y)
    touts = teacher(x)  # with autograd, as the originals ran it
    if name == "kd":
        return kd_loss(logits, touts[-1], y, float(params["T"]), float(params["alpha"]))
    stage = int(params.get("stage", 3)) - 1
    t, s = touts[stage], outs[stage]
    if name == "ft":
        factor_t = extras["paraphraser"].encoder(t)
        factor_s = extras["translator"](s)
        feature = float(params.get("beta", 500.0)) * F.l1_loss(
            normalise(factor_s), normalise(factor_t)
        )
    else:
        feature = feature_loss(name, params, t, s)
    return F.cross_entropy(logits, y) + feature


def time_steps(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    trainable: list[nn.Module],
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    warmup: int,
    steps: int,
    lr: float = 0.1,
) -> dict[str, Any]:
    """Median seconds of ``steps`` reference steps (loading included) after ``warmup`` ones:
    ``loss_fn(x, y)`` (:func:`step_loss`), backward, a for-loop SGD step of ``trainable``."""
    import tensorly as tl

    opt = torch.optim.SGD(
        [p for m in trainable for p in m.parameters()],
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        foreach=False,
    )
    times: list[float] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tl.set_backend("pytorch")
    with warnings.catch_warnings():
        # tensorly warns about autograd tensors and ranks above a mode's size: not ours to fix
        warnings.filterwarnings("ignore", module="tensorly")
        try:
            batches = iter(loader)
            sync()
            t0 = time.perf_counter()
            for i in range(warmup + steps):
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    x, y = next(batches)
                x, y = x.to(device), y.to(device)
                loss = loss_fn(x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss.detach().item()  # the originals logged loss.item() every step
                sync()
                t1 = time.perf_counter()
                if i >= warmup:
                    times.append(t1 - t0)
                t0 = t1
        finally:
            tl.set_backend("numpy")
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"step_seconds": statistics.median(times), "steps": steps, "peak_cuda_mb": peak}
