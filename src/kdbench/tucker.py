"""Exact, fast Tucker decomposition for feature-map distillation.

Conventions are tensorly's: factor ``i`` has shape ``(x.shape[i], ranks[i])`` with orthonormal
columns, and ``core = x ×₀ U₀ᵀ ×₁ U₁ᵀ … `` (:func:`project`); ``x̂ = core ×₀ U₀ ×₁ U₁ …``
(:func:`recompose`).

:func:`decompose` computes the truncated higher-order SVD from per-mode Gram matrices and their
symmetric eigendecompositions, in fp32, with optional HOOI sweeps. When the ranks truncate a
single mode, as the distillation methods' ranks ``(B, r, H, W)`` do, the truncated HOSVD *is*
the HOOI optimum: the channel fibres projected onto the top-``r`` eigenvectors of the channel
Gram matrix. tensorly's ``tucker`` (HOOI, 100 iterations) reaches the same reconstruction.

Deliberate deviation from the original projects: a mode kept at full rank gets the identity as
its factor. tensorly rotates it by an eigenbasis of that mode's Gram matrix instead. For the
batch mode that matrix is ill-conditioned (samples are nearly orthogonal), so the core's rows
become arbitrary mixtures of samples. With the identity, row ``b`` of the core belongs to sample
``b``. Reconstructions are identical either way.

Gradient path: the factors are computed from ``x.detach()`` and are constants; the core is the
linear projection of ``x`` on them, so gradients reach ``x`` through :func:`project` only, never
through the eigendecomposition (whose gradient is unstable for close eigenvalues).

Eigenvector signs are fixed (largest-magnitude entry positive) so that results are
deterministic. Everything runs on the tensor's device, CPU or CUDA, without ``.item()`` calls,
except, when :func:`set_eigh_on_host` asks for it (``train.eigh_on_host``), the small symmetric
eigendecompositions of CUDA tensors: they are copied to the host, solved by LAPACK and copied
back. ``torch.linalg.eigh`` synchronises with the host on CUDA anyway (it checks its result
there).

On CUDA torch solves a batch of symmetric matrices up to 32×32 in one call (cuSOLVER's batched
Jacobi), but a batch of larger ones one matrix after the other: the sample-wise decomposition of
a stage-3 batch (128 channel Gram matrices of 64×64) took 97 ms that way on an H200, against
0.3 ms for 128 of 32×32. Such a batch is solved by :func:`block_jacobi_eigh` instead, a block
Jacobi method whose every step is one batched eigendecomposition of 32×32 blocks, run until the
off-diagonal part is at rounding level.

``train.samplewise_solver`` (:func:`set_samplewise_solver`) ``svd`` takes the sample-wise
factors from one batched SVD of the samples' unfoldings instead, their top left singular
vectors: on CUDA cuSOLVER's batched ``gesvda``, one call whatever the size (on an H200 1.1 ms
for a stage-3 batch against 9.7 ms by block Jacobi, and closer to LAPACK's in double precision:
``bench methods``), on the host LAPACK's SVD (11x slower there than ``eigh``). ``auto``, the
default, is ``svd`` on CUDA and ``eigh`` elsewhere. Where ``gesvda`` gives up (an unfolding with
many repeated singular values, such as the zero rows of channels that ReLU silenced in a
sample), that mode's factors of that batch come from ``eigh``; :func:`svd_fallbacks` counts
those (``method_stats.svd_fallbacks`` in metrics.json).

``jacobi`` takes the same vectors on CUDA from :mod:`kdbench.jacobi`'s Triton kernel: one-sided
Jacobi, one program per sample, which cannot fail and never reports back, so that the step does
not wait for the host (``svd`` and ``eigh`` check their result there); elsewhere ``eigh``. It
works on each sample's unfolding where that fits a program (at most 64 × 64: a CIFAR ResNet's
stage-3 sample, 64 channels of 8 × 8), else on its Gram matrix (the same vectors), else the mode
goes to ``eigh``.

On the host a batch of eigendecompositions (sample-wise) is split over torch's intra-op
threads: LAPACK solves each matrix on its own either way, so the result is the same, bit for
bit, and torch's own batched CPU ``eigh`` runs them one after the other.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from kdbench import jacobi
from kdbench.errors import KdbenchError


def check_ranks(shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """Validate ``ranks`` for a tensor of ``shape``; one-line KdbenchError otherwise."""
    shape, ranks = tuple(int(s) for s in shape), tuple(ranks)
    if len(ranks) != len(shape):
        raise KdbenchError(
            f"Tucker ranks {list(ranks)} need {len(shape)} entries, "
            f"one per mode of shape {list(shape)}"
        )
    for mode, (r, n) in enumerate(zip(ranks, shape, strict=True)):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise KdbenchError(f"Tucker rank {r!r} of mode {mode} must be a positive integer")
        if r > n:
            raise KdbenchError(f"Tucker rank {r} of mode {mode} exceeds that mode's size {n}")
    return tuple(int(r) for r in ranks)


def _apply(x: Tensor, matrix: Tensor, mode: int, batched: bool) -> Tensor:
    """Contract mode ``mode`` of ``x`` (size n) with ``matrix`` (n × m, or B × n × m)."""
    moved = x.movedim(mode, -1)
    if batched:
        shape = moved.shape
        out = torch.bmm(moved.reshape(shape[0], -1, shape[-1]), matrix)
        out = out.reshape(*shape[:-1], matrix.shape[-1])
    else:
        out = moved @ matrix
    return out.movedim(-1, mode)


def _is_batched(factors: Sequence[Tensor]) -> bool:
    return all(f.ndim == 3 for f in factors)


def _first_mode(x: Tensor, factors: Sequence[Tensor]) -> int:
    """0 for whole-tensor factors; 1 for sample-wise factors (one set per sample)."""
    batched = _is_batched(factors)
    if len(factors) != x.ndim - int(batched):
        raise KdbenchError(f"{len(factors)} factors do not fit a tensor of {x.ndim} modes")
    return int(batched)


def truncated_modes(shape: Sequence[int], ranks: Sequence[int]) -> list[int]:
    """The modes whose rank is below their size (the others get identity factors)."""
    return [i for i, (r, n) in enumerate(zip(ranks, shape, strict=True)) if r < n]


def project(x: Tensor, factors: Sequence[Tensor], modes: Sequence[int] | None = None) -> Tensor:
    """The core ``x ×ᵢ Uᵢᵀ`` (differentiable in ``x``); sample-wise factors are (B, n, r).

    ``modes`` restricts the product to those modes; pass :func:`truncated_modes` when the other
    factors are identities (as :func:`decompose` makes them) to skip multiplying by them.
    """
    first = _first_mode(x, factors)
    out = x.float()
    for i, u in enumerate(factors):
        if modes is None or i in modes:
            out = _apply(out, u, first + i, bool(first))
    return out


def recompose(
    core: Tensor, factors: Sequence[Tensor], modes: Sequence[int] | None = None
) -> Tensor:
    """The reconstruction ``core ×ᵢ Uᵢ``; sample-wise factors are (B, n, r).

    ``modes`` as in :func:`project`.
    """
    first = _first_mode(core, factors)
    out = core.float()
    for i, u in enumerate(factors):
        if modes is None or i in modes:
            out = _apply(out, u.transpose(-1, -2), first + i, bool(first))
    return out


_EIGH_ON_HOST = False


def set_eigh_on_host(enabled: bool) -> None:
    """Solve the eigendecompositions of CUDA tensors on the host (see the module docstring);
    CPU tensors are not affected. Set by ``kdbench.train.prepare`` from ``train.eigh_on_host``."""
    global _EIGH_ON_HOST
    _EIGH_ON_HOST = bool(enabled)


def eigh_on_host() -> bool:
    """The switch that :func:`set_eigh_on_host` set (False unless set)."""
    return _EIGH_ON_HOST


#: how :func:`decompose_samplewise` finds each sample's factors (``train.samplewise_solver``):
#: ``eigh`` of each sample's Gram matrices, or ``svd``: one batched SVD of the samples'
#: unfoldings, their top left singular vectors (the same vectors; :data:`SVD_DRIVERS`);
#: ``auto``: ``svd`` on the devices that :data:`SVD_DRIVERS` names (CUDA), else ``eigh``;
#: ``jacobi``: the same vectors from :mod:`kdbench.jacobi`'s kernel, without a host
#: synchronisation, on the devices that :data:`JACOBI_DEVICES` names (CUDA), else ``eigh``
SAMPLEWISE_SOLVERS = ("auto", "eigh", "svd", "jacobi")
#: ``torch.linalg.svd``'s driver for the ``svd`` solver per device type: on CUDA cuSOLVER's
#: ``gesvdaStridedBatched``, one call for a batch of any size (approximate: it works from the
#: Gram matrices, in the input's precision, as ``eigh`` does); elsewhere torch's (LAPACK)
SVD_DRIVERS: dict[str, str] = {"cuda": "gesvda"}
#: the device types on which the ``jacobi`` solver runs :mod:`kdbench.jacobi`'s Triton kernel
#: (on the host LAPACK's ``eigh`` has no synchronisation to save)
JACOBI_DEVICES: tuple[str, ...] = ("cuda",)
_SAMPLEWISE_SOLVER = "auto"


def set_samplewise_solver(name: str) -> None:
    """The solver of :func:`decompose_samplewise` (:data:`SAMPLEWISE_SOLVERS`). Set by
    ``kdbench.train.prepare`` from ``train.samplewise_solver``."""
    if name not in SAMPLEWISE_SOLVERS:
        raise KdbenchError(
            f"unknown sample-wise Tucker solver {name!r}; one of {', '.join(SAMPLEWISE_SOLVERS)}"
        )
    global _SAMPLEWISE_SOLVER
    _SAMPLEWISE_SOLVER = name


def samplewise_solver() -> str:
    """The solver set by :func:`set_samplewise_solver` (``auto`` unless set)."""
    return _SAMPLEWISE_SOLVER


@contextlib.contextmanager
def solving(
    *, eigh_on_host: bool | None = None, samplewise_solver: str | None = None
) -> Iterator[None]:
    """Meanwhile the switches given (:func:`set_eigh_on_host`, :func:`set_samplewise_solver`);
    afterwards both as they were, whatever was set inside (``kdbench.train.prepare`` sets
    them)."""
    before = _EIGH_ON_HOST, _SAMPLEWISE_SOLVER
    try:
        if eigh_on_host is not None:
            set_eigh_on_host(eigh_on_host)
        if samplewise_solver is not None:
            set_samplewise_solver(samplewise_solver)
        yield
    finally:
        set_eigh_on_host(before[0])
        set_samplewise_solver(before[1])


def uses_svd(device: torch.device) -> bool:
    """Whether :func:`decompose_samplewise` takes the factors of a batch on ``device`` from
    one batched SVD (``svd``, or ``auto`` where :data:`SVD_DRIVERS` names the device type)."""
    if _SAMPLEWISE_SOLVER == "auto":
        return device.type in SVD_DRIVERS
    return _SAMPLEWISE_SOLVER == "svd"


def uses_jacobi(device: torch.device) -> bool:
    """Whether :func:`decompose_samplewise` takes the factors of a batch on ``device`` from
    :mod:`kdbench.jacobi`'s kernel (``jacobi``, on the devices :data:`JACOBI_DEVICES` names)."""
    return _SAMPLEWISE_SOLVER == "jacobi" and device.type in JACOBI_DEVICES


