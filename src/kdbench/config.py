"""The workflow config: schema validation (one line per problem) and the run grid.

The JSON schema lives in ``workflow/schemas/config.schema.yaml``; each registered method adds the
schema of its own parameters, so a new method needs no edit here. Defaults live in code (the
training recipe, dataset settings, method parameters) and are resolved here into the complete
per-job dictionaries that the workflow hands to its scripts through ``params:``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from kdbench import methods, models
from kdbench.data import check_train_size, dataset_params, image_shape, train_split_size
from kdbench.errors import KdbenchError, one_line
from kdbench.models import canonical_arch
from kdbench.train import TrainConfig

TEACHER_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "label_smoothing": 0.1,
    "checkpoint": "best",
    "train": {},
}
#: role of teacher runs in paths and tables; vanilla students have no teacher
NO_TEACHER = "none"
#: Training protocols (REFERENCE §3): settings a config gets unless it sets them itself.
#: ``accuracy`` is the headline accuracy of the tables: ``best_val`` (test accuracy at the
#: best-validation epoch) or ``last`` (at the last epoch, as the CRD protocol reports).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "seed": {
        "accuracy": "best_val",
        "teacher": {"label_smoothing": 0.1},
        "train": {
            "epochs": 150,
            "batch_size": 128,
            "optimizer": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4},
            "schedule": {"name": "cosine", "eta_min": 0.0},
        },
        "methods": {
            "vanilla": {"label_smoothing": 0.1},
            "kd": {"T": 2.0, "alpha": 0.9},
            "ft": {"beta": 500},
        },
    },
    "crd": {
        "accuracy": "last",
        "teacher": {"label_smoothing": 0.0},
        "train": {
            "epochs": 240,
            "batch_size": 64,
            "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
            "schedule": {"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1},
        },
        "methods": {
            "vanilla": {"label_smoothing": 0.0},
            "kd": {"T": 4.0, "alpha": 0.9},
            "ft": {"beta": 200},
        },
    },
}
DEFAULT_ANCHORS = "config/anchors.yaml"
#: The feature-map analysis stage (config block ``analysis``) and its defaults.
ANALYSIS_DEFAULTS: dict[str, Any] = {
    "n_images": 1000,  # the first N test images are measured (all of them if fewer)
    "checkpoint": "best",  # which weights are analysed: best validation epoch or final
    "batch_size": 250,
    "images": [0, 1, 2, 3],  # test images shown in the diagnostics
    "seed": None,  # student seed shown in the diagnostics (None: the first of `seeds`)
    "tau": 0.5,  # attention-map temperature
    "top_k": 8,  # channels shown per method in the most-affected plot
    "spectra_channels": 3,  # most-affected channels whose spectra the diagnostics show
    "threads": 1,  # CPU threads of each analysis job
}


def load_schema(path: str | Path) -> dict[str, Any]:
    """The config schema with every registered method's parameter schema merged in."""
    schema = yaml.safe_load(Path(path).read_text())
    props = {name: copy.deepcopy(methods.get(name).config_schema()) for name in methods.available()}
    schema["properties"]["methods"]["properties"] = props
    return schema


def _where(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in path]
    return ".".join(parts).replace(".[", "[") or "config"


