"""The README's "Python API" example runs as written, and does what its comments say."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO

from kdbench import methods, metrics, models

TEACHER = "results/digits/teachers/resnet20/seed0/model_best.pt"


def readme_example() -> str:
    """The Python code blocks of the README's "Python API" section, joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no python block"
    return "\n".join(blocks)


def test_the_readme_python_api_example_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_example()
    assert TEACHER in code  # the weights the example loads, made here as a run would write them
    weights = tmp_path / TEACHER
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.build("resnet20", 10, 1).state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md (Python API)", "exec"), ns)

    assert [tuple(t.shape) for t in ns["model"](ns["x"])] == [
        (8, 16, 32, 32), (8, 32, 16, 16), (8, 64, 8, 8), (8, 100),
    ]  # fmt: skip
    assert tuple(ns["xb"].shape) == (64, 1, 16, 16) and ns["ds"].num_classes == 10
    assert tuple(ns["t3"].shape) == (64, 64, 4, 4)
    assert tuple(ns["core"].shape) == (64, 16, 4, 4)
    assert 0 < float(ns["error"]) < 1
    assert tuple(ns["cores"].shape) == (64, 16, 4, 4)
    assert ns["names"] == ["featuremap", "ft", "kd", "tucker", "tucker_recomp", "vanilla"]
    assert ns["names"] == sorted(methods.available())
    assert set(ns["parts"]) == {"ce", "feature"}
    assert ns["method"].params["decomposition"] == "sample"
    student, teacher = ns["student"], ns["teacher"]
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert set(ns["values"]) == set(metrics.KEYS)
    assert list(ns["table"].columns) == ["channel", "metric", "value"]
    assert len(ns["table"]) == 64 * len(metrics.KEYS)
