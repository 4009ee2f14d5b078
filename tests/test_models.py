import pytest
import torch

from kdbench import models
from kdbench.errors import KdbenchError

# REFERENCE §1
COUNTS = {
    "resnet110": (1_736_564, 1_730_714),
    "resnet56": (861_620, 855_770),
    "resnet20": (278_324, 272_474),
    "resnet8": (83_892, 78_042),
    # not in REFERENCE §1: resnet20 plus two blocks per stage, 2 × (4,672 + 18,560 + 73,984)
    "resnet32": (278_324 + 2 * 97_216, 272_474 + 2 * 97_216),
}


@pytest.mark.parametrize("arch", sorted(COUNTS))
def test_parameter_counts(arch):
    hundred, ten = COUNTS[arch]
    assert models.num_parameters(models.build(arch, 100)) == hundred
    assert models.num_parameters(models.build(arch, 10)) == ten


@pytest.mark.parametrize(("arch", "in_channels", "size"), [("resnet8", 3, 32), ("resnet20", 1, 16)])
def test_forward_returns_stages_and_logits(arch, in_channels, size):
    model = models.build(arch, 10, in_channels)
    s1, s2, s3, logits = model(torch.randn(2, in_channels, size, size))
    assert s1.shape == (2, 16, size, size)
    assert s2.shape == (2, 32, size // 2, size // 2)
    assert s3.shape == (2, 64, size // 4, size // 4)
    assert logits.shape == (2, 10)
    assert (s3 >= 0).all()  # post-ReLU


def test_aliases_and_errors():
    assert models.canonical_arch("ResNetBaby") == "resnet8"
    assert models.canonical_arch("ResNet112") == "resnet110"
    assert models.canonical_arch("ResNet56") == "resnet56"
    assert models.num_parameters(models.build("ResNet112", 100)) == COUNTS["resnet110"][0]
    with pytest.raises(KdbenchError, match="unknown architecture 'resnet9'"):
        models.build("resnet9", 10)


def test_shortcuts_are_option_b():
    model = models.build("resnet20", 10)
    block = model.layer2[0]
    conv, bn = block.shortcut
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)


def test_folded_batchnorm_gives_the_same_outputs_with_fewer_kernels():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = models.build("resnet20", 10)
    for m in model.modules():  # batch norms that do something: non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = models.fold_batchnorm(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        with Ops() as plain_ops:
            want = model(x)
        with Ops() as folded_ops:
            got = folded(x)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # the stem, 2 per block (9 blocks) and the 2 projection shortcuts
    assert plain_ops.names.count("batch_norm") == 1 + 2 * 9 + 2
    assert "batch_norm" not in folded_ops.names
    assert len(folded_ops.names) == len(plain_ops.names) - 21
    assert not any(p.requires_grad for p in folded.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # unchanged

    half = models.fold_batchnorm(model, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        logits = half(x.bfloat16())[-1].float()
    torch.testing.assert_close(logits, want[-1], rtol=0.1, atol=0.1)


def test_a_stack_computes_each_student_from_its_own_weights():
    torch.manual_seed(0)
    students = [models.build("resnet8", 10, 1) for _ in range(3)]
    state = torch.get_rng_state()
    stacked = models.stack(students)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is not used
    conv = stacked.layer2[0].conv1
    assert conv.groups == 3 and conv.weight.shape == (3 * 32, 16, 3, 3)
    assert stacked.linear.weight.shape == (3, 10, 64)
    assert models.num_parameters(stacked) == 3 * models.num_parameters(students[0])
    x = torch.rand(5, 1, 12, 12)
    outs = models.unstacked(stacked(x), 3)  # training mode: batch statistics
    for student, share in zip(students, outs, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(student(x), share, strict=True))
    # a gradient of one student's loss reaches that student's share of the stack alone
    outs[1][-1].sum().backward()
    grad = stacked.layer3[0].conv2.weight.grad
    assert grad[:64].abs().sum() == grad[128:].abs().sum() == 0 and grad[64:128].abs().sum() > 0
    for i, student in enumerate(students):
        models.alias(stacked, student, i)
    assert torch.equal(students[2].bn1.running_mean, stacked.bn1.running_mean[32:])
    with torch.no_grad():
        stacked.linear.weight[2].zero_()
    assert students[2].linear.weight.abs().sum() == 0 < students[1].linear.weight.abs().sum()
    with pytest.raises(KdbenchError, match="one architecture and dataset"):
        models.stack([students[0], models.build("resnet20", 10, 1)])
    with pytest.raises(KdbenchError, match="two or more CIFAR ResNets"):
        models.stack(students[:1])
