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


def _graphed(events, method_name="kd", fused=True, fail=False):
    student = models.build("resnet8", 10, 1)
    teacher = models.build("resnet8", 10, 1)
    params = {"rank": 4} if method_name.startswith("tucker") else {}
    method = methods.get(method_name)(student, teacher, params)
    opt = {"student": make_sgd(student, TrainConfig(fused=fused))}

    def step(xb, yb):
        if fail and events.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        events.append("step-in-capture" if events.capturing else "eager")
        return xb.sum(), {"ce": xb.mean()}, torch.tensor(True)

    return graphs.GraphedStep(step, method, opt), opt["student"]


def test_warm_up_then_one_capture_replayed_until_the_lr_changes(events):
    g, opt = _graphed(events)
    full, last = torch.zeros(8, 1, 8, 8), torch.zeros(3, 1, 8, 8)
    y8, y3 = torch.zeros(8, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    for _ in range(5):
        g(full, y8)
    assert events == ["side", "eager"] * 3 + ["capture", "step-in-capture", "replay", "replay"]
    events.clear()
    g(last, y3)  # the smaller last batch of the epoch
    assert events == ["eager"]
    events.clear()
    for group in opt.param_groups:
        group["lr"] *= 0.5  # the schedule's step at the end of the epoch
    g(full, y8)
    g(full, y8)
    assert events == ["capture", "step-in-capture", "replay", "replay"]


def test_a_failed_capture_trains_eagerly_from_then_on(events, caplog):
    g, _ = _graphed(events, fail=True)
    x, y = torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    for _ in range(5):
        g(x, y)
    assert events == ["side", "eager"] * 3 + ["capture", "eager", "eager"]
    assert "CUDA graphs off: capture failed (operation not permitted" in caplog.text


@pytest.mark.parametrize(
    ("method", "fused", "why"),
    [
        ("tucker", True, "method 'tucker' synchronises with the host"),
        ("tucker_recomp", True, "method 'tucker_recomp' synchronises with the host"),
        ("kd", False, "optimizer(s) student not fused"),
    ],
)
def test_steps_that_cannot_be_captured_stay_eager(events, caplog, method, fused, why):
    g, _ = _graphed(events, method, fused=fused)
    x, y = torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    for _ in range(5):
        g(x, y)
    assert events == ["eager"] * 5
    assert why in caplog.text
