"""kdbench.cohort.Cohort: several students trained on one teacher pass per batch, each as it
trains alone."""

from __future__ import annotations

import json

import pytest
import torch

from kdbench import bench, io, methods, models
from kdbench.cohort import Cohort
from kdbench.data import Loader, Split
from kdbench.errors import KdbenchError
from kdbench.methods.ft import Paraphraser
from kdbench.train import TrainConfig, make_schedule, make_sgd, train_epoch

MEMBERS = [
    ("vanilla", {}),
    ("kd", {}),
    ("featuremap", {}),
    ("ft", {}),
    ("tucker", {"rank": 4}),
    ("tucker", {"rank": 4, "decomposition": "sample"}),
    ("tucker_recomp", {"rank": 4, "target": "both"}),
]


def _loader():
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(40, 3, 16, 16, generator=g), torch.randint(0, 10, (40,), generator=g))
    return Loader(split, 8, "cpu", (0.5,) * 3, (0.25,) * 3, train=True, crop_padding=2, flip=True)


def _members(tmp_path, teacher):
    paraphraser = tmp_path / "paraphraser.pt"
    torch.manual_seed(1)
    io.save_torch(paraphraser, Paraphraser(64, 0.5).state_dict())
    out = []
    for name, params in MEMBERS:
        torch.manual_seed(0)
        cls = methods.get(name)
        assets = {"paraphraser": paraphraser} if "paraphraser" in cls.requires else {}
        out.append(cls(models.build("resnet8", 10, 3), teacher, params, assets))
    return out


def _train(method, epochs=2):
    cfg = TrainConfig(epochs=epochs, lr=0.05)
    opts = {k: make_sgd(m, cfg) for k, m in method.trainable().items()}
    schedules = [make_schedule(o, cfg) for o in opts.values()]
    totals = []
    for epoch in range(epochs):
        totals.append(train_epoch(method, opts, _loader(), epoch, torch.device("cpu"), cfg))
        for s in schedules:
            s.step()
    return totals


def test_each_member_trains_as_it_does_alone(tmp_path):
    torch.manual_seed(2)
    teacher = models.build("resnet8", 10, 3)
    alone = _members(tmp_path, teacher)
    alone_totals = [_train(m) for m in alone]
    labels = [bench._label(*c) for c in MEMBERS]
    cohort = Cohort(_members(tmp_path, teacher), labels)
    assert cohort.graph_mode() == "split" and len(cohort.students()) == len(MEMBERS)
    calls = []
    forward = teacher.forward
    teacher.forward = lambda x: calls.append(1) or forward(x)
    totals = _train(cohort)
    assert len(calls) == 2 * 5  # one teacher pass per batch, for all members
    for label, m, own in zip(labels, cohort.members, alone_totals, strict=True):
        lone = alone[labels.index(label)]
        for key, module in m.trainable().items():  # the student, FT's translator
            want, got = lone.trainable()[key].state_dict(), module.state_dict()
            assert all(torch.equal(want[k], got[k]) for k in want), (label, key)
        for epoch in range(2):
            parts = {k: v for k, v in totals[epoch].parts.items() if k.startswith(f"{label}/")}
            assert parts == {f"{label}/{k}": v for k, v in own[epoch].parts.items()}
    # the first member's predictions count as the cohort's
    assert [t.correct for t in totals] == [t.correct for t in alone_totals[0]]


def test_a_cohort_needs_one_teacher_and_distinct_labels():
    a, b = models.build("resnet8", 10, 3), models.build("resnet8", 10, 3)
    kd = methods.get("kd")
    with pytest.raises(KdbenchError, match="share one teacher"):
        Cohort(
            [kd(models.build("resnet8", 10, 3), a, {}), kd(models.build("resnet8", 10, 3), b, {})],
            ["x", "y"],
        )
    with pytest.raises(KdbenchError, match="one distinct label per member"):
        Cohort(
            [kd(models.build("resnet8", 10, 3), a, {}), kd(models.build("resnet8", 10, 3), a, {})],
            ["x", "x"],
        )


def test_bench_epochs_times_a_cohort_against_its_members(tmp_path, capsys):
    out = tmp_path / "epochs.json"
    args = ["epochs", "--device", "cpu", "--dataset", "digits", "--train-size", "48"]
    args += ["--batch", "16", "--pair", "resnet20:resnet8", "--epochs", "1", "--warmup", "1"]
    args += ["--no-reference", "--methods", "kd", "tucker full-teacher-r32", "--cohort"]
    assert bench.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["epochs"]
    own = {r["method"]: r for r in rows if r["setting"] == "default"}
    (cohort,) = [r for r in rows if r["setting"] == "cohort"]
    assert cohort["method"] == "cohort of 2"
    assert cohort["members"] == ["kd", "tucker full-teacher-r32"]
    total = own["kd"]["train_seconds"] + own["tucker full-teacher-r32"]["train_seconds"]
    assert cohort["members_train_seconds"] == pytest.approx(total)
    assert cohort["ratio_to_members"] == pytest.approx(cohort["train_seconds"] / total)
    assert "its members one by one" in capsys.readouterr().out
