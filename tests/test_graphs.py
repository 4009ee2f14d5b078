"""kdbench.graphs.GraphedStep's decisions (warm-up, capture, replay, recapture, eager steps),
with torch's CUDA stream and graph API replaced by stand-ins that record what happens (CI has
no GPU; the speed is measured with ``python -m kdbench.bench`` on one)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kdbench import graphs, methods, models
from kdbench.train import TrainConfig, make_sgd


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
    def graph(g):
        log.append("capture")
        capturing.append(True)
        try:
            yield
        finally:
            capturing.pop()

    class Stream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def stream(s):
        log.append("side")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: FakeGraph(log))
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    log.capturing = capturing
    return log


def _graphed(events, method_name="kd", fused=True, fail=False, autocast=None, **params):
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
    return graphs.GraphedStep(method, opt, optimise, autocast), opt["student"]


FULL, LAST = torch.zeros(8, 1, 8, 8), torch.zeros(3, 1, 8, 8)
Y8, Y3 = torch.zeros(8, dtype=torch.long), torch.zeros(3, dtype=torch.long)


def test_warm_up_then_one_capture_replayed_until_the_lr_changes(events):
    g, opt = _graphed(events)
    for _ in range(5):
        g(FULL, Y8)
    assert events == ["side", "eager"] * 3 + ["capture", "step-in-capture", "replay", "replay"]
    events.clear()
    g(LAST, Y3)  # the smaller last batch of the epoch
    assert events == ["eager"]
    events.clear()
    for group in opt.param_groups:
        group["lr"] *= 0.5  # the schedule's step at the end of the epoch
    g(FULL, Y8)
    g(FULL, Y8)
    assert events == ["capture", "step-in-capture", "replay", "replay"]


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
    # teacher graph captured (and run, for the targets' shapes), then the student's step
    captured = ["capture", "replay", "capture", "step-in-capture"]
    assert events == ["side", "eager"] * 3 + captured + ["replay", "replay"] * 2
    # eagerly between the graphs, at every replay, under the step's autocast as in eager steps
    assert calls == [True] * (1 + 2)
    assert g.static_targets[0].shape == (8, 64, 2, 2)  # the teacher's stage 3 (8×8 input)


def test_a_failed_capture_trains_eagerly_from_then_on(events, caplog):
    g, _ = _graphed(events, fail=True)
    for _ in range(5):
        g(FULL, Y8)
    assert events == ["side", "eager"] * 3 + ["capture", "eager", "eager"]
    assert "CUDA graphs off: capture failed (operation not permitted" in caplog.text


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
    assert why in caplog.text
