import json
import os
import resource
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import curves, fit_digits, fresh_imports, outputs, run_gpu_script, train_digits

from kdbench import io, models, runs
from kdbench.errors import KdbenchError
from kdbench.train import TrainConfig, peak_memory

TRAIN = {"epochs": 2, "batch_size": 128, "optimizer": {"lr": 0.05}, "device": "cpu"}
DATA = {"image_size": 8}


@pytest.fixture(scope="module")
def teacher_weights(digits_teacher):
    return digits_teacher


def test_two_epoch_training_writes_every_output(tmp_path, teacher_weights):
    out = outputs(tmp_path / "run")
    state = tmp_path / "state" / "run.pt"
    doc = runs.train(
        role="student",
        dataset="digits",
        data=DATA,
        arch="resnet8",
        seed=1,
        method="kd",
        variant="default",
        method_params={"T": 4.0},
        train=TRAIN,
        outputs=out,
        state=state,
        teacher="resnet8",
        teacher_weights=teacher_weights,
    )
    for path in out.values():
        assert (tmp_path / "run" / path.split("/")[-1]).stat().st_size > 0
    assert not state.exists()  # removed once the run is complete
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    assert saved["status"] == "complete" and len(saved["epochs"]) == 2
    epoch = saved["epochs"][0]
    for key in (
        "lr",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "test_loss",
        "test_acc",
        "epoch_seconds",
    ):
        assert isinstance(epoch[key], float)
    assert set(epoch["train_loss_parts"]) == {"hard", "soft"}
    assert epoch["train_loss"] == pytest.approx(sum(epoch["train_loss_parts"].values()))
    assert epoch["lr"] == 0.05 and saved["epochs"][1]["lr"] < 0.05  # cosine, stepped per epoch
    final = saved["final"]
    assert final["test_acc_last"] == saved["epochs"][-1]["test_acc"]
    assert final["test_acc_best_val"] == saved["epochs"][final["best_epoch"] - 1]["test_acc"]
    assert saved["seed"] == 1 and saved["run"]["method"] == "kd"
    assert saved["config"]["method"]["params"]["T"] == 4.0
    assert saved["config"]["train"]["epochs"] == 2
    assert len(saved["config"]["teacher_weights"]["sha256"]) == 64
    prov = saved["provenance"]
    assert prov["versions"]["torch"] == torch.__version__.split("+")[0]
    assert prov["device"]["type"] == "cpu" and "commit" in prov["git"]
    weights = io.load_torch(tmp_path / "run" / "model_best.pt")
    models.build("resnet8", 10, 1).load_state_dict(weights)
    png = (tmp_path / "run" / "Accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_on_a_training_subset_records_it(tmp_path, caplog):
    caplog.set_level("INFO", logger="kdbench")
    train = {"epochs": 1, "batch_size": 64, "device": "cpu", "train_size": 200}
    doc = train_digits(tmp_path, train=train)
    assert doc["data"]["sizes"] == {"train": 200, "val": 270, "test": 359}
    assert doc["data"]["train_size_of"] == 1168 and doc["config"]["train"]["train_size"] == 200
    assert "data digits: {'train': 200, 'val': 270, 'test': 359}" in caplog.text
    with pytest.raises(KdbenchError, match=r"train_size must be in 10\.\.1168 for digits"):
        train_digits(tmp_path / "too_many", train={**train, "train_size": 5000})


def _fit(tmp_path, name, on_epoch_end=None, epochs=3, **train):
    train = {"epochs": epochs, **train}
    return fit_digits(tmp_path, name, train=train, on_epoch_end=on_epoch_end)


# fused SGD too: the state holds the momenta packed, contiguous, and fused SGD updates a
# channels_last weight from its momentum element by element in memory order
@pytest.mark.parametrize("fused", ["auto", True])
def test_resume_after_interruption_gives_the_same_result(tmp_path, fused):
    optimizer = {"lr": 0.05, "fused": fused}
    plain = _fit(tmp_path, "plain", optimizer=optimizer)

    def interrupt(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "resumed", interrupt, optimizer=optimizer)
    partial = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert partial["status"] == "running" and len(partial["epochs"]) == 1
    assert not (tmp_path / "resumed" / "model_final.pt").exists()
    assert (tmp_path / "resumed.state").exists()
    resumed = _fit(tmp_path, "resumed", optimizer=optimizer)
    assert resumed["final"]["resumed_after_epochs"] == [1]
    # the interrupted process is named in the resumed run's provenance
    (session,) = resumed["provenance"]["previous_sessions"]
    assert session["epochs"] == 1 and session["host"] == resumed["provenance"]["host"]
    assert plain["provenance"]["previous_sessions"] == []
    assert curves(resumed) == curves(plain)
    measured = ("train_seconds", "seconds_per_epoch", "peak_rss_mb", "peak_cuda_mb")
    skip = (*measured, "resumed_after_epochs")
    assert {k: v for k, v in resumed["final"].items() if k not in skip} == {
        k: v for k, v in plain["final"].items() if k not in skip
    }
    assert resumed["final"]["peak_rss_mb"] > 0 and resumed["final"]["seconds_per_epoch"] > 0
    a = io.load_torch(tmp_path / "plain" / "model_final.pt")
    b = io.load_torch(tmp_path / "resumed" / "model_final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_gpu_resume_check_runs_on_cpu(tmp_path):
    """tests/gpu/resume.py (measure.sh resume) on the CPU, with fused SGD as on CUDA: two
    uninterrupted runs agree, and the run stopped after its first epoch and resumed ends with
    their weights and curves (it exits 1 where the resumed run alone differs)."""
    out = tmp_path / "resume.json"
    argv = ("--epochs", "2", "--set", "fused=true", "--json", str(out))
    proc = run_gpu_script("resume.py", *argv, timeout=300)
    assert "resumed equals uninterrupted: weights True, curves True" in proc.stdout
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert doc["command"] == "resume" and doc["device"]["type"] == "cpu"
    assert row["settings"] == {"fused": True} and row["resumed_after_epochs"] == [1]
    assert row["deterministic_pair"]["weights_equal"]
    assert row["resumed_against_uninterrupted"] == {
        "weights_equal": True,
        "curves_equal": True,
        "max_weight_difference": 0.0,
    }


def test_state_of_another_configuration_or_garbage_is_not_loaded(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "run", lambda e: (_ for _ in ()).throw(KeyboardInterrupt()), epochs=3)
    # a different recipe (epochs) must not continue from that state
    doc = _fit(tmp_path, "run", epochs=2)
    assert doc["final"]["resumed_after_epochs"] == [] and len(doc["epochs"]) == 2
    (tmp_path / "run.state").write_bytes(b"not a checkpoint")
    doc = _fit(tmp_path, "run", epochs=1)
    assert doc["final"]["resumed_after_epochs"] == []


def test_students_of_one_seed_start_from_the_same_weights(tmp_path, teacher_weights):
    firsts = []
    for method, extra in (
        ("vanilla", {}),
        ("kd", {"teacher": "resnet8", "teacher_weights": teacher_weights}),
    ):
        d = tmp_path / method
        recipe = {**TRAIN, "epochs": 1, "optimizer": {"lr": 1e-12}}
        train_digits(d, data=DATA, seed=3, method=method, train=recipe, **extra)
        firsts.append(io.load_torch(d / "model_final.pt"))
    weights = [k for k in firsts[0] if k.endswith("weight")]
    assert all(torch.allclose(firsts[0][k], firsts[1][k], atol=1e-9) for k in weights)


def test_bad_teacher_checkpoint_is_one_clear_error(tmp_path, teacher_weights):
    kwargs = {"data": DATA, "method": "kd", "train": TRAIN}
    with pytest.raises(KdbenchError, match="do not fit the model"):
        train_digits(tmp_path, **kwargs, teacher="resnet20", teacher_weights=teacher_weights)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(KdbenchError, match="cannot load teacher"):
        train_digits(tmp_path, **kwargs, teacher="resnet8", teacher_weights=garbage)
    assert not (tmp_path / "metrics.json").exists()


def test_train_config_validation():
    assert (
        TrainConfig.from_config({"schedule": {"name": "multistep", "milestones": [2]}}).schedule
        == "multistep"
    )
    with pytest.raises(KdbenchError, match="epochs must be positive"):
        TrainConfig.from_config({"epochs": 0})
    with pytest.raises(KdbenchError, match="unknown setting"):
        TrainConfig.from_config({"epoch": 3})
    with pytest.raises(KdbenchError, match="cudnn_benchmark and train.deterministic"):
        TrainConfig.from_config({"cudnn_benchmark": True, "deterministic": True})
    for size in (0, 2.5, True):
        with pytest.raises(KdbenchError, match="train_size must be a positive integer or null"):
            TrainConfig.from_config({"train_size": size})


@pytest.mark.parametrize(
    ("setting", "device", "deterministic", "want"),
    [
        ("auto", "cuda", False, True),
        ("auto", "cuda", True, False),
        ("auto", "cpu", False, False),
        (False, "cuda", False, False),
        (True, "cpu", False, True),
    ],
)
def test_cudnn_autotuning_auto_is_on_for_cuda_unless_deterministic(
    setting, device, deterministic, want
):
    from kdbench.train import TrainConfig, cudnn_autotuning

    cfg = TrainConfig.from_config({"cudnn_benchmark": setting, "deterministic": deterministic})
    assert cudnn_autotuning(cfg, torch.device(device)) is want


@pytest.mark.parametrize(
    ("setting", "device", "want"),
    [("auto", "cuda", True), ("auto", "cpu", False), (False, "cuda", False), (True, "cpu", True)],
)
def test_cohort_stack_auto_stacks_on_cuda_alone(setting, device, want):
    from kdbench.train import TrainConfig, cohort_stacking

    assert TrainConfig().cohort_stack == "auto"
    cfg = TrainConfig.from_config({"cohort_stack": setting})
    assert cohort_stacking(cfg, torch.device(device)) is want
    with pytest.raises(KdbenchError, match="cohort_stack must be true, false or auto, got 'on'"):
        TrainConfig.from_config({"cohort_stack": "on"})


def test_cudnn_benchmark_rejects_other_values():
    from kdbench.train import TrainConfig

    assert TrainConfig().cudnn_benchmark == "auto"
    with pytest.raises(KdbenchError, match="cudnn_benchmark must be true, false or auto"):
        TrainConfig.from_config({"cudnn_benchmark": "yes"})


def test_prepare_folds_the_teacher_and_sets_cudnn_autotuning():
    from kdbench import methods, models
    from kdbench.train import TrainConfig, prepare

    torch.manual_seed(0)
    teacher = models.build("resnet8", 10, 1)
    method = methods.get("kd")(models.build("resnet8", 10, 1), teacher, {})
    x = torch.rand(8, 1, 8, 8)
    want = method.teacher_outputs(x)
    try:
        prepare(method, TrainConfig(fold_teacher=True, cudnn_benchmark=True), torch.device("cpu"))
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False
    assert method.teacher is not teacher
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in method.teacher.modules())
    assert not method.teacher.training
    for w, g in zip(want, method.teacher_outputs(x), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    prepare(method, TrainConfig(), torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_lays_out_the_weights_and_batches_of_a_cpu_run(channels_last):
    from kdbench import methods
    from kdbench.data import Dataset, Split
    from kdbench.train import make_loaders, prepare

    cpu, cfg = torch.device("cpu"), TrainConfig(device="cpu", channels_last=channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    method = methods.get("kd")(models.build("resnet8", 10, 3), models.build("resnet8", 10, 3), {})
    prepare(method, cfg, cpu)
    for network in (method.student, method.teacher):
        assert network.layer1[0].conv1.weight.is_contiguous(memory_format=layout)
    split = Split(torch.rand(16, 3, 8, 8), torch.arange(16) % 10)
    images = Dataset("rgb", split, split, split, 10, (0.5,) * 3, (0.25,) * 3)
    for loader in make_loaders(images, cfg, cpu, seed=0):
        xb, _ = next(loader.epoch(0))
        assert xb.is_contiguous(memory_format=layout)


def test_prepare_sets_where_tucker_solves_its_eigendecompositions():
    from kdbench import methods, models, tucker
    from kdbench.train import TrainConfig, prepare

    method = methods.get("tucker")(
        models.build("resnet8", 10, 1), models.build("resnet8", 10, 1), {}
    )
    try:
        prepare(
            method, TrainConfig(eigh_on_host=True, samplewise_solver="svd"), torch.device("cpu")
        )
        assert tucker.eigh_on_host() and tucker.samplewise_solver() == "svd"
    finally:
        prepare(method, TrainConfig(), torch.device("cpu"))
    assert not tucker.eigh_on_host() and tucker.samplewise_solver() == "auto"
    with pytest.raises(
        KdbenchError, match="train.samplewise_solver must be one of auto, eigh, svd, jacobi, got"
    ):
        TrainConfig.from_config({"samplewise_solver": "qr"})


def test_prepare_sets_deterministic_algorithms_either_way():
    from kdbench import methods, models
    from kdbench.train import TrainConfig, prepare

    method = methods.get("vanilla")(models.build("resnet8", 10, 1), None, {})
    try:
        prepare(method, TrainConfig(deterministic=True), torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        prepare(method, TrainConfig(), torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    "recipe",
    [
        {"momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
        {"momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
        {"momentum": 0.0, "weight_decay": 0.0, "nesterov": False},
    ],
)
def test_kdbench_sgd_steps_as_torch_sgd_bit_for_bit(recipe):
    from kdbench.train import SGD, make_sgd

    cfg = TrainConfig.from_config({"optimizer": {"lr": 0.1, **recipe}, "device": "cpu"})
    torch.manual_seed(0)
    ours, theirs = models.build("resnet8", 10, 1), models.build("resnet8", 10, 1)
    theirs.load_state_dict(ours.state_dict())
    opt = make_sgd(ours, cfg)
    assert type(opt) is SGD
    ref = torch.optim.SGD(theirs.parameters(), **opt.defaults)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3) for o in (opt, ref)]
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    warnings.simplefilter("error")  # (pytest restores the filters after the test)
    for step in range(3):
        for model, o, sched in zip((ours, theirs), (opt, ref), schedules, strict=True):
            o.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x)[-1], y).backward()
            o.step()
            sched.step()  # no warning that it came before the optimizer's step
        if step == 1:  # a state dict round trip keeps the momentum
            again = make_sgd(ours, cfg)
            again.load_state_dict(opt.state_dict())
            schedules[0].optimizer = opt = again
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"][0]["lr"] == ref.state_dict()["param_groups"][0]["lr"]


def test_a_training_job_on_cpu_does_not_import_torch_dynamo(tmp_path):
    # torch.optim's own wrappers import torch._dynamo (about 2 s per job) on first use
    teacher = tmp_path / "teacher"
    train_digits(teacher, role="teacher", variant="teacher")
    then = (
        "sys.path.insert(0, 'tests'); from conftest import train_digits;"
        f"train_digits(pathlib.Path({str(tmp_path / 'kd')!r}), method='kd', teacher='resnet8',"
        f" teacher_weights={str(teacher / 'model_best.pt')!r})"
    )
    held = fresh_imports("pathlib", "kdbench.runs", then=then)
    assert "kdbench.train" in held and "torch._dynamo" not in held
    assert (tmp_path / "kd" / "metrics.json").is_file()


def test_later_settings_at_their_defaults_leave_the_recipe_record_unchanged():
    """A state saved before a setting existed still matches its run's fingerprint, and the
    jobs' params do not change: at their defaults, later settings are not in the record."""
    from kdbench.train import TrainConfig

    first_release = {
        "epochs", "batch_size", "eval_batch_size", "lr", "momentum", "weight_decay",
        "nesterov", "schedule", "eta_min", "milestones", "gamma", "drop_last", "device",
        "bf16", "channels_last",
    }  # fmt: skip
    assert set(TrainConfig().record()) == first_release
    # the state's fingerprint has covered skip_nonfinite since it arrived
    assert set(TrainConfig().state_record()) == first_release | {"skip_nonfinite"}
    # cuda_graphs and prefetch_targets are on by default (since 2026-11-26): off is recorded
    changed = TrainConfig(cuda_graphs=False, fused=False, skip_nonfinite=3).record()
    assert set(changed) - first_release == {"cuda_graphs", "fused", "skip_nonfinite"}
    assert TrainConfig(cuda_graphs=True, prefetch_targets=True).record() == TrainConfig().record()
    # so are overlap_teacher and compile: auto (since the second H200 session of 2026-11-26)
    # and pipeline_targets (since the third)
    on = TrainConfig(overlap_teacher=True, compile="auto", pipeline_targets=True)
    assert on.record() == TrainConfig().record()
    changed = TrainConfig(overlap_teacher=False, compile="none", pipeline_targets=False).record()
    assert set(changed) - first_release == {"overlap_teacher", "compile", "pipeline_targets"}
    # cohort_streams is on by default (since the fifth H200 session, 2026-11-27): off is
    # recorded
    assert TrainConfig(cohort_streams=True).record() == TrainConfig().record()
    assert TrainConfig(cohort_streams=False).record()["cohort_streams"] is False
    # train_size: all images unless set
    assert TrainConfig(train_size=None).record() == TrainConfig().record()
    assert TrainConfig(train_size=500).record()["train_size"] == 500


@pytest.mark.parametrize(
    "setting, device, mode",
    [
        ({}, "cuda", "default"),
        ({}, "cpu", "none"),
        ({"deterministic": True}, "cuda", "none"),
        ({"compile": "none"}, "cuda", "none"),
        ({"compile": "max-autotune"}, "cpu", "max-autotune"),
    ],
)
def test_compile_auto_compiles_on_cuda_only_and_not_with_deterministic(setting, device, mode):
    from kdbench.train import TrainConfig, compile_mode, graphed

    cfg = TrainConfig(**setting)
    assert compile_mode(cfg, torch.device(device)) == mode
    # kdbench's own CUDA graphs stay on under auto's mode (it brings none of its own)
    assert graphed(torch.device("cuda"), cfg) == (mode not in ("reduce-overhead", "max-autotune"))


def test_compile_auto_leaves_the_models_of_a_cpu_run_eager(monkeypatch):
    from kdbench import methods, models
    from kdbench.train import TrainConfig, compile_models

    asked = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode: asked.append(mode))
    method = methods.get("kd")(models.build("resnet8", 10, 1), models.build("resnet8", 10, 1), {})
    compile_models(method, TrainConfig())
    assert asked == []
    compile_models(method, TrainConfig(compile="default"))
    assert asked == ["default", "default"]  # student and teacher


def test_a_jobs_threads_reach_torch_imported_after_the_job_started():
    # (torch takes at most as many threads as there are cores: 1 is below its default here)
    then = (
        "import os; os.environ.pop('OMP_NUM_THREADS', None);"
        "assert kdbench.jobs.run_job(lambda: 'torch' in sys.modules, None, 1) is False;"
        "import torch; assert torch.get_num_threads() == 1, torch.get_num_threads()"
    )
    assert "torch" in fresh_imports("kdbench.jobs", then=then)


def test_a_jobs_threads_bound_torch_compiles_worker_processes(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this process keeps its own
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "")  # restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")
    assert runs.run_job(lambda: os.environ["TORCHINDUCTOR_COMPILE_THREADS"], None, 3) == "3"
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "16")  # the user's choice stands
    assert runs.run_job(lambda: os.environ["TORCHINDUCTOR_COMPILE_THREADS"], None, 3) == "16"


@pytest.mark.parametrize("platform, maxrss", [("linux", 300 * 2**10), ("darwin", 300 * 2**20)])
def test_peak_memory_is_in_mib_where_getrusage_counts_kib_or_bytes(monkeypatch, platform, maxrss):
    assert 20 < peak_memory(torch.device("cpu"))["peak_rss_mb"] < 10**5  # this process
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=maxrss))
    assert peak_memory(torch.device("cpu")) == {"peak_rss_mb": 300.0, "peak_cuda_mb": None}
