import contextlib
import logging

import numpy as np
import pytest
import torch
from conftest import paraphrase_digits, train_digits

from kdbench import methods, models
from kdbench.errors import KdbenchError

BETA = 7.0


def n(x):
    flat = x.reshape(x.shape[0], -1)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def channel_basis(t, r):
    """Top-r left singular vectors of the channel unfolding (numpy, independent of kdbench)."""
    unfolded = np.moveaxis(t, 1, 0).reshape(t.shape[1], -1)
    u, _, _ = np.linalg.svd(unfolded, full_matrices=False)
    return u[:, :r]


def project(x, u):
    return np.einsum("bchw,cr->brhw", x, u)


def recompose(core, u):
    return np.einsum("brhw,cr->bchw", core, u)


class Fixed(torch.nn.Module):
    """A 'network' returning given stage-3 features and logits."""

    def __init__(self, s3, logits):
        super().__init__()
        self.s3 = torch.nn.Parameter(s3.clone())
        self.logits = logits

    def forward(self, x):
        return [self.s3, self.s3, self.s3, self.logits]


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    t = torch.relu(torch.randn(6, 12, 3, 3, generator=g))
    s = torch.relu(torch.randn(6, 12, 3, 3, generator=g))
    logits = torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    return t, s, logits, y


def loss_of(name, params, t, s, logits, y):
    method = methods.get(name)(Fixed(s, logits), Fixed(t, logits), {"beta": BETA, **params})
    _, parts = method.forward_train(torch.zeros(6, 1), y)
    assert torch.allclose(parts["ce"], torch.nn.functional.cross_entropy(logits, y))
    return float(parts["feature"].detach())


def test_featuremap_l1_and_l2(tensors):
    t, s, logits, y = tensors
    a, b = n(t.numpy()), n(s.numpy())
    assert loss_of("featuremap", {}, t, s, logits, y) == pytest.approx(
        BETA * np.abs(a - b).mean(), rel=1e-5
    )
    l2 = loss_of("featuremap", {"distance": "l2"}, t, s, logits, y)
    assert l2 == pytest.approx(BETA * ((a - b) ** 2).mean(), rel=1e-5)


@pytest.mark.parametrize("r", [3, 8])
def test_tucker_core_loss(tensors, r):
    t, s, logits, y = tensors
    u = channel_basis(t.numpy(), r)
    expected = BETA * np.abs(n(project(t.numpy(), u)) - n(project(s.numpy(), u))).mean()
    assert loss_of("tucker", {"rank": r}, t, s, logits, y) == pytest.approx(expected, rel=1e-4)


def test_tucker_samplewise(tensors):
    t, s, logits, y = tensors
    tn, sn = t.numpy(), s.numpy()
    ct, cs = [], []
    for b in range(6):
        u = channel_basis(tn[b : b + 1], 4)
        ct.append(project(tn[b : b + 1], u))
        cs.append(project(sn[b : b + 1], u))
    expected = BETA * np.abs(n(np.concatenate(ct)) - n(np.concatenate(cs))).mean()
    got = loss_of("tucker", {"rank": 4, "decomposition": "sample"}, t, s, logits, y)
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("target", ["teacher", "student", "both"])
def test_tucker_recomposition_targets(tensors, target):
    t, s, logits, y = tensors
    tn, sn = t.numpy(), s.numpy()
    u = channel_basis(tn, 5)
    rt = recompose(project(tn, u), u)
    rs = recompose(project(sn, u), u)
    a, b = {"teacher": (rt, sn), "student": (tn, rs), "both": (rt, rs)}[target]
    expected = BETA * np.abs(n(a) - n(b)).mean()
    got = loss_of("tucker_recomp", {"rank": 5, "target": target}, t, s, logits, y)
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(("target", "in_step"), [("teacher", 0), ("student", 1), ("both", 1)])
def test_tucker_recomposition_of_the_teacher_is_a_target_not_part_of_the_step(
    tensors, monkeypatch, target, in_step
):
    """The teacher's recomposition is made with its decomposition (which CUDA graphs run beside
    the student's step), so the step recomposes only the student's side."""
    from kdbench import tucker

    t, s, logits, y = tensors
    method = methods.get("tucker_recomp")(
        Fixed(s, logits), Fixed(t, logits), {"beta": BETA, "rank": 5, "target": target}
    )
    a, _, _ = targets = method.teacher_targets(method.teacher_outputs(torch.zeros(6, 1)))
    u = channel_basis(t.numpy(), 5)
    want = t.numpy() if target == "student" else recompose(project(t.numpy(), u), u)
    np.testing.assert_allclose(a.numpy(), want, rtol=1e-4, atol=1e-5)
    calls = []
    original = tucker.recompose
    monkeypatch.setattr(tucker, "recompose", lambda *a: calls.append(1) or original(*a))
    method.student_loss(torch.zeros(6, 1), y, targets)
    assert len(calls) == in_step


