"""The published checkpoints in ../shared reproduce DATA.md's figures, in torch and in ONNX.

Every checkpoint is checked on the exact 1,000-image sample here; the full 10,000-image
JPEG test split is checked for ResNet-20 (the rest take minutes on 2 cores: they are in
benchmarks/foundation.py, with their results in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import pytest

from edgecompress.data import load_dataset
from edgecompress.evaluate import evaluate
from edgecompress.export import export_onnx, read_input_spec, read_metadata
from edgecompress.zoo import load_model

# model -> (file, exact test 0-999, JPEG test all 10,000), from ../shared/DATA.md
EXPECTED = {
    "resnet20": ("resnet20.th", 91.50, 81.03),
    "resnet32": ("resnet32.th", 92.80, 82.56),
    "resnet44": ("resnet44.th", 93.30, 82.67),
    "resnet56": ("resnet56.th", 92.60, 83.20),
    "vgg16_bn": ("vgg16_bn.pt", 92.40, 90.05),
}


@pytest.fixture(scope="module")
def exact_test(cifar10_dir):
    return load_dataset(f"npz:{cifar10_dir / 'exact_test.npz'}", "test")


def _torch_and_onnx(model, data, out):
    torch_result = evaluate(model, data)
    export_onnx(model, out)
    return torch_result, evaluate(out, data)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exact_sample_figure_in_torch_and_onnx(name, weights_dir, exact_test, tmp_path):
    file, exact_top1, _ = EXPECTED[name]
    model = load_model(name, weights_dir / file)
    out = tmp_path / f"{name}.onnx"
    torch_result, onnx_result = _torch_and_onnx(model, exact_test, out)
    assert torch_result.top1 == pytest.approx(exact_top1, abs=1e-9)
    assert (onnx_result.predictions == torch_result.predictions).mean() >= 0.999
    assert read_input_spec(out) == model.spec
    assert name in read_metadata(out)["edgecompress.source"]


def test_resnet20_jpeg_test_split_figure(weights_dir, cifar10_dir, tmp_path):
    jpeg_test = load_dataset(f"cifar10:{cifar10_dir}", "test")
    assert len(jpeg_test) == 10_000
    model = load_model("resnet20", weights_dir / "resnet20.th")
    torch_result, onnx_result = _torch_and_onnx(model, jpeg_test, tmp_path / "r20.onnx")
    assert torch_result.top1 == pytest.approx(81.03, abs=0.02)
    assert (onnx_result.predictions == torch_result.predictions).mean() >= 0.999