def samplewise_solver_on(device: torch.device) -> str:
    """The solver that :func:`decompose_samplewise` runs on ``device``: ``jacobi``, ``svd`` or
    ``eigh`` (what ``auto`` and ``jacobi`` come to there; metrics.json records it)."""
    if uses_jacobi(device):
        return "jacobi"
    return "svd" if uses_svd(device) else "eigh"


_SVD_FALLBACKS = 0


def svd_fallbacks() -> int:
    """How many times so far in this process the ``svd`` solver failed on a mode of a batch,
    whose factors ``eigh`` then gave (a count that only grows: callers take differences)."""
    return _SVD_FALLBACKS


#: matrices per thread below which a batch of host eigendecompositions is not split
MIN_PER_THREAD = 8


@functools.cache
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """The threads of process ``pid`` (a forked child does not inherit its parent's)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="kdbench-eigh")


def _top(vectors: Tensor, rank: int) -> Tensor:
    """The last ``rank`` eigenvectors (ascending order) as columns in descending order, each
    with its largest-magnitude entry positive."""
    return _fix_signs(vectors[..., -rank:].flip(-1))


def _fix_signs(columns: Tensor) -> Tensor:
    """``columns`` (… × n × r), each multiplied by the sign of its largest-magnitude entry."""
    pivot = columns.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(columns, -2, pivot))
    return columns * torch.where(sign == 0, torch.ones_like(sign), sign)


#: the largest symmetric matrices that torch solves as one batch on CUDA
BATCHED_EIGH_MAX = 32
#: the block Jacobi iteration stops once ‖off-diagonal‖ ≤ this × n × ‖A‖ (Frobenius), or after
#: ``MAX_SWEEPS`` sweeps
JACOBI_TOL = float(torch.finfo(torch.float32).eps)
MAX_SWEEPS = 16


@functools.cache
def _jacobi_plan(n: int, size: int) -> tuple[int, int, list[int], list[list[int]]]:
    """Block size, padded order, starting permutation and one sweep of a round-robin block
    Jacobi for ``n`` × ``n`` matrices and subproblems of at most ``size`` × ``size``.

    The padded order is split into an even number of blocks; a round pairs every block with
    another, and a sweep's rounds pair every two blocks once (the pairings repeat from sweep
    to sweep). Each round's permutation takes the layout the previous round left (its pairs
    side by side) to this round's pairs side by side, so that a round is one gather, one batch
    of 2·block × 2·block eigendecompositions and one block-diagonal rotation; the starting
    permutation puts the matrix in the layout a sweep ends with.
    """
    half = max(1, size // 2)
    count = 2 * -(-n // (2 * half))  # blocks, even
    block = -(-n // count)
    labels = list(range(count))
    layout = labels[:]  # the block at each position
    perms: list[list[int]] = []
    for _ in range(2 * (count - 1)):  # the second sweep's rounds start from a sweep's end
        pairs = [(labels[i], labels[count - 1 - i]) for i in range(count // 2)]
        order = [b for pair in pairs for b in pair]
        perms.append([layout.index(b) * block + i for b in order for i in range(block)])
        layout = order
        labels = [labels[0], labels[-1], *labels[1:-1]]
    start = [b * block + i for b in layout for i in range(block)]
    return block, count * block, start, perms[count - 1 :]


@functools.cache
def _jacobi_indices(
    n: int, size: int, device: torch.device
) -> tuple[int, int, Tensor, list[Tensor], list[Tensor]]:
    """:func:`_jacobi_plan` as index tensors on ``device`` (made once, not at every step):
    block size, padded order, the starting permutation, and each round's permutation of the
    rows and of the flattened matrix."""
    block, padded, start, perms = _jacobi_plan(n, size)
    rows = [torch.tensor(p, device=device) for p in perms]
    flat = [(r[:, None] * padded + r[None, :]).reshape(-1) for r in rows]
    return block, padded, torch.tensor(start, device=device), rows, flat


def block_jacobi_eigh(gram: Tensor, size: int = BATCHED_EIGH_MAX) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a batch of symmetric positive
    semi-definite matrices (B × n × n), as ``torch.linalg.eigh`` gives them, computed from
    eigendecompositions of at most ``size`` × ``size``.

    Two-sided block Jacobi: the matrix is split into an even number of blocks; each round
    diagonalises the principal submatrix of every pair of blocks exactly (one batched
    ``torch.linalg.eigh``) and rotates the whole matrix by those eigenvectors, which removes
    that pair's off-diagonal part; a sweep pairs every two blocks once. A subproblem's
    eigenvectors are put in the order of its diagonal, so that the rotations tend to the
    identity and the iteration converges quadratically (64 × 64 in blocks of 16: about 5
    sweeps, 15 rounds). It stops once the off-diagonal part is at rounding level (checked on
    the host once per sweep). The order is padded to a multiple of the blocks with decoupled
    diagonal entries below every eigenvalue (of the size of ‖gram‖, so that they cost the
    subproblems no precision), which stay out of the result.
    """
    batch, n = gram.shape[0], gram.shape[-1]
    block, padded, first, rows, flat = _jacobi_indices(n, size, gram.device)
    m, pairs = 2 * block, padded // (2 * block)
    norm = torch.linalg.matrix_norm(gram).clamp_min(torch.finfo(gram.dtype).tiny)
    a = gram.new_zeros(batch, padded, padded)
    a[:, :n, :n] = gram
    if padded > n:  # distinct, below the spectrum of a PSD matrix (‖gram‖ bounds it), as large
        steps = torch.arange(1, padded - n + 1, device=gram.device, dtype=gram.dtype)
        a.diagonal(dim1=-2, dim2=-1)[:, n:] = -norm[:, None] * steps / (padded - n)
    a = a[:, first][:, :, first]
    v = torch.eye(padded, device=gram.device, dtype=gram.dtype)[:, first].expand_as(a).contiguous()
    rotation = a.new_zeros(batch, pairs, m, pairs, m)
    for _ in range(MAX_SWEEPS):
        for row, index in zip(rows, flat, strict=True):
            a = a.reshape(batch, -1)[:, index].reshape(batch, padded, padded)
            v = v[:, :, row]
            sub = a.reshape(batch, pairs, m, pairs, m).diagonal(dim1=1, dim2=3)
            sub = sub.permute(0, 3, 1, 2)  # (batch, pairs, m, m)
            _, q = torch.linalg.eigh(sub)
            order = sub.diagonal(dim1=-2, dim2=-1).argsort(-1).argsort(-1)
            q = torch.gather(q, -1, order.unsqueeze(-2).expand_as(q))
            rotation.diagonal(dim1=1, dim2=3).copy_(q.permute(0, 2, 3, 1))
            j = rotation.reshape(batch, padded, padded)
            a = j.transpose(1, 2) @ a @ j
            v = v @ j
        off = torch.linalg.matrix_norm(a - torch.diag_embed(a.diagonal(dim1=-2, dim2=-1)))
        if bool(((off / norm) <= JACOBI_TOL * padded).all()):
            break
    values, order = a.diagonal(dim1=-2, dim2=-1).sort(-1)
    vectors = torch.gather(v, -1, order.unsqueeze(-2).expand_as(v))
    keep = padded - n  # the padding's entries sort first
    return values[:, keep:], vectors[:, :n, keep:]


