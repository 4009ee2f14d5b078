"""Does a resumed run end where an uninterrupted one does, on this device (``measure.sh resume``)?

A run's state holds the optimizer's momenta packed, contiguous (``kdbench.io.pack_tensors``),
and until f1bca2d a resumed run handed them so to channels_last weights: fused SGD, which steps
weight and momentum element by element in memory order, then left the uninterrupted run's
curves. Fused SGD and channels_last are the CUDA defaults, so GPU runs resumed before then
(SLURM retries after a preemption or a time limit) may have been affected. The tests check the
fix on the CPU; this checks it on a GPU.

For each ``--set`` combination of flat train settings (default: the device's defaults, and the
same with ``fused=false``, that is ``train.optimizer.fused: false``), it trains resnet8 on 8×8
digits (the embedded set, vanilla, seed 5, ``--epochs`` epochs, batch 128) with
``train.deterministic: true``, so that runs agree bit for bit on CUDA too: twice uninterrupted
(the determinism the comparison needs), and once stopped after its first epoch's state is on
disk, then resumed. Prints and saves (``--json``) whether the resumed run's weights and curves
equal the uninterrupted run's, and their largest weight difference. Exit status 1 if a
deterministic pair agreed but the resumed run did not.

    python tests/gpu/resume.py --json out/resume.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from kdbench import data, io, methods, models, provenance
from kdbench.train import RunOutputs, TrainConfig, fit

FILES = {
    "metrics": "metrics.json",
    "final_weights": "model_final.pt",
    "best_weights": "model_best.pt",
    "loss_plot": "Loss.png",
    "accuracy_plot": "Accuracy.png",
}


def run(directory: Path, name: str, train: dict[str, Any], stop: bool = False) -> dict:
    """One training of resnet8 on 8×8 digits into ``directory / name`` (its state beside it):
    its metrics document and final weights; ``stop``: stopped after the first epoch."""
    ds = data.load_dataset("digits", image_size=8)
    torch.manual_seed(5)
    student = models.build("resnet8", ds.num_classes, ds.in_channels)
    method = methods.get("vanilla")(student, None, {})

    def first_only(epoch: int) -> None:
        if stop and epoch == 1:  # as a job stopped by SIGINT, its state on disk
            raise KeyboardInterrupt

    record = {"run": {"dataset": "digits", "student": "resnet8", "method": "vanilla", "seed": 5}}
    doc = fit(
        method,
        ds,
        TrainConfig.from_config(train),
        seed=5,
        outputs=RunOutputs.from_mapping({k: directory / name / f for k, f in FILES.items()}),
        state_path=directory / f"{name}.state",
        record=record,
        on_epoch_end=first_only,
    )
    return {"doc": doc, "weights": io.load_torch(directory / name / FILES["final_weights"])}


def curves(doc: dict) -> list[tuple]:
    return [(e["train_loss"], e["val_acc"], e["test_acc"]) for e in doc["epochs"]]


def apart(a: dict, b: dict) -> dict[str, Any]:
    """Whether two runs ended alike: weights equal, curves equal, the largest weight
    difference."""
    diff = max(
        float((a["weights"][k].float() - b["weights"][k].float()).abs().max()) for k in a["weights"]
    )
    equal = all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    return {
        "weights_equal": equal,
        "curves_equal": curves(a["doc"]) == curves(b["doc"]),
        "max_weight_difference": diff,
    }


def check(settings: dict[str, Any], epochs: int, device: str) -> dict[str, Any]:
    # flat train settings, as bench's --set takes them (fused=false, not optimizer.fused)
    base = {"epochs": epochs, "batch_size": 128, "device": device, "deterministic": True}
    train = {**base, "lr": 0.05, **settings}
    with tempfile.TemporaryDirectory(prefix="kdbench-resume-") as tmp:
        d = Path(tmp)
        once, twice = run(d, "once", train), run(d, "twice", train)
        with contextlib.suppress(KeyboardInterrupt):
            run(d, "resumed", train, stop=True)
        resumed = run(d, "resumed", train)
    return {
        "settings": settings,
        "resumed_after_epochs": resumed["doc"]["final"]["resumed_after_epochs"],
        "deterministic_pair": apart(once, twice),
        "resumed_against_uninterrupted": apart(resumed, once),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="train settings of one check, flat as bench's --set takes them (repeatable); "
        "default: none, then fused=false",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    combos = args.set if args.set is not None else ["", "fused=false"]
    rows, failed = [], False
    for combo in combos:
        settings = {
            k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in combo.split(",") if s)
        }
        row = check(settings, args.epochs, args.device)
        pair, resumed = row["deterministic_pair"], row["resumed_against_uninterrupted"]
        failed |= pair["weights_equal"] and not resumed["weights_equal"]
        rows.append(row)
        print(
            f"{combo or 'defaults'}: resumed after epochs {row['resumed_after_epochs']}; two "
            f"uninterrupted runs equal: {pair['weights_equal']}; resumed equals uninterrupted: "
            f"weights {resumed['weights_equal']}, curves {resumed['curves_equal']} (largest "
            f"weight difference {resumed['max_weight_difference']:.3g})"
        )
    if args.json:
        doc = {
            "command": "resume",
            "device": provenance.device_info(torch.device(args.device)),
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
