"""kdbench.cohort.Cohort: several students trained on one teacher pass per batch, each as it
trains alone."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kdbench import bench, io, methods, models, runs, tucker
from kdbench.cohort import Cohort
from kdbench.data import Loader, Split, load_dataset
from kdbench.errors import KdbenchError
from kdbench.methods.ft import Paraphraser
from kdbench.train import (
    TrainConfig,
    evaluate,
    evaluate_each,
    evaluate_runs,
    make_schedule,
    make_sgd,
    prepare,
    train_epoch,
)

MEMBERS = [
    ("vanilla", {}),
    ("kd", {}),
    ("featuremap", {}),
    ("ft", {}),
    ("tucker", {"rank": 4}),
    ("tucker", {"rank": 4, "decomposition": "sample"}),
    ("tucker_recomp", {"rank": 4, "target": "both"}),
]


def _loader(channels_last=False):
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(40, 3, 16, 16, generator=g), torch.randint(0, 10, (40,), generator=g))
    norm = (0.5,) * 3, (0.25,) * 3
    return Loader(
        split, 8, "cpu", *norm, train=True, crop_padding=2, flip=True, channels_last=channels_last
    )


def _members(tmp_path, teacher, channels_last=False):
    paraphraser = tmp_path / "paraphraser.pt"
    torch.manual_seed(1)
    io.save_torch(paraphraser, Paraphraser(64, 0.5).state_dict())
    out = []
    for name, params in MEMBERS:
        torch.manual_seed(0)
        cls = methods.get(name)
        assets = {"paraphraser": paraphraser} if "paraphraser" in cls.requires else {}
        out.append(cls(models.build("resnet8", 10, 3), teacher, params, assets))
        if channels_last:  # the member and the teacher, in place
            out[-1].to(memory_format=torch.channels_last)
    return out


def _train(method, epochs=2, channels_last=False):
    cfg = TrainConfig(epochs=epochs, lr=0.05)
    opts = {k: make_sgd(m, cfg) for k, m in method.trainable().items()}
    schedules = [make_schedule(o, cfg) for o in opts.values()]
    totals = []
    for epoch in range(epochs):
        loader = _loader(channels_last)
        totals.append(train_epoch(method, opts, loader, epoch, torch.device("cpu"), cfg))
        for s in schedules:
            s.step()
    return totals


def _alone(tmp_path, channels_last=False):
    """A teacher, :data:`MEMBERS` of it each trained alone, their epoch totals and labels
    (``channels_last``: weights and batches in that layout)."""
    torch.manual_seed(2)
    teacher = models.build("resnet8", 10, 3)
    alone = _members(tmp_path, teacher, channels_last)
    totals = [_train(m, channels_last=channels_last) for m in alone]
    return teacher, alone, totals, [bench._label(*c) for c in MEMBERS]


def test_each_member_trains_as_it_does_alone(tmp_path, monkeypatch):
    teacher, alone, alone_totals, labels = _alone(tmp_path)
    cohort = Cohort(_members(tmp_path, teacher), labels)
    assert cohort.graph_mode() == "split" and len(cohort.students()) == len(MEMBERS)
    calls = []
    forward = teacher.forward
    teacher.forward = lambda x: calls.append(1) or forward(x)
    decompositions = []
    decompose = tucker.decompose
    monkeypatch.setattr(
        tucker, "decompose", lambda *a: decompositions.append(a[1]) or decompose(*a)
    )
    totals = _train(cohort)
    assert len(calls) == 2 * 5  # one teacher pass per batch, for all members
    # tucker full-teacher-r4 and tucker_recomp both-r4 share the teacher's decomposition
    assert decompositions == [(8, 4, 4, 4)] * (2 * 5)
    _assert_as_alone(cohort, totals, alone, alone_totals)

    # each member on a stream of its own (train.cohort_streams): torch's CPU stand-ins here, so
    # this checks that every member's pass runs under its own stream and nothing changes
    entered = []
    stream = torch.cpu.stream
    monkeypatch.setattr(torch.cpu, "stream", lambda s: entered.append(s) or stream(s))
    cohort = Cohort(_members(tmp_path, teacher), labels, streams=True)
    totals = _train(cohort)
    streams = cohort.member_streams(torch.device("cpu"))
    assert len(set(map(id, streams))) == len(MEMBERS)
    assert entered == streams * (2 * 5)  # every member, every step, on its own stream
    _assert_as_alone(cohort, totals, alone, alone_totals)


def test_a_stacked_cohort_trains_each_member_as_alone_up_to_rounding(tmp_path, monkeypatch):
    teacher, alone, alone_totals, labels = _alone(tmp_path)
    cohort = Cohort(_members(tmp_path, teacher), labels, streams=True, stack=True)
    (stack,) = cohort.stacks
    assert stack.n == len(MEMBERS) and cohort.compiled()[0] is stack
    assert list(cohort.trainable()) == ["stack0/student", "ft/translator"]
    ran = []  # the members' own students never run while the stack trains
    for m in cohort.members:
        monkeypatch.setattr(m.student, "forward", lambda x: ran.append(x))
    totals = _train(cohort)
    monkeypatch.undo()
    assert not ran
    _assert_stacked_as_alone(labels, cohort, totals, alone, alone_totals)
    # each member's student is its share of the stack, outputs bit for bit
    x = torch.rand(4, 3, 16, 16)
    cohort.eval()
    with torch.no_grad():
        shares = models.unstacked(stack(x), len(MEMBERS))
        for m, share in zip(cohort.members, shares, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(m.student(x), share, strict=True))
    # evaluated: the stack once for all its students, each with its own network's scores
    assert cohort.evaluated() == [(stack, list(range(len(MEMBERS))))]
    loader, cpu, cfg = _loader(), torch.device("cpu"), TrainConfig()
    each = [evaluate(m.student, loader, cpu, cfg) for m in cohort.members]
    assert evaluate_each(stack, loader, cpu, cfg) == each
    both = evaluate_runs(cohort, len(MEMBERS), (loader, loader), cpu, cfg)
    assert both == [(own, own) for own in each]
    with pytest.raises(KdbenchError, match="8 runs, but the method evaluates"):
        evaluate_runs(cohort, 8, (loader, loader), cpu, cfg)
    # converted (channels_last), the students still point at the stack
    cohort.to(memory_format=torch.channels_last)
    with torch.no_grad():
        stack.linear.bias.add_(1.0)
        stack.layer1[0].conv1.weight.mul_(2.0)
    student = cohort.members[3].student
    assert torch.equal(student.linear.bias, stack.linear.bias[3])
    assert torch.equal(student.layer1[0].conv1.weight, stack.layer1[0].conv1.weight[48:64])
    # unstacked again: each student keeps the weights it had, in tensors of its own
    before = [{k: v.clone() for k, v in m.student.state_dict().items()} for m in cohort.members]
    cohort.set_stack(False)
    assert not cohort.stacks and list(cohort.trainable())[0] == "vanilla/student"
    assert cohort.evaluated() == [(m.student, [i]) for i, m in enumerate(cohort.members)]
    with torch.no_grad():
        stack.linear.bias.add_(1.0)
    for m, state in zip(cohort.members, before, strict=True):
        assert all(torch.equal(v, state[k]) for k, v in m.student.state_dict().items())
    cohort.train()
    cohort.members[0].student(x)  # unstacked, a student runs itself again


def test_a_stacked_cohort_in_channels_last_trains_each_member_as_alone_up_to_rounding(tmp_path):
    # the layout that train.channels_last (the default) gives runs on the host too, where
    # oneDNN's grouped convolutions are other kernels than its plain ones
    teacher, alone, alone_totals, labels = _alone(tmp_path, channels_last=True)
    members = _members(tmp_path, teacher, channels_last=True)
    cohort = Cohort(members, labels, streams=True, stack=True)
    cohort.to(memory_format=torch.channels_last)  # the stack, as train.prepare converts it
    (stack,) = cohort.stacks
    assert stack.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    totals = _train(cohort, channels_last=True)
    _assert_stacked_as_alone(labels, cohort, totals, alone, alone_totals)


def _assert_stacked_as_alone(labels, cohort, totals, alone, alone_totals):
    """Each member of a stacked cohort trained as alone: weights and loss parts up to
    rounding."""
    for label, m, lone, own in zip(labels, cohort.members, alone, alone_totals, strict=True):
        for key, module in m.trainable().items():  # the student, FT's translator
            want, got = lone.trainable()[key].state_dict(), module.state_dict()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-3)
        for epoch in range(2):
            parts = {k: v for k, v in totals[epoch].parts.items() if k.startswith(f"{label}/")}
            want = {f"{label}/{k}": v for k, v in own[epoch].parts.items()}
            assert parts == pytest.approx(want, rel=1e-4)


def test_a_stacked_cohort_refuses_a_method_that_runs_its_student_itself():
    kd = methods.get("kd")

    class Direct(kd):  # not through Method.student_outputs: it would not train
        def forward_train(self, x, y):
            logits = self.student(x)[-1]
            return logits, {"ce": torch.nn.functional.cross_entropy(logits, y)}

    teacher = models.build("resnet8", 10, 3)
    students = [models.build("resnet8", 10, 3) for _ in range(2)]
    members = [Direct(students[0], teacher, {}), kd(students[1], teacher, {})]
    cohort = Cohort(members, ["direct", "kd"], stack=True)
    with pytest.raises(KdbenchError, match=r"method 'kd' runs its student itself.*student_outputs"):
        _train(cohort, epochs=1)


def _assert_as_alone(cohort, totals, alone, alone_totals):
    """Every member of ``cohort`` has the weights, loss parts and training accuracy of its run
    alone (``alone``, ``alone_totals``)."""
    labels = cohort.labels
    for label, m, own in zip(labels, cohort.members, alone_totals, strict=True):
        lone = alone[labels.index(label)]
        for key, module in m.trainable().items():  # the student, FT's translator
            want, got = lone.trainable()[key].state_dict(), module.state_dict()
            assert all(torch.equal(want[k], got[k]) for k in want), (label, key)
        for epoch in range(2):
            parts = {k: v for k, v in totals[epoch].parts.items() if k.startswith(f"{label}/")}
            assert parts == {f"{label}/{k}": v for k, v in own[epoch].parts.items()}
    for i, own in enumerate(alone_totals):  # every member's own training accuracy
        assert [t.correct[i] for t in totals] == [t.correct for t in own]


def test_shared_work_is_computed_once_per_sharing_scope_and_never_outside_one():
    from kdbench.methods.base import shared, sharing

    calls = []

    def work(value):
        return lambda: calls.append(value) or value

    assert shared("k", work(1)) == 1 and shared("k", work(2)) == 2  # no scope: every call
    with sharing():
        assert shared("k", work(3)) == 3 and shared("k", work(4)) == 3
        assert shared("other", work(5)) == 5
        with sharing():  # an inner scope shares nothing with the outer one
            assert shared("k", work(6)) == 6
        assert shared("k", work(7)) == 3
    with pytest.raises(RuntimeError), sharing():
        shared("k", work(8))
        raise RuntimeError("a failed step")
    assert shared("k", work(9)) == 9  # the failed scope was closed
    assert calls == [1, 2, 3, 5, 6, 8, 9]
    # a scope is its thread's (train.targets_thread makes targets on another)
    with sharing(), ThreadPoolExecutor(1) as other:
        assert shared("k", work(10)) == 10
        assert other.submit(shared, "k", work(11)).result() == 11
        assert shared("k", work(12)) == 10


def test_a_cohort_s_provenance_is_its_members_under_their_labels():
    """Method.provenance: what a member records of how it ran (sample-wise Tucker's solver),
    which fit_runs gives that member's metrics.json alone."""
    teacher = models.build("resnet8", 10, 3)
    members = [
        methods.get("kd")(models.build("resnet8", 10, 3), teacher, {}),
        methods.get("tucker")(
            models.build("resnet8", 10, 3), teacher, {"rank": 4, "decomposition": "sample"}
        ),
        methods.get("tucker")(models.build("resnet8", 10, 3), teacher, {"rank": 4}),
    ]
    cohort = Cohort(members, ["kd", "sample", "full"])
    with tucker.solving(samplewise_solver="svd"):
        assert cohort.provenance(torch.device("cpu")) == {"sample/samplewise_solver": "svd"}
    assert cohort.provenance(torch.device("cuda")) == {"sample/samplewise_solver": "svd"}
    assert cohort.provenance(torch.device("cpu")) == {"sample/samplewise_solver": "eigh"}


def test_train_cohort_streams_gives_each_member_a_stream_of_its_own():
    teacher = models.build("resnet8", 10, 3)
    kd = methods.get("kd")
    cohort = Cohort([kd(models.build("resnet8", 10, 3), teacher, {}) for _ in "ab"], ["a", "b"])
    cpu = torch.device("cpu")
    assert cohort.member_streams(cpu) == []  # a Cohort's own default: off
    prepare(cohort, TrainConfig(), cpu)  # the trainer's: on
    streams = cohort.member_streams(cpu)
    assert len(streams) == 2 and streams[0] is not streams[1]
    assert cohort.member_streams(cpu) == streams  # made once
    prepare(cohort, TrainConfig(cohort_streams=False), cpu)
    assert cohort.member_streams(cpu) == []


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
    args += ["--no-reference", "--methods", "kd", "tucker full-teacher-r32", "--cohort-streams"]
    assert bench.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["epochs"]
    own = {r["method"]: r for r in rows if r["setting"] == "default"}
    # the cohort, then the cohort with each member on a stream of its own
    cohort, streams = [r for r in rows if r["setting"] == "cohort"]
    assert cohort["method"] == "cohort of 2" and streams["method"] == "cohort of 2 on streams"
    assert not cohort["train_config"]["cohort_streams"]
    assert streams["train_config"]["cohort_streams"]
    total = own["kd"]["train_seconds"] + own["tucker full-teacher-r32"]["train_seconds"]
    for row in (cohort, streams):
        assert row["members"] == ["kd", "tucker full-teacher-r32"]
        assert row["members_train_seconds"] == pytest.approx(total)
        assert row["ratio_to_members"] == pytest.approx(row["train_seconds"] / total)
    assert "its members one by one" in capsys.readouterr().out
    # the cohort alone (what each run of `concurrent --cohort` trains), on streams by default
    args[args.index("--cohort-streams")] = "--cohort"
    assert bench.main([*args, "--only-cohort", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["epochs"]
    assert row["method"] == "cohort of 2 on streams" and "members_train_seconds" not in row
    # --cohort-stack: the cohort as set, then stacked (one network for both resnet8 students)
    args[args.index("--cohort")] = "--cohort-stack"
    assert bench.main([*args, "--only-cohort", "--json", str(out)]) == 0
    plain, stacked = json.loads(out.read_text())["epochs"]
    assert plain["method"] == "cohort of 2 on streams" and not plain["train_config"]["cohort_stack"]
    assert stacked["method"] == "cohort of 2 on streams, stacked"
    assert stacked["train_config"]["cohort_stack"] and stacked["train_seconds"] > 0
    assert bench.main([*args[:-1], "--only-cohort"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "bench epochs: --only-cohort needs --cohort, --cohort-streams or --cohort-stack"
    )


def _digits_runs(tmp_path):
    """A digits setting, a teacher checkpoint and 4 members (kd, featuremap, both Tucker
    methods), each with its own outputs below ``tmp_path/<where>/<label>``."""
    data = {"image_size": 8, "val_fraction": 0.15, "test_fraction": 0.2, "split_seed": 0}
    ds = load_dataset("digits", **data)
    torch.manual_seed(5)
    teacher = tmp_path / "teacher.pt"
    io.save_torch(teacher, models.build("resnet8", ds.num_classes, ds.in_channels).state_dict())
    members = []
    for method, block in (
        ("kd", {}),
        ("featuremap", {}),
        ("tucker", {"ranks": [4]}),
        ("tucker_recomp", {"ranks": [4], "targets": ["both"]}),
    ):
        ((variant, params),) = methods.get(method).expand_variants(block).items()
        members.append(
            {"arch": "resnet8", "method": method, "variant": variant, "method_params": params}
        )
    train = {"epochs": 2, "batch_size": 128, "device": "cpu", "optimizer": {"lr": 0.05}}
    common = {"dataset": "digits", "data": data, "teacher": "resnet8", "seed": 3, "train": train}
    return common, teacher, members


def _outputs(root, label):
    names = {
        "metrics": "metrics.json",
        "final_weights": "model_final.pt",
        "best_weights": "model_best.pt",
        "loss_plot": "Loss.png",
        "accuracy_plot": "Accuracy.png",
    }
    return {k: str(root / label / v) for k, v in names.items()}


def _killed_after_its_first_state(patch: pytest.MonkeyPatch) -> None:
    """Training stops (KeyboardInterrupt) once its first epoch's state and metrics are written."""
    save = io.StateWriter.save

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        self.wait()
        raise KeyboardInterrupt

    patch.setattr(io.StateWriter, "save", save_then_stop)


@pytest.mark.parametrize("stack", [False, True])
def test_train_cohort_writes_each_members_own_run_and_resumes(tmp_path, monkeypatch, stack):
    """With ``train.cohort_stack`` (one stack of the 4 students) as alone up to rounding."""
    common, teacher, members = _digits_runs(tmp_path)
    labels = [f"resnet8-{m['method']}-{m['variant']}" for m in members]
    for m, label in zip(members, labels, strict=True):
        runs.train(
            role="student",
            arch=m["arch"],
            method=m["method"],
            variant=m["variant"],
            method_params=m["method_params"],
            teacher_weights=teacher,
            outputs=_outputs(tmp_path / "alone", label),
            state=tmp_path / "state" / f"{label}.pt",
            **common,
        )
    cohort = [
        {**m, "outputs": _outputs(tmp_path / "cohort", label)}
        for m, label in zip(members, labels, strict=True)
    ]
    if stack:
        common["train"] = {**common["train"], "cohort_stack": True}
    kwargs = {"name": "c0", "teacher_weights": teacher, "state": tmp_path / "c0.pt", **common}
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        _killed_after_its_first_state(patch)
        runs.train_cohort(members=cohort, **kwargs)
    docs = runs.train_cohort(members=cohort, **kwargs)
    assert not (tmp_path / "c0.pt").exists()
    for doc, label in zip(docs, labels, strict=True):
        own = json.loads((tmp_path / "alone" / label / "metrics.json").read_text())
        got = json.loads((tmp_path / "cohort" / label / "metrics.json").read_text())
        assert got == json.loads(json.dumps(doc)) and got["status"] == "complete"
        assert got["cohort"] == {"name": "c0", "members": labels}
        assert got["final"]["resumed_after_epochs"] == [1]
        assert got["run"] == own["run"]
        if stack:
            assert got["config"]["train"].pop("cohort_stack") is True
            own["config"]["train"].pop("cohort_stack")
        assert got["config"] == own["config"]
        for a, b in zip(got["epochs"], own["epochs"], strict=True):
            a.pop("epoch_seconds"), b.pop("epoch_seconds")
            if stack:  # losses up to rounding; accuracies within an image (0.28 points)
                parts = a.pop("train_loss_parts")
                assert parts == pytest.approx(b.pop("train_loss_parts"), rel=1e-3), label
                for key in ("train_acc", "val_acc", "test_acc"):
                    assert a.pop(key) == pytest.approx(b.pop(key), abs=0.5), (label, key)
                assert a.pop("method_stats", None) == b.pop("method_stats", None)
            assert a == (pytest.approx(b, rel=1e-3) if stack else b), label
        for name in ("model_final.pt", "model_best.pt"):
            want = io.load_torch(tmp_path / "alone" / label / name)
            have = io.load_torch(tmp_path / "cohort" / label / name)
            assert want.keys() == have.keys()
            for k in want:
                if stack:  # featuremap's L1 loss, whose gradient is a sign, moves most (1.6e-3)
                    torch.testing.assert_close(have[k], want[k], rtol=1e-2, atol=1e-2)
                else:
                    assert torch.equal(want[k], have[k]), (label, name)
        assert (tmp_path / "cohort" / label / "Loss.png").stat().st_size > 0


def test_a_cohorts_state_resumes_only_as_it_was_stacked(tmp_path, monkeypatch, caplog):
    """train.cohort_stack as it resolves on the device guards the state: auto on CPU (not
    stacked) resumes as false does; a stacked cohort (true) does not take it, and starts over."""
    common, teacher, members = _digits_runs(tmp_path)
    members = members[:2]
    cohort = [{**m, "outputs": _outputs(tmp_path / "cohort", m["method"])} for m in members]
    kwargs = {"name": "c0", "teacher_weights": teacher, "state": tmp_path / "c0.pt", **common}
    for setting, resumed in (("auto", None), (False, [1]), ("auto", None), (True, [])):
        kwargs["train"] = {**common["train"], "cohort_stack": setting}
        if resumed is None:
            with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
                _killed_after_its_first_state(patch)
                runs.train_cohort(members=cohort, **kwargs)
            continue
        caplog.clear()
        docs = runs.train_cohort(members=cohort, **kwargs)
        assert [d["final"]["resumed_after_epochs"] for d in docs] == [resumed] * 2
        assert all(d["provenance"]["cohort_stack"] is bool(setting) for d in docs)
        assert ("of a different configuration" in caplog.text) is (not resumed)


def test_link_outputs_links_each_file_dated_now_or_names_the_missing_one(tmp_path):
    source = tmp_path / "cohort" / "resnet8" / "kd" / "default"
    source.mkdir(parents=True)
    (source / "metrics.json").write_text("{}")
    os.utime(source / "metrics.json", (1, 1))  # written long before the member's job
    out = tmp_path / "student" / "metrics.json"
    io.link_outputs(source, [str(out)])
    assert os.path.samefile(out, source / "metrics.json")
    assert out.stat().st_mtime > 1 and not list(out.parent.glob(".*.tmp"))
    with pytest.raises(KdbenchError, match="model_best.pt is missing: its cohort's job"):
        io.link_outputs(source, [str(tmp_path / "student" / "model_best.pt")])
    assert not (tmp_path / "student" / "model_best.pt").exists()


def test_a_non_finite_step_of_one_member_stops_the_cohort_naming_it(tmp_path, monkeypatch):
    common, teacher, members = _digits_runs(tmp_path)
    members = members[:2]  # kd, featuremap
    kd, calls = methods.get("kd"), []
    student_loss = kd.student_loss

    def poisoned(self, x, y, targets):
        logits, parts = student_loss(self, x, y, targets)
        calls.append(1)
        if len(calls) == 3:  # epoch 1, step 3
            parts = {k: v * float("nan") for k, v in parts.items()}
        return logits, parts

    monkeypatch.setattr(kd, "student_loss", poisoned)
    cohort = [{**m, "outputs": _outputs(tmp_path / "cohort", m["method"])} for m in members]
    with pytest.raises(KdbenchError) as err:
        runs.train_cohort(
            members=cohort, name="c0", teacher_weights=teacher, state=tmp_path / "c0.pt", **common
        )
    message = str(err.value)
    assert message.startswith("cohort c0 (dataset=digits teacher=resnet8 seed=3) epoch 1 step 3:")
    assert "non-finite loss or gradient" in message and "\n" not in message
    assert not (tmp_path / "cohort" / "kd" / "metrics.json").exists()
