import copy
import json
import math
import os
import re
import subprocess

import pytest
import yaml
from conftest import REPO, job_counts, snakemake
from snakemake.utils import update_config

from kdbench import config as kdconfig
from kdbench.train import LATER_SETTINGS, TrainConfig

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
FULL = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def with_change(path, value):
    cfg = copy.deepcopy(DEMO)
    *parents, last = path
    node = cfg
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return cfg


@pytest.mark.parametrize("name", ["demo.yaml", "config.yaml", "fashion.yaml", "crd.yaml"])
def test_shipped_configs_are_valid(name):
    kdconfig.validate(yaml.safe_load((REPO / "config" / name).read_text()), SCHEMA)


def _readme_config_rows() -> list[tuple[list[str], list[str]]]:
    """The README's Configuration table: each row's keys (``train.x``, ``.y`` → ``train.y``,
    ``a.b / c`` → ``a.c``) and its cells (key, meaning, default)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip(" |").split("|")]
        keys: list[str] = []
        for name in re.findall(r"`([^`]+)`", cells[0]):
            first, *more = name.split(" / ")
            prefix = first.rsplit(".", 1)[0] + "." if "." in first.lstrip(".") else ""
            if first.startswith("."):
                first = keys[-1].rsplit(".", 1)[0] + first
            keys += [first, *(prefix + m for m in more)]
        rows.append((keys, cells))
    return rows


def _yaml_spelling(value: object) -> str:
    """A default as the README's tables spell it (YAML's): null, true, 512, auto."""
    return json.dumps(value).strip('"')


def test_the_readme_configuration_table_names_every_key_with_its_default():
    schema = yaml.safe_load(SCHEMA.read_text())
    train = schema["$defs"]["train"]["properties"]
    want = set(schema["properties"]) - {"teacher", "analysis", "data", "methods", "train"}
    for block in ("teacher", "analysis"):
        want |= {f"{block}.{k}" for k in schema["properties"][block]["properties"]}
    want |= {f"train.{k}" for k in train if k not in ("optimizer", "schedule")}
    want |= {f"train.optimizer.{k}" for k in train["optimizer"]["properties"]}
    rows = _readme_config_rows()
    named = {key for keys, _ in rows for key in keys}
    assert want <= named, sorted(want - named)
    # the schedule's row names its name's values' keys: `cosine` (`eta_min`), `multistep` (…)
    (meaning,) = [cells[1] for keys, cells in rows if keys == ["train.schedule.name"]]
    assert set(train["schedule"]["properties"]) - {"name"} <= set(re.findall(r"`(\w+)`", meaning))
    # the train rows that give a default for each key: TrainConfig's
    defaults = TrainConfig()
    checked = 0
    for keys, cells in rows:
        values = cells[-1].split(", ")
        if not keys[0].startswith("train.") or "." in keys[0][6:] or len(values) != len(keys):
            continue
        for key, value in zip(keys, values, strict=True):
            have = getattr(defaults, key.removeprefix("train."))
            assert value.split(":")[0] == _yaml_spelling(have), (key, value, have)
            checked += 1
    assert checked >= 20


def test_the_readme_speed_switch_table_gives_every_switch_with_its_default():
    text = (REPO / "README.md").read_text()
    table = text.split("\n**On a GPU.**", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip(" |").split("|")] for line in table.splitlines()[2:]]
    switches = {cells[0].strip("`").removeprefix("optimizer."): cells[-1] for cells in rows}
    # the Configuration table's row of switches, each here (and the precision and layout ones)
    (keys,) = [k for k, _ in _readme_config_rows() if k[0] == "train.data_on_device"]
    assert {k.removeprefix("train.") for k in keys} | {"bf16", "channels_last", "fused"} == set(
        switches
    )
    defaults = TrainConfig()
    for key, value in switches.items():
        assert value == _yaml_spelling(getattr(defaults, key)), (key, value)


BAD = [
    (("methods", "kdd"), {}, "methods: unknown key 'kdd'"),
    (("pairs", 0, "student"), "resnet9", "pairs[0].student: 'resnet9' is not one of"),
    (("datasets",), ["mnist"], "datasets[0]: 'mnist' is not one of"),
    (("train", "epochs"), 0, "train.epochs: 0 is less than the minimum of 1"),
    (("train", "epochs"), -3, "train.epochs"),
    (("methods", "kd", "alpha"), 1.5, "methods.kd.alpha: 1.5 is greater than the maximum of 1"),
    (("methods", "kd", "alpha"), -0.1, "methods.kd.alpha"),
    (("methods", "kd", "T"), 0, "methods.kd.T"),
    (("seeds",), KeyError, "missing key 'seeds'"),
    (("protocol",), "cifar", "protocol: 'cifar' is not one of seed, crd"),
    (("train", "cohort_stack"), "yes", "train.cohort_stack: 'yes' is not one of auto, True, False"),
    (("accuracy",), "max", "accuracy: 'max' is not one of best_val, last"),
    (("anchors",), "", "anchors"),
    (("train", "optimizer", "lr"), "fast", "train.optimizer.lr: 'fast' is not of type 'number'"),
    (("train", "schedule", "name"), "linear", "train.schedule.name: 'linear' is not one of"),
    (("teacher", "checkpoint"), "last", "teacher.checkpoint"),
    (("data", "digits", "image_sise"), 8, "data.digits: unknown key 'image_sise'"),
    (("seeds",), [0, 0], "seeds"),
    (("train", "device"), "tpu", "train.device"),
    (("train", "compile"), "fast", "train.compile: 'fast' is not one of auto, none, default"),
    (("train", "optimizer", "fused"), "yes", "train.optimizer.fused: 'yes' is not one of"),
    (("train", "deterministic"), 1, "train.deterministic: 1 is not of type 'boolean'"),
    (("train", "fold_teacher"), "yes", "train.fold_teacher: 'yes' is not of type 'boolean'"),
    (("train", "eigh_on_host"), 0, "train.eigh_on_host: 0 is not of type 'boolean'"),
    (
        ("train", "samplewise_solver"),
        "qr",
        "train.samplewise_solver: 'qr' is not one of auto, eigh, svd, jacobi",
    ),
    (
        ("train",),
        {"device": "cpu", "cudnn_benchmark": True, "deterministic": True},
        "train.cudnn_benchmark and train.deterministic cannot both be true",
    ),
    (("methods", "tucker", "ranks"), [65], "Tucker rank 65 of mode 0 exceeds that mode's size 64"),
    (("methods", "tucker", "ranks"), [[8, 3, 4]], "rank 4 of mode 2 exceeds that mode's size 3"),
    (("methods", "tucker", "ranks"), [0], "methods.tucker.ranks[0]"),
    (("methods", "tucker", "ranks"), [[8, 2]], "need 3 entries"),
    (("methods", "tucker_recomp", "ranks"), [64, 80], "tucker_recomp (teacher-r80) on digits"),
    (("methods", "tucker", "basis"), ["student"], "methods.tucker.basis[0]"),
    (("methods", "featuremap", "stage"), 4, "methods.featuremap.stage: 4 is not one of 1, 2, 3"),
    (("methods", "ft", "variants"), {"r25": {"rate": 0.25}}, "rate cannot vary between FT"),
    (("analysis",), {"seed": 7}, "analysis.seed: 7 is not one of the student seeds [0, 1]"),
    (("analysis",), {"tau": 0}, "analysis.tau: 0 is less than or equal to the minimum of 0"),
    (("analysis",), {"images": []}, "analysis.images"),
    (("analysis",), {"n_images": 0}, "analysis.n_images"),
    (("analysis",), {"checkpoint": "last"}, "analysis.checkpoint: 'last' is not one of"),
    (("analysis",), {"imgs": [0]}, "analysis: unknown key 'imgs'"),
    (("methods", "vanilla"), KeyError, "the analysis compares every distilled student with"),
    (("cohort_size",), -1, "cohort_size: -1 is less than the minimum of 0"),
    (("cohort_size",), 2.5, "cohort_size: 2.5 is not of type 'integer'"),
    (("train", "train_size"), 0, "train.train_size: 0 is less than the minimum of 1"),
    (("train", "train_size"), "all", "train.train_size: 'all' is not of type"),
    (("train", "train_size"), 1169, "train.train_size must be in 10..1168 for digits (its"),
    (("teacher", "train", "train_size"), 9, "teacher.train.train_size must be in 10..1168"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"), BAD, ids=[".".join(map(str, b[0])) for b in BAD]
)
def test_bad_config_is_one_line_naming_the_key(path, value, message, tmp_path, monkeypatch):
    """What the Snakefile does first: exit status 1 (SystemExit with a message), one line,
    nothing written (run in an empty directory)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        kdconfig.check_or_exit(with_change(path, value), SCHEMA)
    text = str(exit_.value.code)
    assert text.startswith("kdbench: config error: ") and message in text and "\n" not in text
    assert not list(tmp_path.iterdir())


