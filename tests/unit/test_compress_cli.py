"""`edgecompress export` with a plan file or uniform plan flags, run as a real subprocess."""

from __future__ import annotations

import json

import onnx
import torch
from compress_fixtures import run_export, trained_small_cnn

from edgecompress.compress.plan import CompressionPlan, LayerPlan


def test_uniform_flags_and_plan_file_export_checked_smaller_files(tmp_path) -> None:
    weights = tmp_path / "small.pt"
    torch.save(trained_small_cnn().module.state_dict(), weights)
    out = tmp_path / "uniform.onnx"
    done = run_export("small_cnn", "--weights", str(weights), "--keep-ratio", "0.5", "--weight-bits", "4",
                "--activations", "int8", "--data", "digits", "--out", str(out), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["size_bytes"] == out.stat().st_size and record["size_ratio"] > 10
    assert record["opset"] == 21 and record["parity"]["top1_agreement"] >= 0.995
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)

    plan = CompressionPlan(default=LayerPlan(weight_bits=8), layers={"features.9": LayerPlan(clusters=4)})
    path = plan.save(tmp_path / "plan.json")
    out2 = tmp_path / "planned.onnx"
    done = run_export("small_cnn", "--weights", str(weights), "--plan", str(path), "--out", str(out2))
    assert done.returncode == 0, done.stderr
    assert "smaller than the fp32 export" in done.stdout
    types = {t.name: t.data_type for t in onnx.load(str(out2)).graph.initializer}
    assert types["features.9.weight_index"] == onnx.TensorProto.UINT2


def test_bad_plans_and_conflicting_flags_fail_in_one_line(tmp_path) -> None:
    plan = tmp_path / "bad.json"
    plan.write_text('{"default": {"weight_bits": 5}}')
    done = run_export(
        "small_cnn", "--plan", str(plan), "--keep-ratio", "0.5", "--out", str(tmp_path / "x.onnx")
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: give either --plan or the uniform flags")
    done = run_export("small_cnn", "--plan", str(plan), "--out", str(tmp_path / "x.onnx"))
    assert done.returncode == 1 and "weight_bits must be one of 32, 8, 4, 2" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.onnx").exists()
