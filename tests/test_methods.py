import math

import pytest
import torch

from kdbench import methods, models
from kdbench.errors import KdbenchError
from kdbench.methods.kd import kd_loss


def test_kd_loss_against_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    T, alpha = 2.0, 0.9

    def softmax(row, temp):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    ce = 0.0
    for srow, trow, label in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        ps, pt = softmax(srow, T), softmax(trow, T)
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
        ce += -math.log(softmax(srow, 1.0)[label])
    expected = alpha * T * T * kl / 2 + (1 - alpha) * ce / 2
    assert kd_loss(s, t, y, T, alpha).item() == pytest.approx(expected, rel=1e-6)
    # alpha = 0 is plain cross-entropy; identical logits leave only the hard part
    assert kd_loss(s, t, y, T, 0.0).item() == pytest.approx(ce / 2, rel=1e-6)
    assert kd_loss(s, s, y, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_registry_has_the_methods_of_this_release():
    assert {"vanilla", "kd"} <= set(methods.available())
    assert methods.get("kd").needs_teacher and not methods.get("vanilla").needs_teacher
    with pytest.raises(KdbenchError, match="unknown method"):
        methods.get("nope")


def test_variants_and_parameters():
    kd = methods.get("kd")
    assert kd.expand_variants(None) == {"default": {"T": 2.0, "alpha": 0.9, "label_smoothing": 0.0}}
    expanded = kd.expand_variants({"T": 3.0, "variants": {"T4": {"T": 4.0}, "a05": {"alpha": 0.5}}})
    assert expanded["T4"]["T"] == 4.0 and expanded["a05"] == {
        "T": 3.0,
        "alpha": 0.5,
        "label_smoothing": 0.0,
    }
    with pytest.raises(KdbenchError, match="unknown parameter 'beta'"):
        kd.expand_variants({"beta": 1})
    with pytest.raises(KdbenchError, match="bad name"):
        kd.expand_variants({"variants": {"a/b": {}}})


def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    torch.manual_seed(0)
    student = models.build("resnet8", 10, 1)
    teacher = models.build("resnet8", 10, 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = methods.get("kd")(student, teacher, {})
    method.train()
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert "teacher" not in dict(method.named_modules())  # not a trainable submodule
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    logits, parts = method.forward_train(x, y)
    sum(parts.values()).backward()
    assert set(parts) == {"hard", "soft"} and logits.shape == (4, 10)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched too


def test_a_method_needing_a_teacher_refuses_to_run_without_one():
    with pytest.raises(KdbenchError, match="needs a teacher"):
        methods.get("kd")(models.build("resnet8", 10), None, {})


def test_vanilla_uses_label_smoothing():
    torch.manual_seed(0)
    m = methods.get("vanilla")(models.build("resnet8", 10, 1), None, {"label_smoothing": 0.1})
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    logits, parts = m.forward_train(x, y)
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(parts["ce"], expected)