def _message(err: jsonschema.ValidationError) -> str:
    where = _where(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        if allowed and extra:
            return f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(allowed)})"
    if err.validator == "required":
        return f"{where}: missing key {err.message.split()[0]}"
    if err.validator == "enum":
        return f"{where}: {err.instance!r} is not one of {', '.join(map(str, err.validator_value))}"
    return f"{where}: {err.message}"


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, nested dictionaries merged key by key."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its protocol's settings (``protocol``, default ``seed``) filled in where
    it leaves them out; protocol settings of methods the config does not run are not added."""
    name = config.get("protocol", "seed")
    if name not in PROTOCOLS:
        raise KdbenchError(f"protocol: {name!r} is not one of {', '.join(PROTOCOLS)}")
    preset = PROTOCOLS[name]
    out = copy.deepcopy(config)
    out["protocol"] = name
    out.setdefault("accuracy", preset["accuracy"])
    for key in ("train", "teacher"):
        if key in preset:
            out[key] = _merge(preset[key], out.get(key) or {})
    methods_cfg = out.get("methods")
    if isinstance(methods_cfg, dict):
        for method, params in preset.get("methods", {}).items():
            if method in methods_cfg:
                methods_cfg[method] = _merge(params, methods_cfg[method] or {})
    return out


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def read_exponent_floats(config: Any) -> None:
    """Make every string in ``config`` that is a number in exponent form without a dot, such as
    ``5e-4``, a float, in place: YAML 1.1, and so a config file as Snakemake loads it, reads
    ``weight_decay: 5e-4`` as a string, which the schema would refuse."""
    if isinstance(config, dict):
        items: list[tuple[Any, Any]] = list(config.items())
    elif isinstance(config, list):
        items = list(enumerate(config))
    else:
        return
    for key, value in items:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            config[key] = float(value)
        else:
            read_exponent_floats(value)


def command_line_types(given: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``snakemake --config KEY=VALUE`` (``given``, as Snakemake parsed them) with
    their YAML types, for the Snakefile to merge into the config again (Snakemake's
    ``update_config``, as Snakemake merged them): Snakemake parses a top-level number itself, but
    every scalar of a list or mapping comes as a string (``seeds=[0, 1]`` is ``['0', '1']``),
    which the schema would refuse. A string that YAML reads as a number, a boolean or null becomes
    one; the others stay strings (``5e-4`` too, which YAML 1.1 reads as a string:
    :func:`read_exponent_floats`, which the Snakefile runs next)."""

    def typed(value: Any) -> Any:
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                return value
            return parsed if parsed is None or isinstance(parsed, bool | int | float) else value
        if isinstance(value, Mapping):
            return {k: typed(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [typed(v) for v in value]
        return value

    return typed(given)


def check_or_exit(config: dict[str, Any], schema_path: str | Path) -> None:
    """What the Snakefile runs once it has read the config: :func:`validate`, a problem being
    one line on stderr (``kdbench: config error: ...``) and exit status 1, before any job or
    output exists."""
    try:
        validate(config, schema_path)
    except KdbenchError as exc:
        raise SystemExit(f"kdbench: config error: {one_line(exc)}") from None


def validate(config: dict[str, Any], schema_path: str | Path) -> None:
    """Check ``config`` (its protocol resolved) against the schema and the registry; raise
    KdbenchError with one line."""
    config = resolve(config)
    validator = jsonschema.Draft202012Validator(load_schema(schema_path))
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), e.path))
    if errors:
        # report the deepest error of the first failing key: it names the most specific location
        err = jsonschema.exceptions.best_match(errors)
        raise KdbenchError(_message(err))
    # What the schema cannot say: resolve everything once so that bad values fail here.
    for dataset in config["datasets"]:
        data_params(config, dataset)
    for role in ("teacher", "student"):
        size = train_params(config, role).get("train_size")  # absent: all images
        own = role == "teacher" and "train_size" in (teacher_config(config).get("train") or {})
        key = "teacher.train.train_size" if own else "train.train_size"
        for dataset in config["datasets"] if size is not None else ():
            images, classes = train_split_size(dataset, data_params(config, dataset))
            check_train_size(dataset, size, images, classes, key)
    for name in config["methods"]:
        variants(config, name)
    _check_teacher_methods(config)
    _check_methods(config)
    analysis_config(config)


def _check_methods(config: dict[str, Any]) -> None:
    """Each method's own checks (ranks, stages) for every dataset and pair it runs on."""
    for dataset, pair in itertools.product(config["datasets"], config["pairs"]):
        shape = image_shape(dataset, (config.get("data") or {}).get(dataset))
        archs = [pair["student"], pair["teacher"]]

        def stage_shape(stage: int, archs: list[str] = archs, shape: Any = shape) -> Any:
            shapes = {models.stage_shape(a, stage, shape) for a in archs}
            if len(shapes) > 1:
                raise KdbenchError(
                    f"stage {stage} of {' and '.join(archs)} differ in shape: {sorted(shapes)}"
                )
            return shapes.pop()

        for name in config["methods"]:
            cls = methods.get(name)
            for vname, params in variants(config, name).items():
                try:
                    cls.check(params, stage_shape)
                except KdbenchError as exc:
                    raise KdbenchError(f"methods.{name} ({vname}) on {dataset}: {exc}") from None


def _check_teacher_methods(config: dict[str, Any]) -> None:
    if not any(methods.get(m).needs_teacher for m in config["methods"]):
        return
    if not config.get("pairs"):
        raise KdbenchError("pairs: at least one teacher → student pair is needed")


