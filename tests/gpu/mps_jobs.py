"""The workflow's training jobs under ``KDBENCH_MPS=1``, on a GPU (``measure.sh mps-jobs``).

Starts ``--jobs`` digits teacher trainings at once, each a process that calls
``kdbench.runs.run_job(train, ..., gpu=True)`` as the workflow's scripts do (config/demo.yaml's
teacher recipe on CUDA, seed = job number): first without MPS, then with ``KDBENCH_MPS=1``, where
the first job starts the daemon and the others join it. A one-job, one-epoch round before them
fills the compile cache, so that both timed rounds read their compiled code from it. Prints and
saves (``--json``) the wall time of each round, whether every MPS job logged its daemon and
recorded it in its metrics.json, and how far each job's final weights are apart in the two
rounds; stops the daemon at the end. Exit status 1 if a job failed or an MPS job did not join.

    python tests/gpu/mps_jobs.py --jobs 4 --epochs 5 --json out/mps-jobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from kdbench import config as kdconfig
from kdbench import mps
from kdbench.runs import run_job, train

REPO = Path(__file__).resolve().parents[2]


def job(directory: Path, seed: int, epochs: int, device: str) -> None:
    """One teacher training, as the workflow's train_teacher script runs it."""
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg.update(kdconfig.resolve(cfg))
    recipe = {**kdconfig.train_params(cfg, "teacher"), "epochs": epochs, "device": device}
    out = directory / f"job{seed}"
    run_job(
        train,
        out / "log.txt",
        threads=1,
        gpu=True,
        role="teacher",
        dataset="digits",
        data=kdconfig.data_params(cfg, "digits"),
        arch="resnet20",
        seed=seed,
        method="vanilla",
        variant="default",
        method_params={"label_smoothing": 0.1},
        train=recipe,
        outputs={
            "metrics": out / "metrics.json",
            "final_weights": out / "final.pt",
            "best_weights": out / "best.pt",
            "loss_plot": out / "Loss.png",
            "accuracy_plot": out / "Accuracy.png",
        },
        state=out / "state.pt",
    )


def round_(
    directory: Path, args: argparse.Namespace, use_mps: bool, jobs: int = 0, epochs: int = 0
) -> dict:
    """``jobs`` (default ``args.jobs``) trainings at once; their wall time and what each
    recorded."""
    jobs, epochs = jobs or args.jobs, epochs or args.epochs
    env = {**os.environ, "KDBENCH_MPS": "1" if use_mps else "0", "TMPDIR": str(directory)}
    started = time.monotonic()
    worker = [sys.executable, __file__, "--dir", str(directory), "--epochs", str(epochs)]
    procs = [
        subprocess.Popen([*worker, "--device", args.device, "--job", str(i)], env=env)
        for i in range(jobs)
    ]
    codes = [p.wait() for p in procs]
    wall = time.monotonic() - started
    runs = []
    for i in range(jobs):
        out = directory / f"job{i}"
        log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
        metrics = (out / "metrics.json").exists() and json.loads((out / "metrics.json").read_text())
        runs.append(
            {
                "exit": codes[i],
                "mps_logged": "MPS: a client of the daemon in" in log,
                "mps_pipe_directory": metrics and metrics["provenance"].get("mps_pipe_directory"),
                "test_acc_last": metrics and metrics["final"]["test_acc_last"],
            }
        )
    return {"mps": use_mps, "wall_seconds": wall, "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--device", default="cuda", help="auto on a CPU machine: a smoke run (stand-in daemon)"
    )
    ap.add_argument("--job", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job is not None:
        job(args.dir, args.job, args.epochs, args.device)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        warm, plain, shared = Path(tmp, "warm"), Path(tmp, "plain"), Path(tmp, "mps")
        for d in (warm, plain, shared):
            d.mkdir()
        warmup = round_(warm, args, False, jobs=1, epochs=1)
        rounds = [round_(plain, args, False)]
        try:
            rounds.append(round_(shared, args, True))
        finally:
            stopped = mps.stop(shared / f"kdbench-mps-uid{os.getuid()}")
        apart: list[float | None] = []  # largest difference of any weight or buffer
        for i in range(args.jobs):
            a, b = (d / f"job{i}" / "final.pt" for d in (plain, shared))
            if a.exists() and b.exists():
                wa, wb = (torch.load(p, weights_only=True) for p in (a, b))
                apart.append(max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa))
            else:
                apart.append(None)
        same = [None if d is None else d == 0.0 for d in apart]
    doc = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "jobs": args.jobs,
        "epochs": args.epochs,
        "warmup_wall_seconds": warmup["wall_seconds"],
        "rounds": rounds,
        "weights_identical_per_job": same,
        "max_weight_difference_per_job": apart,
        "daemon_stopped": stopped,
    }
    for r in rounds:
        label = "under MPS" if r["mps"] else "without MPS"
        joined = sum(bool(run["mps_logged"] and run["mps_pipe_directory"]) for run in r["runs"])
        print(
            f"{args.jobs} jobs at once {label}: {r['wall_seconds']:.1f} s wall, exits "
            f"{[run['exit'] for run in r['runs']]}, {joined} joined the daemon",
            flush=True,
        )
    print(
        f"final weights identical with and without MPS: {same} (largest difference {apart}); "
        f"daemon stopped: {stopped}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    failed = any(run["exit"] for r in [warmup, *rounds] for run in r["runs"])
    unjoined = not all(
        run["mps_logged"] and run["mps_pipe_directory"] for run in rounds[-1]["runs"]
    )
    return 1 if failed or unjoined else 0


if __name__ == "__main__":
    sys.exit(main())
