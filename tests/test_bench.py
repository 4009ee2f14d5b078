import json

from kdbench import bench


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
    assert "faster" in capsys.readouterr().out