def test_analysis_defaults_and_pairs():
    cfg = kdconfig.analysis_config(DEMO)
    assert cfg["seed"] == 0 and cfg["n_images"] == 1000 and cfg["tau"] == 0.5
    assert kdconfig.analysis_config({**DEMO, "analysis": {"seed": 1}})["seed"] == 1
    assert kdconfig.pairs(DEMO) == [("digits", "resnet20", "resnet8")]
    assert len(kdconfig.pairs(FULL)) == 4  # 2 datasets × 2 pairs
    assert kdconfig.pairs({**DEMO, "methods": {"vanilla": None}}) == []


def test_methods_contribute_their_schema():
    schema = kdconfig.load_schema(SCHEMA)
    assert (
        schema["properties"]["methods"]["properties"]["kd"]["properties"]["alpha"]["maximum"] == 1
    )


def test_a_training_subset_for_the_students_the_teacher_on_all_images():
    cfg = with_change(("train", "train_size"), 300)
    cfg["teacher"]["train"]["train_size"] = None
    kdconfig.check_or_exit(cfg, SCHEMA)
    assert kdconfig.train_params(cfg, "student")["train_size"] == 300
    # all images, the default: not in the recipe (the teacher's params as without the key)
    assert kdconfig.train_params(cfg, "teacher") == kdconfig.train_params(DEMO, "teacher")


