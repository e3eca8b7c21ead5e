"""int8 activations: onnxruntime's fused kernels against the torch simulation, tensor by tensor,
and the activation calibration methods (min/max, percentile, MSE)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from compress_fixtures import digits, random_images, randomize_bn, trained_small_cnn
from torch import nn

from edgecompress.compress import quantization as q
from edgecompress.compress.api import apply, compressed_onnx, uniform_plan
from edgecompress.compress.onnx_ops import attributes, run_node
from edgecompress.compress.plan import CompressionPlan
from edgecompress.compress.rewrite import to_onnx
from edgecompress.errors import PlanError
from edgecompress.export import check_parity, save_onnx
from edgecompress.zoo import LoadedModel
from edgecompress.zoo.mobilenetv2 import InvertedResidual, conv_bn_relu
from edgecompress.zoo.spec import InputSpec


class TinyMobileNet(nn.Module):
    """MobileNetV2's parts: ReLU6 (Clip), depthwise convs, residual Adds, global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 8, 3)
        self.block1 = InvertedResidual(8, 8, 1, 4)
        self.block2 = InvertedResidual(8, 16, 2, 4)
        self.block3 = InvertedResidual(16, 16, 1, 4)
        self.head = nn.Linear(16, 4)
        self.input_spec = InputSpec((3, 12, 12), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), num_classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _tiny_mobilenet() -> LoadedModel:
    torch.manual_seed(0)
    module = randomize_bn(TinyMobileNet()).eval()
    return LoadedModel(module, module.input_spec, "user")


def _fused_tensors(model: onnx.ModelProto, x: np.ndarray, tmp_path) -> dict[str, np.ndarray]:
    """The integer outputs of every fused QLinear* node onnxruntime runs, by tensor name.

    Exposing a tensor of the QDQ file as an output would stop the fusion, so the graph
    onnxruntime optimized (QLinearConv, QLinearAdd, ...) is saved, its fused nodes'
    outputs exposed, and that graph run without further optimization.
    """
    source, optimized = tmp_path / "qdq.onnx", tmp_path / "fused.onnx"
    onnx.save(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    fused = onnx.load(optimized)
    names = [n.output[0] for n in fused.graph.node if n.op_type.startswith("QLinear")]
    names += [n.output[0] for n in fused.graph.node if n.op_type == "QuantizeLinear"]
    fused.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    onnx.save(fused, optimized)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(optimized), plain, providers=["CPUExecutionProvider"])
    outputs = session.run(names, {session.get_inputs()[0].name: x})
    return dict(zip(names, outputs, strict=True))


PLANS = {
    "int8": dict(weight_bits=8, activations="int8"),
    "int4 weights": dict(weight_bits=4, activations="int8"),
    "int8 codebook": dict(weight_bits=8, activations="int8", clusters=16),
    "pruned + int4": dict(keep_ratio=0.5, weight_bits=4, activations="int8"),
    "int2 + half the kernels": dict(weight_bits=2, activations="int8", kernel_sparsity=0.5),
}


@pytest.mark.parametrize("label", PLANS)
def test_fused_int8_kernels_equal_the_evaluated_simulation_bit_for_bit(label, tmp_path) -> None:
    """In evaluation the simulation runs onnxruntime's integer kernels (compress/exact.py):
    every QLinearConv (depthwise too, ReLU6 folded), QLinearAdd, QLinearGlobalAveragePool
    and the input's QuantizeLinear give the very integers onnxruntime's fused graph gives,
    through the whole network, and so the same logits and top-1."""
    model = _tiny_mobilenet()
    plan = uniform_plan(model, **PLANS[label])
    sim = apply(model, plan, calibration=random_images(model.spec, 64, seed=1)).module.eval()
    x = model.spec.normalize(random_images(model.spec, 128, seed=2))
    fused = _fused_tensors(to_onnx(sim, compact=False), x, tmp_path)
    with torch.no_grad():
        values = sim.tensors(torch.from_numpy(x))
    kinds = {k for k, _ in filter(None, sim._kernels)}
    assert kinds == {"layer", "add", "pool"}, kinds
    for name, got in fused.items():
        tensor = name.removesuffix("_q")
        scale, zero = sim.act_quant(tensor).params()
        want = (torch.round(values[tensor] / scale) + zero).numpy()
        assert np.array_equal(got.astype(np.float64), want), (label, tensor, int((got != want).sum()))
    assert len(fused) >= 12  # input, 9 convs (ReLU6 folded), 2 adds, the pooling
    path = save_onnx(to_onnx(sim), tmp_path / "model.onnx", force=True)
    assert check_parity(sim, model.spec, path, random_images(model.spec, 128, seed=2)).top1_agreement == 1.0