def _uses_block_jacobi(gram: Tensor) -> bool:
    """A batch of matrices that torch's CUDA ``eigh`` would solve one after the other."""
    return gram.device.type == "cuda" and gram.ndim == 3 and gram.shape[-1] > BATCHED_EIGH_MAX


def _solve(gram: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors of ``gram`` on its own device, in one call."""
    if _uses_block_jacobi(gram):
        return _top(block_jacobi_eigh(gram)[1], rank)
    return _top(torch.linalg.eigh(gram)[1], rank)


def _host_top_eigenvectors(gram: Tensor, rank: int) -> Tensor:
    """:func:`_top_eigenvectors` of a CPU ``gram``; a batch is split over the intra-op threads
    (every step is per matrix, so the result is the same)."""
    batch = gram.shape[0] if gram.ndim == 3 else 1
    threads = min(torch.get_num_threads(), batch // MIN_PER_THREAD)
    if threads < 2:
        return _solve(gram, rank)
    parts = _pool(threads, os.getpid()).map(lambda g: _solve(g, rank), gram.chunk(threads))
    return torch.cat(list(parts))


def _top_eigenvectors(gram: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors (columns, descending) of symmetric ``gram`` (… × n × n)."""
    if gram.device.type == "cpu":
        return _host_top_eigenvectors(gram, rank)
    if _EIGH_ON_HOST:
        return _host_top_eigenvectors(gram.cpu(), rank).to(gram.device)
    return _solve(gram, rank)


def _top_left_singular_vectors(x: Tensor, mode: int, rank: int) -> Tensor | None:
    """The top ``rank`` left singular vectors (B × n × rank, signs as :func:`_top`'s) of each
    sample's mode-``mode`` unfolding (n × the rest), from one batched ``torch.linalg.svd``;
    None where the rest is smaller than ``rank`` (the Gram matrices' null space then supplies
    vectors that an SVD of the unfoldings does not give) and where the SVD fails to converge
    (cuSOLVER's ``gesvda`` gives up on many repeated singular values): ``eigh`` then."""
    unfolded = _unfold(x, mode, batched=True)
    if rank > unfolded.shape[-1]:
        return None
    driver = SVD_DRIVERS.get(x.device.type)
    try:
        left = torch.linalg.svd(unfolded, full_matrices=False, driver=driver)[0]
    except torch.linalg.LinAlgError:
        global _SVD_FALLBACKS
        _SVD_FALLBACKS += 1
        return None
    return _fix_signs(left[..., :rank])


def _jacobi_top(x: Tensor, mode: int, rank: int) -> Tensor | None:
    """The top ``rank`` left singular vectors of each sample's mode-``mode`` unfolding from
    :mod:`kdbench.jacobi`'s kernel: of the unfolding itself where it fits one program, else of
    its Gram matrix (the same vectors); None where neither fits (``eigh`` then)."""
    unfolded = _unfold(x, mode, batched=True)
    n, rest = unfolded.shape[-2:]
    if jacobi.fits(n, rest):
        return jacobi.top_left_singular_vectors(unfolded, rank)
    if jacobi.fits(n, n):
        return jacobi.top_left_singular_vectors(unfolded @ unfolded.mT, rank)
    return None


def _unfold(x: Tensor, mode: int, batched: bool) -> Tensor:
    """The mode-``mode`` unfolding of ``x`` (n × the rest), or of each sample (B × n × the
    rest) when ``batched``."""
    if batched:
        return x.movedim(mode, 1).reshape(x.shape[0], x.shape[mode], -1)
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def _gram(x: Tensor, mode: int, batched: bool) -> Tensor:
    unfolded = _unfold(x, mode, batched)
    return unfolded @ unfolded.mT


@functools.cache
def _eye(n: int, device: torch.device) -> Tensor:
    """The fp32 identity of order ``n`` on ``device``, made once: a full mode's factor, which
    nothing writes to (a Tucker step would otherwise make three every step)."""
    return torch.eye(n, device=device, dtype=torch.float32)


def _identity(n: int, like: Tensor, batch: int | None) -> Tensor:
    if like.is_cuda and torch.cuda.is_current_stream_capturing():  # not from a graph's pool
        eye = torch.eye(n, device=like.device, dtype=torch.float32)
    else:
        eye = _eye(n, like.device)
    return eye if batch is None else eye.expand(batch, n, n)


def _factors(x: Tensor, ranks: tuple[int, ...], n_iter: int, batched: bool) -> list[Tensor]:
    first = int(batched)
    batch = x.shape[0] if batched else None
    sizes = x.shape[first:]
    truncated = truncated_modes(sizes, ranks)
    factors = [_identity(n, x, batch) for n in sizes]
    with torch.autocast(device_type=x.device.type, enabled=False):
        for i in truncated:
            top = None
            if batched and uses_jacobi(x.device):
                top = _jacobi_top(x, first + i, ranks[i])
            elif batched and uses_svd(x.device):
                top = _top_left_singular_vectors(x, first + i, ranks[i])
            if top is None:
                top = _top_eigenvectors(_gram(x, first + i, batched), ranks[i])
            factors[i] = top
        if len(truncated) > 1:  # HOOI sweeps only change anything when several modes truncate
            for _ in range(n_iter):
                for i in truncated:
                    partial = x
                    for j in truncated:
                        if j != i:
                            partial = _apply(partial, factors[j], first + j, batched)
                    factors[i] = _top_eigenvectors(_gram(partial, first + i, batched), ranks[i])
    return factors


def decompose(x: Tensor, ranks: Sequence[int], n_iter: int = 0) -> tuple[Tensor, list[Tensor]]:
    """Truncated HOSVD of ``x`` with ``ranks`` (plus ``n_iter`` HOOI sweeps): (core, factors).

    Factors are constants (computed without gradient); the core is differentiable in ``x``.
    """
    ranks = check_ranks(x.shape, ranks)
    factors = _factors(x.detach().float(), ranks, n_iter, batched=False)
    return project(x, factors, truncated_modes(x.shape, ranks)), factors


def decompose_samplewise(x: Tensor, ranks: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """Each sample ``x[b]`` decomposed on its own with ``ranks`` (one per non-batch mode).

    Returns the stacked cores ``(B, *ranks)`` and factors of shape ``(B, n_i, r_i)``. The
    factors come from the samples' Gram matrices' eigenvectors, or, where :func:`uses_svd`
    (:func:`set_samplewise_solver`), from one batched SVD of their unfoldings.
    """
    ranks = check_ranks(x.shape[1:], ranks)
    factors = _factors(x.detach().float(), ranks, 0, batched=True)
    return project(x, factors, truncated_modes(x.shape[1:], ranks)), factors


def relative_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """‖x − x̂‖ / ‖x‖ (a tensor; no host synchronisation)."""
    return torch.linalg.vector_norm(x.float() - x_hat.float()) / torch.linalg.vector_norm(x.float())
