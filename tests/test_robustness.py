"""Damaged training state, non-finite losses and gradients, determinism, safe loading."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAIN, curves, fit_digits, paraphrase_digits

from kdbench import io, methods
from kdbench.errors import KdbenchError
from kdbench.train import TrainConfig

Vanilla = methods.get("vanilla")


class Poisoned(Vanilla):
    """vanilla whose loss (or, with ``grad``, only a gradient) is not finite at given steps."""

    def __init__(self, *args, bad: set[int], grad: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad, self.grad, self.calls = bad, grad, 0

    def forward_train(self, x, y):
        logits, parts = super().forward_train(x, y)
        self.calls += 1
        if self.calls in self.bad:
            if self.grad:  # d/dw sqrt(|0·w|) is 0·inf: the loss stays finite, the gradient not
                w = next(self.student.parameters())
                parts = {**parts, "bad": (w * 0).abs().sqrt().sum()}
            else:
                parts = {k: v * float("nan") for k, v in parts.items()}
        return logits, parts


def _fit(tmp_path, name, cls=None, on_epoch_end=None, train=None, **kwargs):
    return fit_digits(
        tmp_path, name, cls, {"epochs": 3, **(train or {})}, on_epoch_end=on_epoch_end, **kwargs
    )


def _interrupt_after(n):
    def hook(epoch):
        if epoch == n:
            raise KeyboardInterrupt

    return hook


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plain")
    return _fit(directory, "plain"), directory / "plain"


@pytest.fixture(scope="module")
def plain(plain_run):
    return plain_run[0]


def test_two_runs_of_one_seed_are_bit_identical(tmp_path, plain_run):
    plain, plain_dir = plain_run
    again = _fit(tmp_path, "again")
    # the curves as metrics.json stores them, to the last digit
    assert json.dumps(curves(again)) == json.dumps(curves(plain))
    assert (
        json.loads((tmp_path / "again" / "metrics.json").read_text())["epochs"][-1]["train_loss"]
        == json.loads((plain_dir / "metrics.json").read_text())["epochs"][-1]["train_loss"]
    )
    for name in ("model_final.pt", "model_best.pt"):
        a = io.load_torch(tmp_path / "again" / name)
        b = io.load_torch(plain_dir / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_state_falls_back_to_the_one_before(tmp_path, plain, damage, caplog):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "run", on_epoch_end=_interrupt_after(2))
    state = tmp_path / "run.state"
    assert state.exists() and io.previous_state(state).exists()
    blob = state.read_bytes()
    state.write_bytes(
        {
            "truncate": blob[: len(blob) // 2],
            "flip": blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:],
            "garbage": b"\x00garbage" * 100,
            "empty": b"",
        }[damage]
    )
    with caplog.at_level(logging.WARNING, logger="kdbench"):
        doc = _fit(tmp_path, "run")
    assert "ignoring damaged training state" in caplog.text
    assert doc["final"]["resumed_after_epochs"] == [1]  # from the state of epoch 1
    assert curves(doc) == curves(plain)
    assert not state.exists() and not io.previous_state(state).exists()


def test_no_usable_state_restarts_from_scratch_with_a_warning(tmp_path, plain, caplog):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "run", on_epoch_end=_interrupt_after(2))
    for path in (tmp_path / "run.state", io.previous_state(tmp_path / "run.state")):
        path.write_bytes(path.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="kdbench"):
        doc = _fit(tmp_path, "run")
    assert "starting from scratch" in caplog.text
    assert doc["final"]["resumed_after_epochs"] == [] and curves(doc) == curves(plain)


def test_a_run_killed_between_the_two_renames_resumes_from_the_previous_state(tmp_path, plain):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "run", on_epoch_end=_interrupt_after(2))
    state = tmp_path / "run.state"
    state.replace(io.previous_state(state))  # as if killed after "rotate", before the rename
    (tmp_path / "run" / ".metrics.json.x1y2.tmp").write_text("{")  # and a writer's leftover
    doc = _fit(tmp_path, "run")
    assert doc["final"]["resumed_after_epochs"] == [2] and curves(doc) == curves(plain)
    assert not list((tmp_path / "run").glob(".*.tmp"))


#: a job that fits ``fit_digits(<dir>, "run")`` for 3 epochs through ``run_job``, as a
#: workflow script does
SIGNALLED_JOB = """
import signal
import sys
from pathlib import Path