def test_float_layers_between_int8_layers_stay_float_in_onnxruntime(tmp_path) -> None:
    """A layer planned with float weights whose input an int8 layer quantized: onnxruntime
    must run it in float as the simulation does. Its WeightBiasQuantization quantizes the
    float weights of a Conv/Gemm fed straight by a DequantizeLinear (int8 per tensor), which
    moved 10-24% of the next layers' integers and up to 2% of top-1 on an AVX2 host. What
    remains are one-step differences where a float layer's output is quantized: torch and
    onnxruntime add a float convolution's products in different orders."""
    model = trained_small_cnn()
    float_32, weight_only = {"weight_bits": 32}, {"weight_bits": 4, "activations": "float"}
    int8 = {"weight_bits": 8, "activations": "int8"}
    layers = {"features.3": int8, "features.6": float_32, "features.9": int8, "features.12": weight_only}
    plan = CompressionPlan.from_dict({"layers": {**layers, "features.15": int8, "classifier": float_32}})
    sim = apply(model, plan, calibration=digits("train", 256).x).module.eval()
    x = model.spec.normalize(digits("test").x)
    fused = _fused_tensors(to_onnx(sim, compact=False), x, tmp_path)
    optimized = onnx.load(tmp_path / "fused.onnx")
    assert sum(n.op_type == "QLinearConv" for n in optimized.graph.node) == 3  # the int8 layers only
    with torch.no_grad():
        values = sim.tensors(torch.from_numpy(x))
    for name, got in fused.items():
        tensor = name.removesuffix("_q")
        scale, zero = sim.act_quant(tensor).params()
        diff = np.abs(got.astype(np.float64) - (torch.round(values[tensor] / scale) + zero).numpy())
        # Without the fix: 10-24% of the integers after the float layer moved, by up to 5.
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (tensor, diff.max(), (diff > 0).mean())
    path = save_onnx(to_onnx(sim), tmp_path / "model.onnx", force=True)
    assert check_parity(sim, model.spec, path, digits("test").x).top1_agreement >= 0.995


def test_the_straight_through_simulation_differs_from_the_kernels_only_at_rounding_ties(tmp_path) -> None:
    """The training-time (straight-through) simulation computes round(conv(x, w) / s) in
    float: each QLinearConv, QLinearAdd and QLinearGlobalAveragePool output of onnxruntime,
    recomputed from onnxruntime's own inputs, equals it except for one-step differences at
    rounding ties (the kernels order their float arithmetic differently). A real mismatch
    (bias scale, zero point, requantization, a fused Clip) would move many values by more."""
    model = _tiny_mobilenet()
    plan = uniform_plan(model, weight_bits=8, activations="int8")  # uint8 activations
    images = random_images(model.spec, 64, seed=1)
    sim = apply(model, plan, calibration=images).module
    sim.exact = False
    x = model.spec.normalize(random_images(model.spec, 32, seed=2))
    fused = _fused_tensors(to_onnx(sim, compact=False), x, tmp_path)
    shift = 0
    nodes = {n.output[0]: n for n in sim.base.graph.node}

    def from_onnxruntime(tensor: str) -> torch.Tensor:
        """A tensor as onnxruntime computed it: dequantized where it is quantized, else
        recomputed (in torch) from onnxruntime's inputs (a Conv whose ReLU6 is folded)."""
        if f"{tensor}_q" in fused:
            scale, zero = sim.act_quant(tensor).params()
            return (torch.from_numpy(fused[f"{tensor}_q"]).double() + shift - float(zero)).float() * scale
        return _before_rounding(sim, nodes[tensor], from_onnxruntime)

    compared: dict[str, int] = {}
    for name, got in fused.items():
        tensor = name.removesuffix("_q")
        scale, zero = sim.act_quant(tensor).params()
        if tensor == sim.input_name:
            steps = (torch.from_numpy(x) / scale).numpy()
            kind = "input"
        else:
            steps = (_before_rounding(sim, nodes[tensor], from_onnxruntime) / scale).numpy()
            kind = nodes[tensor].op_type
        want = np.clip(np.round(steps) + float(zero), 0, 255) - shift
        diff = np.abs(got.astype(np.float64) - want)
        off = diff > 0
        # The only differences are one step at rounding ties (within 1e-4 step of a midpoint).
        assert diff.max() <= 1, (name, diff.max())
        assert np.all(np.abs(steps[off] - np.floor(steps[off]) - 0.5) < 1e-4), name
        compared[kind] = compared.get(kind, 0) + 1
    # ReLU6 is folded into QLinearConv's output, the residual Add and the pooling are fused
    assert compared.get("Clip", 0) >= 6 and compared.get("Conv", 0) >= 3, compared
    assert compared.get("Add") == 2 and compared.get("GlobalAveragePool") == 1, compared
    assert compared.get("input") == 1, compared


