import argparse
import importlib.util
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, mps_stub, run_gpu_script

from kdbench import bench
from kdbench.errors import KdbenchError
from kdbench.train import TrainConfig


def test_bench_methods_runs_on_cpu_and_saves_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [
        "methods",
        "--device",
        "cpu",
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--batch",
        "8",
        "--image-size",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--decomp-repeats",
        "1",
        "--tensorly-repeats",
        "1",
        "--json",
        str(out),
    ]
    assert bench.main(args) == 0
    doc = json.loads(out.read_text())
    names = [s["method"] for s in doc["steps"]]
    assert names[0] == "featuremap" and doc["steps"][0]["ratio_to_featuremap"] == 1.0
    assert {"vanilla", "kd", "ft", "tucker full-teacher-r32", "tucker_recomp both-r32"} <= set(
        names
    )
    assert all(s["seconds"] > 0 for s in doc["steps"])
    d = doc["decomposition"]
    assert d["shape"] == [128, 64, 8, 8] and d["ranks"] == [128, 32, 8, 8]
    assert d["reconstruction_relative_difference"] < 1e-4
    # on CPU the eigendecompositions have one place to run (train.eigh_on_host is for CUDA)
    assert set(d) >= {"eigh_on_device"} and "eigh_on_host" not in d
    assert d["eigh_on_device"]["samplewise_seconds"] > 0
    # the sample-wise solvers (CUDA: block Jacobi against cuSOLVER's gesvda) against LAPACK's
    # in double precision: here LAPACK's eigh against LAPACK's SVD
    solvers = d["samplewise_solvers"]
    assert set(solvers) == {"eigh", "svd"} and "driver" not in solvers["svd"]
    for row in solvers.values():
        assert row["seconds"] > 0
        assert row["projector_max_difference"] < 1e-4 and row["core_relative_difference"] < 1e-4
    assert "faster" in capsys.readouterr().out
    # --decomposition-only: no steps
    assert bench.main([*args[:-1], str(tmp_path / "d.json"), "--decomposition-only"]) == 0
    doc = json.loads((tmp_path / "d.json").read_text())
    assert "steps" not in doc and set(doc["decomposition"]["samplewise_solvers"]) == set(solvers)