# Ctrl-C's KeyboardInterrupt, as in a job started from a terminal (a child of a shell's background
# job, such as a suite run with `make test &`, inherits SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)

sys.path.insert(0, sys.argv[2])
from conftest import fit_digits

from kdbench.runs import run_job


def fit_three_epochs():
    return fit_digits(Path(sys.argv[1]), "run", train={"epochs": 3})


run_job(fit_three_epochs, Path(sys.argv[1]) / "job.log")
"""


@pytest.mark.parametrize(
    ("point", "signal", "status", "why"),
    [
        ("write:run.state:e2", "TERM", 143, "stopped by SIGTERM"),
        ("step3:e3", "TERM", 143, "stopped by SIGTERM"),
        ("write:run.state:e2", "INT", 130, "interrupted (SIGINT)"),
    ],
)
def test_a_signal_stops_a_job_in_one_line_once_its_state_in_flight_is_on_disk(
    tmp_path, plain, point, signal, status, why
):
    """SIGTERM (a time limit, scancel) or SIGINT (Ctrl-C) while the state of epoch 2 is being
    written in the background, or early in epoch 3: the job waits for that write, says so in
    one line and exits 143 (130); running it again resumes after epoch 2 and trains as an
    uninterrupted run."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "KDBENCH_FAULT": point, "KDBENCH_FAULT_SIGNAL": signal}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SIGNALLED_JOB, str(tmp_path), str(REPO / "tests")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # the fault signals the process group: this job alone
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr
    assert lines[-1] == (
        f"kdbench: {why}; run the job again to finish it (a training run resumes after its "
        "last saved epoch)"
    )
    assert "Traceback" not in proc.stderr
    state = io.load_state_file(tmp_path / "run.state")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in state["epochs"]] == [1, 2]
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert why in (tmp_path / "job.log").read_text()
    doc = _fit(tmp_path, "run")
    assert doc["final"]["resumed_after_epochs"] == [2] and curves(doc) == curves(plain)