def test_int8_activations_agree_with_the_simulation(tmp_path) -> None:
    """Signed activations: onnxruntime (x86) turns the s8 Q/DQ pairs into u8 ones and leaves
    some Conv/Add in float between them; the logits still match the simulation."""
    model = _tiny_mobilenet()
    plan = uniform_plan(model, weight_bits=8, activations="int8", activation_dtype="int8")
    compressed = apply(model, plan, calibration=random_images(model.spec, 64, seed=1))
    path = save_onnx(compressed_onnx(compressed, plan, {}), tmp_path / "s8.onnx", force=True)
    assert {t.data_type for t in onnx.load(path).graph.initializer if t.name.endswith("act_zero") or
            t.name.startswith("c")} >= {onnx.TensorProto.INT8}  # fmt: skip
    parity = check_parity(compressed.module, model.spec, path, random_images(model.spec, 64, seed=3))
    assert parity.top1_agreement >= 0.95 and parity.max_abs_diff < 0.05, parity


def _before_rounding(sim, node: onnx.NodeProto, value_of) -> torch.Tensor:  # noqa: ANN001
    """A node's float output before its activation quantization, from `value_of(input)`."""
    inputs = [
        value_of(n) if n in sim.points.tensors or n in {m.output[0] for m in sim.base.graph.node}
        else (sim._const(n) if n in sim.const_names else None)
        for n in node.input
    ]  # fmt: skip
    if node.name in sim.layer_names:
        lw = sim.layer(node.name)
        inputs[1] = lw.effective_weight()
        if lw.bias is not None:
            inputs[2] = lw.effective_bias(sim.act_quant(node.input[0]).params()[0])
    with torch.no_grad():
        return run_node(node, inputs, attributes(node))[0]


def test_calibration_methods_clip_long_tails_and_keep_zero_exact() -> None:
    rng = np.random.default_rng(0)
    values = torch.from_numpy(np.concatenate([rng.laplace(0, 1, 100_000), [60.0]]).astype(np.float32))

    def err(lo: float, hi: float) -> float:
        scale = (hi - lo) / 255
        fq = torch.fake_quantize_per_tensor_affine(values, scale, round(-lo / scale), 0, 255)
        return float(((fq - values) ** 2).sum())

    ranges = {}
    for method, choose in q.CALIBRATION_METHODS.items():
        lo, hi = float(values.min()), float(values.max())
        if choose is not None:
            lo, hi = choose(torch.histc(values, q.HISTOGRAM_BINS, lo, hi), lo, hi)
        ranges[method] = (lo, hi)
    assert ranges["minmax"][1] == pytest.approx(60.0)
    assert 5 < ranges["percentile"][1] < 15 and -15 < ranges["percentile"][0] < -5, ranges
    # MSE narrows the range where the tail costs less than the rounding it saves: here the
    # negative tail, not the lone outlier at 60 (clipping it would cost (60 - hi)^2).
    assert ranges["mse"][0] > ranges["minmax"][0] + 1 and ranges["mse"][1] > 40, ranges
    assert err(*ranges["mse"]) < 0.95 * err(*ranges["minmax"])
    assert err(*ranges["mse"]) < 0.5 * err(*ranges["percentile"])
    # A one-sided (post-ReLU) tensor keeps zero at the bottom of its range.
    relu = values.clamp_min(0)
    top = float(relu.max())
    for choose in (q.mse_range, q.percentile_range):
        assert choose(torch.histc(relu, q.HISTOGRAM_BINS, 0.0, top), 0.0, top)[0] == 0.0


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_each_calibration_method_exports_a_file_that_agrees_with_its_simulation(method, tmp_path) -> None:
    model = trained_small_cnn()
    plan = uniform_plan(model, weight_bits=8, activations="int8", activation_calibration=method)
    compressed = apply(model, plan, calibration=digits("train", 256).x)
    path = save_onnx(compressed_onnx(compressed, plan, {}), tmp_path / f"{method}.onnx", force=True)
    test = digits("test")
    assert check_parity(compressed.module, compressed.spec, path, test.x).top1_agreement >= 0.995


def test_calibration_ranges_differ_by_method_on_the_same_images() -> None:
    model = trained_small_cnn()
    images = digits("train", 256).x
    his = {}
    for method in ("minmax", "percentile", "mse"):
        plan = uniform_plan(model, weight_bits=8, activations="int8", activation_calibration=method)
        his[method] = np.array(
            [float(a.hi) for a in apply(model, plan, calibration=images).module.acts.values()]
        )
    assert np.all(his["mse"] <= his["minmax"] + 1e-6) and np.all(his["percentile"] <= his["minmax"] + 1e-6)
    assert np.any(his["mse"] < his["minmax"] * 0.99)  # some range is actually clipped


