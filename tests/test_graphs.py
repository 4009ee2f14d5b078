"""kdbench.graphs.GraphedStep's decisions (warm-up, capture, replay, recapture, eager steps),
with torch's CUDA stream and graph API replaced by stand-ins that record what happens (CI has
no GPU; the speed is measured with ``python -m kdbench.bench`` on one)."""

from __future__ import annotations

import contextlib
import functools
import threading

import pytest
import torch
from conftest import paraphrase_digits
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kdbench import bench, faults, graphs, io, methods, models
from kdbench.cohort import Cohort
from kdbench.data import Loader, Split
from kdbench.methods.ft import Paraphraser, Reconstruction
from kdbench.train import (
    TrainConfig,
    evaluate,
    make_schedule,
    make_sgd,
    optimise,
    train_epoch,
)


class FakeGraph:
    def __init__(self, events):
        self.events = events

    def replay(self):
        self.events.append("replay")


class Events(list):
    """What happened, in order; ``capturing`` is non-empty inside a capture."""

    capturing: list[bool]


@pytest.fixture
def events(monkeypatch):
    log = Events()
    capturing = []

    @contextlib.contextmanager
    def graph(g, stream=None):
        log.append("capture" if stream is None else "capture-on-side")
        capturing.append(True)
        try:
            yield
        finally:
            capturing.pop()

    class Stream:
        def __init__(self, priority=0):
            self.priority = priority

        def wait_stream(self, other):
            pass

        def wait_event(self, event):
            log.append("wait-event")

    class Event:
        def record(self):
            log.append("event")

    @contextlib.contextmanager
    def stream(s):
        log.append("side")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: FakeGraph(log))
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    log.capturing = capturing
    return log


def _graphed(
    events,
    method_name="kd",
    fused=True,
    fail=False,
    autocast=None,
    overlap=False,
    pipeline=False,
    thread=False,
    **params,
):
    student = models.build("resnet8", 10, 1)
    teacher = models.build("resnet8", 10, 1)
    if method_name.startswith("tucker"):
        params = {"rank": 4, **params}
    method = methods.get(method_name)(student, teacher, params)
    opt = {"student": make_sgd(student, TrainConfig(fused=fused))}

    def optimise(forward):  # stands for kdbench.train.optimise: records instead of training
        if fail and events.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        events.append("step-in-capture" if events.capturing else "eager")
        return torch.zeros(()), {"ce": torch.zeros(())}, torch.tensor(True)

    autocast = autocast or contextlib.nullcontext
    step = graphs.GraphedStep(
        method, opt, optimise, autocast, overlap=overlap, pipeline=pipeline, thread=thread
    )
    return step, opt["student"]


FULL, LAST = torch.zeros(8, 1, 8, 8), torch.zeros(3, 1, 8, 8)
Y8, Y3 = torch.zeros(8, dtype=torch.long), torch.zeros(3, dtype=torch.long)


def test_warm_up_then_one_capture_replayed_for_the_whole_run(events):
    g, opt = _graphed(events)
    for _ in range(5):
        g(FULL, Y8)
    assert events == ["side", "eager"] * 3 + ["capture", "step-in-capture", "replay", "replay"]
    assert g.status == "whole"
    # the captured update reads the rate from a tensor; the optimizer keeps its float
    (group,) = opt.param_groups
    ((captured, tensor, _),) = g.lrs
    assert captured is group and isinstance(group["lr"], float)
    assert tensor.dtype == torch.float32 and float(tensor) == pytest.approx(group["lr"])
    events.clear()
    g(LAST, Y3)  # the smaller last batch of the epoch
    assert events == ["eager"]
    events.clear()
    group["lr"] *= 0.5  # the schedule's step at the end of the epoch: no new capture
    g(FULL, Y8)
    g(FULL, Y8)
    assert events == ["replay", "replay"]
    assert float(tensor) == pytest.approx(group["lr"]) and isinstance(group["lr"], float)


