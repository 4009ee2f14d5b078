"""Top left singular vectors of a batch of small matrices without a host synchronisation.

``torch.linalg.svd`` and ``torch.linalg.eigh`` check their result on the host: on CUDA every
call waits for the GPU, and a CUDA graph cannot hold one. Sample-wise Tucker (REFERENCE §4)
needs the top left singular vectors of every sample's unfolding (the top eigenvectors of its
Gram matrix) at every step: :func:`top_left_singular_vectors` finds them with one Triton
kernel, one program per matrix, that neither fails nor reports back: one-sided (Hestenes)
Jacobi.

* Each program holds its matrix (at most :data:`MAX_SIZE` rows and columns, padded to powers
  of two) and an orthogonal matrix ``W`` (the identity at first) and rotates pairs of rows of
  both until the matrix's rows are orthogonal: then ``W``'s rows are the left singular vectors,
  and the rows' norms the singular values. A round rotates every row with another (the circle
  method: a sweep's rounds pair every two rows once); at the start of each sweep the rows are
  sorted by norm, largest first (de Rijk), which saves about a sweep.
* A pair turns when the cosine of its rows exceeds ``tol`` (:data:`TOL`, 8 × fp32's epsilon,
  by default), unless both rows are at rounding level (the rows beyond a matrix's rank); the
  program stops after the first sweep in which no pair turned, or after ``max_sweeps``
  (:data:`MAX_SWEEPS`), each program on its own, on the GPU. Six 64 × 64 unfoldings of ReLU
  features took 7-9 sweeps, their top 32 vectors' subspaces at most 6.9e-6 from LAPACK's in
  double precision (fp32 LAPACK ``eigh`` of their Gram matrices: 2.7e-6; with 64 × epsilon,
  7-8 sweeps and 2.7e-5).
* ``W`` is a product of rotations, orthogonal up to rounding, whatever the input: zero rows
  (channels that ReLU silenced) never turn and keep their unit vectors, which complete the
  basis. Each vector's sign makes its largest-magnitude entry positive (the first, on ties),
  as ``kdbench.tucker``'s other solvers do.

On the host the kernel runs only in Triton's interpreter (NumPy, slow: about 5 s for a 64 × 64
matrix), where Triton was imported under ``TRITON_INTERPRET=1``; the tests run it so on small
matrices. :func:`compiles` compiles it for a CUDA architecture without a GPU (Triton's compiler
and its ``ptxas``). Triton is imported when the kernel is first needed.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from kdbench.errors import KdbenchError

#: the largest matrices (rows and columns) one program holds
MAX_SIZE = 64
#: rows whose cosine is at most this count as orthogonal
TOL = 8 * float(torch.finfo(torch.float32).eps)
#: sweeps after which a program stops whatever the rows' cosines
MAX_SWEEPS = 20


def fits(rows: int, cols: int) -> bool:
    """Whether a ``rows`` × ``cols`` matrix fits one program."""
    return 2 <= rows <= MAX_SIZE and 1 <= cols <= MAX_SIZE


def _padded(n: int) -> int:
    return max(2, 1 << (n - 1).bit_length())


@functools.cache
def _kernel() -> Any:
    """The kernel, ``triton.jit``-wrapped: compiled for CUDA tensors, or, where Triton was
    imported under ``TRITON_INTERPRET=1``, interpreted on the host."""
    import triton

    from kdbench.jacobi_kernel import rows_jacobi

    return triton.jit(rows_jacobi)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, which must be set
    before Triton is imported): the only way :func:`solve` takes host tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _warps(rows: int, cols: int) -> int:
    """Warps per program: 8 for the largest tiles (with 4, a 64 × 64 program spills registers
    for sm_90), else 4."""
    return 8 if _padded(rows) * max(_padded(rows), _padded(cols)) >= 4096 else 4


def available() -> bool:
    """Whether Triton can be imported (it comes with torch's CUDA wheels)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    """One-line KdbenchError unless :func:`available`."""
    if not available():
        raise KdbenchError(
            "train.samplewise_solver: jacobi needs Triton (pip install triton), "
            "which this Python environment lacks"
        )


def solve(
    a: Tensor,
    rank: int,
    *,
    tol: float = TOL,
    max_sweeps: int = MAX_SWEEPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``rank`` left singular vectors of each matrix of ``a`` (B × rows × cols, fp32):
    (vectors B × rows × rank, singular values B × rank in descending order, sweeps per matrix
    (int32)). CUDA tensors run the compiled kernel, host tensors the interpreter."""
    batch, rows, cols = a.shape
    if not fits(rows, cols) or not 1 <= rank <= rows:
        raise KdbenchError(
            f"Jacobi solver: {rows} x {cols} matrices, rank {rank}: at most "
            f"{MAX_SIZE} x {MAX_SIZE} and a rank from 1 to the rows"
        )
    a = a.detach().float().contiguous()
    R, K = _padded(rows), _padded(cols)
    vectors = a.new_empty(batch, rows, rank)
    values = a.new_empty(batch, rank)
    sweeps = torch.empty(batch, dtype=torch.int32, device=a.device)
    if batch == 0:
        return vectors, values, sweeps
    if not a.is_cuda and not interpreting():
        raise KdbenchError(
            "the Jacobi solver runs on CUDA tensors (on the host only in Triton's interpreter, "
            "TRITON_INTERPRET=1)"
        )
    _kernel()[(batch,)](
        a,
        vectors,
        values,
        sweeps,
        rows,
        cols,
        rank,
        tol,
        max_sweeps,
        R=R,
        K=K,
        num_warps=_warps(rows, cols),
    )
    return vectors, values, sweeps


def top_left_singular_vectors(a: Tensor, rank: int) -> Tensor:
    """:func:`solve`'s vectors only: B × rows × ``rank``."""
    return solve(a, rank)[0]


def compiles(arch: int = 90, rows: int = MAX_SIZE, cols: int = MAX_SIZE) -> dict[str, Any]:
    """Compile the kernel for ``rows`` × ``cols`` matrices and CUDA architecture ``arch`` (90:
    H100, H200) without a GPU (Triton's compiler and its ``ptxas``): the warps, shared memory,
    registers per thread and bytes of spilled registers of a program."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from kdbench.jacobi_kernel import rows_jacobi

    signature = {
        "a_ptr": "*fp32",
        "vec_ptr": "*fp32",
        "norm_ptr": "*fp32",
        "sweeps_ptr": "*i32",
        "rows": "i32",
        "cols": "i32",
        "rank": "i32",
        "tol": "fp32",
        "max_sweeps": "i32",
        "R": "constexpr",
        "K": "constexpr",
    }
    constexprs = {"R": _padded(rows), "K": _padded(cols)}
    source = ASTSource(JITFunction(rows_jacobi), signature, constexprs=constexprs)
    options = {"num_warps": _warps(rows, cols)}
    binary = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "kernel.ptx")
        ptx.write_text(binary.asm["ptx"])
        command = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2"]
        command += [f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx)]
        command += ["-o", str(Path(tmp, "kernel.cubin"))]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {
        "arch": arch,
        "warps": binary.metadata.num_warps,
        "shared_bytes": binary.metadata.shared,
        "registers": int(registers.group(1)) if registers else None,
        "spills": int(spills.group(1)) if spills else 0,
    }
