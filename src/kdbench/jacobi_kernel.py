"""The Triton source of :mod:`kdbench.jacobi`'s kernel (imported when it is first needed: it
imports Triton). Not decorated: :mod:`kdbench.jacobi` wraps it with ``triton.jit`` for CUDA
tensors and with Triton's interpreter for host tensors."""

import triton
import triton.language as tl


@triton.jit
def _descending(key, i):
    """The order of ``key`` (a vector), largest first, ties by position: the position whose
    entry goes to each place (``i``: the positions, ``tl.arange``)."""
    first = (key[None, :] > key[:, None]) | (
        (key[None, :] == key[:, None]) & (i[None, :] < i[:, None])
    )
    place = tl.sum(first.to(tl.int32), axis=1)
    return tl.sum(tl.where(place[None, :] == i[:, None], i[None, :], 0), axis=1)


@triton.jit
def _key(a, real):
    """Each row's squared norm, by which the rows sort: NaN (a sample of NaN features) after
    every number and the padding's rows (not ``real``) last, so that the order is a
    permutation whatever the input."""
    norm = tl.sum(a * a, axis=1)
    return tl.where(real, tl.where(norm == norm, norm, -0.5), -1.0)


def rows_jacobi(  # noqa: PLR0913
    a_ptr,
    vec_ptr,
    norm_ptr,
    sweeps_ptr,
    rows,
    cols,
    rank,
    tol,
    max_sweeps,
    R: tl.constexpr,
    K: tl.constexpr,
):
    """One program per matrix: see :mod:`kdbench.jacobi` (``R``, ``K``: the padded rows and
    columns, powers of two)."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, R)
    j = tl.arange(0, R)
    k = tl.arange(0, K)
    inside = (i[:, None] < rows) & (k[None, :] < cols)
    a = tl.load(a_ptr + b * rows * cols + i[:, None] * cols + k[None, :], mask=inside, other=0.0)
    # scaled to a largest magnitude of 1: squared norms neither overflow nor underflow
    top = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    magnitude = tl.where(top > 0, top, 1.0)
    a = a / magnitude
    w = tl.where(i[:, None] == j[None, :], 1.0, 0.0)
    real = i < rows  # the padding's rows sort last and never turn
    # pairs of rows both at rounding level (a rank-deficient matrix's) never turn
    floor = tol * tol * tl.sum(tl.sum(a * a, axis=1), axis=0)
    m = R - 1
    sweep = max_sweeps * 0
    turned = tol * 0.0 + 1.0
    while (sweep < max_sweeps) & (turned > 0):
        # de Rijk: the rows by norm, largest first (the padding last, ties by position)
        source = _descending(_key(a, real), i)
        a = tl.gather(a, tl.broadcast_to(source[:, None], (R, K)), axis=0)
        w = tl.gather(w, tl.broadcast_to(source[:, None], (R, R)), axis=0)
        real = tl.gather(real.to(tl.int32), source, axis=0) > 0
        moved = (i < 0).to(tl.int32)  # the rows this sweep turned (one sum a sweep, not a round)
        for r in range(R - 1):
            # the circle method: row m stays, the others turn around it
            p = (r - i + m) % m
            p = tl.where(p == i, m, p)
            p = tl.where(i == m, (r * (R // 2)) % m, p)
            a_p = tl.gather(a, tl.broadcast_to(p[:, None], (R, K)), axis=0)
            w_p = tl.gather(w, tl.broadcast_to(p[:, None], (R, R)), axis=0)
            norm = tl.sum(a * a, axis=1)
            gamma = tl.sum(a * a_p, axis=1)
            norm_p = tl.gather(norm, p, axis=0)
            lo = i < p
            alpha = tl.where(lo, norm, norm_p)
            beta = tl.where(lo, norm_p, norm)
            scale = tl.sqrt_rn(alpha) * tl.sqrt_rn(beta)
            cosine = tl.abs(gamma) / tl.where(scale > 0, scale, 1.0)
            turn = (cosine > tol) & (tl.abs(gamma) > floor)
            moved = tl.maximum(moved, turn.to(tl.int32))
            zeta = tl.where(turn, beta - alpha, 0.0) / tl.where(turn, 2.0 * gamma, 1.0)
            t = tl.where(zeta >= 0, 1.0, -1.0) / (tl.abs(zeta) + tl.sqrt_rn(1.0 + zeta * zeta))
            c = 1.0 / tl.sqrt_rn(1.0 + t * t)
            s = tl.where(turn, tl.where(lo, -c * t, c * t), 0.0)
            c = tl.where(turn, c, 1.0)
            a = c[:, None] * a + s[:, None] * a_p
            w = c[:, None] * w + s[:, None] * w_p
        turned = tl.sum(moved.to(tl.float32), axis=0)
        sweep += 1
    key = _key(a, real)
    source = _descending(key, i)
    w = tl.gather(w, tl.broadcast_to(source[:, None], (R, R)), axis=0)
    key = tl.gather(key, source, axis=0)
    # signs: each vector's largest-magnitude entry (the first, on ties) positive
    size = tl.abs(w)
    top = tl.max(size, axis=1)
    pivot = tl.min(tl.where(size == top[:, None], j[None, :], R), axis=1)
    sign = tl.sum(tl.where(j[None, :] == pivot[:, None], w, 0.0), axis=1)
    w = tl.where(sign[:, None] < 0, -w, w)
    # vector t (row t of w) as column t
    keep = (i[:, None] < rank) & (j[None, :] < rows)
    tl.store(vec_ptr + b * rows * rank + j[None, :] * rank + i[:, None], w, mask=keep)
    tl.store(norm_ptr + b * rank + i, tl.sqrt_rn(tl.maximum(key, 0.0)) * magnitude, mask=i < rank)
    tl.store(sweeps_ptr + b, sweep)