@pytest.mark.parametrize("method", ["tucker", "tucker_recomp"])
def test_tucker_steps_are_captured_in_two_graphs_around_the_decomposition(events, method):
    inside = []  # non-empty inside the step's autocast

    @contextlib.contextmanager
    def autocast():
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    g, _ = _graphed(events, method, autocast=autocast)
    calls = []
    original = g.method.teacher_targets
    g.method.teacher_targets = lambda outs: calls.append(bool(inside)) or original(outs)
    for _ in range(5):
        g(FULL, Y8)
    # teacher graph captured (and run, for the targets' shapes), then the student's step;
    # the targets made for the capture serve its batch's step, which then replays one graph
    captured = ["capture", "replay", "capture", "step-in-capture"]
    assert events == ["side", "eager"] * 3 + captured + ["replay"] + ["replay", "replay"]
    # eagerly between the graphs, once a batch, under the step's autocast as in eager steps
    assert calls == [True] * 2
    assert g.status == "split"
    assert g.static_targets[0].shape == (8, 64, 2, 2)  # the teacher's stage 3 (8×8 input)


def test_an_overlapped_teacher_runs_on_the_side_stream_beside_the_student_graph(events):
    g, _ = _graphed(events, "kd", overlap=True)
    xs = [torch.rand(8, 1, 8, 8) for _ in range(6)]
    for i in range(3):  # the warm-up
        g(xs[i], Y8, xs[i + 1])
    events.clear()
    g(xs[3], Y8, xs[4])
    # the teacher's graph is captured on the side stream (its cuBLAS workspace is not the
    # student graph's), and run once for the targets' shapes; then the student's step
    assert events[:4] == ["capture-on-side", "replay", "capture", "step-in-capture"]
    # (this batch's targets are the capture's) the next batch's teacher pass on the side
    # stream, before the student graph, which the main stream runs beside it; the side
    # stream's targets copied in behind
    assert events[4:] == ["side", "replay", "event", "replay", "wait-event", "side"]
    events.clear()
    g(xs[4], Y8, xs[5])
    assert events == ["side", "replay", "event", "replay", "wait-event", "side"]
    assert g.status == "split, prefetch, overlap" and g.targets_for is xs[5]
    # the targets are the teacher's outputs; the student's step read them, not the teacher
    assert len(g.static_targets) == 4 and g.static_targets[-1].shape == (8, 10)
    assert g.method._given is None
    # nothing to overlap without a teacher, or where the step is not captured
    assert _graphed(events, "vanilla", overlap=True)[0].status == "whole"
    own = _graphed(events, "tucker", overlap=True, basis="own")[0]
    assert own.status.startswith("eager")


def test_a_pipelined_step_runs_the_teacher_two_batches_ahead_and_the_targets_one(events):
    g, _ = _graphed(events, "tucker", overlap=True, pipeline=True)
    xs = [torch.rand(8, 1, 8, 8) for _ in range(8)]
    for i in range(3):  # the warm-up
        g(xs[i], Y8, xs[i + 1], xs[i + 2])
    events.clear()
    g(xs[3], Y8, xs[4], xs[5])
    assert events[:4] == ["capture-on-side", "replay", "capture", "step-in-capture"]
    ahead = ["wait-event", "side", "replay", "event"]  # a teacher pass on the side stream
    targets = ["wait-event", "side", "event"]  # targets on the third stream, after that pass
    # (this batch's targets are the capture's) this batch's student step first; the teacher
    # on the next two batches, the next one's targets
    assert events[4:] == ["event", "replay", *ahead, *ahead, *targets]
    assert g.targets_for is xs[4] and [p[0] for p in g.pending] == [xs[5]]
    events.clear()
    g(xs[4], Y8, xs[5], xs[6])
    # the student step, the teacher on the batch after next (into the slot whose targets are
    # made: one more wait), the next batch's targets from the pass that ran a step ago
    assert events == ["event", "replay", "wait-event", *ahead, *targets]
    assert g.targets_for is xs[5] and [p[0] for p in g.pending] == [xs[6]]
    assert g.status == "split, prefetch, overlap, pipeline"
    events.clear()
    g(xs[5], Y8, xs[6])  # nothing after the next batch (an epoch's end)
    assert events == ["event", "replay", *targets]
    assert g.targets_for is xs[6] and not g.pending
    # only with the teacher overlapped
    assert not _graphed(events, "tucker", pipeline=True)[0].pipeline