@pytest.mark.parametrize("decomposition", ["full", "sample"])
def test_own_basis_guard_counts_and_contains_non_finite_factors(
    tensors, monkeypatch, decomposition
):
    t, s, logits, y = tensors
    student = Fixed(s, logits)
    params = {"rank": 4, "basis": "own", "decomposition": decomposition}
    method = methods.get("tucker")(student, Fixed(t, logits), params)
    _, parts = method.forward_train(torch.zeros(6, 1), y)
    assert torch.isfinite(parts["feature"]) and float(parts["feature"].detach()) > 0
    assert int(method.pop_stats()["guard_fired"]) == 0
    from kdbench import tucker

    name = "decompose_samplewise" if decomposition == "sample" else "decompose"
    real = getattr(tucker, name)
    calls = []

    def poisoned(x, *args, **kwargs):  # the second call decomposes the student: poison it
        core, factors = real(x, *args, **kwargs)
        calls.append(1)
        if len(calls) % 2 == 0:
            factors = [f * float("nan") for f in factors]
        return core, factors

    monkeypatch.setattr(tucker, name, poisoned)
    _, parts = method.forward_train(torch.zeros(6, 1), y)
    assert float(parts["feature"].detach()) == 0.0
    sum(parts.values()).backward()
    assert torch.isfinite(student.s3.grad).all()
    assert int(method.pop_stats()["guard_fired"]) == 1
    assert int(method.pop_stats()["guard_fired"]) == 0  # reset per epoch


def test_variant_names():
    tucker = methods.get("tucker").expand_variants(
        {"ranks": [32, [16, 2, 2]], "decomposition": ["full", "sample"], "basis": ["teacher"]}
    )
    assert list(tucker) == [
        "full-teacher-r32",
        "sample-teacher-r32",
        "full-teacher-r16x2x2",
        "sample-teacher-r16x2x2",
    ]
    recomp = methods.get("tucker_recomp").expand_variants({"targets": ["both"], "ranks": [8]})
    assert list(recomp) == ["both-r8"] and recomp["both-r8"]["beta"] == 125.0


ALL = [
    ("featuremap", {}),
    ("tucker", {"rank": 8}),
    ("tucker", {"rank": 8, "decomposition": "sample"}),
    ("tucker", {"rank": [8, 1, 1], "basis": "own"}),
    ("tucker_recomp", {"rank": 8, "target": "both"}),
]