def test_run_grid_of_the_full_config():
    teachers = kdconfig.teacher_runs(FULL)
    students = kdconfig.student_runs(FULL)
    assert len(teachers) == 2 and {t.arch for t in teachers} == {"resnet110"}
    assert len(students) == 2 * 2 * 20 * 3
    vanilla = [s for s in students if s.method == "vanilla"]
    assert {s.teacher for s in vanilla} == {"none"}
    assert kdconfig.train_params(FULL, "teacher")["epochs"] == 150


def test_cohorts_split_the_students_of_a_teacher_and_seed_in_config_order():
    assert kdconfig.cohorts({**FULL, "cohort_size": 0}) == []  # 0: a job per student
    assert FULL["cohort_size"] == 8  # the full benchmark's
    cohorts = kdconfig.cohorts(FULL)
    students = [s for s in kdconfig.student_runs(FULL) if s.teacher != "none"]
    order = FULL["datasets"]  # config order, within a dataset and seed too (a stable sort)
    assert [m for c in cohorts for m in c.members] == sorted(
        students, key=lambda s: (order.index(s.dataset), s.seed)
    )
    # per dataset and seed: 2 students × 19 distilling variants = 38, in cohorts of 8 (6 the last)
    assert len(cohorts) == 2 * 3 * 5 and [len(c.members) for c in cohorts[:5]] == [8] * 4 + [6]
    for c in cohorts:
        assert {(m.dataset, m.teacher, m.seed) for m in c.members} == {
            (c.dataset, c.teacher, c.seed)
        }
    assert cohorts[6].name == "resnet110-seed1-c1"


