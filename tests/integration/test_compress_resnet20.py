"""ResNet-20 with its published weights: compressed files that are really smaller and agree.

Parity is measured on 1,000-2,000 images of the CIFAR-10 JPEG test split (the benchmark,
benchmarks/compression.py, measures all 10,000); accuracy on the exact sample.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from edgecompress.compress.api import export_plan, uniform_plan
from edgecompress.data import load_dataset
from edgecompress.evaluate import evaluate
from edgecompress.zoo import load_model

PARITY_IMAGES = 2000


@pytest.fixture(scope="module")
def resnet20(weights_dir):
    return load_model("resnet20", weights_dir / "resnet20.th")


@pytest.fixture(scope="module")
def cifar(cifar10_dir) -> str:
    return f"cifar10:{cifar10_dir}"


def test_half_channels_and_4_bit_weights_is_over_15x_smaller(resnet20, cifar, tmp_path) -> None:
    plan = uniform_plan(resnet20, keep_ratio=0.5, weight_bits=4)
    result = export_plan(resnet20, plan, tmp_path / "r20.onnx", data=cifar, parity_samples=PARITY_IMAGES)
    assert result.size_bytes == (tmp_path / "r20.onnx").stat().st_size
    assert result.size_ratio >= 15, result.as_dict()
    assert result.parity.n == PARITY_IMAGES and result.parity.top1_agreement >= 0.995
    assert result.opset == 21


@pytest.mark.parametrize(
    "settings",
    [
        dict(keep_ratio=0.5, weight_bits=4, activations="int8"),
        dict(weight_bits=8, activations="int8", clusters=16),
    ],
    ids=["pruned-int4-int8act", "int8-codebook16"],
)
def test_integer_plans_agree_with_the_simulation_and_run_on_integer_kernels(
    resnet20, cifar, settings, tmp_path
) -> None:
    path = tmp_path / "q.onnx"
    result = export_plan(resnet20, uniform_plan(resnet20, **settings), path, data=cifar, parity_samples=1000)
    assert result.parity.top1_agreement >= 0.995, result.as_dict()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 19 and "Conv" not in ops


def test_int8_keeps_the_checkpoint_accuracy_on_the_exact_sample(
    resnet20, cifar, cifar10_dir, tmp_path
) -> None:
    path = tmp_path / "int8.onnx"
    export_plan(
        resnet20,
        uniform_plan(resnet20, weight_bits=8, activations="int8"),
        path,
        data=cifar,
        parity_samples=200,
    )
    exact = load_dataset(f"npz:{cifar10_dir / 'exact_test.npz'}", "test")
    top1 = evaluate(path, exact).top1
    assert top1 >= 90.5  # fp32: 91.50 (DATA.md)
