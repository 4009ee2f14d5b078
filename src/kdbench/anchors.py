"""Published results beside the measured ones, with every protocol difference spelled out.

The anchors file (``config/anchors.yaml``; config key ``anchors``) lists protocols (epochs,
schedule, batch, training images, lr, T, β, how the reported epoch was selected, number of
runs) and rows (protocol, dataset, teacher, student, method, optional variant, accuracy, teacher
accuracy).
:func:`anchor_table` joins each row with the measured group of the same dataset, pair, method
and variant: ``teacher`` rows with the teacher run, ``vanilla`` rows with the vanilla student of
the same architecture (it has no teacher).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kdbench.errors import KdbenchError

ROW_KEYS = {"protocol", "dataset", "teacher", "student", "method", "accuracy"}
PROTOCOL_KEYS = (
    "epochs", "schedule", "batch_size", "train_images", "lr", "T", "beta", "selection", "runs"
)  # fmt: skip
COLUMNS = [
    "protocol",
    "source",
    "dataset",
    "teacher",
    "student",
    "method",
    "variant",
    "published",
    "measured",
    "measured_ci95",
    "n",
    "measured_at",
    "difference",
    "published_teacher",
    "measured_teacher",
    "protocol_differences",
]


def load(path: str | Path) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    """The protocols and rows of an anchors file, checked (one-line errors)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KdbenchError(f"cannot read the anchors file {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise KdbenchError(f"anchors file {path}: needs 'protocols' and a list of 'rows'")
    protocols = doc.get("protocols") or {}
    for i, row in enumerate(doc["rows"]):
        missing = ROW_KEYS - set(row)
        if missing:
            raise KdbenchError(f"anchors file {path}: rows[{i}] lacks {', '.join(sorted(missing))}")
        if row["protocol"] not in protocols:
            raise KdbenchError(
                f"anchors file {path}: rows[{i}] names unknown protocol {row['protocol']!r}"
            )
    rows = pd.DataFrame(doc["rows"])
    if "variant" not in rows:
        rows["variant"] = "default"
    if "teacher_acc" not in rows:
        rows["teacher_acc"] = math.nan
    rows["variant"] = rows["variant"].fillna("default")
    return protocols, rows


def _match(summary: pd.DataFrame, row: Any) -> pd.DataFrame:
    s = summary[summary.dataset == row.dataset]
    if row.method == "teacher":
        return s[(s.role == "teacher") & (s.arch == row.teacher)]
    s = s[(s.role == "student") & (s.arch == row.student) & (s.method == row.method)]
    s = s[s.variant == row.variant]
    if row.method == "vanilla":
        return s
    return s[s.teacher == row.teacher]


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _differences(
    protocol: dict[str, Any], row: Any, measured: dict[str, Any], runs: pd.DataFrame
) -> str:
    """'name: X there, Y here' for every setting that differs (or is not stated)."""
    first = runs.iloc[0]
    ours: dict[str, Any] = {
        "epochs": int(first["epochs"]),
        "schedule": first["schedule"],
        "batch_size": int(first["batch_size"]),
        "lr": float(first["lr"]),
        "selection": measured["measured_at"],
        "runs": int(measured["n"]),
    }
    images = float(first.get("train_images", math.nan))
    if not math.isnan(images):  # runs of metrics.json files that record their data
        ours["train_images"] = int(images)
    if row.method == "kd":
        ours["T"] = float(first["T"])  # not first.T: a transpose
    beta = protocol.get("beta")
    theirs_beta = beta.get(row.method) if isinstance(beta, dict) else beta
    if not math.isnan(float(first["beta"])):
        ours["beta"] = float(first["beta"])
    parts = []
    for key in PROTOCOL_KEYS:
        if key not in ours:
            continue
        theirs = theirs_beta if key == "beta" else protocol.get(key)
        if theirs is None:
            parts.append(f"{key}: not stated there, {_fmt(ours[key])} here")
        elif str(_fmt(theirs)) != str(_fmt(ours[key])):
            parts.append(f"{key}: {_fmt(theirs)} there, {_fmt(ours[key])} here")
    teacher = measured["measured_teacher"]
    if not math.isnan(row.teacher_acc) and not math.isnan(teacher):
        parts.append(f"teacher accuracy: {row.teacher_acc:.2f} there, {teacher:.2f} here")
    return "; ".join(parts) if parts else "same protocol"


def anchor_table(
    anchors_path: str | Path, summary: pd.DataFrame, runs: pd.DataFrame
) -> pd.DataFrame:
    """Every published row with the matching measurement and the protocol differences; rows
    that this run measured come first."""
    protocols, rows = load(anchors_path)
    headline = str(summary.accuracy.iloc[0]) if len(summary) else "best_val"
    out = []
    for row in rows.itertuples():
        protocol = protocols[row.protocol]
        last = str(protocol.get("selection") or "").startswith("last")
        at = "last" if last else headline
        record: dict[str, Any] = {
            "protocol": row.protocol,
            "source": protocol.get("source", ""),
            "dataset": row.dataset,
            "teacher": row.teacher,
            "student": row.student,
            "method": row.method,
            "variant": row.variant,
            "published": float(row.accuracy),
            "published_teacher": float(row.teacher_acc),
            "measured": math.nan,
            "measured_ci95": math.nan,
            "n": 0,
            "measured_at": "last epoch" if at == "last" else "best-validation epoch",
            "difference": math.nan,
            "measured_teacher": math.nan,
            "protocol_differences": "not run here",
        }
        found = _match(summary, row)
        if len(found):
            got = found.iloc[0]
            record["measured"] = float(got[f"{at}_mean"])
            record["measured_ci95"] = float(got[f"{at}_ci95"])
            record["n"] = int(got.n)
            record["difference"] = record["measured"] - record["published"]
            teacher = summary[
                (summary.role == "teacher")
                & (summary.dataset == row.dataset)
                & (summary.arch == row.teacher)
            ]
            if len(teacher) and row.method != "teacher":
                record["measured_teacher"] = float(teacher[f"{at}_mean"].iloc[0])
            group = runs[
                (runs.dataset == got.dataset)
                & (runs.role == got.role)
                & (runs.arch == got.arch)
                & (runs.method == got.method)
                & (runs.variant == got.variant)
                & (runs.teacher == got.teacher)
            ]
            record["protocol_differences"] = _differences(protocol, row, record, group)
        out.append(record)
    table = pd.DataFrame(out, columns=COLUMNS)
    order = table.measured.isna().astype(int)
    return table.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o")