@pytest.mark.parametrize(("name", "params"), ALL)
def test_gradients_reach_the_student_and_never_the_teacher(name, params):
    torch.manual_seed(0)
    student, teacher = models.build("resnet8", 10, 1), models.build("resnet8", 10, 1)
    method = methods.get(name)(student, teacher, params)
    method.train()
    _, parts = method.forward_train(torch.randn(5, 1, 8, 8), torch.arange(5))
    parts["feature"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.layer3[0].conv1.weight.grad.abs().sum() > 0
    assert float(parts["feature"].detach()) > 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    train_digits(d, role="teacher", variant="teacher")
    return d / "model_best.pt"


@pytest.mark.parametrize(("name", "params"), ALL)
def test_one_epoch_of_training(tmp_path, teacher, name, params):
    doc = train_digits(
        tmp_path,
        method=name,
        variant="v",
        method_params=params,
        # 1168 = 5×200 + 168: a short last batch
        train={"epochs": 1, "batch_size": 200, "device": "cpu"},
        teacher="resnet8",
        teacher_weights=teacher,
    )
    epoch = doc["epochs"][0]
    assert (
        set(epoch["train_loss_parts"]) == {"ce", "feature"}
        and epoch["train_loss_parts"]["feature"] > 0
    )
    if params.get("basis") == "own":
        assert epoch["method_stats"]["guard_fired"] == 0
    # the solver that ran, where a sample-wise decomposition did (the method's provenance)
    sample = params.get("decomposition") == "sample"
    assert doc["provenance"].get("samplewise_solver") == ("eigh" if sample else None)


class Lines(logging.Handler):
    """The messages logged to the logger it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_samplewise_tucker_trains_alike_with_either_solver(tmp_path, teacher, monkeypatch):
    """train.samplewise_solver: svd (one batched SVD of the unfoldings) trains sample-wise
    Tucker as eigh does, up to rounding (16×16 digits: stage 3 is 64 channels of 4×4, so the
    unfoldings have the 16 columns that rank 8 needs), also where the SVD fails on a batch
    (eigh's factors then, counted in method_stats.svd_fallbacks); metrics.json names the
    solver that ran."""
    from kdbench import tucker

    svd, calls = torch.linalg.svd, []

    def failing_twice(a: torch.Tensor, **kw: object) -> tuple:
        calls.append(a.shape)
        if len(calls) in (2, 5):  # the second and fifth batches' SVDs give up
            raise torch.linalg.LinAlgError("linalg.svd: failed to converge")
        return svd(a, **kw)

    monkeypatch.setattr(torch.linalg, "svd", failing_twice)
    kdlog, lines = logging.getLogger("kdbench"), Lines()
    level = kdlog.level
    kdlog.addHandler(lines)
    kdlog.setLevel(logging.INFO)
    docs = {}
    with tucker.solving(), contextlib.ExitStack() as undo:  # prepare sets the solver
        undo.callback(kdlog.setLevel, level)
        undo.callback(kdlog.removeHandler, lines)
        for solver in ("eigh", "svd"):
            docs[solver] = train_digits(
                tmp_path / solver,
                method="tucker",
                variant="v",
                method_params={"rank": 8, "decomposition": "sample"},
                data={"image_size": 16},
                train={
                    "epochs": 1,
                    "batch_size": 200,
                    "device": "cpu",
                    "samplewise_solver": solver,
                },
                teacher="resnet8",
                teacher_weights=teacher,
            )
            if solver == "eigh":
                assert calls == []
    assert (200, 64, 16) in calls  # each batch's decomposition: one SVD
    for solver, doc in docs.items():
        assert doc["provenance"]["samplewise_solver"] == solver
        fallbacks = 2 if solver == "svd" else 0
        assert doc["epochs"][0]["method_stats"]["svd_fallbacks"] == fallbacks
        assert doc["final"]["method_stats"]["svd_fallbacks"] == fallbacks
    # the epoch's log line names the counters that are not zero
    epochs = [line for line in lines.lines if "epoch 1/1" in line]
    assert len(epochs) == 2 and "svd_fallbacks" not in epochs[0]
    assert "(ce " in epochs[1] and "; svd_fallbacks 2) train" in epochs[1]
    (a,), (b,) = docs["eigh"]["epochs"], docs["svd"]["epochs"]
    # the epoch's mean loss to rounding; its last weights (6 steps of lr 0.05 from factors that
    # differ by rounding, β = 125) a little further
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["train_loss_parts"]["feature"] == pytest.approx(
        b["train_loss_parts"]["feature"], rel=1e-4
    )
    for key in ("val_loss", "test_loss"):
        assert a[key] == pytest.approx(b[key], rel=5e-3)


def test_bad_ranks_fail_at_validation():
    tucker = methods.get("tucker")
    shape = {3: (64, 4, 4)}
    with pytest.raises(KdbenchError, match="exceeds"):
        tucker.check({"stage": 3, "rank": 65}, shape.get)
    with pytest.raises(KdbenchError, match="need 3 entries"):
        tucker.check({"stage": 3, "rank": [8, 2]}, shape.get)
    with pytest.raises(KdbenchError, match="exceeds"):
        tucker.check({"stage": 3, "rank": [8, 5, 4]}, shape.get)


@pytest.fixture(scope="module")
def paraphraser(tmp_path_factory, teacher):
    d = tmp_path_factory.mktemp("paraphraser")
    doc = paraphrase_digits(d, teacher)
    assert doc["status"] == "complete" and len(doc["epochs"]) == 3
    losses = [e["val_loss"] for e in doc["epochs"]]
    assert doc["final"]["selected_epoch"] == 1 + losses.index(min(losses))
    assert (d / "P.png").read_bytes()[:4] == b"\x89PNG" and not (d / "state.pt").exists()
    return d / "p.pt"


def test_ft_gradients_reach_student_and_translator_only(paraphraser):
    torch.manual_seed(0)
    student, teacher = models.build("resnet8", 10, 1), models.build("resnet8", 10, 1)
    method = methods.get("ft")(student, teacher, {}, {"paraphraser": paraphraser})
    assert set(method.trainable()) == {"student", "translator"}
    method.train()
    _, parts = method.forward_train(torch.randn(5, 1, 8, 8), torch.arange(5))
    parts["feature"].backward()
    frozen = method._paraphraser[0]
    assert all(p.grad is None for p in [*teacher.parameters(), *frozen.parameters()])
    assert all(p.grad is not None for p in method.translator.parameters())
    assert student.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_ft_one_epoch(tmp_path, teacher, paraphraser):
    ft = {"method": "ft", "train": {"epochs": 1, "batch_size": 200, "device": "cpu"}}
    ft |= {"teacher": "resnet8", "teacher_weights": teacher}
    doc = train_digits(tmp_path, **ft, assets={"paraphraser": str(paraphraser)})
    assert doc["epochs"][0]["train_loss_parts"]["feature"] > 0
    assert len(doc["config"]["assets"]["paraphraser"]["sha256"]) == 64
    with pytest.raises(KdbenchError, match="needs paraphraser"):
        train_digits(tmp_path, **ft)
