"""kdbench.jacobi: sample-wise Tucker's factors without a host synchronisation
(``train.samplewise_solver: jacobi``). CI has no GPU: the kernel is compiled for sm_90 here
(Triton's compiler and ptxas, no device needed) and run in Triton's interpreter, in a process
of its own (``TRITON_INTERPRET=1`` must be set before Triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kdbench import jacobi, tucker
from kdbench.errors import KdbenchError
from kdbench.train import TrainConfig

pytest.importorskip("triton")

# Run in the interpreter: each case's top vectors against LAPACK's in double precision, and
# sample-wise Tucker with the jacobi solver against eigh's. Prints one JSON line.
_INTERPRETED = r"""
import json
import torch
from kdbench import jacobi, tucker

def against_lapack(a, rank, exact):
    vectors, values, sweeps = jacobi.solve(a, rank)
    u, s, _ = torch.linalg.svd(a.double())
    s = torch.cat([s, s.new_zeros(a.shape[0], a.shape[1] - s.shape[1])], 1)  # rows beyond: 0
    v = vectors.double()
    out = {
        "shapes": [list(vectors.shape), list(values.shape), list(sweeps.shape)],
        "sweeps": int(sweeps.max()),
        "orthonormal": float((v.mT @ v - torch.eye(rank, dtype=torch.double)).abs().max()),
        "values": float(((values.double() - s[:, :rank]).abs() / s[:, :1]).max()),
        "descending": bool((values[:, 1:] <= values[:, :-1]).all()),
    }
    top = min(rank, exact)  # the vectors of nonzero singular values
    p, q = v[..., :top], u[..., :top]
    out["subspace"] = float((p @ p.mT - q @ q.mT).abs().max())
    # the vectors beyond: orthogonal to the matrix's rows (its null space)
    beyond = v[..., top:].mT @ a.double()
    out["null"] = float(beyond.abs().amax() / s[:, 0].max()) if rank > top else 0.0
    # each vector, signs included, as eigh gives it (distinct singular values)
    want = tucker._top(torch.linalg.eigh(a.double() @ a.double().mT)[1], top)
    out["vectors"] = float((v[..., :top] - want).abs().max())
    return out

g = torch.Generator().manual_seed(0)
res = {}
a = torch.relu(torch.randn(3, 12, 16, generator=g)) * torch.linspace(2, 0.5, 16)
res["relu"] = against_lapack(a, 5, 5)
b = torch.relu(torch.randn(2, 16, 8, generator=g))  # rank 8 at most: 8 rows at rounding level
res["tall"] = against_lapack(b, 10, 8)
c = torch.relu(torch.randn(2, 9, 12, generator=g))
c[:, [1, 4, 5]] = 0  # channels that ReLU silenced: rank-6 samples
res["silenced"] = against_lapack(c, 7, 6)
res["padded"] = against_lapack(torch.randn(2, 5, 7, generator=g), 2, 2)
res["square"] = against_lapack(torch.randn(1, 8, 8, generator=g), 8, 8)
e = torch.relu(torch.randn(3, 6, 8, generator=g))
e[1] *= 1e25  # squared norms beyond fp32's range, but for the kernel's scaling
res["large"] = against_lapack(e[1:2], 3, 3)
e[2, 2, 3] = float("nan")  # a sample of NaN features
vectors, values, sweeps = jacobi.solve(e, 3)
alone = jacobi.solve(e[:1], 3)
nan = vectors[2].double()
res["extremes"] = {
    "others alone": all(torch.equal(got[:2], want[:2]) for got, want in
                        zip((vectors, values, sweeps), jacobi.solve(e[:2], 3))),
    "first alone": all(torch.equal(got[:1], want) for got, want in
                       zip((vectors, values, sweeps), alone)),
    "nan orthonormal": float((nan.mT @ nan - torch.eye(3, dtype=torch.double)).abs().max()),
}

tucker.JACOBI_DEVICES = ("cpu",)
cases = {
    "unfolding": (torch.relu(torch.randn(3, 12, 4, 4, generator=g)), (5, 4, 4)),
    "gram": (torch.relu(torch.randn(2, 6, 9, 9, generator=g)), (3, 9, 9)),
    "two modes": (torch.relu(torch.randn(2, 6, 4, 4, generator=g)), (3, 2, 4)),
}
for name, (x, ranks) in cases.items():
    x = x * torch.linspace(2, 0.5, x.shape[1])[:, None, None]  # distinct eigenvalues
    want_core, want = tucker.decompose_samplewise(x, ranks)
    with tucker.solving(samplewise_solver="jacobi"):
        solver = tucker.samplewise_solver_on(x.device)
        core, factors = tucker.decompose_samplewise(x, ranks)
    res[name] = {
        "solver": solver,
        "shapes": [list(f.shape) for f in factors] == [list(f.shape) for f in want],
        "factors": max(float((f - w).abs().max()) for f, w in zip(factors, want)),
        "core": float((core - want_core).norm() / want_core.norm()),
    }
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", ["relu", "tall", "silenced", "padded", "square", "large"])
def test_the_kernel_finds_the_top_left_singular_vectors(interpreted, case):
    """Top vectors and singular values as LAPACK's in double precision, to fp32 rounding: for
    matrices padded to powers of two, with more rows than columns (the vectors beyond the
    matrix's rank are orthonormal and span its null space), with zero rows, square with every
    vector asked, with entries of 1e25 (whose squares fp32 cannot hold); each vector's sign as
    kdbench.tucker's other solvers give it, and each program converged (no sweep cap
    reached)."""
    r = interpreted[case]
    batch, rows, rank = {
        "relu": (3, 12, 5),
        "tall": (2, 16, 10),
        "silenced": (2, 9, 7),
        "padded": (2, 5, 2),
        "square": (1, 8, 8),
        "large": (1, 6, 3),
    }[case]
    assert r["shapes"] == [[batch, rows, rank], [batch, rank], [batch]]
    assert r["orthonormal"] < 1e-5
    assert r["values"] < 1e-5 and r["descending"]
    assert r["subspace"] < 1e-5
    assert r["null"] < 1e-5
    assert r["vectors"] < 1e-4
    assert 1 <= r["sweeps"] < jacobi.MAX_SWEEPS


