"""The job-level half of the bad-input catalogue (docs/errors.md): each case runs a training job
the way its workflow script does (``kdbench.runs.run_job``) and must exit with status 1, print
one line naming the cause, and write no output and no state. The config half is in
tests/test_config.py (``BAD`` and the workflow-level refusals)."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import pytest
import torch
from conftest import REPO, outputs

from kdbench import config as kdconfig
from kdbench import models, runs
from kdbench.errors import KdbenchError

TRAIN = {"epochs": 1, "batch_size": 128, "optimizer": {"lr": 0.05}, "device": "cpu"}
DATA = {"image_size": 8}


@pytest.fixture(scope="module")
def teacher(digits_teacher):
    return digits_teacher


def job_error(tmp_path: Path, capsys, **overrides) -> str:
    """Run a student job with ``overrides``; return its one line of error."""
    out = outputs(tmp_path / "out")
    state = tmp_path / "state" / "seed0.pt"
    kwargs = {
        "role": "student",
        "dataset": "digits",
        "data": DATA,
        "arch": "resnet8",
        "seed": 0,
        "method": "vanilla",
        "variant": "default",
        "method_params": {},
        "train": TRAIN,
        "outputs": out,
        "state": state,
        **overrides,
    }
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        runs.run_job(runs.train, tmp_path / "job.log", **kwargs)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kdbench: error: "), lines[0]
    written = [p for p in kwargs["outputs"].values() if Path(p).exists()]
    assert not written and not state.exists(), written
    return lines[0]


def _kd(teacher_weights, arch="resnet8"):
    return {
        "method": "kd",
        "method_params": {"T": 4.0},
        "teacher": arch,
        "teacher_weights": str(teacher_weights),
    }


def test_missing_dataset_files(tmp_path, capsys):
    line = job_error(
        tmp_path, capsys, dataset="fashion_mnist", data={"root": str(tmp_path / "none")}
    )
    assert "Fashion-MNIST" in line or "fashion" in line.lower()


def test_cifar_not_extracted(tmp_path, capsys):
    line = job_error(tmp_path, capsys, dataset="cifar10", data={"root": str(tmp_path)})
    assert "CIFAR10 not found" in line and "download: true" in line


def test_cifar_files_failing_their_checksum(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"\x80truncated")
    line = job_error(tmp_path, capsys, dataset="cifar10", data={"root": str(tmp_path)})
    assert "cannot be read" in line


def test_unknown_dataset_setting(tmp_path, capsys):
    assert "unknown key 'size'" in job_error(tmp_path, capsys, data={"size": 8})


def test_unknown_training_setting(tmp_path, capsys):
    line = job_error(tmp_path, capsys, train={**TRAIN, "epochz": 3})
    assert "unknown setting(s) epochz" in line


def test_unknown_method(tmp_path, capsys):
    assert "kdd" in job_error(tmp_path, capsys, method="kdd")


def test_method_needing_a_teacher_without_one(tmp_path, capsys):
    assert "needs a teacher" in job_error(tmp_path, capsys, method="kd")


def test_missing_teacher_checkpoint(tmp_path, capsys):
    line = job_error(tmp_path, capsys, **_kd(tmp_path / "nowhere.pt"))
    assert "cannot load teacher resnet8 weights" in line and "nowhere.pt" in line


def test_unreadable_teacher_checkpoint(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    assert "cannot load teacher" in job_error(tmp_path, capsys, **_kd(garbage))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"linear.weight": torch.zeros(1), "hook": print}, evil)
    assert "cannot load teacher" in job_error(tmp_path, capsys, **_kd(evil))


def test_checkpoint_of_another_architecture(tmp_path, capsys, teacher):
    line = job_error(tmp_path, capsys, **_kd(teacher, arch="resnet20"))
    assert "do not fit the model" in line


def test_teacher_of_another_class_count(tmp_path, capsys):
    other = tmp_path / "cifar100_teacher.pt"
    torch.save(models.build("resnet8", 100, 1).state_dict(), other)
    line = job_error(tmp_path, capsys, **_kd(other))
    assert "are for 100 classes" in line and "have 10" in line


def test_ft_without_its_paraphraser(tmp_path, capsys, teacher):
    kwargs = {**_kd(teacher), "method": "ft", "method_params": {}}
    assert "paraphraser" in job_error(tmp_path, capsys, **kwargs)


def test_unreadable_paraphraser(tmp_path, capsys, teacher):
    bad = tmp_path / "paraphraser.pt"
    bad.write_bytes(b"")
    kwargs = {**_kd(teacher), "method": "ft", "method_params": {}}
    line = job_error(tmp_path, capsys, **kwargs, assets={"paraphraser": str(bad)})
    assert "paraphraser" in line


def test_output_directory_that_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "blocked").write_text("a file where the run directory should be")
    out = outputs(tmp_path / "blocked" / "run")
    line = job_error(tmp_path, capsys, outputs=out)
    assert "is not writable" in line and "blocked" in line


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="no RLIMIT_FSIZE here")
def test_full_disk(tmp_path, capsys):
    """A file-size limit stands in for a full disk or quota: the first large write fails."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
    try:
        line = job_error(tmp_path, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "cannot write" in line and "File too large" in line
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.skipif(
    hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
    reason="root writes into read-only directories",
)
def test_read_only_output_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = job_error(tmp_path, capsys, outputs=outputs(ro), state=str(ro / "s.pt"))
    finally:
        ro.chmod(0o700)
    assert "is not writable" in line


def test_feature_method_between_stages_of_different_shape(monkeypatch):
    """No two shipped architectures differ in stage shape; a future one that does is refused."""
    real = models.stage_shape

    def shape(arch, stage, image):
        c, h, w = real(arch, stage, image)
        return (c * 2, h, w) if arch == "resnet20" else (c, h, w)

    monkeypatch.setattr(models, "stage_shape", shape)
    import yaml

    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["methods"] = {"vanilla": {}, "featuremap": {"beta": 125}}
    schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    with pytest.raises(KdbenchError) as err:
        kdconfig.validate(cfg, schema)
    assert "stage 3 of resnet8 and resnet20 differ in shape" in str(err.value)
    assert "\n" not in str(err.value)
