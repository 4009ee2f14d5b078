from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The pytest-xdist workers share the machine's cores, and so do the jobs they start (the SLURM
# test's cluster runs several at once): each worker's torch gets its share of the cores, and
# OpenMP threads that wait sleep instead of spinning. Without this, resnet8 training steps with 2
# threads on 2 cores that two other processes kept busy ran 9 times slower than with 1 thread
# (2 with sleeping threads), and the SLURM test's students 16 times slower than alone.
# Set before any test module imports torch; a job's set_num_threads (train_threads) still wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")


def snakemake(
    *args: str, cwd: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the project's Snakefile with ``args`` (working directory ``cwd``, default the repo)."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args]
    if cwd is not None:
        cmd += ["-d", str(cwd)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run, as rule → count."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    except StopIteration:
        return counts
    for line in lines[start + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def run_gpu_script(name: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``tests/gpu/<name>`` (a script of measure.sh) run with ``argv`` in a new Python process
    with kdbench's sources on its path; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "gpu" / name), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def fresh_imports(*modules: str, then: str = "") -> set[str]:
    """The modules that a new Python process holds after importing ``modules`` and running the
    statements ``then``."""
    code = f"import sys; import {', '.join(modules)}; {then or 'pass'}; print(*sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(proc.stdout.split())


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def mps_stub(directory: Path) -> tuple[Path, Path]:
    """A stand-in for NVIDIA's ``nvidia-cuda-mps-control`` in ``directory/bin``, which records
    its calls ("start PIPE", "COMMAND PIPE") in ``directory/calls``: its daemon is a file
    ``running`` in the pipe directory, and it does not start while ``directory/fail`` exists.
    Returns (the bin folder to put on the PATH, the calls file)."""
    calls, fail = directory / "calls", directory / "fail"
    control = directory / "bin" / "nvidia-cuda-mps-control"
    control.parent.mkdir(parents=True)
    control.write_text(
        f"""#!/bin/sh
pipe="$CUDA_MPS_PIPE_DIRECTORY"
if [ "$1" = -d ]; then
    echo "start $pipe" >> "{calls}"
    [ ! -e "{fail}" ] || {{ echo "no GPU" >&2; exit 1; }}
    sleep 0.2
    touch "$pipe/running"
    exit 0
fi
read -r line
echo "$line $pipe" >> "{calls}"
[ -e "$pipe/running" ] || {{ echo "Cannot find MPS control daemon process"; exit 1; }}
[ "$line" != quit ] || rm -f "$pipe/running"
"""
    )
    control.chmod(0o755)
    calls.touch()
    return control.parent, calls


OUTPUT_FILES = {
    "metrics": "metrics.json",
    "final_weights": "model_final.pt",
    "best_weights": "model_best.pt",
    "loss_plot": "Loss.png",
    "accuracy_plot": "Accuracy.png",
}


def outputs(directory: Path) -> dict[str, str]:
    """The declared outputs of a training run in ``directory``."""
    return {k: str(directory / name) for k, name in OUTPUT_FILES.items()}


def train_digits(directory: Path, **overrides):
    """``kdbench.runs.train`` on 8×8 digits with resnet8 on CPU, writing into ``directory``;
    ``overrides`` replace any argument (role, method, train recipe, teacher, …)."""
    from kdbench import runs

    kwargs = {
        "role": "student",
        "dataset": "digits",
        "data": {"image_size": 8},
        "arch": "resnet8",
        "seed": 0,
        "method": "vanilla",
        "variant": "default",
        "method_params": {},
        "train": {"epochs": 1, "batch_size": 256, "device": "cpu"},
        "outputs": outputs(directory),
        "state": directory / "state.pt",
    }
    return runs.train(**{**kwargs, **overrides})


TINY_TRAIN = {"epochs": 2, "batch_size": 128, "optimizer": {"lr": 0.05}, "device": "cpu"}


def fit_digits(directory: Path, name: str, method_cls=None, train=None, **kwargs):
    """``kdbench.train.fit`` of a vanilla-like resnet8 (seed 5) on 8×8 digits into
    ``directory / name``, its state at ``directory / f"{name}.state"``; ``kwargs`` go to
    ``fit`` (``on_epoch_end``) or, the rest, to ``method_cls``."""
    import torch

    from kdbench import data, methods, models
    from kdbench.train import RunOutputs, TrainConfig, fit

    ds = data.load_dataset("digits", image_size=8)
    torch.manual_seed(5)
    student = models.build("resnet8", ds.num_classes, ds.in_channels)
    on_epoch_end = kwargs.pop("on_epoch_end", None)
    method = (method_cls or methods.get("vanilla"))(student, None, {}, **kwargs)
    run = {"dataset": "digits", "teacher": "none", "student": "resnet8", "method": "vanilla"}
    return fit(
        method,
        ds,
        TrainConfig.from_config({**TINY_TRAIN, **(train or {})}),
        seed=5,
        outputs=RunOutputs.from_mapping(outputs(directory / name)),
        state_path=directory / f"{name}.state",
        record={"run": {**run, "variant": "default", "seed": 5}},
        on_epoch_end=on_epoch_end,
    )


def paraphrase_digits(directory: Path, teacher: Path, epochs: int = 3, **train) -> dict:
    """FT's paraphraser of a resnet8 ``teacher`` trained on 8×8 digits (batch 256, CPU, seed 0)
    into ``directory`` (``p.pt``, ``metrics.json``, ``P.png``; state ``state.pt``); ``train``
    adds ``train`` keys. Returns its metrics document."""
    from kdbench.methods.ft import train_paraphraser

    names = {"weights": "p.pt", "metrics": "metrics.json", "loss_plot": "P.png"}
    return train_paraphraser(
        dataset="digits",
        data={"image_size": 8},
        teacher="resnet8",
        teacher_weights=teacher,
        seed=0,
        params={"paraphraser": {"epochs": epochs}},
        train={"batch_size": 256, "device": "cpu", **train},
        outputs={k: str(directory / name) for k, name in names.items()},
        state=directory / "state.pt",
    )


def curves(doc: dict) -> list[dict]:
    """A metrics document's per-epoch entries without their timings."""
    return [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in doc["epochs"]]


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """Best weights of a resnet8 teacher trained for 2 epochs on 8×8 digits."""
    d = tmp_path_factory.mktemp("digits_teacher")
    train_digits(d, role="teacher", variant="teacher", train=TINY_TRAIN)
    return d / "model_best.pt"


#: The modules that take over 10 s, longest first (``make test`` with ``--durations=0`` on the
#: 2-core CI machine, 2026-11-28: 400, 335, 190, 145, 80, 75, 70, 70, 65, 50, 25, 20, 15 and
#: 15 s; test_jacobi.py, added later that day: 20 s alone). ``make test`` runs the suite on
#: several pytest-xdist workers, one module per worker at a time (``--dist loadfile``), each
#: worker taking the next module as it finishes one: longest first, the workers end close
#: together (the others, a few seconds each, come last).
LONG_MODULES = (
    "test_slurm.py",
    "test_workflow.py",
    "test_faults.py",
    "test_bench.py",
    "test_config.py",
    "test_cohort.py",
    "test_cohort_workflow.py",
    "test_robustness.py",
    "test_mps.py",
    "test_graphs.py",
    "test_train.py",
    "test_jacobi.py",
    "test_profile.py",
    "test_analysis.py",
    "test_feature_methods.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the order within each module is kept