def _state_like() -> dict:
    """Tensors of every kind a training state holds, and plain values around them."""
    weights = torch.randn(4, 3, 3, 3)
    return {
        "version": 1,
        "modules": {"student": {"conv.weight": weights, "bn.num_batches_tracked": torch.tensor(7)}},
        "optimizers": {"student": {"state": {0: {"momentum_buffer": weights[:, 1]}}, "lr": 0.1}},
        "rng": {"cpu": torch.get_rng_state()},
        "flags": torch.tensor([True, False, True]),
        "half": torch.arange(5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 2),
        "epochs": [{"epoch": 1, "val_acc": 50.0, "parts": (1, None)}],
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_a_state_is_saved_packed_as_a_snapshot_and_loads_tensor_by_tensor(tmp_path):
    state = _state_like()
    packed = io.pack_tensors(state)
    assert [k for k, v in packed.items() if isinstance(v, torch.Tensor)] == ["blob"]
    expected = json.loads(json.dumps(state, default=lambda t: t.tolist()))
    state["modules"]["student"]["conv.weight"].add_(1)  # after the snapshot: not in it
    got = io.unpack_tensors(packed)
    assert json.loads(json.dumps(got, default=lambda t: t.tolist())) == expected
    assert got["optimizers"]["student"]["state"][0]["momentum_buffer"].shape == (4, 3, 3)
    # each tensor in a storage of its own: a module's weights saved alone stay small
    weights = got["modules"]["student"]["conv.weight"]
    assert weights.untyped_storage().nbytes() == weights.numel() * 4
    io.save_state(tmp_path / "s.pt", state)
    _assert_same(io.load_state_file(tmp_path / "s.pt"), state)


def test_a_state_written_before_packing_still_loads(tmp_path):
    import hashlib
    from io import BytesIO

    state = _state_like()
    buf = BytesIO()
    torch.save(state, buf)
    digest = hashlib.sha256(buf.getvalue()).hexdigest().encode()
    (tmp_path / "old.pt").write_bytes(io.STATE_MAGIC + digest + b"\n" + buf.getvalue())
    _assert_same(io.load_state_file(tmp_path / "old.pt"), state)


def test_the_state_writer_writes_while_the_caller_goes_on(tmp_path, monkeypatch):
    """save returns before the state is written; the metrics follow the state, named after the
    phase it was saved in; wait and close wait for it."""
    import threading

    from kdbench import faults

    release, write = threading.Event(), io.write_state_file

    def held(path, packed):
        assert release.wait(30)
        write(path, packed)

    monkeypatch.setattr(io, "write_state_file", held)
    monkeypatch.setenv("KDBENCH_FAULT_LOG", str(tmp_path / "points"))
    state, metrics, saved = tmp_path / "run.state", tmp_path / "metrics.json", _state_like()
    monkeypatch.setattr(faults, "_phase", "e1")
    with io.StateWriter() as writer:
        writer.save(state, saved, then_json=[(metrics, {"epoch": 1})])
        faults.phase("e2")  # the caller goes on to the next epoch
        assert not state.exists() and not metrics.exists()
        release.set()
        writer.wait()
        assert json.loads(metrics.read_text()) == {"epoch": 1}
        _assert_same(io.load_state_file(state), saved)
    points = (tmp_path / "points").read_text().split()
    assert points == ["write:run.state:e1", "write:metrics.json:e1"]


def test_a_failed_state_write_is_raised_and_writes_no_metrics(tmp_path):
    (tmp_path / "file").write_text("")
    state, metrics = tmp_path / "file" / "run.state", tmp_path / "metrics.json"
    writer = io.StateWriter()
    writer.save(state, _state_like(), then_json=[(metrics, {"epoch": 1})])
    with pytest.raises(KdbenchError, match="cannot write"):
        writer.close()
    assert not metrics.exists()
    # leaving the block on another error keeps that error, the failed write noted on it
    with pytest.raises(KeyboardInterrupt) as stop, io.StateWriter() as writer:
        writer.save(state, _state_like())
        raise KeyboardInterrupt
    assert "the last training state was not written: cannot write" in stop.value.__notes__[0]


#: how a step's finite check is read: on the device once per epoch with an unfused optimizer
#: (the step is taken, the run stops at the epoch's end), on the device with fused SGD (the step
#: is skipped there), or on the host at every step
CHECKS = {
    "device": {},
    "device-fused": {"fused": True},
    "host": {"check_every_step": True},
}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("grad", [False, True], ids=["loss", "gradient"])
def test_non_finite_step_stops_the_run_naming_it_and_keeps_the_state(tmp_path, grad, check):
    # 8×8 digits, batch 128: 10 steps per epoch; call 12 is epoch 2, step 2 (from 1)
    with pytest.raises(KdbenchError) as err:
        _fit(tmp_path, "run", Poisoned, bad={12}, grad=grad, train=CHECKS[check])
    message = str(err.value)
    for part in ("dataset=digits", "teacher=none", "student=resnet8", "method=vanilla"):
        assert part in message
    assert "variant=default seed=5 epoch 2 step 2: non-finite loss or gradient" in message
    assert "\n" not in message and "(epoch 1)" in message
    state = io.load_state_file(tmp_path / "run.state")
    assert len(state["epochs"]) == 1
    assert all(torch.isfinite(v).all() for v in state["modules"]["student"].values())


@pytest.mark.parametrize("check", CHECKS)
def test_non_finite_batches_can_be_skipped_up_to_a_limit(tmp_path, caplog, check):
    train = {"skip_nonfinite": 2, **CHECKS[check]}
    with caplog.at_level(logging.WARNING, logger="kdbench"):
        doc = _fit(tmp_path, "run", Poisoned, bad={3, 12}, train=train)
    assert doc["status"] == "complete"
    assert [e.get("skipped_batches", 0) for e in doc["epochs"]] == [1, 1, 0]
    assert "epoch 1 step 3: non-finite loss or gradient, batch skipped (1 of at most 2" in (
        caplog.text
    )
    assert "epoch 2 step 2: non-finite loss or gradient, batch skipped (2 of at most 2" in (
        caplog.text
    )
    with pytest.raises(KdbenchError, match="epoch 2 step 2: .* 1 bad batch"):
        _fit(tmp_path, "again", Poisoned, bad={3, 12}, train={**train, "skip_nonfinite": 1})


def test_a_batch_skipped_on_the_device_equals_one_skipped_by_the_host(tmp_path):
    """Fused SGD skips a non-finite step on the device; the host check skips the same step."""
    runs = [
        _fit(tmp_path, name, Poisoned, bad={3, 12}, grad=True, train={"skip_nonfinite": 2, **t})
        for name, t in (
            ("device", {"fused": True}),
            ("host", {"fused": True, "check_every_step": True}),
        )
    ]
    assert curves(runs[0]) == curves(runs[1])
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in runs[0]["epochs"])


