import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tucker as tl_tucker

from kdbench import data, models, tucker
from kdbench.errors import KdbenchError


def tensorly_reconstruction(x, ranks):
    core, factors = tl_tucker(
        tl.tensor(x.double().numpy()), rank=list(ranks), init="svd", n_iter_max=100, tol=1e-4
    )
    return torch.from_numpy(np.asarray(tl.tucker_to_tensor((core, factors)))).float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def real_features():
    """Stage-3 maps of a (randomly initialised) resnet8 on real digits."""
    torch.manual_seed(0)
    ds = data.load_dataset("digits", image_size=16)
    model = models.build("resnet8", 10, 1).eval()
    with torch.no_grad():
        return model((ds.train.x[:64] - ds.mean[0]) / ds.std[0])[2]


@pytest.mark.parametrize("source", ["random", "real"])
@pytest.mark.parametrize("r", [32, 8])
def test_single_mode_truncation_matches_tensorly(source, r, real_features):
    x = torch.relu(torch.randn(32, 64, 4, 4)) if source == "random" else real_features
    ranks = (x.shape[0], r, x.shape[2], x.shape[3])
    core, factors = tucker.decompose(x, ranks)
    assert core.shape == ranks and [f.shape for f in factors] == [
        (n, k) for n, k in zip(x.shape, ranks, strict=True)
    ]
    assert rel(tucker.recompose(core, factors), tensorly_reconstruction(x, ranks)) <= 1e-4


@pytest.mark.parametrize("ranks", [(16, 24, 3, 4), (32, 8, 4, 2)])
def test_multi_mode_truncation_is_within_one_percent_of_tensorly(ranks):
    torch.manual_seed(1)
    x = torch.relu(torch.randn(32, 64, 4, 4))
    ours = tucker.relative_error(x, tucker.recompose(*tucker.decompose(x, ranks, n_iter=10)))
    theirs = tucker.relative_error(x, tensorly_reconstruction(x, ranks))
    assert float(ours) <= 1.01 * float(theirs)


def test_factors_are_orthonormal_and_full_modes_are_identity():
    x = torch.randn(8, 16, 4, 4)
    core, factors = tucker.decompose(x, (8, 5, 4, 3), n_iter=2)
    for f in factors:
        assert torch.allclose(f.T @ f, torch.eye(f.shape[1]), atol=1e-5)
    assert torch.equal(factors[0], torch.eye(8)) and torch.equal(factors[2], torch.eye(4))
    # the core is the projection; with the identity batch factor, core row b is sample b's
    assert torch.allclose(core, tucker.project(x, factors), atol=1e-5)
    assert torch.allclose(core[:1], tucker.decompose(x, (8, 5, 4, 3), n_iter=2)[0][:1])
    # the full modes' identities are made once, not at every decomposition (every step)
    again = tucker.decompose(torch.randn(8, 16, 4, 4), (8, 5, 4, 3))[1]
    assert again[0] is factors[0] and again[2] is factors[2] and again[1] is not factors[1]
    assert tucker.decompose_samplewise(x, (5, 4, 3))[1][1].data_ptr() == factors[2].data_ptr()


def test_samplewise_equals_one_decomposition_per_sample():
    torch.manual_seed(2)
    x = torch.relu(torch.randn(5, 16, 4, 4))
    cores, factors = tucker.decompose_samplewise(x, (6, 4, 4))
    assert cores.shape == (5, 6, 4, 4) and factors[0].shape == (5, 16, 6)
    recon = tucker.recompose(cores, factors)
    for b in range(5):
        core, f = tucker.decompose(x[b], (6, 4, 4))
        assert torch.allclose(recon[b], tucker.recompose(core, f), atol=1e-5)
        assert rel(recon[b], tensorly_reconstruction(x[b], (6, 4, 4))) <= 1e-4


def test_gradient_flows_through_the_projection_only():
    x = torch.randn(4, 8, 2, 2, requires_grad=True)
    core, factors = tucker.decompose(x, (4, 3, 2, 2))
    assert all(not f.requires_grad for f in factors)
    core.sum().backward()
    expected = factors[1].sum(1).view(1, 8, 1, 1).expand_as(x)  # d/dx of sum(x ×₁ U₁ᵀ)
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_deterministic_signs():
    x = torch.randn(6, 10, 3, 3)
    a = tucker.decompose(x, (6, 4, 3, 3))[1][1]
    b = tucker.decompose(x.clone(), (6, 4, 3, 3))[1][1]
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ((8, 17, 4, 4), "exceeds that mode's size 16"),
        ((8, 0, 4, 4), "must be a positive integer"),
        ((8, 4, 4), "need 4 entries"),
    ],
)
def test_bad_ranks(ranks, message):
    with pytest.raises(KdbenchError, match=message):
        tucker.decompose(torch.randn(8, 16, 4, 4), ranks)


