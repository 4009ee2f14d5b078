"""Benchmarks: ``python -m kdbench.bench methods [options]``.

``methods`` times one training step (``kdbench.train.train_step``: forward, losses, backward, the
optimizer steps) of every method on the same student, teacher and batch, and prints each as a
ratio to ``featuremap``. It also times ``kdbench.tucker.decompose`` against tensorly's ``tucker``
(pytorch backend, HOOI, SVD init, 100 iterations, tol 1e-4, as the original projects called it)
on a 128×64×8×8 tensor with ranks (128, 32, 8, 8), and compares their reconstructions.
Warm-up steps are excluded; CUDA timings are synchronised. ``--json`` saves every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdbench import io, methods, models, provenance, tucker
from kdbench.methods.ft import Paraphraser
from kdbench.train import TrainConfig, make_sgd, resolve_device, train_step

#: (method, parameters) timed by ``methods``: every method, the Tucker variants included
CASES: list[tuple[str, dict[str, Any]]] = [
    ("featuremap", {}),
    ("vanilla", {}),
    ("kd", {}),
    ("ft", {}),
    ("tucker", {"rank": 32}),
    ("tucker", {"rank": 32, "decomposition": "sample"}),
    ("tucker", {"rank": 32, "basis": "own"}),
    ("tucker_recomp", {"rank": 32, "target": "teacher"}),
    ("tucker_recomp", {"rank": 32, "target": "student"}),
    ("tucker_recomp", {"rank": 32, "target": "both"}),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _label(name: str, params: dict[str, Any]) -> str:
    cls = methods.get(name)
    variant = cls.variant_name(cls.resolve_params(params)) if cls.grid else ""
    return f"{name} {variant}".strip()


def bench_methods(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    cfg = TrainConfig.from_config({"epochs": 1, "batch_size": args.batch, "device": args.device})
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(*shape, generator=g).to(device)
    yb = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    if device.type == "cuda" and cfg.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    teacher = models.build(args.teacher, args.classes, args.channels)
    steps: list[Callable[[], Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paraphraser = Path(tmp) / "paraphraser.pt"
        io.save_torch(paraphraser, Paraphraser(64, 0.5).state_dict())
        for name, params in CASES:
            torch.manual_seed(0)
            student = models.build(args.student, args.classes, args.channels)
            cls = methods.get(name)
            assets = {"paraphraser": paraphraser} if "paraphraser" in cls.requires else {}
            method = cls(student, teacher if cls.needs_teacher else None, params, assets).to(device)
            if device.type == "cuda" and cfg.channels_last:
                method.to(memory_format=torch.channels_last)
            method.train()
            optimizers = {k: make_sgd(m, cfg) for k, m in method.trainable().items()}

            def step(method: Any = method, optimizers: Any = optimizers) -> None:
                train_step(method, optimizers, xb, yb, device, cfg)

            _time(step, device, args.warmup, 0)
            steps.append(step)
    # Interleaved rounds (one step of each method per round) so that drift in clock speed or
    # load affects every method alike; the median over rounds is reported.
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.steps):
        for i, step in enumerate(steps):
            times[i] += _time(step, device, 0, 1)
    results = [
        {"method": _label(name, params), "seconds": statistics.median(t)}
        for (name, params), t in zip(CASES, times, strict=True)
    ]
    for r in results:
        print(f"  {r['method']:<28} {r['seconds'] * 1e3:9.2f} ms/step", flush=True)
    base = results[0]["seconds"]
    for r in results:
        r["ratio_to_featuremap"] = r["seconds"] / base
    return {"steps": results, "decomposition": bench_decomposition(device, args)}


def bench_decomposition(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    torch.manual_seed(0)
    x = torch.relu(torch.randn(128, 64, 8, 8, device=device))
    ranks = (128, 32, 8, 8)
    ours = _time(lambda: tucker.decompose(x, ranks), device, 3, args.decomp_repeats)
    core, factors = tucker.decompose(x, ranks)
    mine = tucker.recompose(core, factors)
    tl.set_backend("pytorch")
    try:
        theirs_times = _time(
            lambda: tl_tucker(x, rank=list(ranks), init="svd", n_iter_max=100, tol=1e-4),
            device,
            1,
            args.tensorly_repeats,
        )
        tl_core, tl_factors = tl_tucker(x, rank=list(ranks), init="svd", n_iter_max=100, tol=1e-4)
        ref = tl.tucker_to_tensor((tl_core, tl_factors)).float()
    finally:
        tl.set_backend("numpy")
    out = {
        "shape": list(x.shape),
        "ranks": list(ranks),
        "kdbench_seconds": statistics.median(ours),
        "tensorly_seconds": statistics.median(theirs_times),
        "reconstruction_relative_difference": float((mine - ref).norm() / ref.norm()),
        "kdbench_relative_error": float(tucker.relative_error(x, mine)),
        "tensorly_relative_error": float(tucker.relative_error(x, ref)),
    }
    out["speedup"] = out["tensorly_seconds"] / out["kdbench_seconds"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdbench.bench", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "methods", help="time a training step of every method, and Tucker vs tensorly"
    )
    m.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    m.add_argument("--teacher", default=None, help="default resnet110 on CUDA, resnet20 on CPU")
    m.add_argument("--student", default=None, help="default resnet56 on CUDA, resnet8 on CPU")
    m.add_argument("--batch", type=int, default=128)
    m.add_argument("--image-size", type=int, default=32)
    m.add_argument("--channels", type=int, default=3)
    m.add_argument("--classes", type=int, default=100)
    m.add_argument(
        "--steps", type=int, default=None, help="timed rounds (default 50 on CUDA, 20 on CPU)"
    )
    m.add_argument("--warmup", type=int, default=5)
    m.add_argument("--decomp-repeats", type=int, default=50)
    m.add_argument("--tensorly-repeats", type=int, default=5)
    m.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.teacher = args.teacher or ("resnet110" if cuda else "resnet20")
    args.student = args.student or ("resnet56" if cuda else "resnet8")
    args.steps = args.steps or (50 if cuda else 20)
    info = provenance.device_info(device)
    print(
        f"kdbench bench methods: {args.teacher} → {args.student}, "
        f"batch {args.batch}×{args.channels}×{args.image_size}×{args.image_size}, "
        f"{args.classes} classes, on {info['name']} "
        f"({info['threads']} threads), torch {torch.__version__}",
        flush=True,
    )
    result = bench_methods(args)
    print("\nstep time relative to featuremap:")
    for r in result["steps"]:
        print(f"  {r['method']:<28} {r['ratio_to_featuremap']:6.3f}×")
    d = result["decomposition"]
    print(
        f"\nTucker {tuple(d['shape'])} ranks {tuple(d['ranks'])}: "
        f"kdbench {d['kdbench_seconds'] * 1e3:.3f} ms, "
        f"tensorly {d['tensorly_seconds'] * 1e3:.1f} ms → {d['speedup']:.0f}× faster; "
        f"reconstructions differ by {d['reconstruction_relative_difference']:.1e} (relative), "
        f"errors {d['kdbench_relative_error']:.5f} vs {d['tensorly_relative_error']:.5f}"
    )
    if args.json:
        doc = {
            "command": "methods",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": info,
            "platform": platform.platform(),
            "versions": provenance.package_versions(),
            **result,
        }
        with io.atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