def test_each_sample_is_solved_on_its_own_nan_included(interpreted):
    """A sample's vectors do not depend on the others in its batch, and a sample of NaN
    features still gets orthonormal vectors (the identity's, sorted: its core, projected from
    the NaN features, is NaN, which the training step's finite check catches) and leaves the
    others alone."""
    r = interpreted["extremes"]
    assert r["others alone"] and r["first alone"]
    assert r["nan orthonormal"] == 0.0


@pytest.mark.parametrize("case", ["unfolding", "gram", "two modes"])
def test_samplewise_tucker_with_the_jacobi_solver_has_eighs_factors(interpreted, case):
    """train.samplewise_solver: jacobi gives sample-wise Tucker the factors and cores of eigh,
    up to rounding: from each sample's unfolding where it fits a program, from its Gram matrix
    where the unfolding is wider (6 channels of 9 × 9), and for two truncated modes."""
    r = interpreted[case]
    assert r["solver"] == "jacobi" and r["shapes"]
    assert r["factors"] < 1e-4 and r["core"] < 1e-4


def test_the_kernel_compiles_for_hopper_without_spilling():
    """The kernel, which CI cannot run on a GPU, compiles for sm_90 (H100, H200) for the largest
    matrices it takes, 64 × 64, within the registers of its warps (no spills) and for small
    ones."""
    big = jacobi.compiles(90, jacobi.MAX_SIZE, jacobi.MAX_SIZE)
    assert big["arch"] == 90 and big["warps"] == 8
    assert big["spills"] == 0 and 0 < big["registers"] <= 255
    small = jacobi.compiles(90, 12, 16)
    assert small["warps"] == 4 and small["spills"] == 0


def test_jacobi_runs_on_cuda_and_comes_to_eigh_elsewhere(monkeypatch):
    """train.samplewise_solver: jacobi runs the kernel on CUDA and eigh on the host (LAPACK,
    with no synchronisation to save), and metrics.json's provenance says which; a host tensor
    reaches the kernel only in Triton's interpreter; the solver is one of the config's."""
    with tucker.solving(samplewise_solver="jacobi"):
        assert tucker.uses_jacobi(torch.device("cuda"))
        assert not tucker.uses_jacobi(torch.device("cpu"))
        assert tucker.samplewise_solver_on(torch.device("cuda")) == "jacobi"
        assert tucker.samplewise_solver_on(torch.device("cpu")) == "eigh"
        assert not tucker.uses_svd(torch.device("cuda"))
        x = torch.relu(torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(1)))
        core, factors = tucker.decompose_samplewise(x, (3, 3, 3))
    assert torch.equal(core, tucker.decompose_samplewise(x, (3, 3, 3))[0])  # eigh's, exactly
    assert TrainConfig.from_config({"samplewise_solver": "jacobi"}).samplewise_solver == "jacobi"
    with pytest.raises(KdbenchError, match="runs on CUDA tensors .* TRITON_INTERPRET=1"):
        jacobi.solve(torch.ones(2, 4, 4), 2)
    with pytest.raises(KdbenchError, match=r"at most 64 x 64"):
        jacobi.solve(torch.ones(2, 65, 4), 2)
    assert jacobi.fits(64, 64) and not jacobi.fits(64, 65) and not jacobi.fits(1, 4)


def test_without_triton_the_jacobi_solver_is_one_line(monkeypatch):
    """Where Triton is missing (torch without CUDA wheels), a sample-wise Tucker run that asks
    for the jacobi solver where it would run the kernel stops in ``prepare``, before training,
    with one line that says what is missing; other methods and the host's eigh do not need
    Triton."""
    from kdbench import methods, models
    from kdbench.train import prepare

    def tucker_run(decomposition: str) -> methods.Method:
        student, teacher = models.build("resnet8", 10, 1), models.build("resnet8", 10, 1)
        return methods.get("tucker")(student, teacher, {"decomposition": decomposition})

    cfg, cpu = TrainConfig(samplewise_solver="jacobi"), torch.device("cpu")
    monkeypatch.setitem(sys.modules, "triton", None)
    assert not jacobi.available()
    with tucker.solving():
        prepare(tucker_run("sample"), cfg, cpu)  # eigh on the host
        monkeypatch.setattr(tucker, "JACOBI_DEVICES", ("cpu",))  # as on CUDA
        prepare(tucker_run("full"), cfg, cpu)  # no sample-wise decomposition
        with pytest.raises(KdbenchError, match="jacobi needs Triton") as err:
            prepare(tucker_run("sample"), cfg, cpu)
    assert "\n" not in str(err.value)