def test_zero_input_gives_finite_results():
    core, factors = tucker.decompose(torch.zeros(4, 8, 2, 2), (4, 3, 2, 2))
    assert torch.isfinite(core).all() and all(torch.isfinite(f).all() for f in factors)


def test_eigh_on_host_moves_only_device_tensors_and_changes_no_cpu_result(monkeypatch):
    x = torch.relu(torch.randn(16, 8, 4, 4, generator=torch.Generator().manual_seed(3)))
    want = tucker.decompose_samplewise(x, (3, 4, 4))
    with tucker.solving(eigh_on_host=True):
        got = tucker.decompose_samplewise(x, (3, 4, 4))  # a CPU tensor: nothing moves
        assert torch.equal(got[0], want[0])

        class OnDevice:  # a Gram matrix on another device (here: meta), that records copies
            device = torch.device("meta")
            copies = 0

            def cpu(self):
                OnDevice.copies += 1
                return torch.eye(5)

        vectors = tucker._top_eigenvectors(OnDevice(), 3)
        assert OnDevice.copies == 1 and vectors.device.type == "meta"
        assert vectors.shape == (5, 3)
    assert not tucker.eigh_on_host()
    seen = []
    monkeypatch.setattr(torch.linalg, "eigh", lambda g: seen.append(g) or (None, g))
    tucker._top_eigenvectors(torch.eye(2), 1)  # switched off: on the tensor's own device
    assert len(seen) == 1


def test_a_batch_of_host_eigendecompositions_is_split_over_the_threads_bit_for_bit(monkeypatch):
    x = torch.randn(64, 12, 3, 4, generator=torch.Generator().manual_seed(5))
    gram = tucker._gram(x, 1, batched=True)
    # torch's batched CPU eigh (one matrix after another), then the top 5 with their signs
    want = tucker._top(torch.linalg.eigh(gram)[1], 5)
    threads = torch.get_num_threads()
    eigh = torch.linalg.eigh
    sizes = []
    monkeypatch.setattr(torch.linalg, "eigh", lambda g: sizes.append(len(g)) or eigh(g))
    try:
        torch.set_num_threads(4)
        got = tucker._top_eigenvectors(gram, 5)
        assert sorted(sizes) == [16] * 4 and torch.equal(got, want)
        sizes.clear()
        tucker._top_eigenvectors(gram[:12], 5)  # too few matrices to split
        tucker._top_eigenvectors(gram[0], 5)  # one matrix
        assert sizes == [12, 12]
        torch.set_num_threads(1)
        sizes.clear()
        assert torch.equal(tucker._top_eigenvectors(gram, 5), want) and sizes == [64]
    finally:
        torch.set_num_threads(threads)
    # the sample-wise decomposition, on one thread and on two
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    try:
        torch.set_num_threads(1)
        one = tucker.decompose_samplewise(x, (5, 3, 4))
        torch.set_num_threads(2)
        two = tucker.decompose_samplewise(x, (5, 3, 4))
    finally:
        torch.set_num_threads(threads)
    # the factors are the same bits (the cores' projection, a batched matmul, may round
    # differently with the thread count)
    assert all(map(torch.equal, one[1], two[1]))
    torch.testing.assert_close(one[0], two[0])


def _psd(batch, n, rank=None, seed=0):
    x = torch.randn(batch, n, rank or 2 * n, generator=torch.Generator().manual_seed(seed))
    return torch.relu(x) @ torch.relu(x).mT if rank is None else x @ x.mT


@pytest.mark.parametrize("n", [33, 64, 100])
def test_block_jacobi_eigh_matches_lapack(n):
    gram = _psd(6, n, seed=n)
    values, vectors = tucker.block_jacobi_eigh(gram)
    want_values, want_vectors = torch.linalg.eigh(gram.double())
    assert values.shape == (6, n) and vectors.shape == (6, n, n)
    scale = want_values.abs().amax(-1, keepdim=True)
    assert ((values.double() - want_values).abs() / scale).max() < 1e-5
    assert torch.allclose(vectors.mT @ vectors, torch.eye(n).expand(6, n, n), atol=1e-4)
    residual = gram @ vectors - vectors * values[:, None, :]
    assert (torch.linalg.matrix_norm(residual) / torch.linalg.matrix_norm(gram)).max() < 1e-4
    # the top eigenvectors are LAPACK's, up to sign
    cos = (vectors[..., -16:].double() * want_vectors[..., -16:]).sum(-2).abs()
    assert cos.min() > 0.9999


