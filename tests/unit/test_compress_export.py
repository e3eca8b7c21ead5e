"""Quantized, shared and sparse exports: parity with the torch simulation, types, fusion, sizes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from compress_fixtures import digits, trained_small_cnn

from edgecompress.compress import quantization as q
from edgecompress.compress import sharing, sparse
from edgecompress.compress.api import apply, compressed_onnx, export_plan, uniform_plan
from edgecompress.compress.plan import CompressionPlan, LayerPlan
from edgecompress.compress.sizing import size_report
from edgecompress.export import check_parity, save_onnx, to_onnx_model, write_onnx

PLANS = {
    "int8": dict(weight_bits=8, activations="int8"),
    "int4-weights": dict(weight_bits=4),
    "int4+int8act": dict(weight_bits=4, activations="int8"),
    "int2+int8act": dict(weight_bits=2, activations="int8", first_last="float"),
    "shared16": dict(clusters=16),
    "shared4+int8act": dict(clusters=4, weight_bits=8, activations="int8"),
    "pruned+int4+sparse": dict(keep_ratio=0.5, weight_bits=4, kernel_sparsity=0.5, channel_multiple=4),
}


def _export(plan: CompressionPlan, path) -> tuple:
    model = trained_small_cnn()
    compressed = apply(model, plan, calibration=digits("train", 256).x)
    save_onnx(compressed_onnx(compressed, plan, {}), path, force=True)
    return model, compressed


def _optimized_ops(path, tmp_path) -> dict[str, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for node in onnx.load(options.optimized_model_filepath).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


@pytest.mark.parametrize("name", list(PLANS))
def test_each_precision_matches_its_torch_simulation(name: str, tmp_path) -> None:
    model = trained_small_cnn()
    plan = uniform_plan(model, **PLANS[name])
    path = tmp_path / f"{name}.onnx"
    _, compressed = _export(plan, path)
    test = digits("test")
    parity = check_parity(compressed.module, compressed.spec, path, test.x)
    assert parity.top1_agreement >= 0.995, parity
    fp32 = len(to_onnx_model(model.module, model.spec).SerializeToString())
    assert path.stat().st_size < fp32 / 2.5, (path.stat().st_size, fp32)


def test_int4_and_int2_use_the_right_types_and_opsets(tmp_path) -> None:
    model = trained_small_cnn()
    for bits, dtype, opset in ((4, onnx.TensorProto.INT4, 21), (2, onnx.TensorProto.INT2, 25)):
        path = tmp_path / f"w{bits}.onnx"
        _export(uniform_plan(model, weight_bits=bits, activations="int8"), path)
        m = onnx.load(str(path))
        assert m.opset_import[0].version == opset
        types = {t.name: t.data_type for t in m.graph.initializer}
        assert types["features.3.weight_q"] == dtype
        assert types["features.0.weight_q"] == onnx.TensorProto.INT8  # first layer: 8 bits
        w = next(t for t in m.graph.initializer if t.name == "features.12.weight_q")
        assert len(w.raw_data) == int(np.prod(w.dims)) * bits // 8  # packed, not one byte each


def test_onnxruntime_runs_int8_int4_and_int8_codebooks_on_integer_kernels(tmp_path) -> None:
    model = trained_small_cnn()
    for settings in (
        dict(weight_bits=8),
        dict(weight_bits=4),
        dict(weight_bits=2),
        dict(weight_bits=8, clusters=16),
    ):
        path = tmp_path / "fused.onnx"
        _export(uniform_plan(model, activations="int8", first_last="same", **settings), path)
        ops = _optimized_ops(path, tmp_path)
        assert ops.get("QLinearConv", 0) == 6, (settings, ops)  # every conv on int8 kernels
        assert "Conv" not in ops


def test_weight_only_layers_are_folded_to_plain_float_convs(tmp_path) -> None:
    path = tmp_path / "w4.onnx"
    _export(uniform_plan(trained_small_cnn(), weight_bits=4, first_last="same"), path)
    ops = _optimized_ops(path, tmp_path)
    assert "DequantizeLinear" not in ops and "Cast" not in ops and "Mul" not in ops, ops


def test_weight_fake_quant_lies_on_a_symmetric_per_channel_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    for bits in (8, 4, 2):
        fq = q.fake_quant_weight(w, bits)
        scale = q.weight_scale(w, bits)
        levels = fq / scale.view(-1, 1, 1, 1)
        torch.testing.assert_close(levels, levels.round())
        assert levels.abs().max() <= q.QMAX[bits]
    assert set(
        torch.unique((q.fake_quant_weight(w, 2) / q.weight_scale(w, 2).view(-1, 1, 1, 1)).round()).tolist()
    ) <= {-1.0, 0.0, 1.0}
    w.requires_grad_(True)
    q.fake_quant_weight(w, 4).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through


def test_activation_quant_rounds_half_to_even_and_keeps_zero_exact() -> None:
    aq = q.ActQuant()
    aq.observing = True
    aq(torch.tensor([-1.0, 3.0]))
    aq.observing = False
    scale, zero = aq.params()
    assert float(scale) == pytest.approx(4 / 255)
    assert float(aq(torch.zeros(1))) == 0.0
    half = (torch.tensor([0.5, 1.5, 2.5]) - 0) * scale
    assert torch.equal(torch.round(aq(half) / scale), torch.tensor([0.0, 2.0, 2.0]))


def test_kmeans_is_deterministic_and_sharing_reserves_an_exact_zero() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=5000)
    a, ia = sharing.kmeans_1d(values, 16)
    b, ib = sharing.kmeans_1d(values, 16)
    assert np.array_equal(a, b) and np.array_equal(ia, ib)
    assert len(a) == 16 and np.all(np.diff(a) > 0)
    assert np.abs(a[ia] - values).mean() < 0.1
    c, _ = sharing.kmeans_1d(values, 8, seed=3, init="kmeans++")
    assert len(c) == 8
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    mask = np.ones((4, 2, 1, 1), np.float32)
    mask[0, 1] = 0
    codebook, index = sharing.share(w, 4, mask, 0)
    assert codebook[-1] == 0.0 and np.all(index[0, 1] == 3)
    assert [sharing.index_type(k) for k in (4, 16, 17)] == [
        onnx.TensorProto.UINT2,
        onnx.TensorProto.UINT4,
        onnx.TensorProto.UINT8,
    ]


def test_codebook_layers_store_uint_indices_and_train_the_codebook(tmp_path) -> None:
    model = trained_small_cnn()
    plan = uniform_plan(model, clusters=4, first_last="same")
    path = tmp_path / "c4.onnx"
    _, compressed = _export(plan, path)
    m = onnx.load(str(path))
    types = {t.name: t.data_type for t in m.graph.initializer}
    assert types["features.3.weight_index"] == onnx.TensorProto.UINT2
    assert m.opset_import[0].version == 25
    layer = compressed.module.layer("features.3")
    assert len(torch.unique(layer.effective_weight())) <= 4
    compressed.module.train()
    x = torch.from_numpy(model.spec.normalize(digits("train", 8).x))
    compressed.module(x).sum().backward()
    assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0


def test_kernel_sparsity_goes_sparse_only_where_smaller(tmp_path) -> None:
    w = np.random.default_rng(0).normal(size=(8, 8, 3, 3)).astype(np.float32)
    dense = onnx.numpy_helper.from_array(w * sparse.kernel_mask(w, 0.2), "w")
    assert sparse.smaller_encoding(dense) is None  # 80% of kernels left: dense is smaller
    thin = onnx.numpy_helper.from_array(w * sparse.kernel_mask(w, 0.9), "w")
    encoded = sparse.smaller_encoding(thin)
    assert encoded is not None and encoded.ByteSize() < thin.ByteSize()
    mask = sparse.kernel_mask(w, 0.99)
    assert np.all(mask.sum((1, 2, 3)) >= 1)  # no output channel loses every kernel

    model = trained_small_cnn()
    thick, thin_path = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    _export(uniform_plan(model, kernel_sparsity=0.2, first_last="same"), thick)
    _, compressed = _export(uniform_plan(model, kernel_sparsity=0.9, first_last="same"), thin_path)
    assert not any(t.sparse for layer in size_report(thick).layers for t in layer.tensors)
    sparse_layers = [layer for layer in size_report(thin_path).layers if layer.precision == "float32 sparse"]
    assert len(sparse_layers) >= 4
    assert any(t.name == "features.15.weight" and t.sparse for t in sparse_layers[-1].tensors)
    assert thin_path.stat().st_size < 0.6 * thick.stat().st_size
    assert (
        check_parity(compressed.module, compressed.spec, thin_path, digits("test", 64).x).max_abs_diff < 1e-4
    )


def test_size_report_accounts_for_every_byte_of_the_file(tmp_path) -> None:
    model = trained_small_cnn()
    path = tmp_path / "mixed.onnx"
    plan = uniform_plan(model, weight_bits=4, activations="int8").with_layers(
        **{"features.6": LayerPlan(8, "int8", 16)}
    )
    _export(plan, path)
    report = size_report(path)
    assert report.file_bytes == path.stat().st_size
    assert sum(layer.bytes for layer in report.layers) + report.overhead_bytes == report.file_bytes
    rows = {layer.layer: layer for layer in report.layers}
    assert rows["features.3"].precision == "int4"
    assert rows["features.3"].params == 16 * 16 * 9
    assert rows["features.3"].bytes >= 16 * 16 * 9 // 2
    assert rows["features.6"].precision.startswith("uint4 index -> 16 x int8")
    assert rows["classifier"].precision == "int8"
    plain = write_onnx(model.module, model.spec, tmp_path / "plain.onnx")
    assert size_report(plain).layers[0].precision == "float32"


def test_export_plan_writes_a_checked_file_with_parity_and_refuses_overwrite(tmp_path) -> None:
    model = trained_small_cnn()
    out = tmp_path / "model.onnx"
    result = export_plan(
        model, uniform_plan(model, keep_ratio=0.5, weight_bits=4, activations="int8"), out, data="digits"
    )
    assert result.size_bytes == out.stat().st_size
    assert result.parity is not None and result.parity.n == 360 and result.parity.top1_agreement >= 0.995
    assert result.size_ratio > 10
    assert result.plan.groups and all(g.keep is not None for g in result.plan.groups.values())
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert CompressionPlan.from_json(meta["edgecompress.plan"]) == result.plan
    with pytest.raises(Exception, match="already exists"):
        export_plan(model, result.plan, out)
