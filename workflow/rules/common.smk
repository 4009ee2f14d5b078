# Targets, wildcard constraints and the helpers the rules use. Every hyper-parameter a job needs
# is resolved here from the config and reaches the job through `params:`, so changing one
# method's setting re-runs only that method's jobs and what aggregates them.
import os
from pathlib import Path

from kdbench import config as kdconfig
from kdbench import methods as kdmethods
from kdbench import mps as kdmps
from kdbench.data import DATASETS

RESULTS = config.get("results", "results")
TEACHER = kdconfig.teacher_config(config)
TEACHER_RUNS = kdconfig.teacher_runs(config)
STUDENT_RUNS = kdconfig.student_runs(config)
TRAIN_THREADS = int(config.get("train_threads", 1))
ANALYSIS = kdconfig.analysis_config(config)
ACCURACY = config["accuracy"]
ANCHORS = config.get("anchors") or str(
    Path(workflow.basedir) / kdconfig.DEFAULT_ANCHORS
)
TUCKER_METHODS = [m for m in ("tucker", "tucker_recomp") if m in config["methods"]]
PAIRS = kdconfig.pairs(config)
# cohort_size N > 0: the students of one dataset, teacher and seed train N to a job on one
# teacher pass per batch (rule distill_cohort), each then linked to its own directory
COHORTS = kdconfig.cohorts(config)
COHORT_OF = {run: cohort for cohort in COHORTS for run in cohort.members}
# KDBENCH_MPS=1 (or auto, the default, inside a SLURM job on a node with NVIDIA's MPS control
# program): the training jobs share their GPU as clients of an NVIDIA MPS daemon that the first
# of them starts (kdbench.mps); it stops when the workflow (or the group's job) ends
MPS = kdmps.wanted_or_exit()

TEACHER_DIR = f"{RESULTS}/{{dataset}}/teachers/{{arch}}/seed{{seed}}"
STUDENT_DIR = f"{RESULTS}/{{dataset}}/students/{{teacher}}-{{student}}/{{method}}/{{variant}}/seed{{seed}}"
PARAPHRASER_DIR = f"{RESULTS}/{{dataset}}/paraphrasers/{{teacher}}/seed{{seed}}"
FEATURES_DIR = f"{RESULTS}/{{dataset}}/{{model}}/features"
ANALYSIS_DIR = f"{RESULTS}/{{dataset}}/analysis"
PAIR_DIR = f"{ANALYSIS_DIR}/{{teacher}}-{{student}}"
COHORT_DIR = f"{RESULTS}/{{dataset}}/cohorts/{{teacher}}-seed{{seed}}/c{{cohort}}"
STATE_DIR = f"{RESULTS}/state"
# what a student's training writes, by output name (kdbench.train.RunOutputs)
STUDENT_FILES = {
    "metrics": "metrics.json",
    "final_weights": "model_final.pt",
    "best_weights": "model_best.pt",
    "loss_plot": "Loss.png",
    "accuracy_plot": "Accuracy.png",
}
LOG_DIR = f"{RESULTS}/logs"
# torch.compile's cache (train.compile): one for every training job of the workflow
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(Path(STATE_DIR, "torchinductor").resolve())
)


wildcard_constraints:
    dataset="|".join(DATASETS),
    arch="resnet[0-9]+",
    teacher="resnet[0-9]+|none",
    student="resnet[0-9]+",
    method="|".join(kdmethods.available()),
    variant="[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*",
    seed="[0-9]+",
    cohort="[0-9]+",
    # a trained model's directory below the dataset: teachers/… or students/…
    model="(teachers/[^/]+|students/[^/]+/[^/]+/[^/]+)/seed[0-9]+",


def teacher_dir(run):
    return TEACHER_DIR.format(dataset=run.dataset, arch=run.arch, seed=run.seed)


def student_dir(run):
    return STUDENT_DIR.format(**vars(run))


def teacher_metrics():
    return [f"{teacher_dir(r)}/metrics.json" for r in TEACHER_RUNS]


def student_metrics():
    return [f"{student_dir(r)}/metrics.json" for r in STUDENT_RUNS]