def test_a_threaded_pipeline_hands_each_batch_s_targets_to_the_worker_with_its_teacher_pass(
    events,
):
    """train.targets_thread: the targets of the batch after next go to the worker as soon as
    its teacher pass is queued; the step takes the next batch's, handed over a step earlier."""
    g, _ = _graphed(events, "tucker", overlap=True, pipeline=True, thread=True)
    xs = [torch.rand(8, 1, 8, 8) for _ in range(7)]
    for i in range(3):  # the warm-up
        g(xs[i], Y8, xs[i + 1], xs[i + 2])
    g(xs[3], Y8, xs[4], xs[5])  # the capture; both teacher passes ahead, both to the worker
    assert g.status == "split, prefetch, overlap, pipeline, thread"
    assert g.targets_for is xs[4] and [p[0] for p in g.pending] == [xs[5]]
    ((_, slot, _, future),) = g.pending
    targets, _ = future.result()
    want = g.method.teacher_targets(graphs.tree_unflatten(g.slots[slot], g.slot_spec))
    assert torch.equal(targets[1], want[1])  # the core of that batch's teacher stage
    g(xs[4], Y8, xs[5], xs[6])
    assert g.targets_for is xs[5] and [p[0] for p in g.pending] == [xs[6]]
    assert g.pending[0][3] is not None and g.pending[0][3] is not future
    g(xs[5], Y8, xs[6])  # nothing after the next batch (an epoch's end): the worker is idle
    assert g.targets_for is xs[6] and not g.pending
    # without the pipeline, no thread
    assert not _graphed(events, "tucker", overlap=True, thread=True)[0].thread


def test_a_failed_capture_trains_eagerly_from_then_on(events, caplog):
    g, _ = _graphed(events, fail=True)
    for _ in range(5):
        g(FULL, Y8)
    assert events == ["side", "eager"] * 3 + ["capture", "eager", "eager"]
    assert "CUDA graphs off: capture failed (operation not permitted" in caplog.text
    assert g.status.startswith("eager: capture failed (operation not permitted")


@pytest.mark.parametrize(
    ("method", "fused", "params", "why"),
    [
        ("tucker", True, {"basis": "own"}, "method 'tucker' ("),
        ("kd", False, {}, "optimizer(s) student not fused"),
    ],
)
def test_steps_that_cannot_be_captured_stay_eager(events, caplog, method, fused, params, why):
    g, _ = _graphed(events, method, fused=fused, **params)
    for _ in range(5):
        g(FULL, Y8)
    assert events == ["eager"] * 5
    assert why in caplog.text and g.status.startswith(f"eager: {why}")


#: aten ops that synchronise a CUDA stream with the host (a value read back, or an output whose
#: size depends on the data) or copy host data to the device: a CUDA graph cannot hold them
HOST_SYNC = {
    "_local_scalar_dense",  # .item(), bool(), int(), float() of a tensor
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
    "lift_fresh",  # torch.tensor(python data)
    "lift_fresh_copy",
}