def test_plan_json_keeps_min_max_for_old_plans_and_round_trips_the_method() -> None:
    old = {"format": "edgecompress-plan", "version": 1, "default": {"weight_bits": 8, "activations": "int8"}}
    assert CompressionPlan.from_dict(old).activation_calibration == "minmax"  # as those files were made
    assert CompressionPlan().activation_calibration == "minmax"
    plan = uniform_plan(weight_bits=8, activations="int8", activation_calibration="percentile")
    again = CompressionPlan.from_json(plan.to_json())
    assert again == plan and json.loads(plan.to_json())["activation_calibration"] == "percentile"
    with pytest.raises(PlanError, match="activation_calibration must be one of minmax, percentile, mse"):
        CompressionPlan.from_dict({**old, "activation_calibration": "kl"})


def test_qlinear_add_equals_onnxruntime_over_random_scales_and_zero_points(tmp_path) -> None:
    """compress/exact.add against onnxruntime's own QLinearAdd (fused from DQ, DQ -> Add -> Q)
    on every pair of input values, over many scale / zero-point sets: the kernel's fused
    multiply-adds, including the one the compiler makes of its constant part, are reproduced
    (that one alone changes a value in a few hundred thousand, so the test is exhaustive)."""
    from onnx import TensorProto, helper

    from edgecompress.compress import exact

    rng = np.random.default_rng(0)
    shape = [1, 1, 256, 256]
    qa, qb = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    qa, qb = qa.reshape(shape), qb.reshape(shape)
    checked = 0
    for k in range(40):
        sa, sb, sc = (float(np.float32(v)) for v in rng.uniform(0.01, 0.2, 3))
        za, zb, zc = (int(v) for v in rng.integers(0, 256, 3))
        scales = {"sa": sa, "sb": sb, "sc": sc}
        zeros = {"za": za, "zb": zb, "zc": zc}
        inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in scales.items()]
        inits += [helper.make_tensor(n, TensorProto.UINT8, [], [v]) for n, v in zeros.items()]
        nodes = [
            helper.make_node("DequantizeLinear", ["qa", "sa", "za"], ["a"]),
            helper.make_node("DequantizeLinear", ["qb", "sb", "zb"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["c"]),
            helper.make_node("QuantizeLinear", ["c", "sc", "zc"], ["qc"]),
        ]
        graph = helper.make_graph(
            nodes,
            "add",
            [helper.make_tensor_value_info(n, TensorProto.UINT8, shape) for n in ("qa", "qb")],
            [helper.make_tensor_value_info("qc", TensorProto.UINT8, shape)],
            inits,
        )
        path = tmp_path / f"add{k}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"add{k}.opt.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        fused_ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
        assert "QLinearAdd" in fused_ops, fused_ops
        got = session.run(None, {"qa": qa, "qb": qb})[0]

        def params(s: float, z: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tensor(s, dtype=torch.float32), torch.tensor(float(z))

        (ta, tza), (tb, tzb), (tc, tzc) = params(sa, za), params(sb, zb), params(sc, zc)
        a = (torch.from_numpy(qa).float() - tza) * ta
        b = (torch.from_numpy(qb).float() - tzb) * tb
        out = exact.add(a, (ta, tza), b, (tb, tzb), (tc, tzc))
        want = (torch.round(out / tc) + tzc).numpy()
        assert np.array_equal(got.astype(np.float64), want), (k, int((got != want).sum()))
        checked += got.size
    assert checked == 40 * 256 * 256


def test_8_bit_weights_keep_to_a_range_this_hosts_kernels_add_exactly() -> None:
    """On any host, a QLinearConv with weights within qmax(8) gives the exact integers; where
    the probe says pairs saturate (x86 without VNNI), full-range weights really do not."""
    from edgecompress.compress.exact import pairs_saturate, qlinear_conv

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 32, 6, 6)).astype(np.uint8)

    def exact(weights: np.ndarray) -> np.ndarray:
        acc = torch.nn.functional.conv2d(
            torch.tensor(x, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64), padding=1
        )
        return np.clip(np.round(acc.numpy() / 1000) + 128, 0, 255).astype(np.int64)

    top = q.qmax(8)
    assert top == (q.QMAX_PAIRS_SATURATE if pairs_saturate() else q.QMAX[8])
    kept = rng.integers(-top, top + 1, (8, 32, 3, 3)).astype(np.int8)
    np.testing.assert_array_equal(qlinear_conv(x, kept, 1000.0, 128, pads=1), exact(kept))
    full = rng.integers(-127, 128, (8, 32, 3, 3)).astype(np.int8)
    assert pairs_saturate() == (not np.array_equal(qlinear_conv(x, full, 1000.0, 128, pads=1), exact(full)))