def test_bench_epochs_times_the_trainer_and_the_reference_on_cpu(tmp_path, capsys):
    out = tmp_path / "epochs.json"
    args = ["epochs", "--device", "cpu", "--dataset", "digits", "--train-size", "48"]
    args += ["--batch", "16", "--pair", "resnet20:resnet8", "--epochs", "1", "--warmup", "1"]
    args += ["--teachers", "--ablation", "--reference-steps", "1", "--reference-warmup", "0"]
    assert bench.main([*args, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    # no CUDA graphs on the CPU
    assert {(r["steps"], r["evaluation"]) for r in doc["epochs"]} == {("eager", "eager")}
    rows = {(r["method"], r["setting"]): r for r in doc["epochs"]}
    assert ("teacher", "teacher") in rows and ("kd", "plain") in rows
    assert ("kd", "+ no host sync per step") in rows
    plain = rows[("kd", "plain")]["train_config"]
    assert plain["fused"] is False and plain["check_every_step"] is True
    assert rows[("featuremap", "default")]["ratio_to_featuremap"] == 1.0
    for method in ("kd", "ft", "tucker full-teacher-r32", "tucker sample-teacher-r32"):
        r = rows[(method, "default")]
        assert r["train_seconds"] > 0 and r["images_per_second"] > 0 and r["train_images"] == 48
        assert r["reference"]["train_seconds"] > 0
        assert r["speedup_vs_reference"] == pytest.approx(
            r["reference"]["train_seconds"] / r["train_seconds"]
        )
    assert "speed-up" in capsys.readouterr().out
    # the grid of the demo at these rows' batch size (16), from these epoch times
    grid = tmp_path / "grid.json"
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["train"]["batch_size"] = 16
    demo = str(tmp_path / "demo16.yaml")
    Path(demo).write_text(yaml.safe_dump(cfg))
    argv = ["grid", str(out), "--config", demo, "--dataset", "digits", "--json", str(grid)]
    assert bench.main(argv) == 0
    g = json.loads(grid.read_text())["grid"]
    assert g["runs"] == {"teachers": 1, "paraphrasers": 1, "students": 18}
    # the demo: teacher 10 epochs, paraphrasers 4, students 4 (config/demo.yaml)
    sec = {k: r["epoch_seconds"] for k, r in rows.items()}
    demo_runs = ("vanilla", "kd", "featuremap", "ft", "tucker full-teacher-r32")
    demo_runs += ("tucker sample-teacher-r32", "tucker_recomp teacher-r32")
    demo_runs += ("tucker_recomp student-r32", "tucker_recomp both-r32")
    students = 2 * 4 * sum(sec[(m, "default")] for m in demo_runs)
    assert g["gpu_hours"]["students"] == pytest.approx(students / 3600)
    assert g["gpu_hours"]["teachers"] == pytest.approx(10 * sec[("teacher", "teacher")] / 3600)
    assert g["gpu_hours"]["paraphrasers"] == pytest.approx(
        4 * sec[("featuremap", "default")] / 3600
    )
    # apart: each run's start, what its row's warm-up epoch took beyond an epoch
    start = {k: max(0.0, r["warmup_seconds"] - r["epoch_seconds"]) for k, r in rows.items()}
    assert all(r["warmup_epochs"] == 1 and r["warmup_seconds"] > 0 for r in rows.values())
    expected = start[("teacher", "teacher")] + start[("featuremap", "default")]
    expected += 2 * sum(start[(m, "default")] for m in demo_runs)
    assert g["startup_gpu_hours"] == pytest.approx(expected / 3600)
    # a file of rows without their warm-up (before it was recorded): no start-up figure
    doc["epochs"][1].pop("warmup_seconds")
    out.write_text(json.dumps(doc))
    assert bench.main(argv) == 0
    assert json.loads(grid.read_text())["grid"]["startup_gpu_hours"] is None


def _grid_rows(pairs: list[str], labels: list[str]) -> list[dict]:
    """`epochs` rows of ``labels`` for each of ``pairs`` (2 s per epoch) and of their teacher
    (3 s)."""
    rows = [{"pair": p, "method": m, "setting": "default", "epoch_seconds": 2.0}
            for p in pairs for m in labels]  # fmt: skip
    teacher = pairs[0].split(":")[0]
    return [*rows, {"pair": f"none:{teacher}", "method": "teacher", "setting": "teacher",
                    "epoch_seconds": 3.0}]  # fmt: skip


def _config_rows() -> list[dict]:
    """`epochs` rows of config/config.yaml's grid (one rank each) for its two pairs."""
    labels = ["vanilla", "kd", "featuremap", "ft", "tucker full-teacher-r32"]
    labels += [f"tucker_recomp {t}-r32" for t in ("teacher", "student", "both")]
    return _grid_rows(["resnet110:resnet56", "resnet110:resnet20"], labels)


def _demo_rows(pair: str) -> list[dict]:
    """`epochs` rows of every variant of the demo's grid for ``pair`` and its teacher."""
    labels = ["vanilla", "kd", "featuremap", "ft", "tucker full-teacher-r16"]
    labels += ["tucker sample-teacher-r16", "tucker_recomp teacher-r16"]
    labels += ["tucker_recomp student-r16", "tucker_recomp both-r16"]
    return _grid_rows([pair], labels)


def test_bench_grid_estimates_the_grid_in_cohorts_from_a_cohort_row(tmp_path, capsys):
    pair = "resnet20:resnet8"
    rows = _demo_rows(pair)
    # vanilla, kd and featuremap: 6 s one by one, 5 s in a cohort; 2 of them learn from the
    # teacher, so each taught member beyond the first saves 1 s per epoch
    cohort = {"pair": pair, "method": "cohort of 3", "setting": "cohort", "train_seconds": 5.0}
    cohort.update(members=["vanilla", "kd", "featuremap"], members_train_seconds=6.0)
    epochs = tmp_path / "epochs.json"
    epochs.write_text(json.dumps({"epochs": [*rows, cohort]}))
    grid = tmp_path / "grid.json"
    # the demo without member streams or stacks (the cohort row above was trained without them)
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["train"]["cohort_streams"] = False
    config["train"]["cohort_stack"] = False
    demo = str(tmp_path / "plain.yaml")
    Path(demo).write_text(yaml.safe_dump(config))
    argv = ["grid", str(epochs), "--config", demo, "--dataset", "digits", "--json", str(grid)]
    assert bench.main([*argv, "--cohort-size", "4"]) == 0
    g = json.loads(grid.read_text())["grid"]
    # the demo: 2 seeds × 8 taught students (4 epochs each) in cohorts of 4: 4 cohorts
    assert g["cohort_size"] == 4 and g["cohorts"] == 4
    assert g["cohort_saving_seconds_per_member_epoch"] == {"resnet20": 1.0}
    saved = 4 * 4 * (4 - 1) * 1.0
    assert g["gpu_hours_total_cohorts"] == pytest.approx(g["gpu_hours_total"] - saved / 3600)
    assert "in 4 cohorts of up to 4" in capsys.readouterr().out
    # the demo's cohort_size (0): no cohort estimate; a cohort row with one taught member, or
    # none: one line naming what is missing
    assert bench.main(argv) == 0
    assert "gpu_hours_total_cohorts" not in json.loads(grid.read_text())["grid"]
    cohort.update(members=["vanilla", "kd"])
    epochs.write_text(json.dumps({"epochs": [*rows, cohort]}))
    assert bench.main([*argv, "--cohort-size", "4"]) == 1
    assert "need an `epochs --cohort` row of at least 2 taught members with teacher resnet20" in (
        capsys.readouterr().err
    )
    # a config with train.cohort_streams takes the saving of the cohort rows trained with it
    cohort.update(members=["vanilla", "kd", "featuremap"])
    on_streams = {**cohort, "train_seconds": 4.0}
    on_streams["train_config"] = {"cohort_streams": True}
    epochs.write_text(json.dumps({"epochs": [*rows, cohort, on_streams]}))
    config["train"]["cohort_streams"] = True  # the default
    streams_config = tmp_path / "streams.yaml"
    streams_config.write_text(yaml.safe_dump(config))
    argv[argv.index(demo)] = str(streams_config)
    assert bench.main([*argv, "--cohort-size", "4"]) == 0
    g = json.loads(grid.read_text())["grid"]
    assert g["cohort_streams"] is True
    assert g["cohort_saving_seconds_per_member_epoch"] == {"resnet20": 2.0}
    # and so does --cohort-streams, whatever the config; --no-cohort-streams takes the others
    demo_argv = [*argv, "--cohort-size", "4"]
    demo_argv[demo_argv.index(str(streams_config))] = demo
    for flag, saving in (("--cohort-streams", 2.0), ("--no-cohort-streams", 1.0)):
        assert bench.main([*demo_argv, flag]) == 0
        g = json.loads(grid.read_text())["grid"]
        assert g["cohort_saving_seconds_per_member_epoch"] == {"resnet20": saving}
    epochs.write_text(json.dumps({"epochs": [*rows, cohort]}))  # none trained with it
    assert bench.main([*argv, "--cohort-size", "4"]) == 1
    assert "trained with cohort_streams (--cohort-streams)" in capsys.readouterr().err
    # the rows trained with train.cohort_stack: only with --cohort-stack or the config's
    # cohort_stack (the demo's: auto, which a GPU's grid takes as on CUDA: stacked); this one
    # of `epochs --only-cohort`, without its members' seconds, which come from their rows (2 s
    # each)
    stacked = {k: v for k, v in on_streams.items() if k != "members_train_seconds"}
    stacked["train_seconds"] = 3.0
    stacked["train_config"] = {"cohort_streams": True, "cohort_stack": True}
    timed = [{**r, "train_seconds": 2.0} if r["method"] in cohort["members"] else r for r in rows]
    epochs.write_text(json.dumps({"epochs": [*timed, cohort, on_streams, stacked]}))
    stack_argv = [*argv, "--cohort-size", "4"]
    stack_argv[stack_argv.index(str(streams_config))] = str(REPO / "config" / "demo.yaml")
    for call, stack, saving in (
        ([*argv, "--cohort-size", "4"], False, 2.0),
        ([*argv, "--cohort-size", "4", "--cohort-stack"], True, 3.0),
        (stack_argv, True, 3.0),
        ([*stack_argv, "--no-cohort-stack"], False, 2.0),
    ):
        assert bench.main(call) == 0
        g = json.loads(grid.read_text())["grid"]
        assert g["cohort_stack"] is stack
        assert g["cohort_saving_seconds_per_member_epoch"] == {"resnet20": saving}
    epochs.write_text(json.dumps({"epochs": [*rows, cohort, on_streams, stacked]}))  # no 2 s
    assert bench.main(stack_argv) == 1
    assert "with cohort_streams (--cohort-streams) and cohort_stack (--cohort-stack)" in (
        capsys.readouterr().err
    )


def test_bench_grid_costs_a_mixed_cohort_with_each_member_s_own_pair(tmp_path):
    """config.yaml's cohorts of 8 hold resnet56 and resnet20 students of resnet110 (19 taught
    per pair and seed, in config order: 8, 8, 3 + 5, 8, 6): each member saves what its pair's
    cohort row saved (else the teacher's mean), all but the one that would save most."""
    from kdbench import config as kdconfig

    rows = _config_rows()

    def cohort(student, saving):  # 3 taught members: 2 of them save `saving` each
        row = {"pair": f"resnet110:{student}", "method": "cohort of 3", "setting": "cohort"}
        row.update(members=["kd", "featuremap", "ft"], members_train_seconds=6.0)
        row.update(train_seconds=6.0 - 2 * saving, train_config={"cohort_streams": True})
        return row

    config = REPO / "config" / "config.yaml"
    resolved = kdconfig.resolve(yaml.safe_load(config.read_text()))
    epochs_per_run = int(kdconfig.train_params(resolved, "student")["epochs"])
    epochs, grid = tmp_path / "epochs.json", tmp_path / "grid.json"
    argv = ["grid", str(epochs), "--config", str(config), "--json", str(grid)]
    argv += ["--cohort-size", "8", "--cohort-streams", "--no-cohort-stack"]
    for cohorts, cut in (
        ([cohort("resnet20", 1.0)], 7 + 7 + 7 + 7 + 5),  # resnet20's saving for all
        ([cohort("resnet20", 1.0), cohort("resnet56", 2.0)], 14 + 14 + (3 * 2 + 5 - 2) + 7 + 5),
    ):
        epochs.write_text(json.dumps({"epochs": [*rows, *cohorts]}))
        assert bench.main(argv) == 0
        g = json.loads(grid.read_text())["grid"]
        assert g["cohorts"] == 15
        saved = g["gpu_hours_total"] - g["gpu_hours_total_cohorts"]
        assert saved == pytest.approx(3 * cut * epochs_per_run / 3600)  # 3 seeds
    assert g["cohort_saving_seconds_per_member_epoch"] == {"resnet110": 1.5}
    by_pair = g["cohort_saving_seconds_per_member_epoch_by_pair"]
    assert by_pair == {"resnet110:resnet20": 1.0, "resnet110:resnet56": 2.0}


def test_state_wait_interpolates_between_the_nearest_rows():
    rows = [{"arch": "resnet20", "students": n, "blocking_seconds": s}
            for n, s in ((1, 1.0), (4, 2.0), (8, 6.0))]  # fmt: skip
    assert bench.state_wait(rows, "resnet20", 4) == 2.0
    assert bench.state_wait(rows, "resnet20", 2) == pytest.approx(1 + 1 / 3)
    assert bench.state_wait(rows, "resnet20", 6) == pytest.approx(4.0)  # 4 and 8 as near
    assert bench.state_wait(rows, "resnet20", 10) == pytest.approx(8.0)  # on past the last
    assert bench.state_wait(rows[:1], "resnet20", 3) == 3.0  # one row: its share a student
    assert bench.state_wait(rows, "resnet56", 1) is None


def test_bench_grid_adds_saving_the_training_state(tmp_path, capsys):
    """config.yaml's grid with `bench state` rows of resnet20 (1 and 8 students) and resnet56
    (1): each run waits its architecture's row after every epoch, and each cohort (per seed
    8 resnet56, 8 resnet56, 3 resnet56 + 5 resnet20, 8 resnet20, 6 resnet20; the 2 vanilla
    students alone) once for its students of each architecture."""
    rows = _config_rows()
    epochs, grid, state = tmp_path / "epochs.json", tmp_path / "grid.json", tmp_path / "s.json"
    epochs.write_text(json.dumps({"epochs": rows}))
    states = [{"arch": "resnet20", "students": 1, "blocking_seconds": 1.0},
              {"arch": "resnet20", "students": 8, "blocking_seconds": 4.5},
              {"arch": "resnet56", "students": 1, "blocking_seconds": 2.0}]  # fmt: skip
    state.write_text(json.dumps({"command": "state", "states": states}))
    config = REPO / "config" / "config.yaml"
    argv = ["grid", str(epochs), "--config", str(config), "--json", str(grid)]
    assert bench.main([*argv, "--cohort-size", "0", "--state", str(state)]) == 0
    g = json.loads(grid.read_text())["grid"]
    assert g["state_saving_gpu_hours"] == pytest.approx((60 * 1.0 + 60 * 2.0) * 150 / 3600)
    assert "state_saving_gpu_hours_cohorts" not in g
    assert g["state_saving_not_costed"] == {"teacher resnet110": 1, "paraphraser": 1}
    out = capsys.readouterr().out
    assert "saving the training state 7.50 more one at a time (no `bench state` row for " in out
    # in the config's cohorts of 8 (resnet20: 1 + 0.5 a student beyond the first; resnet56:
    # 2.0 a student, its one row's share)
    argv += ["--cohort-size", "8", "--cohort-streams", "--no-cohort-stack"]
    cohort = {"pair": "resnet110:resnet20", "method": "cohort of 3", "setting": "cohort"}
    cohort.update(members=["kd", "featuremap", "ft"], members_train_seconds=6.0)
    cohort.update(train_seconds=5.0, train_config={"cohort_streams": True})
    epochs.write_text(json.dumps({"epochs": [*rows, cohort]}))
    assert bench.main([*argv, "--state", str(state)]) == 0
    g = json.loads(grid.read_text())["grid"]
    per_seed = 2 * 16.0 + (6.0 + 3.0) + 4.5 + 3.5 + 2.0 + 1.0
    assert g["state_saving_gpu_hours_cohorts"] == pytest.approx(3 * per_seed * 150 / 3600)
    assert "7.50 more one at a time, 6.50 in the cohorts" in capsys.readouterr().out
    # without --state, none of it; a file that is not `state --json`'s: one line
    assert bench.main(argv) == 0
    assert not any(k.startswith("state_") for k in json.loads(grid.read_text())["grid"])
    assert bench.main([*argv, "--state", str(epochs)]) == 1
    assert capsys.readouterr().err.strip().endswith("has no rows of `state --json`")


def test_bench_grid_with_several_cohorts_per_gpu_from_a_concurrent_cohort_file(tmp_path, capsys):
    pair = "resnet20:resnet8"
    rows = _demo_rows(pair)
    cohort = {"pair": pair, "method": "cohort of 2", "setting": "cohort", "train_seconds": 3.0}
    cohort.update(members=["kd", "featuremap"], members_train_seconds=4.0)
    cohort["train_config"] = {"cohort_streams": True, "cohort_stack": True}  # the defaults
    epochs = tmp_path / "epochs.json"
    epochs.write_text(json.dumps({"epochs": [*rows, cohort]}))
    # 1, 2 and 4 cohorts at once: 1.5x and 1.2x the throughput of one
    runs = [{"runs": n, "cohort": ["kd", "featuremap"], "throughput_vs_one": t}
            for n, t in ((1, 1.0), (2, 1.5), (4, 1.2))]  # fmt: skip
    cohorts = tmp_path / "cohorts.json"
    cohorts.write_text(json.dumps({"concurrent": runs}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"concurrent": [{"runs": 2, "throughput_vs_one": 1.25}]}))
    grid = tmp_path / "grid.json"
    argv = ["grid", str(epochs), "--config", str(REPO / "config" / "demo.yaml")]
    argv += ["--dataset", "digits", "--json", str(grid), "--cohort-size", "4"]
    assert bench.main([*argv, "--cohort-concurrency", str(cohorts)]) == 0
    g = json.loads(grid.read_text())["grid"]
    assert g["cohorts_per_gpu"] == 2
    assert g["gpu_hours_total_cohorts_concurrent"] == pytest.approx(
        g["gpu_hours_total_cohorts"] / 1.5
    )
    assert "with 2 per GPU" in capsys.readouterr().out.splitlines()[-1]
    # each file where it belongs, and cohorts to put several of on a GPU: one line otherwise
    bad = [
        (["--concurrency", str(cohorts)], "is a `concurrent --cohort` file"),
        (["--cohort-concurrency", str(plain)], "is not a `concurrent --cohort` file"),
        (["--cohort-concurrency", str(cohorts), "--cohort-size", "0"], "needs cohorts"),
    ]
    for extra, message in bad:
        assert bench.main([*argv, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert bench.main([*argv, "--concurrency", str(plain)]) == 0
    assert json.loads(grid.read_text())["grid"]["runs_per_gpu"] == 2


def test_bench_grid_gives_the_readmes_h200_figures_from_the_kept_json(tmp_path):
    """The grid GPU-hours quoted in docs/perf/README.md (10.2 one run per GPU, 6.6 with 4 under
    MPS) and the README (with the fifth session's files 9.0, 5.8, and 6.5 in cohorts of 8; with
    the sixth's, 3.8 in stacked cohorts of 8; with the eighth's vanilla resnet56 row, 8.93 and
    3.73; with the ninth's resnet56 recompositions, 8.15, 5.28, 3.47 and 2.03, and 0.047 and
    0.046 for saving the training state) from the JSON files of docs/perf, as their commands
    compute them."""
    perf = REPO / "docs" / "perf"
    h200 = perf / "h200-2026-11-26"
    files = ["s2/epochs56.json", "s2/epochs20.json", "s3/epochs56.json", "s3/epochs20.json"]
    files += ["s3/tucker-pipeline_targets-true.json", "s4/epochs20.json"]
    out = tmp_path / "grid.json"
    argv = ["grid", *(str(h200 / f) for f in files), "--config", str(REPO / "config/config.yaml")]
    argv += ["--concurrency", str(h200 / "s4/mps.json"), "--json", str(out)]
    assert bench.main(argv) == 0
    g = json.loads(out.read_text())["grid"]
    # the config's cohorts of 8, stacked, which these files have no rows of: left out
    assert "gpu_hours_total_cohorts" not in g and "cohort_stack" in g["cohorts_not_estimated"]
    assert g["runs"] == {"teachers": 1, "paraphrasers": 1, "students": 120}
    assert round(g["gpu_hours_total"], 1) == 10.2 and g["runs_per_gpu"] == 4
    assert round(g["gpu_hours_total_concurrent"], 1) == 6.6
    # with the fifth session's rows (cuDNN autotuning; cohorts of 7 resnet20 students), and in
    # cohorts of 8 with and without member streams: 9.0, 5.8 with 4 per GPU, 6.5 and 7.3
    h200_5 = perf / "h200-2026-11-27"

    def add(*paths: Path) -> None:
        """The files after the others, before the options, as the commands give them (later
        files replace the rows of earlier ones)."""
        at = argv.index("--config")
        argv[at:at] = [str(p) for p in paths]

    add(*(h200_5 / f for f in ("cohort.json", "kd56.json", "cohort56.json")))
    for flag, cohorts in (("--cohort-streams", 6.5), ("--no-cohort-streams", 7.3)):
        assert bench.main([*argv, "--cohort-size", "8", flag, "--no-cohort-stack"]) == 0
        g = json.loads(out.read_text())["grid"]
        assert round(g["gpu_hours_total"], 1) == 9.0
        assert round(g["gpu_hours_total_concurrent"], 1) == 5.8
        assert round(g["gpu_hours_total_cohorts"], 1) == cohorts and g["cohorts"] == 15
    # and with the sixth session's stacked cohorts of 7 (resnet20 and resnet56): the config's
    # own cohorts (8, on streams, stacked on CUDA), 3.8
    h200_6 = perf / "h200-2026-11-27-s6"
    add(h200_6 / "stack.json", h200_6 / "stack56.json")
    assert bench.main(argv) == 0
    g = json.loads(out.read_text())["grid"]
    assert g["cohort_size"] == 8 and g["cohort_streams"] and g["cohort_stack"]
    assert round(g["gpu_hours_total"], 1) == 9.0
    assert round(g["gpu_hours_total_cohorts"], 1) == 3.8 and g["cohorts"] == 15
    by_pair = g["cohort_saving_seconds_per_member_epoch_by_pair"]
    assert {k: round(v, 2) for k, v in by_pair.items()} == {
        "resnet110:resnet20": 0.82,
        "resnet110:resnet56": 1.73,
    }
    # and with the eighth session's vanilla resnet56 row (cuDNN autotuning): 8.93 and 3.73
    add(perf / "h200-2026-11-27-s8" / "vanilla56.json")
    assert bench.main(argv) == 0
    g = json.loads(out.read_text())["grid"]
    assert round(g["gpu_hours_total"], 2) == 8.93
    assert round(g["gpu_hours_total_cohorts"], 2) == 3.73
    # and with the ninth session's recompositions on resnet56 (cuDNN autotuning), several
    # stacked cohorts to a GPU (the seventh's) and the save of the training state
    add(perf / "h200-2026-11-28-s9" / "recomp56.json")
    argv += ["--cohort-concurrency", str(perf / "h200-2026-11-27-s7" / "mps-cohort.json")]
    argv += [
        "--state",
        *(str(perf / "h200-2026-11-27-s7" / f"state-{a}.json") for a in ("resnet20", "resnet56")),
    ]
    assert bench.main(argv) == 0
    g = json.loads(out.read_text())["grid"]
    assert round(g["gpu_hours_total"], 2) == 8.15
    assert round(g["gpu_hours_total_concurrent"], 2) == 5.28
    assert round(g["gpu_hours_total_cohorts"], 2) == 3.47
    assert round(g["gpu_hours_total_cohorts_concurrent"], 2) == 2.03
    assert round(g["state_saving_gpu_hours"], 3) == 0.047
    assert round(g["state_saving_gpu_hours_cohorts"], 3) == 0.046


def _profile_step():
    """tests/gpu/profile_step.py as a module."""
    spec = importlib.util.spec_from_file_location(
        "profile_step", REPO / "tests" / "gpu" / "profile_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_profile_gives_each_streams_busy_time_and_takes_benchs_labels():
    """measure.sh profile-tucker: per CUDA stream, the union of its kernels' intervals per step,
    busiest first; a row's METHOD a method or a label of bench epochs."""
    ps = _profile_step()

    def kernel(stream: int, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(
            device_resource_id=stream, time_range=SimpleNamespace(start=start, end=end)
        )

    kernels = [kernel(7, 0, 400), kernel(7, 300, 1000), kernel(13, 100, 300), kernel(7, 3000, 3500)]
    kernels += [kernel(13, 1500, 1600), kernel(21, 0, 2000)]
    assert ps._streams(kernels, steps=2) == [
        {"stream": 21, "busy_ms_per_step": 1.0, "kernels_per_step": 0.5},
        {"stream": 7, "busy_ms_per_step": 0.75, "kernels_per_step": 1.5},
        {"stream": 13, "busy_ms_per_step": 0.15, "kernels_per_step": 1.0},
    ]
    assert ps._case("tucker sample-teacher-r32") == (
        "tucker",
        {"rank": 32, "decomposition": "sample"},
    )
    assert ps._case("tucker") == ("tucker", {"rank": 32})
    assert ps._case("tucker_recomp") == ("tucker_recomp", {"rank": 32, "target": "teacher"})
    assert ps._case("kd") == ("kd", {})


def test_the_gpu_profile_script_runs_on_cpu(tmp_path):
    """tests/gpu/profile_step.py on the CPU (no CUDA kernels to count): its rows, the methods
    its labels name (with a train setting after the colon), one line for a row that fails, and
    the JSON's device and versions."""
    out = tmp_path / "profile.json"
    argv = ["--device", "cpu", "--teacher", "resnet8", "--student", "resnet8"]
    argv += ["--train-size", "256", "--row", "featuremap", "--json", str(out)]
    argv += ["--row", "tucker sample-teacher-r32:cuda_graphs=false", "--row", "nonsense"]
    proc = run_gpu_script("profile_step.py", *argv, timeout=300)
    assert "nonsense: failed: KdbenchError: bench: unknown method(s) nonsense" in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["command"] == "profile_step" and doc["device"]["type"] == "cpu"
    assert doc["versions"]["torch"] == torch.__version__.split("+")[0]
    rows = doc["rows"]
    assert [(r["method"], r["params"]) for r in rows] == [
        ("featuremap", {}),
        ("tucker", {"rank": 32, "decomposition": "sample"}),
    ]
    assert all(r["pair"] == "resnet8:resnet8" and r["steps"] == 2 for r in rows)
    assert all(r["wall_ms_per_step"] > 0 and r["streams"] == [] for r in rows)


def test_timed_epochs_step_the_learning_rate_schedule_as_fit_does(monkeypatch):
    """So that a timed epoch pays for a new learning rate (under CUDA graphs, a new capture)."""
    from kdbench import methods, models, train

    lrs = []
    real = train.train_epoch

    def train_epoch(method, optimizers, *args, **kwargs):
        lrs.append(optimizers["student"].param_groups[0]["lr"])
        return real(method, optimizers, *args, **kwargs)

    monkeypatch.setattr(bench, "train_epoch", train_epoch)
    method = methods.get("vanilla")(models.build("resnet8", 10, 3), None, {})
    cfg = train.TrainConfig(epochs=4, batch_size=8, lr=0.1, device="cpu")
    data = bench._synthetic_data(3, 8, 10, (16, 8, 8))
    bench.time_epochs(method, cfg, data, torch.device("cpu"), epochs=2, warmup=1)
    # cosine over 4 epochs: each of the 3 epochs at its own learning rate
    assert lrs == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05])


def test_bench_epochs_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    timed = []

    def time_epochs(*args, **kwargs):
        if timed:
            raise KeyboardInterrupt  # as a time limit's signal would stop it
        timed.append(real(*args, **kwargs))
        return timed[-1]

    real = bench.time_epochs
    monkeypatch.setattr(bench, "time_epochs", time_epochs)
    out = tmp_path / "epochs.json"
    args = ["epochs", "--device", "cpu", "--dataset", "digits", "--train-size", "32"]
    args += ["--batch", "16", "--pair", "resnet8:resnet8", "--epochs", "1", "--warmup", "0"]
    args += ["--methods", "vanilla", "kd", "--no-reference", "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["device"]["type"] == "cpu"
    assert [r["method"] for r in doc["epochs"]] == ["vanilla"]
    assert doc["epochs"][0]["train_seconds"] == timed[0]["train_seconds"]


def test_bench_concurrent_and_spread_run_on_cpu(tmp_path):
    out = tmp_path / "concurrent.json"
    args = ["concurrent", "--device", "cpu", "--dataset", "digits", "--train-size", "32"]
    args += ["--pair", "resnet8:resnet8", "--runs", "1", "2", "--epochs", "1", "--warmup", "0"]
    assert bench.main([*args, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["concurrent"]
    assert doc["complete"] and [r["runs"] for r in rows] == [1, 2]
    assert rows[0]["throughput_vs_one"] == 1.0
    assert all(r["images_per_second"] > 0 for r in rows)
    # each run a cohort of two students on one teacher pass, its members on no other row
    cohorts = tmp_path / "cohorts.json"
    args[args.index("--runs") + 1 : args.index("--runs") + 3] = ["1"]
    assert bench.main([*args, "--cohort", "kd", "featuremap", "--json", str(cohorts)]) == 0
    rows = json.loads(cohorts.read_text())["concurrent"]
    assert [(r["runs"], r["cohort"]) for r in rows] == [(1, ["kd", "featuremap"])]
    assert rows[0]["images_per_second"] > 0
    out = tmp_path / "spread.json"
    argv = ["spread", "--device", "cpu", "--epochs", "1", "--teacher-epochs", "1", "--seeds", "2"]
    argv += ["--set", "check_every_step=true", "--cohort"]  # for the fast runs and a cohort
    # on one thread, which the bounds on the cohort below were drawn for: this short run carries
    # rounding far, and how far depends on the order of the sums (3e-5 in training loss on one
    # thread, 3e-3 on two); test_cohort checks a stack against its members step by step
    threads = torch.get_num_threads()  # another test's job in this process may have set it
    torch.set_num_threads(1)
    try:
        assert bench.main([*argv, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    spread = json.loads(out.read_text())["spread"]
    assert set(spread) == {"fast", "plain", "deterministic", "cohort"}
    cohort = spread.pop("cohort")
    assert spread["fast"]["train_config"]["check_every_step"] is True
    assert spread["fast"]["train_config"]["fused"] == "auto"
    for row in spread.values():  # on CPU every setting repeats bit for bit
        assert row["repeat_weights_identical"] and row["repeat_max_abs_diff"]["test_acc"] == 0
        assert len(row["test_acc_last_per_seed"]) == 2
    # the fast runs' KD students stacked with a featuremap student: their own runs up to
    # rounding (the grouped convolutions' backward sums in another order)
    assert cohort["cohort_stack"] is True and cohort["train_config"]["check_every_step"]
    assert cohort["members"] == ["resnet8-kd-default", "resnet8-featuremap-default"]
    assert len(cohort["test_acc_last_per_seed"]) == 2
    assert 0 < cohort["vs_fast_max_abs_diff"]["train_loss"] < 1e-3
    assert 0 < cohort["vs_fast_weights_max_abs_diff"] < 0.05


def test_bench_state_times_saving_a_cohorts_state_on_cpu(tmp_path, capsys):
    out = tmp_path / "state.json"
    argv = ["state", "--device", "cpu", "--arch", "ResNetBaby", "--students", "1", "3"]
    assert bench.main([*argv, "--rounds", "2", "--dir", str(tmp_path), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "state" and doc["device"]["type"] == "cpu"
    one, three = doc["states"]
    assert (one["arch"], one["students"], three["students"]) == ("resnet8", 1, 3)
    assert 2.5 < three["megabytes"] / one["megabytes"] < 3.5  # weights, momenta, best weights
    for row in (one, three):
        for key in ("before", "blocking", "write", "load"):
            assert row[f"{key}_seconds"] > 0
        assert row["before_over_blocking"] == row["before_seconds"] / row["blocking_seconds"]
    assert not list(tmp_path.glob("*.state*"))  # its states removed, nothing else left
    assert "resnet8 ×3" in capsys.readouterr().out


def test_bench_bad_arguments_are_one_line(capsys, tmp_path):
    assert bench.main(["epochs", "--device", "cpu", "--pair", "resnet20"]) == 1
    assert bench.main(["epochs", "--device", "cpu", "--methods", "kdd"]) == 1
    assert bench.main(["concurrent", "--device", "cpu", "--mps"]) == 1
    (tmp_path / "cut.json").write_text('{"epochs": [')
    (tmp_path / "other.json").write_text('{"concurrent": [{"runs": 1}]}')
    for name in ("missing.json", "cut.json", "other.json"):
        assert bench.main(["grid", str(tmp_path / name)]) == 1
    assert bench.main(["state", "--device", "cpu", "--arch", "vgg8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err.pop().startswith("kdbench bench: unknown architecture 'vgg8' (known: resnet110")
    assert err[0] == "kdbench bench: bench: --pair wants TEACHER:STUDENT, got 'resnet20'"
    assert err[1].startswith("kdbench bench: bench: unknown method(s) kdd")
    assert err[2] == "kdbench bench: bench concurrent: --mps needs a CUDA device, not cpu"
    assert err[3].startswith(f"kdbench bench: bench grid: cannot read {tmp_path / 'missing.json'}")
    assert err[4].startswith(f"kdbench bench: bench grid: cannot read {tmp_path / 'cut.json'}")
    assert err[5].endswith("other.json has no rows of `epochs --json`") and len(err) == 6
    # a bad option value: argparse's one line, not its usage, and status 2
    for argv in (["concurrent", "--runs", "0"], ["epochs", "--train-size", "x"]):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "python -m kdbench.bench concurrent: argument --runs: 0 is less than 1 "
        "(--help lists the options)",
        "python -m kdbench.bench epochs: argument --train-size: 'x' is not a whole number "
        "(--help lists the options)",
    ]


def test_bench_grid_takes_the_configs_dataset_and_refuses_one_it_does_not_train(capsys, tmp_path):
    epochs, grid = tmp_path / "epochs.json", tmp_path / "grid.json"
    epochs.write_text(json.dumps({"epochs": _demo_rows("resnet20:resnet8")}))
    argv = ["grid", str(epochs), "--config", str(REPO / "config" / "demo.yaml")]
    assert bench.main([*argv, "--json", str(grid)]) == 0
    g = json.loads(grid.read_text())["grid"]
    assert g["dataset"] == "digits" and g["runs"]["students"] == 18  # 9 variants, 2 seeds
    capsys.readouterr()
    assert bench.main([*argv, "--dataset", "cifar100"]) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == (
        f"kdbench bench: bench grid: {REPO / 'config' / 'demo.yaml'} trains nothing on "
        "cifar100 (its datasets: digits)"
    )


def test_bench_grid_costs_each_run_from_rows_of_its_batch_size(capsys, tmp_path):
    """Rows at batch 128 (2 s an epoch, the teacher 3 s; a run's start 1 s) and 64 (4 s, 6 s;
    3 s): each run is costed at its own batch size, and a batch no row has is one line naming
    it."""
    rows = [{**r, "train_config": {"batch_size": 128}, "warmup_epochs": 1,
             "warmup_seconds": r["epoch_seconds"] + 1} for r in _config_rows()]  # fmt: skip
    slow = [{**r, "epoch_seconds": 2 * r["epoch_seconds"], "train_config": {"batch_size": 64},
             "warmup_epochs": 1, "warmup_seconds": 2 * r["epoch_seconds"] + 3}
            for r in _config_rows()]  # fmt: skip
    epochs, grid = tmp_path / "epochs.json", tmp_path / "grid.json"
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    argv = ["grid", str(epochs), "--config", str(tmp_path / "c.yaml"), "--cohort-size", "0"]

    def estimate(rows, student, teacher):
        epochs.write_text(json.dumps({"epochs": rows}))
        cfg["train"]["batch_size"] = student
        cfg["teacher"].setdefault("train", {})["batch_size"] = teacher
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        return bench.main([*argv, "--json", str(grid)])

    assert estimate([*rows, *slow], 128, 128) == 0
    fast = json.loads(grid.read_text())["grid"]["gpu_hours"]
    assert estimate([*slow, *rows], 64, 128) == 0  # the order of the files does not matter
    mixed = json.loads(grid.read_text())["grid"]["gpu_hours"]
    assert mixed["students"] == pytest.approx(2 * fast["students"])
    assert mixed["paraphrasers"] == pytest.approx(2 * fast["paraphrasers"])
    assert mixed["teachers"] == pytest.approx(fast["teachers"])
    g = json.loads(grid.read_text())["grid"]  # each run's start at its own batch size too
    started = 3 * (g["runs"]["students"] + g["runs"]["paraphrasers"]) + 1 * g["runs"]["teachers"]
    assert g["startup_gpu_hours"] == pytest.approx(started / 3600)
    capsys.readouterr()
    assert estimate(rows, 64, 128) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("kdbench bench: bench grid: no measurement of ")
    assert err.endswith(" at batch 64 (time it with epochs --batch 64 --pair/--methods/--teachers)")


def test_bench_grid_costs_a_config_that_trains_on_a_subset(capsys, tmp_path):
    """Epochs on train.train_size images: the rows' training seconds in proportion to the
    images (45,000 measured), their evaluation as it was; the teachers on their own subset."""
    rows = _config_rows()
    for r in rows:  # 2 s an epoch: 1.8 s training 45,000 images, 0.2 s evaluation (teacher 3 s)
        share = r["epoch_seconds"] * 0.9
        r.update(train_images=45000, train_seconds=share, eval_seconds=r["epoch_seconds"] - share)
    cohort = {"pair": "resnet110:resnet20", "method": "cohort of 3", "setting": "cohort"}
    cohort.update(members=["kd", "featuremap", "ft"], members_train_seconds=6.0, eval_seconds=0)
    cohort.update(train_seconds=5.0, train_images=45000, train_config={"cohort_streams": True})
    epochs, grid = tmp_path / "epochs.json", tmp_path / "grid.json"
    epochs.write_text(json.dumps({"epochs": [*rows, cohort]}))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    argv = ["grid", str(epochs), "--json", str(grid), "--cohort-size", "8", "--cohort-streams"]
    argv.append("--no-cohort-stack")

    def estimate(students, teachers):
        cfg["train"]["train_size"] = students
        cfg["teacher"].setdefault("train", {})["train_size"] = teachers
        (tmp_path / "subset.yaml").write_text(yaml.safe_dump(cfg))
        assert bench.main([*argv, "--config", str(tmp_path / "subset.yaml")]) == 0
        return json.loads(grid.read_text())["grid"]

    full, sub = estimate(None, None), estimate(4500, None)
    assert sub["train_size"] == {"student": 4500, "teacher": None}
    # students and the paraphraser: 0.18 + 0.2 s an epoch instead of 2 s; the teacher as before
    hours = full["gpu_hours"]
    assert sub["gpu_hours"]["students"] == pytest.approx(hours["students"] * 0.38 / 2)
    assert sub["gpu_hours"]["paraphrasers"] == pytest.approx(hours["paraphrasers"] * 0.38 / 2)
    assert sub["gpu_hours"]["teachers"] == pytest.approx(hours["teachers"])
    # a cohort saves a tenth of what it saved per member epoch
    saved = full["gpu_hours_total"] - full["gpu_hours_total_cohorts"]
    assert saved > 0
    assert sub["gpu_hours_total"] - sub["gpu_hours_total_cohorts"] == pytest.approx(saved / 10)
    # the teacher on 9,000 images: 0.54 + 0.3 s an epoch instead of 3 s
    both = estimate(4500, 9000)
    assert both["gpu_hours"]["teachers"] == pytest.approx(hours["teachers"] * 0.84 / 3)
    assert both["gpu_hours"]["students"] == pytest.approx(sub["gpu_hours"]["students"])
    assert "(students on 4500 images, teachers on 9000 images)" in capsys.readouterr().out
    # rows that do not record their training images and seconds: one line
    epochs.write_text(json.dumps({"epochs": _config_rows()}))
    cfg["train"]["train_size"] = 4500
    (tmp_path / "subset.yaml").write_text(yaml.safe_dump(cfg))
    assert bench.main(["grid", str(epochs), "--config", str(tmp_path / "subset.yaml")]) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("kdbench bench: bench grid: the row of ") and "train.train_size" in err


def test_mps_daemon_is_started_for_the_block_and_stopped_after(tmp_path, monkeypatch):
    """With a stand-in for nvidia-cuda-mps-control that records its calls."""
    stub, calls = mps_stub(tmp_path)
    monkeypatch.setenv("PATH", f"{stub}:{os.environ['PATH']}")
    with bench.mps_daemon(tmp_path / "mps") as env:
        pipe = env["CUDA_MPS_PIPE_DIRECTORY"]
        assert Path(pipe).is_dir() and Path(env["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert calls.read_text().splitlines() == [f"start {pipe}"]
    assert calls.read_text().splitlines()[1] == f"quit {pipe}"
    (tmp_path / "fail").touch()  # a daemon that does not start: one line, nothing to stop
    with (
        pytest.raises(KdbenchError, match="the MPS daemon did not start: no GPU"),
        bench.mps_daemon(tmp_path / "mps"),
    ):
        pass
    assert len(calls.read_text().splitlines()) == 3


def test_bench_graphs_compares_eager_and_graphed_training(tmp_path, capsys):
    out = tmp_path / "graphs.json"
    # 300 images: two batches of 128 and a smaller last one
    argv = ["graphs", "--device", "cpu", "--methods", "kd", "--train-size", "300"]
    argv += ["--json", str(out)]
    # --cohort: the methods as one cohort too, graphed with the member streams asked for,
    # against an eager cohort without them (on the CPU: stand-in streams, bit-identical)
    assert bench.main([*argv, "--cohort", "--set", "cohort_streams=true"]) == 0
    doc = json.loads(out.read_text())
    row, cohort = doc["graphs"]
    assert doc["ok"] and row["ok"] and row["method"] == "kd"
    assert cohort["ok"] and cohort["method"] == "cohort of 1 on streams"
    # no CUDA: both runs eager, and on the CPU bit-identical
    for r in (row, cohort):
        assert r["steps"] == r["evaluation"] == "eager"
        assert r["max_relative_loss_difference"] == 0 and r["max_weight_difference"] == 0
        assert len(r["curves"]["eager"]) == len(r["curves"]["graphs"]) == 2
    assert "kd" in capsys.readouterr().out
    # a difference beyond the tolerance fails the check, with exit status 1
    assert bench.main([*argv[:-2], "--tolerance", "-1"]) == 1
    assert "FAIL" in capsys.readouterr().out


class _Parsed(Exception):
    """Raised in place of running a command once its arguments have parsed."""


def test_every_step_of_the_gpu_measurements_parses(tmp_path, monkeypatch):
    """tests/gpu/measure.sh, every step, with a stand-in Python that records its command lines:
    each parses (kdbench.bench's, or the GPU script's), with known methods and settings. A typo
    there would cost a GPU session its measurement."""
    calls, py, out = tmp_path / "calls", tmp_path / "py", tmp_path / "out"
    py.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> "{calls}"\necho >> "{calls}"\n')
    stub = tmp_path / "bin" / "nvidia-smi"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho stand-in GPU\n")
    for exe in (py, stub):
        exe.chmod(0o755)
    # the files that the grid step also takes when earlier steps wrote them
    out.mkdir()
    for name in ("concurrent", "mps", "state-resnet20", "cohort", "mps-cohort", "stack"):
        (out / f"{name}.json").write_text("{}")
    env = {**os.environ, "OUT": str(out), "PYTHON": str(py)}
    env["PATH"] = f"{stub.parent}:{os.environ['PATH']}"
    proc = subprocess.run(
        ["bash", "tests/gpu/measure.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "unknown step" not in proc.stderr, proc.stderr
    lines = [line.split("\0")[:-1] for line in calls.read_text().splitlines()]
    commands = [argv for argv in lines if argv[0] != "-c"]

    parse = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)
    seen = set()
    for argv in commands:
        if argv[:2] == ["-m", "kdbench.bench"]:
            seen.add(argv[2])
            with pytest.raises(_Parsed) as done:
                bench.main(argv[2:])
            args = done.value.args[0]
            for labels in (getattr(args, "methods", None), getattr(args, "cohort", None)):
                if isinstance(labels, list):
                    bench._cases(labels)
        else:
            seen.add(Path(argv[0]).name)
            monkeypatch.setattr(sys, "argv", argv)
            with pytest.raises(_Parsed) as done:
                runpy.run_path(str(REPO / argv[0]), run_name="__main__")
            args = done.value.args[0]
            for spec in getattr(args, "row", None) or []:  # profile_step.py's METHOD:K=V,...
                name, _, sets = spec.partition(":")
                bench._cases([name])
                TrainConfig.from_config(bench._parse_sets([s for s in sets.split(",") if s]))
        TrainConfig.from_config(bench._parse_sets(getattr(args, "set", None) or []))
    assert len(commands) > 40
    assert {"epochs", "graphs", "concurrent", "grid", "methods", "spread", "state"} <= seen
    assert {"profile_step.py", "mps_jobs.py", "resume.py"} <= seen