def benchmarks():
    """The benchmark files of the training jobs that trained one run (not the cohorts')."""
    dirs = [teacher_dir(r) for r in TEACHER_RUNS] + [
        student_dir(r) for r in STUDENT_RUNS if r not in COHORT_OF
    ]
    return [f"{d}/benchmark.tsv" for d in dirs]


def pair_metrics(wildcards):
    """metrics.json of the pair's students and of the vanilla students they are compared to."""
    return [
        f"{student_dir(r)}/metrics.json"
        for r in STUDENT_RUNS
        if r.dataset == wildcards.dataset
        and r.student == wildcards.student
        and r.teacher in (wildcards.teacher, kdconfig.NO_TEACHER)
    ]


def all_targets():
    targets = [f"{RESULTS}/summary/{name}" for name in SUMMARY_OUTPUTS]
    if TUCKER_METHODS:
        targets.append(f"{RESULTS}/summary/accuracy_by_rank.png")
    for dataset in config["datasets"]:
        directory = ANALYSIS_DIR.format(dataset=dataset)
        targets += [f"{directory}/{name}" for name in ANALYSIS_OUTPUTS]
    for dataset, teacher, student in PAIRS:
        directory = PAIR_DIR.format(dataset=dataset, teacher=teacher, student=student)
        targets += [f"{directory}/{name}" for name in PAIR_OUTPUTS]
        targets.append(
            f"{RESULTS}/summary/{dataset}/{teacher}-{student}/learning_curves.png"
        )
    return targets


SUMMARY_OUTPUTS = [
    "runs.csv",
    "summary.csv",
    "headline.csv",
    "accuracy_by_method.png",
    "anchors.csv",
    "cost.csv",
    "cost_accuracy.png",
    "provenance.csv",
]


# What the analysis stage writes per dataset and per teacher → student pair.
ANALYSIS_OUTPUTS = [
    "stage_metrics.csv",
    "metric_table.csv",
    "correlations.csv",
    "correlation_accuracy.png",
    "correlation_metrics.png",
]
PAIR_OUTPUTS = [
    "most_affected.csv",
    "affected_stages.png",
    "affected_channels.png",
    "diagnostics/attention.png",
    "diagnostics/spectra.png",
    "diagnostics/changed_spectra.png",
    "diagnostics/histograms.png",
    "diagnostics/channels.png",
]


def model_dirs(dataset, keep=lambda run: True):
    """The directories (below the dataset) of its trained models, teachers first."""
    dirs = [
        f"teachers/{r.arch}/seed{r.seed}" for r in TEACHER_RUNS if r.dataset == dataset
    ]
    dirs += [
        f"students/{r.teacher}-{r.student}/{r.method}/{r.variant}/seed{r.seed}"
        for r in STUDENT_RUNS
        if r.dataset == dataset and keep(r)
    ]
    return dirs


def pair_students(wildcards):
    """Keep the pair's distilled students and the vanilla students of its student arch."""
    return lambda r: r.student == wildcards.student and r.teacher in (
        wildcards.teacher,
        kdconfig.NO_TEACHER,
    )


def weights_name(checkpoint):
    """The weights file of a run for a checkpoint choice (best validation epoch or final)."""
    return "model_best.pt" if checkpoint == "best" else "model_final.pt"


def analysed_weights(wildcards):
    name = weights_name(ANALYSIS["checkpoint"])
    return f"{RESULTS}/{wildcards.dataset}/{wildcards.model}/{name}"


def dataset_stage_tables(wildcards):
    features = f"{RESULTS}/{wildcards.dataset}/{{}}/features/stages.csv"
    return [features.format(d) for d in model_dirs(wildcards.dataset)]


def pair_channel_tables(wildcards):
    """The channel tables of the pair's teacher, vanilla students and distilled students."""
    teacher = f"teachers/{wildcards.teacher}/"
    dirs = [
        d
        for d in model_dirs(wildcards.dataset, pair_students(wildcards))
        if d.startswith("students/") or d.startswith(teacher)
    ]
    return [
        f"{RESULTS}/{wildcards.dataset}/{d}/features/channels.parquet" for d in dirs
    ]