class HostSyncs(TorchDispatchMode):
    """Records every op dispatched (backward included) and those in :data:`HOST_SYNC`."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func._overloadpacket.__name__ in HOST_SYNC:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


#: every method and variant ``bench methods`` times, but Tucker's own basis (never captured)
CAPTURED = [
    (name, {**params, "rank": 4} if "rank" in params else params)
    for name, params in bench.CASES
    if params.get("basis") != "own"
]


@pytest.mark.parametrize(("name", "params"), CAPTURED)
def test_what_graphs_capture_never_synchronises_with_the_host(name, params, tmp_path):
    """What GraphedStep captures, run on the CPU op by op: the whole step (``whole``), or the
    teacher's forward pass and the student's step (``split``; only ``teacher_targets``,
    between the graphs, may synchronise)."""
    torch.manual_seed(0)
    student, teacher = models.build("resnet8", 10, 3), models.build("resnet8", 10, 3)
    cls = methods.get(name)
    assets = {}
    if "paraphraser" in cls.requires:
        io.save_torch(tmp_path / "p.pt", Paraphraser(64, 0.5).state_dict())
        assets = {"paraphraser": tmp_path / "p.pt"}
    method = cls(student, teacher, params, assets)
    cfg = TrainConfig(fused=True)
    opts = {k: make_sgd(m, cfg) for k, m in method.trainable().items()}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    cpu = torch.device("cpu")
    mode = method.graph_mode()
    assert mode in ("whole", "split")
    with HostSyncs() as first:
        if mode == "whole":
            optimise(functools.partial(method.forward_train, x, y), opts, cpu, cfg)
        else:
            outs = method.teacher_outputs(x)
    captured = [first]
    if mode == "split":
        targets = method.teacher_targets(outs)
        with HostSyncs() as second:
            optimise(functools.partial(method.student_loss, x, y, targets), opts, cpu, cfg)
        captured.append(second)
    assert all(c.ops > 20 for c in captured)
    assert [c.syncs for c in captured] == [[] for _ in captured]


def test_the_paraphrasers_step_never_synchronises_with_the_host():
    teacher = models.build("resnet8", 10, 3)
    method = Reconstruction(Paraphraser(64, 0.5), teacher, 3)
    cfg = TrainConfig(fused=True)
    opts = {"student": make_sgd(method.student, cfg)}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with HostSyncs() as seen:
        logits, parts, _ = optimise(
            functools.partial(method.forward_train, x, y), opts, torch.device("cpu"), cfg
        )
    assert logits is None and set(parts) == {"reconstruction"}
    assert seen.ops > 20 and seen.syncs == []


def test_the_paraphraser_reads_from_the_device_once_per_epoch(
    monkeypatch, tmp_path, digits_teacher
):
    """FT's paraphraser trains with the students' epoch loop: no host synchronisation
    between its steps, and it honours the speed switches (here fold_teacher)."""
    before_step = []  # the syncs seen before each step (and each file written), by phase
    with HostSyncs() as seen:

        def point(name):
            before_step.append((name, faults.current_phase(), len(seen.syncs)))

        monkeypatch.setattr(faults, "point", point)
        doc = paraphrase_digits(tmp_path, digits_teacher, epochs=2, fold_teacher=True)
    assert doc["status"] == "complete" and doc["config"]["train"]["fold_teacher"] is True
    epochs = [
        [n for name, phase, n in before_step if name.startswith("step") and phase == epoch]
        for epoch in ("paraphraser-e1", "paraphraser-e2")
    ]
    assert [len(e) for e in epochs] == [5, 5]  # 5 batches of 256 an epoch
    assert [len(set(e)) for e in epochs] == [1, 1] and epochs[0][0] < epochs[1][0]


def test_the_host_sync_check_sees_a_sync_in_the_backward_pass():
    class ReadsBack(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * float(grad.abs().max())  # one value read back in the backward pass

    model = torch.nn.Linear(4, 2)
    opts = {"student": make_sgd(model, TrainConfig(fused=True))}

    def forward():
        out = ReadsBack.apply(model(torch.randn(3, 4)))
        return out, {"ce": out.square().mean()}

    with HostSyncs() as seen:
        optimise(forward, opts, torch.device("cpu"), TrainConfig(fused=True))
    assert seen.syncs == ["aten._local_scalar_dense.default"]


class ReplayingGraph:
    """A CUDA graph's stand-in that computes: capture runs the step once for its outputs and
    undoes its effects (a real capture runs nothing); replay runs it again and copies its
    results into those outputs, as a replay refills a graph's output tensors."""

    def __init__(self, events, state, groups=list):
        self.events, self.state, self.groups = events, state, groups

    def record(self, fn):
        saved = [t.clone() for t in self.state()]
        # what a captured update reads: the rates the optimizers held during the capture
        self.rates = [(g, g["lr"]) for g in self.groups()]
        self.fn, self.out = fn, fn()
        with torch.no_grad():
            for t, s in zip(self.state(), saved, strict=True):
                t.copy_(s)
        return self.out

    def replay(self):
        self.events.append("replay")
        now = [g["lr"] for g, _ in self.rates]
        for g, rate in self.rates:
            g["lr"] = rate
        try:
            new = self.fn()
        finally:
            for (g, _), rate in zip(self.rates, now, strict=True):
                g["lr"] = rate
        with torch.no_grad():
            for static, value in zip(tree_flatten(self.out)[0], tree_flatten(new)[0], strict=True):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)


