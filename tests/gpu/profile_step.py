"""Where a graphed training step's GPU time goes (``measure.sh profile``).

For each ``--row METHOD[:KEY=VALUE,...]`` (``--teacher`` -> ``--student``, default resnet110 ->
resnet56, CIFAR-100 shape, batch 128, random data of ``--train-size`` images, kdbench's trainer as
``bench epochs`` runs it; METHOD a method or one of ``bench epochs``'s method labels, such as
``"tucker sample-teacher-r32"``, a bare ``tucker`` or ``tucker_recomp`` being rank 32 on the
teacher's factors; KEY=VALUE a ``train`` setting) it
trains one warm-up epoch (compilation, graph capture), then one more epoch at the same learning
rate (no recapture) under ``torch.profiler``, and reports per step: the wall time, the GPU's busy
time (the union of its kernels' intervals), the sum of kernel times, the number of kernels, and
the kernels that took most time, and the busy time of each CUDA stream (``streams``: the
student's step on the main stream, with ``overlap_teacher`` the teacher's passes on a second and
with ``pipeline_targets`` the Tucker decomposition on a third). Busy time close to the wall time
means the step is bound by its kernels; far below it, by the gaps between them; a main stream
busy far less than the wall time, with the other streams busy, by the work it waits for. The rows
run in one process, so they share cuDNN's choice of algorithm for each convolution (made by the
first row that ran it, autotuned or not): compare ``cudnn_benchmark`` settings in separate runs.

    python tests/gpu/profile_step.py --row vanilla --row kd --row vanilla:channels_last=false
    python tests/gpu/profile_step.py --student resnet20 --row featuremap \
        --row "tucker sample-teacher-r32" --row "tucker sample-teacher-r32:samplewise_solver=eigh"
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from kdbench import bench, io, models, provenance
from kdbench.methods.ft import Paraphraser
from kdbench.train import TrainConfig, train_epoch


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _case(name: str) -> tuple[str, dict]:
    """The method and its parameters of a row's METHOD: a ``bench epochs`` label, or a method,
    its first label (the Tucker methods at rank 32 on the teacher's factors)."""
    return bench._cases([name])[0]


def _streams(kernels: list, steps: int) -> list[dict]:
    """Per CUDA stream of ``kernels`` (profiler events), busiest first: its busy time (the union
    of its kernels' intervals) and its kernels, per step."""
    by: dict[int, list[tuple[float, float]]] = {}
    for e in kernels:
        by.setdefault(e.device_resource_id, []).append((e.time_range.start, e.time_range.end))
    rows = [
        {
            "stream": stream,
            "busy_ms_per_step": _union(spans) / 1e3 / steps,
            "kernels_per_step": len(spans) / steps,
        }
        for stream, spans in by.items()
    ]
    return sorted(rows, key=lambda r: -r["busy_ms_per_step"])


def profile_row(spec: str, args: argparse.Namespace, data, teacher, paraphraser) -> dict:
    name, _, sets = spec.partition(":")
    settings = {
        k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in sets.split(",") if s)
    }
    cfg = TrainConfig.from_config(
        {"epochs": 1, "batch_size": 128, "device": args.device, **settings}
    )
    name, params = _case(name)
    method = bench._build((name, params), teacher, args.student, 100, 3, paraphraser)
    run = bench._trainer(method, cfg, data, torch.device(args.device))
    t0 = time.perf_counter()
    train_epoch(
        method, run.optimizers, run.train, 0, torch.device(args.device), cfg, step_fn=run.step_fn
    )
    bench._sync(torch.device(args.device))
    warm = time.perf_counter() - t0
    cuda = torch.autograd.DeviceType.CUDA
    activity = torch.profiler.ProfilerActivity
    with torch.profiler.profile(
        activities=[activity.CUDA if args.device == "cuda" else activity.CPU]
    ) as prof:
        t0 = time.perf_counter()
        train_epoch(
            method,
            run.optimizers,
            run.train,
            1,
            torch.device(args.device),
            cfg,
            step_fn=run.step_fn,
        )
        bench._sync(torch.device(args.device))
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == cuda]  # none on the CPU
    steps = len(run.train)
    per: dict[str, list[float]] = {}
    for e in kernels:
        d = per.setdefault(e.name, [0.0, 0])
        d[0] += e.time_range.end - e.time_range.start
        d[1] += 1
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[: args.top]
    row = {
        "row": spec,
        "method": name,
        "params": params,
        "pair": f"{args.teacher}:{args.student}",
        "steps": steps,
        "how": getattr(run.step_fn, "status", "eager"),
        "warmup_seconds": warm,
        "wall_ms_per_step": 1e3 * wall / steps,
        "busy_ms_per_step": _union([(e.time_range.start, e.time_range.end) for e in kernels])
        / 1e3
        / steps,
        "kernel_ms_per_step": sum(v[0] for v in per.values()) / 1e3 / steps,
        "kernels_per_step": len(kernels) / steps,
        "streams": _streams(kernels, steps),
        "top": [
            {"name": k[:120], "ms_per_step": v[0] / 1e3 / steps, "per_step": v[1] / steps}
            for k, v in top
        ],
    }
    print(
        f"{spec:<40} {row['how']:<28} wall {row['wall_ms_per_step']:6.2f} ms/step, "
        f"busy {row['busy_ms_per_step']:6.2f}, kernels {row['kernel_ms_per_step']:6.2f} ms in "
        f"{row['kernels_per_step']:.0f} (warm-up {warm:.0f} s)",
        flush=True,
    )
    if row["streams"]:
        print(
            "    streams: "
            + ", ".join(
                f"{s['stream']}: busy {s['busy_ms_per_step']:.2f} ms in {s['kernels_per_step']:.0f}"
                for s in row["streams"]
            ),
            flush=True,
        )
    for t in row["top"]:
        print(f"    {t['ms_per_step']:7.3f} ms  x{t['per_step']:5.1f}  {t['name']}", flush=True)
    del method, run
    torch._dynamo.reset()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", action="append", required=True)
    p.add_argument("--teacher", default="resnet110")
    p.add_argument("--student", default="resnet56")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    args.command = "profile_step"
    info = provenance.device_info(torch.device(args.device))
    n = args.train_size
    data = bench._synthetic_data(3, 32, 100, (n, n // 9, n // 5))
    torch.manual_seed(1)
    teacher = models.build(args.teacher, 100, 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paraphraser = Path(tmp) / "paraphraser.pt"
        io.save_torch(paraphraser, Paraphraser(64, 0.5).state_dict())
        for spec in args.row:
            try:
                rows.append(profile_row(spec, args, data, teacher, paraphraser))
            except Exception as e:  # one row's failure leaves the others
                print(f"{spec}: failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            # after each row, with the command, device, versions and date, atomically
            bench._save(args, info, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
