# Targets, wildcard constraints and the helpers the rules use. Every hyper-parameter a job needs
# is resolved here from the config and reaches the job through `params:`, so changing one
# method's setting re-runs only that method's jobs and what aggregates them.
from kdbench import config as kdconfig
from kdbench import methods as kdmethods
from kdbench.data import DATASETS

RESULTS = config.get("results", "results")
TEACHER = kdconfig.teacher_config(config)
TEACHER_RUNS = kdconfig.teacher_runs(config)
STUDENT_RUNS = kdconfig.student_runs(config)
TRAIN_THREADS = int(config.get("train_threads", 1))

TEACHER_DIR = f"{RESULTS}/{{dataset}}/teachers/{{arch}}/seed{{seed}}"
STUDENT_DIR = f"{RESULTS}/{{dataset}}/students/{{teacher}}-{{student}}/{{method}}/{{variant}}/seed{{seed}}"
PARAPHRASER_DIR = f"{RESULTS}/{{dataset}}/paraphrasers/{{teacher}}/seed{{seed}}"
STATE_DIR = f"{RESULTS}/state"
LOG_DIR = f"{RESULTS}/logs"


wildcard_constraints:
    dataset="|".join(DATASETS),
    arch="resnet[0-9]+",
    teacher="resnet[0-9]+|none",
    student="resnet[0-9]+",
    method="|".join(kdmethods.available()),
    variant="[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*",
    seed="[0-9]+",


def teacher_dir(run):
    return TEACHER_DIR.format(dataset=run.dataset, arch=run.arch, seed=run.seed)


def student_dir(run):
    return STUDENT_DIR.format(**vars(run))


def teacher_metrics():
    return [f"{teacher_dir(r)}/metrics.json" for r in TEACHER_RUNS]


def student_metrics():
    return [f"{student_dir(r)}/metrics.json" for r in STUDENT_RUNS]


def all_targets():
    return [
        f"{RESULTS}/summary/runs.csv",
        f"{RESULTS}/summary/summary.csv",
        f"{RESULTS}/summary/accuracy_by_method.png",
    ]


def teacher_checkpoint(wildcards):
    """The teacher weights a student learns from (none for teacher-free methods)."""
    if wildcards.teacher == kdconfig.NO_TEACHER:
        return []
    name = "model_best.pt" if TEACHER["checkpoint"] == "best" else "model_final.pt"
    directory = TEACHER_DIR.format(
        dataset=wildcards.dataset, arch=wildcards.teacher, seed=TEACHER["seed"]
    )
    return f"{directory}/{name}"


def method_assets(wildcards):
    """Files a method needs besides the teacher, by name (ft: the teacher's paraphraser)."""
    assets = {}
    for name in kdmethods.get(wildcards.method).requires:
        if name == "paraphraser":
            directory = PARAPHRASER_DIR.format(
                dataset=wildcards.dataset,
                teacher=wildcards.teacher,
                seed=TEACHER["seed"],
            )
            assets[name] = f"{directory}/paraphraser.pt"
        else:
            raise ValueError(
                f"no rule makes the {name!r} that {wildcards.method} needs"
            )
    return assets


def ft_params():
    """The ft block's parameters, which its shared paraphraser is trained with."""
    return kdmethods.get("ft").resolve_params(
        {
            k: v
            for k, v in (config["methods"].get("ft") or {}).items()
            if k != "variants"
        }
    )


def data_params(wildcards):
    return kdconfig.data_params(config, wildcards.dataset)


def method_params(wildcards):
    return kdconfig.variants(config, wildcards.method)[wildcards.variant]