def test_speed_switches_reach_the_jobs_only_when_set():
    """Settings added after the first release stay out of the jobs' params at their defaults,
    so adding them re-ran nothing; set, they are params like any other (and re-run)."""
    params = kdconfig.train_params(FULL, "student")
    assert not set(LATER_SETTINGS) & set(params)
    cfg = with_change(("train", "compile"), "default")
    cfg["train"]["optimizer"] = {**cfg["train"].get("optimizer", {}), "fused": False}
    params = kdconfig.train_params(cfg, "student")
    assert params["compile"] == "default" and params["fused"] is False
    assert TrainConfig.from_config(params).compile == "default"


def test_every_later_setting_is_in_the_schema_and_spelled_out_at_its_default():
    """A switch added to TrainConfig is also a key of the schema, and the shipped main configs
    list it at its default (so that users see it, and nothing re-runs)."""
    schema = kdconfig.load_schema(SCHEMA)
    train = schema["$defs"]["train"]["properties"]
    defaults = TrainConfig()
    for name, cfg in (("demo.yaml", DEMO), ("config.yaml", FULL)):
        block = {**cfg["train"], **cfg["train"].get("optimizer", {})}
        for key in LATER_SETTINGS:
            assert key in train or key in train["optimizer"]["properties"], key
            assert block.get(key) == getattr(defaults, key), (name, key)


def test_aliases_are_canonical_in_the_grid():
    cfg = with_change(("pairs",), [{"teacher": "ResNet112", "student": "ResNetBaby"}])
    assert {(s.teacher, s.student) for s in kdconfig.student_runs(cfg)} >= {
        ("resnet110", "resnet8")
    }


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("methods", "kd", "alpha"), 2.0, "methods.kd.alpha"),
        (("pairs", 0, "teacher"), "vgg8", "pairs[0].teacher"),
        (("train", "epochs"), 0, "train.epochs"),
        (("methods", "tucker", "ranks"), [16, 100], "methods.tucker (full-teacher-r100)"),
    ],
)
def test_workflow_refuses_a_bad_config_with_one_line(tmp_path, path, value, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(with_change(path, value)))
    proc = snakemake("-n", "--configfile", str(cfg), cwd=tmp_path)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("kdbench: config error:") and key in lines[0]
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("epochs", "says"),
    [
        (4, "make report: {cfg} has jobs left to run: 'make run CONFIG={cfg}' first"),
        (0, "kdbench: config error: train.epochs"),
    ],
)
def test_make_report_before_the_workflow_ran_is_one_line(tmp_path, epochs, says):
    cfg = tmp_path / "demo.yaml"
    changed = with_change(("train", "epochs"), epochs)
    changed["results"] = str(tmp_path / "results")
    cfg.write_text(yaml.safe_dump(changed))
    # as typed at a shell (under `make test` the make that runs pytest sets these)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(
        ["make", "--no-print-directory", "report", f"CONFIG={cfg}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    # make's own "make: *** [Makefile:…] Error 1" aside
    lines = [
        line for line in proc.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)
    ]
    assert len(lines) == 1 and lines[0].startswith(says.format(cfg=cfg)), proc.stderr
    assert not proc.stdout.strip() and not (tmp_path / "results").exists()


def test_dry_run_of_the_full_benchmark_lists_the_expected_jobs():
    proc = snakemake("-n", "--configfile", "config/config.yaml")
    assert proc.returncode == 0, proc.stderr
    # per dataset × pair × seed: vanilla, kd, featuremap, ft, tucker × 4, tucker_recomp × 12;
    # vanilla alone, the 2 × 19 others of a dataset, teacher and seed in cohorts of 8 (5 a seed)
    assert job_counts(proc.stdout) == {
        "train_teacher": 2,
        "train_paraphraser": 2,  # one per dataset × teacher × seed, shared by 12 FT students
        "distill": 2 * 2 * 3,
        "distill_cohort": 2 * 5 * 3,
        "cohort_member": 2 * 2 * 19 * 3,
        "aggregate": 1,
        "extract_features_metrics": 2 + 2 * 2 * 20 * 3,  # every trained model
        "analyse_features": 2,  # per dataset
        "most_affected": 2 * 2,  # per dataset × pair
        "diagnose": 2 * 2,
        "learning_curves": 2 * 2,
        "rank_chart": 1,
        "all": 1,
    }
    assert "students/resnet110-resnet56/tucker/full-teacher-r32/seed0/" in proc.stdout
    assert "students/resnet110-resnet20/tucker_recomp/both-r8/seed2/" in proc.stdout