def test_block_jacobi_eigh_of_rank_deficient_and_zero_matrices():
    gram = _psd(4, 64, rank=10)
    values, vectors = tucker.block_jacobi_eigh(gram)
    want = torch.linalg.eigh(gram.double())[1][..., -10:]
    got = vectors[..., -10:].double()
    # the range of the top 10 (the null space's basis is arbitrary)
    assert torch.allclose(got @ got.mT, want @ want.mT, atol=1e-4)
    values, vectors = tucker.block_jacobi_eigh(torch.zeros(2, 40, 40))
    assert torch.equal(values, torch.zeros(2, 40))
    assert torch.allclose(vectors.mT @ vectors, torch.eye(40).expand(2, 40, 40))


@pytest.mark.parametrize("n", [33, 64, 100, 130])
def test_block_jacobi_plan_pairs_every_two_blocks_once_per_sweep(n):
    block, padded, start, perms = tucker._jacobi_plan(n, 32)
    assert 2 * block <= 32 and padded >= n and padded % (2 * block) == 0
    count = padded // block
    layout = [start[i * block] // block for i in range(count)]  # the block at each position
    assert sorted(layout) == list(range(count))
    met = set()
    for perm in perms:
        assert sorted(perm) == list(range(padded))
        # positions move block by block
        moved = [perm[i * block] // block for i in range(count)]
        assert perm == [b * block + i for b in moved for i in range(block)]
        layout = [layout[b] for b in moved]
        met.update(frozenset(layout[i : i + 2]) for i in range(0, count, 2))
    assert len(met) == count * (count - 1) // 2  # every two blocks met, each once
    # a sweep ends in the layout it began with, so the next sweep's permutations apply
    assert layout == [start[i * block] // block for i in range(count)]


def test_samplewise_decomposition_through_block_jacobi_matches_lapack(monkeypatch):
    # a stage-3 batch of the CIFAR ResNets' shape (64 channels, 8×8)
    x = torch.relu(torch.randn(16, 64, 8, 8, generator=torch.Generator().manual_seed(1)))
    x = x * torch.linspace(2, 0.5, 64)[:, None, None]
    want_core, want_factors = tucker.decompose_samplewise(x, (24, 8, 8))
    monkeypatch.setattr(tucker, "_uses_block_jacobi", lambda gram: gram.ndim == 3)
    eigh, sizes = torch.linalg.eigh, []
    monkeypatch.setattr(torch.linalg, "eigh", lambda g: sizes.append(g.shape[-1]) or eigh(g))
    core, factors = tucker.decompose_samplewise(x, (24, 8, 8))
    assert set(sizes) == {32}  # only 32×32 subproblems
    sign = torch.sign((factors[0] * want_factors[0]).sum(-2, keepdim=True))
    assert torch.allclose(factors[0] * sign, want_factors[0], atol=1e-3)
    assert torch.allclose(core * sign.transpose(-1, -2)[..., None], want_core, atol=1e-3, rtol=1e-3)


def test_only_cuda_batches_of_large_matrices_take_block_jacobi():
    class Gram:
        def __init__(self, device, shape):
            self.device, self.shape, self.ndim = torch.device(device), shape, len(shape)

    assert tucker._uses_block_jacobi(Gram("cuda", (128, 64, 64)))
    assert not tucker._uses_block_jacobi(Gram("cuda", (128, 32, 32)))  # torch batches these
    assert not tucker._uses_block_jacobi(Gram("cuda", (64, 64)))  # one matrix
    assert not tucker._uses_block_jacobi(Gram("cpu", (128, 64, 64)))  # LAPACK, threaded


def test_the_svd_solver_gives_the_samplewise_factors_of_eigh(monkeypatch):
    """train.samplewise_solver: svd takes each sample's factors from one batched SVD of the
    unfoldings: the same factors, signs included, and cores as the Gram matrices' eigh; where
    an unfolding has fewer columns than the rank, from eigh still."""
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(6, 16, 4, 5, generator=g))
    x = x * torch.linspace(2, 0.5, 16)[:, None, None]  # distinct eigenvalues
    svd, calls = torch.linalg.svd, []
    monkeypatch.setattr(
        torch.linalg, "svd", lambda a, **kw: calls.append((a.shape, kw)) or svd(a, **kw)
    )
    for ranks in [(6, 4, 5), (6, 2, 5), (16, 4, 5)]:
        want_core, want_factors = tucker.decompose_samplewise(x, ranks)
        with tucker.solving(samplewise_solver="svd"):
            core, factors = tucker.decompose_samplewise(x, ranks)
        for got, want in zip(factors, want_factors, strict=True):
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
        assert torch.allclose(core, want_core, atol=1e-4, rtol=1e-4)
    # one SVD per truncated mode, of all the samples at once (the host's driver: torch's)
    assert calls == [
        ((6, 16, 20), {"full_matrices": False, "driver": None}),
        ((6, 16, 20), {"full_matrices": False, "driver": None}),
        ((6, 4, 80), {"full_matrices": False, "driver": None}),
    ]
    calls.clear()
    # 16 channels of 2×2: the unfoldings have 4 columns, rank 6 needs the Gram's eigh
    with tucker.solving(samplewise_solver="svd"):
        core, factors = tucker.decompose_samplewise(x[:, :, :2, :2], (6, 2, 2))
        assert tucker.decompose(x, (6, 6, 4, 5))[0].shape == (6, 6, 4, 5)  # whole tensor: eigh
    assert calls == [] and torch.allclose(
        factors[0], tucker.decompose_samplewise(x[:, :, :2, :2], (6, 2, 2))[1][0]
    )
    with pytest.raises(KdbenchError, match="unknown sample-wise Tucker solver 'qr'"):
        tucker.set_samplewise_solver("qr")


def test_auto_takes_the_svd_on_cuda_and_eigh_where_the_svd_fails(monkeypatch):
    """train.samplewise_solver: auto (the default) takes the sample-wise factors from the SVD on
    the devices that SVD_DRIVERS names (CUDA: cuSOLVER's batched gesvda), from eigh elsewhere;
    where the SVD fails to converge (gesvda gives up on many repeated singular values, such as
    a sample's channels that ReLU silenced), that mode's factors come from eigh."""
    assert tucker.samplewise_solver() == "auto"
    assert tucker.uses_svd(torch.device("cuda")) and not tucker.uses_svd(torch.device("cpu"))
    assert tucker.samplewise_solver_on(torch.device("cpu")) == "eigh"
    assert tucker.samplewise_solver_on(torch.device("cuda")) == "svd"
    x = torch.relu(torch.randn(5, 12, 4, 6, generator=torch.Generator().manual_seed(8)))
    x[1, :7] = 0  # sample 1: 7 of its 12 channels silent
    ranks = (6, 3, 6)
    want_core, want_factors = tucker.decompose_samplewise(x, ranks)  # auto on CPU: eigh
    svd, calls = torch.linalg.svd, []

    def gesvda(a: torch.Tensor, full_matrices: bool, driver: str | None) -> tuple:
        calls.append((a.shape, driver))
        if a.shape[1] == 12:  # the channel unfoldings: gives up, as gesvda may
            raise torch.linalg.LinAlgError("linalg.svd: (Batch element 1): failed to converge")
        return svd(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", gesvda)
    monkeypatch.setitem(tucker.SVD_DRIVERS, "cpu", "gesvda")
    assert tucker.uses_svd(torch.device("cpu"))
    before = tucker.svd_fallbacks()
    core, factors = tucker.decompose_samplewise(x, ranks)
    assert calls == [((5, 12, 24), "gesvda"), ((5, 4, 72), "gesvda")]
    assert tucker.svd_fallbacks() - before == 1  # the channel mode, counted
    assert torch.equal(factors[0], want_factors[0])  # eigh's, after the SVD failed
    assert torch.allclose(factors[1], want_factors[1], atol=1e-4)  # the SVD's
    assert torch.allclose(core, want_core, atol=1e-4, rtol=1e-4)
    for solver, svd_on_cpu in [("eigh", False), ("svd", True)]:
        with tucker.solving(samplewise_solver=solver):
            assert tucker.uses_svd(torch.device("cpu")) == svd_on_cpu
            assert tucker.uses_svd(torch.device("cuda")) == svd_on_cpu
            assert tucker.samplewise_solver_on(torch.device("cpu")) == solver
    assert tucker.samplewise_solver() == "auto"