def config_hash(config: dict[str, Any]) -> str:
    """md5 of the config, keys sorted: equal configs give equal hashes."""
    return hashlib.md5(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def analysis_config(config: dict[str, Any]) -> dict[str, Any]:
    """The analysis block with defaults, the diagnostics seed resolved and checked."""
    cfg = {**ANALYSIS_DEFAULTS, **(config.get("analysis") or {})}
    seeds = [int(s) for s in config["seeds"]]
    if cfg["seed"] is None:
        cfg["seed"] = seeds[0]
    elif int(cfg["seed"]) not in seeds:
        raise KdbenchError(f"analysis.seed: {cfg['seed']} is not one of the student seeds {seeds}")
    if pairs(config) and "vanilla" not in config["methods"]:
        raise KdbenchError(
            "methods: the analysis compares every distilled student with the vanilla student; "
            "add vanilla to methods"
        )
    return cfg


def pairs(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(dataset, teacher, student) of every pair that has distilled students."""
    found = {
        (r.dataset, r.teacher, r.student): None
        for r in student_runs(config)
        if r.teacher != NO_TEACHER
    }
    return list(found)


def teacher_config(config: dict[str, Any]) -> dict[str, Any]:
    return {**TEACHER_DEFAULTS, **(config.get("teacher") or {})}


def data_params(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """All settings of ``dataset`` (defaults updated from ``data.<dataset>``)."""
    return dataset_params(dataset, (config.get("data") or {}).get(dataset))


def train_params(config: dict[str, Any], role: str) -> dict[str, Any]:
    """The complete training recipe of a teacher (``role="teacher"``) or a student."""
    recipe = copy.deepcopy(config.get("train") or {})
    if role == "teacher":
        for key, value in (teacher_config(config).get("train") or {}).items():
            if isinstance(value, dict):
                recipe[key] = {**recipe.get(key, {}), **value}
            else:
                recipe[key] = value
    # settings added after the first release stay out while at their defaults, so that their
    # arrival re-ran nothing
    return TrainConfig.from_config(recipe).record()


def variants(config: dict[str, Any], method: str) -> dict[str, dict[str, Any]]:
    """Variant name → complete parameters of ``method``."""
    return methods.get(method).expand_variants(config["methods"].get(method))


@dataclass(frozen=True)
class TeacherRun:
    dataset: str
    arch: str
    seed: int


@dataclass(frozen=True)
class StudentRun:
    dataset: str
    teacher: str
    student: str
    method: str
    variant: str
    seed: int


def teacher_runs(config: dict[str, Any]) -> list[TeacherRun]:
    """Every teacher the students of ``config`` need (one seed per dataset and architecture)."""
    seed = int(teacher_config(config)["seed"])
    archs = dict.fromkeys(canonical_arch(p["teacher"]) for p in config.get("pairs") or [])
    needs = any(methods.get(m).needs_teacher for m in config["methods"])
    if not needs:
        return []
    return [TeacherRun(d, a, seed) for d, a in itertools.product(config["datasets"], archs)]


def student_runs(config: dict[str, Any]) -> list[StudentRun]:
    """Every student run: dataset × pair × method × variant × seed (vanilla once per student)."""
    runs: dict[StudentRun, None] = {}
    pairs = [(canonical_arch(p["teacher"]), canonical_arch(p["student"])) for p in config["pairs"]]
    for dataset, (teacher, student), method, seed in itertools.product(
        config["datasets"], pairs, config["methods"], config["seeds"]
    ):
        t = teacher if methods.get(method).needs_teacher else NO_TEACHER
        for variant in variants(config, method):
            runs[StudentRun(dataset, t, student, method, variant, int(seed))] = None
    return list(runs)


@dataclass(frozen=True)
class CohortJob:
    """Students of one dataset, teacher and seed trained in one job on one teacher pass per
    batch (``cohort_size``; :func:`kdbench.runs.train_cohort`)."""

    dataset: str
    teacher: str
    seed: int
    index: int
    members: tuple[StudentRun, ...]

    @property
    def name(self) -> str:
        return f"{self.teacher}-seed{self.seed}-c{self.index}"


def cohorts(config: dict[str, Any]) -> list[CohortJob]:
    """The cohort jobs of ``config``: with ``cohort_size`` N > 0, the students that learn from a
    teacher, per dataset, teacher and seed in config order (pairs, methods, variants), N to a
    cohort; none with 0 (the default). Teacher-free students (vanilla) train alone."""
    size = int(config.get("cohort_size") or 0)
    if size <= 0:
        return []
    groups: dict[tuple[str, str, int], list[StudentRun]] = {}
    for run in student_runs(config):
        if run.teacher != NO_TEACHER:
            groups.setdefault((run.dataset, run.teacher, run.seed), []).append(run)
    return [
        CohortJob(dataset, teacher, seed, i // size, tuple(runs[i : i + size]))
        for (dataset, teacher, seed), runs in groups.items()
        for i in range(0, len(runs), size)
    ]