def diagnosed_models(wildcards):
    """Weights and runs of the teacher, then one seed's students (vanilla first)."""
    seed = ANALYSIS["seed"]
    teacher = f"teachers/{wildcards.teacher}/seed{TEACHER['seed']}"
    keep = pair_students(wildcards)
    students = model_dirs(wildcards.dataset, lambda r: keep(r) and r.seed == seed)
    students = [d for d in students if d.startswith("students/")]
    students.sort(
        key=lambda d: "/vanilla/" not in d
    )  # vanilla first, then config order
    name = weights_name(ANALYSIS["checkpoint"])
    dirs = [f"{RESULTS}/{wildcards.dataset}/{d}" for d in [teacher, *students]]
    return {
        "weights": [f"{d}/{name}" for d in dirs],
        "runs": [f"{d}/metrics.json" for d in dirs],
    }


def teacher_checkpoint(wildcards):
    """The teacher weights a student learns from (none for teacher-free methods)."""
    if wildcards.teacher == kdconfig.NO_TEACHER:
        return []
    name = weights_name(TEACHER["checkpoint"])
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


def student_outputs():
    """A student's outputs (the same whichever rule trains it), its curves in the report."""
    labels = {
        "dataset": "{dataset}",
        "pair": "{teacher} → {student}",
        "method": "{method} {variant}",
        "seed": "{seed}",
    }
    outputs = {key: f"{STUDENT_DIR}/{name}" for key, name in STUDENT_FILES.items()}
    for key, caption in (("loss_plot", "loss"), ("accuracy_plot", "accuracy")):
        outputs[key] = report(
            outputs[key],
            caption=f"../report/{caption}_curve.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels=labels,
        )
    return outputs


def cohort_job(wildcards):
    """The cohort of a distill_cohort job."""
    key = (
        wildcards.dataset,
        wildcards.teacher,
        int(wildcards.seed),
        int(wildcards.cohort),
    )
    for cohort in COHORTS:
        if (cohort.dataset, cohort.teacher, cohort.seed, cohort.index) == key:
            return cohort
    raise ValueError(f"no cohort {wildcards.cohort} of {key[:3]} in the config")


def cohort_dir(cohort):
    return COHORT_DIR.format(
        dataset=cohort.dataset,
        teacher=cohort.teacher,
        seed=cohort.seed,
        cohort=cohort.index,
    )


def member_path(run):
    """Where a cohort's job writes the outputs of its member ``run``."""
    return f"{cohort_dir(COHORT_OF[run])}/{run.student}/{run.method}/{run.variant}"


def cohort_inputs(wildcards):
    """The teacher's weights and every asset the members' methods need."""
    inputs = {"teacher": teacher_checkpoint(wildcards)}
    for run in cohort_job(wildcards).members:
        inputs.update(method_assets(run))
    return inputs


def cohort_members(wildcards):
    """Each member's student, method, variant, parameters, assets and outputs."""
    return [
        {
            "arch": run.student,
            "method": run.method,
            "variant": run.variant,
            "method_params": method_params(run),
            "assets": method_assets(run),
            "outputs": {
                key: f"{member_path(run)}/{name}" for key, name in STUDENT_FILES.items()
            },
        }
        for run in cohort_job(wildcards).members
    ]


def cohort_member_source(wildcards):
    """The directory of the cohort job that trained the student of ``wildcards``."""
    run = kdconfig.StudentRun(
        wildcards.dataset,
        wildcards.teacher,
        wildcards.student,
        wildcards.method,
        wildcards.variant,
        int(wildcards.seed),
    )
    if run not in COHORT_OF:
        raise ValueError(f"{student_dir(run)} is not a student of this config")
    return cohort_dir(COHORT_OF[run])


def data_params(wildcards):
    return kdconfig.data_params(config, wildcards.dataset)


def method_params(wildcards):
    return kdconfig.variants(config, wildcards.method)[wildcards.variant]


onsuccess:
    if MPS:
        kdmps.stop()


onerror:
    if MPS:
        kdmps.stop()
