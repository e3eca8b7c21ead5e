"""ONNX export: checker, dynamic batch, metadata, parity, and never overwriting a user's file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgecompress.data import load_dataset
from edgecompress.errors import ExportError, OutputError
from edgecompress.evaluate import evaluate
from edgecompress.export import export_onnx, read_input_spec, read_metadata
from edgecompress.zoo import MODELS, load_model


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


@pytest.mark.parametrize("name", list(MODELS))
def test_every_architecture_exports_a_checked_file_with_parity(name, tmp_path):
    model = load_model(name)
    images = np.random.default_rng(0).integers(0, 256, (4, *model.spec.shape[1:], model.spec.shape[0]))
    data = load_dataset("digits", "test").take(4)
    data = type(data)(images.astype(np.uint8), data.y, data.classes, "random", "test")
    result = export_onnx(model, tmp_path / "m.onnx", parity_data=data)
    onnx.checker.check_model(onnx.load(str(result.path)), full_check=True)
    assert result.size_bytes == result.path.stat().st_size
    import torch

    with torch.no_grad():
        scale = model.module(torch.from_numpy(model.spec.normalize(data.x))).abs().max().item()
    # untrained deep nets give large logits; float32 rounding grows with them
    assert result.parity.n == 4 and result.parity.max_abs_diff <= 1e-5 * max(1.0, scale) + 1e-5
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions


def test_dynamic_batch_and_metadata(tmp_path):
    model = load_model("small_cnn")
    path = export_onnx(model, tmp_path / "m.onnx").path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        out = session.run(None, {"input": np.zeros((batch, 1, 32, 32), np.float32)})[0]
        assert out.shape == (batch, 10)
    assert read_input_spec(path) == model.spec
    meta = read_metadata(path)
    assert meta["edgecompress.opset"] == "17" and "small_cnn" in meta["edgecompress.source"]


def test_onnx_file_evaluates_like_torch(tmp_path, digits_test):
    model = load_model("small_cnn")
    path = export_onnx(model, tmp_path / "m.onnx").path
    torch_result, onnx_result = evaluate(model, digits_test), evaluate(path, digits_test)
    assert onnx_result.runtime == "onnxruntime" and torch_result.runtime == "torch"
    assert np.mean(onnx_result.predictions == torch_result.predictions) >= 0.99


def test_never_overwrites_without_force(tmp_path):
    target = tmp_path / "mine.onnx"
    target.write_bytes(b"user data")
    model = load_model("small_cnn")
    with pytest.raises(OutputError, match="--force"):
        export_onnx(model, target)
    assert target.read_bytes() == b"user data"
    export_onnx(model, target, force=True)
    assert target.stat().st_size > 1000


def test_unreadable_onnx_is_reported(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        read_input_spec(tmp_path / "bad.onnx")