def test_skip_nonfinite_is_validated():
    with pytest.raises(KdbenchError, match="skip_nonfinite"):
        TrainConfig.from_config({**TINY_TRAIN, "skip_nonfinite": -1})


def test_every_torch_load_is_weights_only_and_nothing_pickles():
    sources = [
        p
        for d in ("src", "workflow", "tests")
        for p in (REPO / d).rglob("*")
        if p.suffix in (".py", ".smk") and p.name != Path(__file__).name
    ]
    sources.append(REPO / "Snakefile")
    offenders = []
    for path in sources:
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(", text):
            depth, end = 1, call.end()
            while depth:  # to the parenthesis that closes the call
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            if "weights_only=True" not in text[call.end() : end]:
                offenders.append(f"{path.relative_to(REPO)}: torch.load without weights_only=True")
        if re.search(r"^\s*(import|from) (pickle|dill|joblib|cloudpickle)\b", text, re.M):
            offenders.append(f"{path.relative_to(REPO)}: imports a pickle module")
        if re.search(r"\.to_pickle\(|\.pkl\b|allow_pickle=True", text):
            offenders.append(f"{path.relative_to(REPO)}: writes or reads pickle")
    assert not offenders, "\n".join(offenders)


def _paraphraser(directory, teacher, train, bad=()):
    """FT's paraphraser (3 epochs of 5 steps on 8×8 digits) whose loss is not finite at the
    step calls in ``bad`` (from 1)."""
    from kdbench.methods import ft

    calls = [0]
    forward = ft.Reconstruction.forward_train

    def poisoned(self, x, y):
        logits, parts = forward(self, x, y)
        calls[0] += 1
        return logits, {k: v * float("nan") if calls[0] in bad else v for k, v in parts.items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft.Reconstruction, "forward_train", poisoned)
        return paraphrase_digits(directory, teacher, **train)


@pytest.mark.parametrize("check", CHECKS)
def test_the_paraphraser_skips_non_finite_batches_as_students_do(tmp_path, digits_teacher, check):
    train = {"skip_nonfinite": 1, **CHECKS[check]}
    doc = _paraphraser(tmp_path / "skip", digits_teacher, train, bad={7})
    assert [e.get("skipped_batches", 0) for e in doc["epochs"]] == [0, 1, 0]
    assert all(torch.isfinite(torch.tensor(e["train_loss"])) for e in doc["epochs"])
    with pytest.raises(KdbenchError) as err:
        _paraphraser(tmp_path / "stop", digits_teacher, CHECKS[check], bad={7})
    message = str(err.value)
    assert "paraphraser dataset=digits teacher=resnet8 seed=0 epoch 2 step 2" in message
    assert "\n" not in message and "(epoch 1)" in message
    assert not (tmp_path / "stop" / "p.pt").exists()
    assert len(io.load_state_file(tmp_path / "stop" / "state.pt")["epochs"]) == 1
