"""Kill-anywhere harness: SIGKILL training jobs at chosen points, re-run them, compare.

For each method family (vanilla, kd, ft with its paraphraser, tucker) on a tiny digits config:

1. an uninterrupted run through Snakemake records every kill point it passes
   (``KDBENCH_FAULT_LOG``, see ``kdbench.faults``);
2. ``kills`` of those points are drawn with ``seed`` (at least one during an epoch, one during
   a state write and one during the final writes), in run order;
3. for each, Snakemake runs the target with ``KDBENCH_FAULT=<point>``: at that point the job and
   Snakemake are killed together with SIGKILL. Every declared output that exists afterwards must
   be whole (JSON parses, checkpoints load, PNGs end);
4. a last plain run must complete, leave no state or temporary file, and give the same
   metrics.json curves and final weights as the uninterrupted run (CPU, deterministic).

``tests/test_faults.py`` runs 3 kills per family (ft: 4) in CI. Locally, more:

    .venv/bin/python tests/faults.py --kills 12 --seed 3 [--families kd ft] [--keep /tmp/faults]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from conftest import curves

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
STUDENTS = "results/digits/students"
FAMILIES = {
    "vanilla": [f"{STUDENTS}/none-resnet8/vanilla/default/seed0"],
    "kd": [f"{STUDENTS}/resnet20-resnet8/kd/default/seed0"],
    "ft": [
        "results/digits/paraphrasers/resnet20/seed0",
        f"{STUDENTS}/resnet20-resnet8/ft/default/seed0",
    ],
    "tucker": [f"{STUDENTS}/resnet20-resnet8/tucker/full-teacher-r16/seed0"],
}
UNTIMED_FINAL = ("train_seconds", "seconds_per_epoch", "peak_rss_mb", "peak_cuda_mb")


def config() -> dict:
    """The demo, cut down: one seed, two short epochs, one variant per family."""
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["seeds"] = [0]
    cfg["teacher"]["train"]["epochs"] = 2
    cfg["train"]["epochs"] = 2
    cfg["train"]["batch_size"] = 128
    cfg["methods"] = {
        "vanilla": cfg["methods"]["vanilla"],
        "kd": cfg["methods"]["kd"],
        "ft": {**cfg["methods"]["ft"], "paraphraser": {"epochs": 2}},
        "tucker": {**cfg["methods"]["tucker"], "decomposition": ["full"]},
    }
    return cfg


def snakemake(work: Path, targets: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "1", "--nolock"]
    cmd += ["--rerun-incomplete", *targets, "--configfile", "faults.yaml"]
    return subprocess.run(
        cmd,
        cwd=work,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        start_new_session=True,  # the kill takes this process group: Snakemake and the job
        timeout=600,
    )


def whole(path: Path) -> str | None:
    """Why ``path`` is not a complete file of its kind, or None."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".png" and not path.read_bytes().endswith(b"IEND\xaeB`\x82"):
            return "PNG without its end"
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return f"{type(exc).__name__}: {exc}"
    return None


def final(doc: dict) -> dict:
    skip = (*UNTIMED_FINAL, "resumed_after_epochs")
    return {k: v for k, v in doc.get("final", {}).items() if k not in skip}


@dataclass
class Chain:
    family: str
    kills: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def choose(points: list[str], kills: int, rng: random.Random) -> list[str]:
    """``kills`` distinct points, in run order: one in an epoch, one in a state write, one in
    the final writes, one in the paraphraser's training (ft), the rest anywhere."""
    kinds = [
        [p for p in points if p.startswith("step")],
        [p for p in points if p.startswith(("write:seed0.pt", "rotate:seed0.pt"))],
        [p for p in points if p.endswith("final")],
        [p for p in points if "paraphraser" in p],
    ]
    chosen = {rng.choice(kind) for kind in kinds if kind}
    rest = [p for p in points if p not in chosen]
    chosen |= set(rng.sample(rest, max(0, min(kills - len(chosen), len(rest)))))
    return sorted(chosen, key=points.index)


def run_family(base: Path, family: str, kills: int, rng: random.Random) -> Chain:
    chain = Chain(family)
    runs = FAMILIES[family]
    targets = [f"{run}/metrics.json" for run in runs]
    ref, work = base / f"{family}-reference", base / f"{family}-killed"
    for d in (ref, work):
        shutil.copytree(base / "teacher", d, symlinks=True)
    log = ref / "points.log"
    proc = snakemake(ref, targets, {"KDBENCH_FAULT_LOG": str(log)})
    if proc.returncode != 0:
        chain.problems.append(f"uninterrupted run failed: {proc.stderr[-2000:]}")
        return chain
    points = log.read_text().split()
    if len(points) != len(set(points)):
        chain.problems.append("kill point ids repeat within one run")
    chain.kills = choose(points, kills, rng)
    for point in chain.kills:
        proc = snakemake(work, targets, {"KDBENCH_FAULT": point})
        if proc.returncode != -9:
            chain.problems.append(f"{point}: not killed (exit {proc.returncode})")
            continue
        for run in runs:
            for path in sorted((work / run).glob("*")):
                if not path.name.startswith(".") and (why := whole(path)):
                    chain.problems.append(f"{point}: partial output {path.name}: {why}")
    proc = snakemake(work, targets, {})
    if proc.returncode != 0:
        chain.problems.append(f"final re-run failed: {proc.stderr[-2000:]}")
        return chain
    leftovers = [p for p in (work / "results").rglob("*") if p.name.endswith((".tmp", ".prev"))]
    leftovers += list((work / "results" / "state").rglob("*.pt"))
    if leftovers:
        chain.problems.append(f"left behind: {[str(p.relative_to(work)) for p in leftovers]}")
    for run in runs:
        a = json.loads((ref / run / "metrics.json").read_text())
        b = json.loads((work / run / "metrics.json").read_text())
        if b["status"] != "complete" or curves(a) != curves(b) or final(a) != final(b):
            chain.problems.append(f"{run}: metrics differ from the uninterrupted run")
        for weights in sorted((ref / run).glob("*.pt")):
            wa = torch.load(weights, weights_only=True)
            wb = torch.load(work / run / weights.name, weights_only=True)
            if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
                chain.problems.append(f"{run}/{weights.name}: weights differ")
    return chain


def prepare(base: Path) -> None:
    """A work directory with the config and the trained teacher, copied for every chain."""
    work = base / "teacher"
    work.mkdir(parents=True)
    (work / "faults.yaml").write_text(yaml.safe_dump(config()))
    target = "results/digits/teachers/resnet20/seed0/metrics.json"
    proc = snakemake(work, [target], {})
    if proc.returncode != 0:
        raise RuntimeError(f"teacher training failed: {proc.stderr[-3000:]}")


def run(base: Path, families: list[str], kills: int, seed: int, jobs: int = 2) -> list[Chain]:
    """Every family's chain, ``jobs`` at a time; each family draws its points from its own
    generator, so a (seed, family) gives the same kill points whatever else runs."""
    prepare(base)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(
            pool.map(
                lambda family: run_family(base, family, kills, random.Random(f"{seed}-{family}")),
                families,
            )
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=5, help="kill points per family (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="draws the kill points (default 0)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    ap.add_argument("--jobs", type=int, default=2, help="families run at once (default 2)")
    args = ap.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="kdbench-faults-"))
    try:
        chains = run(base, args.families, args.kills, args.seed, args.jobs)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    for chain in chains:
        print(f"{chain.family}: {len(chain.kills)} kills: {' '.join(chain.kills)}")
        for problem in chain.problems:
            print(f"  PROBLEM {problem}")
    return 1 if any(c.problems for c in chains) else 0


if __name__ == "__main__":
    raise SystemExit(main())