def test_dry_run_of_the_crd_protocol():
    proc = snakemake("-n", "--configfile", "config/crd.yaml")
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    # 3 pairs × 3 seeds × (kd, ft) + vanilla resnet20 and resnet32 × 3 seeds
    assert counts["distill"] == 3 * 3 * 2 + 2 * 3 and counts["train_teacher"] == 2
    assert "rank_chart" not in counts  # no Tucker method: no rank chart
    assert "students/resnet110-resnet32/kd/default/seed0/" in proc.stdout
    cfg = kdconfig.resolve(yaml.safe_load((REPO / "config" / "crd.yaml").read_text()))
    assert kdconfig.train_params(cfg, "student")["epochs"] == 240
    assert kdconfig.variants(cfg, "kd")["default"]["T"] == 4.0


def test_config_values_on_the_command_line_override_the_demos(tmp_path):
    """`--config KEY=VALUE` without `--configfile` is the demo with those keys changed (before,
    the demo was left out and the config held those keys alone); the numbers in a list given
    there are numbers."""
    proc = snakemake("-n", "--config", "cohort_size=4", "seeds=[0, 1, 2]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    runs = kdconfig.student_runs(kdconfig.resolve(DEMO))
    taught = sum(r.seed == 0 and r.teacher != kdconfig.NO_TEACHER for r in runs)  # of one seed
    assert taught > 4 and counts["distill_cohort"] == 3 * math.ceil(taught / 4)
    assert counts["distill"] == 3  # vanilla students train alone
    assert counts["train_teacher"] == 1


def test_command_line_values_get_their_yaml_types():
    """Snakemake hands every scalar of a `--config` list or mapping over as a string."""
    config = copy.deepcopy(DEMO)
    given = {
        "seeds": ["0", "1", "2"],
        "train": {
            "epochs": "2",
            "bf16": "false",
            "optimizer": {"lr": "0.05", "weight_decay": "1e-4"},
        },
        "methods": {"kd": {"T": "8"}, "vanilla": None},
        "anchors": "config/anchors.yaml",
        "protocol": "crd",
        "cohort_size": 4,
    }
    update_config(config, kdconfig.command_line_types(given))  # as the Snakefile does
    kdconfig.read_exponent_floats(config)  # as the Snakefile does next
    assert config["seeds"] == [0, 1, 2]
    assert config["train"]["epochs"] == 2 and config["train"]["bf16"] is False
    assert config["train"]["optimizer"]["lr"] == 0.05
    assert config["train"]["optimizer"]["weight_decay"] == 1e-4  # to YAML 1.1 a string
    assert config["train"]["batch_size"] == DEMO["train"]["batch_size"]  # merged, as Snakemake
    assert config["methods"]["kd"] == {**DEMO["methods"]["kd"], "T": 8}
    assert config["methods"]["vanilla"] is None
    assert config["anchors"] == "config/anchors.yaml" and config["protocol"] == "crd"
    assert config["cohort_size"] == 4
    kdconfig.validate(config, REPO / "workflow" / "schemas" / "config.schema.yaml")


def test_a_config_file_replaces_the_demo_rather_than_extending_it(tmp_path):
    cfg = copy.deepcopy(DEMO)
    cfg["methods"] = {"vanilla": None}
    del cfg["teacher"]
    path = tmp_path / "only-vanilla.yaml"
    text = yaml.safe_dump(cfg)
    assert "weight_decay: 0.0005" in text
    # as people write it: a string to YAML 1.1 (kdbench.config.read_exponent_floats)
    path.write_text(text.replace("weight_decay: 0.0005", "weight_decay: 5e-4"))
    proc = snakemake("-n", "--configfile", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert job_counts(proc.stdout) == {
        "distill": 2,
        "aggregate": 1,
        "extract_features_metrics": 2,
        "analyse_features": 1,  # no teacher: no pair to rank or diagnose
        "all": 1,
    }