def _loader():
    """76 random images in batches of 8 (the last of 4), augmented."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.rand(76, 3, 16, 16, generator=g), torch.randint(0, 10, (76,), generator=g))
    return Loader(split, 8, "cpu", (0.5,) * 3, (0.25,) * 3, train=True, crop_padding=2, flip=True)


def _run(method, cfg, epochs, step_fn=None):
    """Train ``method`` for ``epochs`` on :func:`_loader`; (epoch totals, the step used)."""
    loader = _loader()
    opts = {k: make_sgd(m, cfg) for k, m in method.trainable().items()}
    schedules = [make_schedule(o, cfg) for o in opts.values()]
    if step_fn is not None:
        step_fn = step_fn(method, opts)
    totals = []
    for epoch in range(epochs):
        totals.append(
            train_epoch(method, opts, loader, epoch, torch.device("cpu"), cfg, None, step_fn)
        )
        for s in schedules:
            s.step()
    return totals, step_fn


@pytest.mark.parametrize(
    ("name", "params", "ahead"),
    [
        ("kd", {}, ""),
        ("tucker", {"rank": 4}, ""),
        ("tucker", {"rank": 4}, "prefetch"),
        ("tucker", {"rank": 4, "decomposition": "sample"}, "prefetch"),
        ("tucker_recomp", {"rank": 4, "target": "both"}, "prefetch"),
        ("paraphraser", {}, ""),  # FT's paraphraser, trained by the same step
        # the teacher's graph for the next batch beside the student's (train.overlap_teacher)
        ("kd", {}, "overlap"),
        ("featuremap", {}, "overlap"),
        ("ft", {}, "overlap"),
        ("tucker", {"rank": 4}, "overlap"),
        ("paraphraser", {}, "overlap"),
        # the teacher two batches ahead, the targets one ahead (train.pipeline_targets)
        ("kd", {}, "pipeline"),
        ("tucker", {"rank": 4}, "pipeline"),
        ("tucker", {"rank": 4, "decomposition": "sample"}, "pipeline"),
        ("tucker_recomp", {"rank": 4, "target": "both"}, "pipeline"),
        # and its decomposition on a stream of high priority (train.priority_targets)
        ("tucker_recomp", {"rank": 4, "target": "both"}, "priority"),
        # or on a host thread of its own, two batches ahead (train.targets_thread)
        ("kd", {}, "thread"),
        ("tucker", {"rank": 4, "decomposition": "sample"}, "thread"),
        ("tucker_recomp", {"rank": 4, "target": "both"}, "thread"),
        # several students on one teacher pass per batch (kdbench.cohort)
        ("cohort", {}, "prefetch"),
        ("cohort", {}, "pipeline"),
        # its members on streams of their own (train.cohort_streams; CPU stand-ins here)
        ("cohort", {"streams": True}, "pipeline"),
        # its students as one stack (train.cohort_stack)
        ("cohort", {"streams": True, "stack": True}, "pipeline"),
        ("cohort", {"streams": True, "stack": True}, "thread"),
    ],
)
def test_replayed_graphs_train_exactly_as_eager_steps(
    events, monkeypatch, tmp_path, name, params, ahead
):
    """Whole and split graphs, with and without prefetched targets or the teacher's pass
    overlapped, replayed on the CPU by stand-ins that compute: the same weights, bit for bit,
    and the same epoch totals."""
    prefetch, priority, thread = ahead == "prefetch", ahead == "priority", ahead == "thread"
    pipeline = ahead == "pipeline" or priority or thread
    overlap = ahead == "overlap" or pipeline
    assets = {}
    if name == "ft":
        assets["paraphraser"] = tmp_path / "paraphraser.pt"
        torch.manual_seed(1)
        io.save_torch(assets["paraphraser"], Paraphraser(64, 0.5).state_dict())
    cfg = TrainConfig(fused=True, epochs=2, lr=0.05)

    def build():
        torch.manual_seed(0)
        student, teacher = models.build("resnet8", 10, 3), models.build("resnet8", 10, 3)
        if name == "paraphraser":
            return Reconstruction(Paraphraser(64, 0.5), teacher, 3)
        if name == "cohort":
            members = [("vanilla", {}), ("kd", {}), ("tucker_recomp", {"rank": 4})]
            built = [methods.get(n)(models.build("resnet8", 10, 3), teacher, p) for n, p in members]
            return Cohort(built, [n for n, _ in members], **params)
        return methods.get(name)(student, teacher, params, assets)

    eager_method = build()
    eager, _ = _run(eager_method, cfg, 2)

    method = build()
    modules = method.trainable().values()  # the student, and FT's translator
    trained = [t for m in modules for t in (*m.parameters(), *m.buffers())]

    def state():  # what a step changes: the student's weights and statistics, the momenta
        momenta = [o.state[p]["momentum_buffer"] for o in opts.values() for p in o.state]
        return trained + momenta

    def groups():
        return [g for o in opts.values() for g in o.param_groups]

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: ReplayingGraph(events, state, groups))
    monkeypatch.setattr(graphs, "_record", lambda g, fn, stream=None: g.record(fn))
    targets, threads = [], set()
    teacher_targets = method.teacher_targets if prefetch or overlap else None
    if prefetch or overlap:  # which batches the targets are computed for, in order, where
        method.teacher_targets = lambda outs: (
            threads.add(threading.current_thread().name)
            or targets.append(outs[-1].sum().item())
            or (teacher_targets(outs))
        )

    def graphed(m, o):
        nonlocal opts
        opts = o
        run = functools.partial(optimise, optimizers=o, device=torch.device("cpu"), cfg=cfg)
        return graphs.GraphedStep(
            m, o, run, contextlib.nullcontext, prefetch, overlap, pipeline, priority, thread
        )

    opts = {}
    totals, step = _run(method, cfg, 2, graphed)
    split = "split, prefetch" if prefetch else "split"
    decomposes = name.startswith("tucker") or name == "cohort"  # the cohort's last member
    want_status = split if decomposes else "whole"
    overlapped = "split, prefetch, overlap" + (", pipeline" if pipeline else "")
    overlapped += ", priority" if priority else ""
    overlapped += ", thread" if thread else ""
    assert step.status == (overlapped if overlap else want_status)
    if pipeline:  # a lower number is a higher priority
        assert step.targets_stream.priority == (-1 if priority else 0)
    assert events.count("replay") > 10
    for k, m in method.trainable().items():
        want, got = eager_method.trainable()[k].state_dict(), m.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert totals == eager
    if prefetch or overlap:
        # epoch 0: 3 eager warm-up steps, then batches 4–8 prefetched; epoch 1: batches 1–8.
        # Pipelined, each of those p teacher passes ahead (the first two at the epoch's first
        # prefetch, then one per step) also waits for the loader's batches, and for its
        # slot's last targets once both slots have been used: 2p - 2 more in epoch 0, 2p in
        # epoch 1 (the same capture, whose slots were used in epoch 0)
        # made on the worker, the step then waits for each on the device (not for its stream)
        waits = 5 + 8 + ((2 * 5 - 2) + 2 * 8 if pipeline else 0) + (5 + 8 if thread else 0)
        assert events.count("wait-event") == waits
        main = threading.current_thread().name
        # with the thread, the targets ahead on the worker, the others (the first step's, the
        # eager last batch's) on the main thread
        assert threads == ({main, "kdbench-targets_0"} if thread else {main})
        assert not step.pending
        # epoch 1 (no new capture: the rate is read from a tensor), the targets computed, in
        # order: in the first step (batch 0, no prefetch), ahead for batches 1–8, and in the
        # eager step of the last batch (where only the Tucker methods compute targets: the
        # others' eager step has none)
        ids = [method.teacher_outputs(x)[-1].sum().item() for x, _ in _loader().epoch(1)]
        if decomposes:
            assert targets[-10:] == ids
        else:
            assert targets[-9:] == ids[:-1]


@pytest.mark.parametrize("ahead", ["prefetch", "pipeline", "thread"])
def test_a_failed_prefetch_turns_prefetching_off_and_trains_on(events, monkeypatch, caplog, ahead):
    cfg = TrainConfig(fused=True, epochs=1)
    torch.manual_seed(0)
    student, teacher = models.build("resnet8", 10, 3), models.build("resnet8", 10, 3)
    method = methods.get("tucker")(student, teacher, {"rank": 4})
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: ReplayingGraph(events, list))
    monkeypatch.setattr(graphs, "_record", lambda g, fn, stream=None: g.record(fn))

    waits, waited = [], []  # the stream waits; the side streams waited for after the failure

    def wait_event(self, event):  # the first prefetches work, then one fails
        waits.append(event)
        if len(waits) > 4:
            waited.clear()
            raise RuntimeError("CUDA error: an illegal stream wait")

    def graphed(m, o):
        run = functools.partial(optimise, optimizers=o, device=torch.device("cpu"), cfg=cfg)
        pipeline = ahead in ("pipeline", "thread")
        return graphs.GraphedStep(
            m,
            o,
            run,
            contextlib.nullcontext,
            True,
            overlap=pipeline,
            pipeline=pipeline,
            thread=ahead == "thread",
        )

    monkeypatch.setattr(torch.cuda.Stream, "wait_event", wait_event)
    monkeypatch.setattr(torch.cuda.Stream, "wait_stream", lambda s, other: waited.append(other))
    totals, step = _run(method, cfg, 1, graphed)
    # nothing after the failure may overtake what the side streams (two, pipelined) still run
    side = [step.side, step.targets_stream] if ahead != "prefetch" else [step.side]
    assert all(any(w is s for w in waited) for s in side)
    assert step.status == "split" and step.targets_for is None and not step.pending
    assert "prefetching targets off: CUDA error: an illegal stream wait" in caplog.text
    assert len(totals) == 1 and not totals[0].bad_steps


@pytest.mark.parametrize("every_step", [False, True])
def test_an_epoch_reads_from_the_device_only_after_its_last_step(monkeypatch, every_step):
    """The epoch loop around the steps (the loader, the running totals) never waits for the
    device either: its results are read once, after the last step; unless
    ``check_every_step`` asks for one read per step."""
    torch.manual_seed(0)
    student, teacher = models.build("resnet8", 10, 3), models.build("resnet8", 10, 3)
    method = methods.get("kd")(student, teacher, {})
    cfg = TrainConfig(fused=True, check_every_step=every_step)
    opts = {"student": make_sgd(student, cfg)}
    loader, before_step = _loader(), []  # syncs seen before each step
    with HostSyncs() as seen:
        monkeypatch.setattr(faults, "point", lambda name: before_step.append(len(seen.syncs)))
        totals = train_epoch(method, opts, loader, 0, torch.device("cpu"), cfg)
    assert len(before_step) == 10 and totals.correct >= 0
    if every_step:
        assert before_step == list(range(10))
    else:
        assert before_step == [0] * 10 and seen.syncs  # all after the last step


@pytest.mark.parametrize("fail", [False, True])
def test_graphed_evaluation_gives_the_eager_results_as_the_weights_change(
    events, monkeypatch, caplog, fail
):
    def record(graph, fn):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return graph.record(fn)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: ReplayingGraph(events, list))
    monkeypatch.setattr(graphs, "_record", record)
    torch.manual_seed(0)
    model = models.build("resnet8", 10, 3)
    g = torch.Generator().manual_seed(1)
    split = Split(torch.rand(44, 3, 16, 16, generator=g), torch.randint(0, 10, (44,), generator=g))
    loader = Loader(split, 16, "cpu", (0.5,) * 3, (0.25,) * 3)  # batches of 16, 16 and 12
    cfg, cpu = TrainConfig(), torch.device("cpu")
    graphed = graphs.GraphedEval()
    for _ in range(3):
        assert evaluate(model, loader, cpu, cfg, graphed) == evaluate(model, loader, cpu, cfg)
        with torch.no_grad():  # the weights and statistics change between evaluations
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.mul_(0.9)
    if fail:
        assert graphed.status.startswith("eager: capture failed (operation not permitted")
        assert "CUDA graphs off for evaluation: capture failed" in caplog.text
        assert events == ["side"]  # the warm-up, then the failed capture: eager from then on
    else:
        # each shape: warmed up on a side stream, captured when it comes again, then replayed
        assert graphed.status == "graphs"
        assert events == ["side", "replay", "side"] + ["replay"] * 6


def test_the_run_s_step_takes_its_pipeline_settings_from_the_config(monkeypatch):
    """kdbench.train.make_step hands GraphedStep the config's switches, priority_targets and
    targets_thread too (which need the pipeline, and are off by default)."""
    from kdbench import train

    monkeypatch.setattr(train, "graphed", lambda device, cfg: True)
    student, teacher = models.build("resnet8", 10, 1), models.build("resnet8", 10, 1)
    method = methods.get("tucker")(student, teacher, {"rank": 4})
    opt = {"student": make_sgd(method.student, TrainConfig(fused=True))}
    cpu = torch.device("cpu")
    for settings, pipeline, priority, thread in (
        ({}, True, False, False),
        ({"priority_targets": True}, True, True, False),
        ({"targets_thread": True}, True, False, True),
        (
            {"priority_targets": True, "targets_thread": True, "pipeline_targets": False},
            *[False] * 3,
        ),
    ):
        step = train.make_step(method, opt, cpu, TrainConfig(fused=True, **settings))
        assert (step.pipeline, step.priority, step.thread) == (pipeline, priority, thread)
