"""Reference graphs for `edgecompress profile`, built with onnx.helper (no torch).

Two kinds: single-layer graphs, one per latency-table row (a Conv with its fused Relu, a
Gemm, an Add, a pool, ...), in fp32 and in int8 QDQ form with integer tensors at the
graph boundary so that only the layer itself runs; and small reference CNNs in three
families (residual, plain VGG-like, inverted-residual) at a few widths, in fp32 and int8
QDQ, for the calibration ratio and for fitting and checking the predictor.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.measure.latency_table import weight_mb
from edgecompress.measure.layers import Layer, LayerKey, describe, main_precision

OPSET = 17
IR_VERSION = 8  # read by onnxruntime builds back to 1.13, as found on older boards
_ACT_SCALE = 0.05


def _onnx() -> Any:
    import onnx

    return onnx


class GraphBuilder:
    """A small fp32 CNN graph under construction; tensors carry (C, H, W) shapes."""

    def __init__(self, name: str, channels: int, size: int, seed: int = 0) -> None:
        from onnx import TensorProto

        self.name = name
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.shapes: dict[str, tuple[int, ...]] = {"input": (channels, size, size)}
        self.inputs = ["input"]
        self.input_type = TensorProto.FLOAT
        self.rng = np.random.default_rng(seed)
        self._count = itertools.count()

    def _name(self, prefix: str) -> str:
        return f"{prefix}_{next(self._count)}"

    def _const(self, prefix: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def _node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs: Any) -> str:
        from onnx import helper

        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.shapes[out] = shape
        return out

    def conv(
        self, x: str, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: str = "relu"
    ) -> str:
        cin, h, w = self.shapes[x]
        fan_in = cin // groups * kernel * kernel
        weight = self.rng.standard_normal((cout, cin // groups, kernel, kernel)) / np.sqrt(fan_in)
        bias = 0.01 * self.rng.standard_normal(cout)
        pad = kernel // 2
        out_shape = (cout, -(-h // stride), -(-w // stride))
        y = self._node(
            "Conv",
            [x, self._const("w", weight.astype(np.float32)), self._const("b", bias.astype(np.float32))],
            out_shape,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=groups,
        )
        return self.activation(y, act)

    def activation(self, x: str, act: str | None) -> str:
        if act == "relu":
            return self._node("Relu", [x], self.shapes[x])
        if act == "relu6":
            low = self._const("lo", np.array(0.0, np.float32))
            high = self._const("hi", np.array(6.0, np.float32))
            return self._node("Clip", [x, low, high], self.shapes[x])
        return x

    def add(self, a: str, b: str, act: str | None = "relu") -> str:
        return self.activation(self._node("Add", [a, b], self.shapes[a]), act)

    def maxpool(self, x: str, kernel: int = 2, stride: int = 2) -> str:
        c, h, w = self.shapes[x]
        shape = (c, h // stride, w // stride)
        return self._node("MaxPool", [x], shape, kernel_shape=[kernel] * 2, strides=[stride] * 2)

    def global_pool(self, x: str) -> str:
        return self._node("GlobalAveragePool", [x], (self.shapes[x][0], 1, 1))

    def flatten(self, x: str) -> str:
        return self._node("Flatten", [x], (int(np.prod(self.shapes[x])),), axis=1)

    def gemm(self, x: str, n: int) -> str:
        (k,) = self.shapes[x]
        weight = (self.rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        bias = np.zeros(n, np.float32)
        return self._node("Gemm", [x, self._const("w", weight), self._const("b", bias)], (n,), transB=1)

    def subsample(self, x: str) -> str:
        """x[:, :, ::2, ::2] as torch exports it (one Slice with steps)."""
        c, h, w = self.shapes[x]
        consts = [np.array(v, np.int64) for v in ([0, 0], [h, w], [2, 3], [2, 2])]
        names = [self._const("s", v) for v in consts]
        return self._node("Slice", [x, *names], (c, -(-h // 2), -(-w // 2)))

    def pad_channels(self, x: str, cout: int) -> str:
        c, h, w = self.shapes[x]
        extra = cout - c
        pads = np.array([0, extra // 2, 0, 0, 0, extra - extra // 2, 0, 0], np.int64)
        return self._node("Pad", [x, self._const("p", pads)], (cout, h, w))

    def shortcut(self, x: str, cout: int) -> str:
        """Option-A shortcut of CIFAR ResNets: subsample, then zero-pad the channels."""
        return self.pad_channels(self.subsample(x), cout)

    def second_input(self) -> str:
        """Another graph input shaped like "input" (an Add's other operand)."""
        self.inputs.append("input_b")
        self.shapes["input_b"] = self.shapes["input"]
        return "input_b"

    def model(self, output: str) -> Any:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes,
            self.name,
            [
                helper.make_tensor_value_info(name, self.input_type, [1, *self.shapes[name]])
                for name in self.inputs
            ],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, *self.shapes[output]])],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model


# ---------------------------------------------------------------- reference CNNs


def resnet(widths: tuple[int, int, int], blocks: int, seed: int = 0) -> Any:
    """A CIFAR ResNet (6*blocks+2 layers) with option-A shortcuts."""
    g = GraphBuilder(f"resnet{6 * blocks + 2}_{'x'.join(map(str, widths))}", 3, 32, seed)
    x = g.conv("input", widths[0])
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            y = g.conv(g.conv(x, width, stride=stride), width, act=None)
            short = g.shortcut(x, width) if stride == 2 else x
            x = g.add(y, short)
    return g.model(g.gemm(g.flatten(g.global_pool(x)), 10))


def speed_reference(
    folder: Path, activations: str = "fp32", stream_layers: int = 0, *, deep: bool = False
) -> Path:
    """The speed reference's file in `folder`, written once: ResNet-8 at widths 16/32/64
    (0.3 MB, about 0.35 ms on a server core), a fixed workload timed between a model's runs;
    in fp32, or in int8 QDQ with `activations` (uint8 or int8) for a model whose work runs
    in int8 kernels, which a busy core slows by another factor than fp32 ones. With `deep`,
    ResNet-20 at the same widths instead (1.0 MB), for a compute-bound model whose weights
    outgrow L2 (DEEP_MIN_MB). With `stream_layers`, the weight-streaming form, for a
    weight-bound model of about that many probe layers' megabytes (stream_layers_for):
    stream_probe(stream_layers) in fp32, or in int8 QDQ at twice the channels, so that each
    layer holds as many bytes (runner.REFERENCE_VERSION names these graphs: bump it when
    they change)."""
    from edgecompress.measure.runner import REFERENCE_VERSION

    suffix = f"-stream{stream_layers}" if stream_layers else "-resnet20" if deep else ""
    if activations != "fp32":
        suffix += f"-{activations}"
    path = folder / f"speed-reference-v{REFERENCE_VERSION}{suffix}.onnx"
    if not path.is_file():
        if stream_layers:
            channels = STREAM_CHANNELS if activations == "fp32" else 2 * STREAM_CHANNELS
            model = stream_probe(stream_layers, channels=channels)
        else:
            model = resnet((16, 32, 64), DEEP_BLOCKS if deep else 1, seed=0)
        if activations != "fp32":
            model = to_qdq(model, activations)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
            f.write(model.SerializeToString())
        Path(f.name).replace(path)
    return path


def speed_reference_for(model: Path, folder: Path) -> Path:
    """The form of the speed reference (in `folder`) to time between `model`'s runs: the
    weight-streaming form of about its size for a weight-bound model (stream_layers_for),
    else the ResNet-20 for an fp32 model of DEEP_MIN_MB or more of weights, else the
    ResNet-8; in int8 with the model's activation type where int8 kernels do most of its
    work, else in fp32 (the ResNet-8 for other types, fp16 say)."""
    layers = describe(model)
    precision = main_precision(layers)
    if precision not in ("fp32", "uint8", "int8"):
        return speed_reference(folder)
    stream_layers = stream_layers_for(layers)
    deep = precision == "fp32" and not stream_layers and weight_mb(layers) >= DEEP_MIN_MB
    return speed_reference(folder, precision, stream_layers=stream_layers, deep=deep)


# The ResNet-20 form of the speed reference. A compute-bound fp32 model whose weights
# outgrow L2 (512 KB a core on Zen 3) fetches them from the shared last-level cache on
# every run, so another tenant there slows it more than the ResNet-8, which stays in L2.
# The ResNet-20 (1.0 MB) does too. On the 2-core Zen 3 host, 6-8 rounds of 10 s windows
# with a neighbour copying 64 MB on the other core in every second round, the CV of the
# model's ratio: ResNet-56 fp32 (3.2 MB) 2.5% to the ResNet-8, 1.3% to the ResNet-20;
# MobileNetV2 fp32 (8.4 MB, 40 MACs per weight) 1.8% and 0.8%; its x0.5 pruning (2.6 MB)
# 2.8% and 1.5%; ResNet-56 pruned fp32 (0.9 MB) 1.6% and 0.9%; ResNet-20 pruned fp32
# (0.7 MB) 1.2% and 0.9%. The neighbour moved the ratio to the ResNet-8 by +1.0% to +3.4%,
# to the ResNet-20 by -0.4% to +1.1%. (ResNet-8 at twice the widths, 1.2 MB, did worse
# than the ResNet-20 on the first three: 1.8%, 2.7%, 2.1%.) int8 models keep the int8
# ResNet-8: their weights take a quarter of the bytes, and in the benchmark their rows
# repeated within 2.2% against it (MobileNetV2 uint8, 2.1 MB of weights, 0.8%).
DEEP_BLOCKS = 3
DEEP_MIN_MB = 0.55  # between the ResNet-8's 0.29 MB and the ResNet-20's 1.02 MB (geometric mean)


# The weight-streaming form of the speed reference. A model whose weights outgrow L2 and
# whose work is mostly fetching them (few MACs per weight, as in VGG's late stages) runs
# as fast as the share of the last-level cache other tenants leave it, which moves for
# minutes at a time; the ResNet-8 lives in L2 and does not see that. A stream_probe of
# about the model's megabytes does. On the 2-core Zen 3 host (32 MB L3 shared with other
# VMs), VGG-16-BN pruned 50% fp32 (14 MB, 5.3 MACs per weight byte), the CV of its ratio
# over three sets of 6-10 windows: to the ResNet-8 9.4%, 5.5%, 5.9%; to a 6-layer probe
# (13.5 MB) 4.3%, 5.1%, 2.7%; in the third set also 3.0% to 8 layers (18 MB) and 4.4% to
# 3 (6.8 MB). VGG-16-BN fp32 (56 MB): 1.5% to the ResNet-8, 0.7% to 23 layers. The same
# holds in int8: VGG-16-BN uint8 (14 MB of int8 weights, 21 MACs per weight), over 8
# windows, 4.2% to the int8 ResNet-8 and 1.3% to 6 int8 probe layers of 512 channels
# (13.5 MB) while its plain median moved 13%. Its depth is rounded to STREAM_DEPTHS
# (half-octaves), since each depth learns its own usual ms.
STREAM_MIN_LAYERS = 2  # below about 4.5 MB the weights stay in the caches
STREAM_MAX_MACS_PER_WEIGHT = 32.0  # the fp32 probe does 16 per weight; ResNets 140-160
STREAM_DEPTHS = (2, 3, 4, 6, 8, 11, 16, 23, 32)
STREAM_CHANNELS = 256  # of the fp32 probe; the int8 one has twice as many
STREAM_LAYER_MB = 9 * STREAM_CHANNELS**2 * 4 / 2**20  # one probe layer (fp32, or int8 at 2x channels): 2.25


def stream_layers_for(layers: Sequence[Layer]) -> int:
    """Depth of the weight-streaming reference for a model (its describe() layers): the
    STREAM_DEPTHS depth nearest its weight megabytes (in their stored precision) in probe
    layers, or 0 for a model that is not weight-bound (under STREAM_MIN_LAYERS of weights,
    or more than STREAM_MAX_MACS_PER_WEIGHT multiply-accumulates per weight)."""
    mb = weight_mb(layers)
    macs = sum(layer.macs for layer in layers)
    weights = sum(layer.params for layer in layers)
    if mb < STREAM_MIN_LAYERS * STREAM_LAYER_MB or macs > STREAM_MAX_MACS_PER_WEIGHT * weights:
        return 0
    return min(STREAM_DEPTHS, key=lambda depth: abs(np.log(depth * STREAM_LAYER_MB / mb)))


def reference_kind(name: str) -> str:
    """Which form of the speed reference the file `name` holds, in words: "fp32",
    "int8 (uint8 activations)", "fp32 ResNet-20", "fp32 weight-streaming (6 layers, 13.5 MB)" or
    "int8 weight-streaming (6 layers, 13.5 MB, uint8 activations)"."""
    forms = Path(name).stem.split("-")[3:]  # after speed-reference-vN
    activations = forms.pop() if forms and forms[-1] in ("uint8", "int8") else None
    precision = "fp32" if activations is None else "int8"
    if forms == ["resnet20"]:
        return f"{precision} ResNet-20"
    if forms and forms[0].startswith("stream") and forms[0][6:].isdigit():
        depth = int(forms[0][6:])
        what = f"{depth} layers, {depth * STREAM_LAYER_MB:.1f} MB"
        if activations is not None:
            what += f", {activations} activations"
        return f"{precision} weight-streaming ({what})"
    return "fp32" if activations is None else f"int8 ({activations} activations)"


def vgg(widths: tuple[int, ...], convs: int = 2, seed: int = 0) -> Any:
    """A VGG-like plain network: `convs` 3x3 convs then a 2x2 max-pool per stage."""
    g = GraphBuilder(f"vgg_{'x'.join(map(str, widths))}", 3, 32, seed)
    x = "input"
    for width in widths:
        for _ in range(convs):
            x = g.conv(x, width)
        x = g.maxpool(x)
    return g.model(g.gemm(g.flatten(x), 10))


def mobilenet(widths: tuple[int, ...], expansion: int = 6, blocks: int = 2, seed: int = 0) -> Any:
    """An inverted-residual network (MobileNetV2-like): `blocks` per stage, the first of
    each stage after the first with stride 2."""
    g = GraphBuilder(f"mobilenet_{'x'.join(map(str, widths))}", 3, 32, seed)
    x = g.conv("input", widths[0], act="relu6")
    for stage, width in enumerate(widths):
        for block in range(blocks):
            cin = g.shapes[x][0]
            stride = 2 if stage > 0 and block == 0 else 1
            hidden = cin * expansion
            y = g.conv(x, hidden, kernel=1, act="relu6")
            y = g.conv(y, hidden, stride=stride, groups=hidden, act="relu6")
            y = g.conv(y, width, kernel=1, act=None)
            x = g.add(y, x, act=None) if stride == 1 and cin == width else y
    x = g.conv(x, 4 * widths[-1], kernel=1, act="relu6")
    return g.model(g.gemm(g.flatten(g.global_pool(x)), 10))


def stream_probe(layers: int, channels: int = STREAM_CHANNELS, size: int = 4) -> Any:
    """A chain of big 3x3 convolutions on a small map (2.25 MB of fp32 weights each).

    Timed at growing depth it shows where a model's weights stop fitting the caches (a
    lone layer's weights stay cached between runs; a big model's do not) and what each
    megabyte then costs to fetch again on every inference, for layers like the late
    stages of VGG or wide ResNets where weights outweigh activations.
    """
    g = GraphBuilder(f"stream_{layers}x{channels}", channels, size)
    x = "input"
    for _ in range(layers):
        x = g.conv(x, channels)
    return g.model(x)


# Depths of the streaming probe: 2.25 MB to 63 MB of fp32 weights.
STREAM_PROBE_LAYERS = (1, 2, 4, 8, 16, 28)


def reference_cnns(channel_multiple: int, quick: bool = False) -> list[tuple[str, str, Any]]:
    """(name, family, fp32 model) for the reference suite, widths in channel multiples.

    Three families at several widths and depths (10 to 120 layers, up to ~30 MB of fp32
    weights at channel multiple 16). The "-c" models are
    held out of the predictor's fit to report its error on models it never saw.
    """
    m = max(8, channel_multiple)
    if quick:
        return [
            ("resnet8-a", "resnet", resnet((m, 2 * m, 4 * m), 1)),
            ("vgg-a", "vgg", vgg((m, 2 * m, 4 * m, 8 * m))),
            ("resnet8-c", "resnet", resnet((2 * m, 3 * m, 5 * m), 1)),
        ]
    return [
        ("resnet8-a", "resnet", resnet((m, 2 * m, 4 * m), 1)),
        ("resnet32-a", "resnet", resnet((m, 2 * m, 3 * m), 5)),
        ("vgg-a", "vgg", vgg((m, 2 * m, 4 * m, 8 * m))),
        ("mobilenet-a", "mobilenet", mobilenet((m, 2 * m, 4 * m), expansion=4)),
        ("resnet14-b", "resnet", resnet((2 * m, 4 * m, 8 * m), 2)),
        ("resnet56-b", "resnet", resnet((m, m, 2 * m), 9)),
        ("vgg-b", "vgg", vgg((2 * m, 4 * m, 8 * m, 16 * m, 16 * m))),
        ("vgg-wide-b", "vgg", vgg((4 * m, 8 * m, 16 * m, 32 * m, 32 * m))),
        ("mobilenet-b", "mobilenet", mobilenet((m, 2 * m, 3 * m, 6 * m), blocks=3)),
        ("resnet20-c", "resnet", resnet((3 * m // 2, 3 * m, 5 * m), 3)),
        ("vgg-c", "vgg", vgg((3 * m, 6 * m, 12 * m), convs=3)),
        ("mobilenet-c", "mobilenet", mobilenet((2 * m, 3 * m, 4 * m), expansion=3)),
    ]


class _RandomReader:
    """Calibration data for quantize_static: random images (timing ignores the values)."""

    def __init__(self, shape: tuple[int, ...], count: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._batches = iter([{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def to_qdq(model: Any, activations: str) -> Any:
    """int8 QDQ form of an fp32 model with onnxruntime's own quantization tool.

    Per-channel int8 weights; activations uint8 or int8, the signedness a profile marks
    fast. The values do not matter for timing, so calibration uses random inputs.
    """
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_RandomReader, CalibrationDataReader):
        pass

    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the tool warns on the root logger about pre-processing
    try:
        return _quantize(model, dims, activations, Reader)
    finally:
        root.setLevel(level)


def _quantize(model: Any, dims: list[int], activations: str, reader: Any) -> Any:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        _onnx().save(model, str(source))
        quantize_static(
            str(source),
            str(target),
            reader(tuple(dims)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
        return _onnx().load(str(target))


# ---------------------------------------------------------------- single-layer graphs


@dataclass(frozen=True)
class LayerCase:
    """A single-layer graph measured for one table row."""

    key: LayerKey
    model: Any


def _single(key: LayerKey, seed: int = 0) -> Any:
    """fp32 graph running exactly the op of `key` on an input of its shape."""
    g = GraphBuilder(f"{key.op}_{key.cin}_{key.cout}_{key.size}", key.cin, key.size, seed)
    op = key.op
    if op == "Conv":
        y = g.conv("input", key.cout, key.kernel, key.stride, key.groups, act="relu")
    elif op == "Gemm":
        g.shapes["input"] = (key.cin,)
        y = g.gemm("input", key.cout)
    elif op == "Flatten" and key.size == 1:
        g.shapes["input"] = (key.cin, 1, 1)
        y = g.flatten("input")
    elif op == "Add":
        y = g.add("input", g.second_input(), act=None)
    elif op in ("Relu", "Clip"):
        y = g.activation("input", "relu" if op == "Relu" else "relu6")
    elif op == "MaxPool":
        y = g.maxpool("input", key.kernel, key.stride)
    elif op == "GlobalAveragePool":
        y = g.global_pool("input")
    elif op == "Flatten":
        y = g.flatten("input")
    elif op == "Slice":
        y = g.subsample("input")
    elif op == "Pad":
        y = g.pad_channels("input", key.cout)
    else:
        raise ValueError(f"no single-layer graph for op {op}")
    return g.model(y)


def _quantize_single(model: Any, key: LayerKey) -> Any:
    """The int8 QDQ form of a single-layer graph with integer input and output tensors.

    Activations enter as uint8/int8 through a DequantizeLinear and leave through a
    QuantizeLinear, exactly as between two int8 layers inside a model, so onnxruntime
    fuses what it would fuse there and nothing else runs. (An Add's second operand is
    a second integer input.)
    """
    from onnx import TensorProto, helper, numpy_helper

    signed = key.aprec == "int8"
    itype = TensorProto.INT8 if signed else TensorProto.UINT8
    npt = np.int8 if signed else np.uint8
    zero = np.array(0 if signed else 128, npt)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_inits, nodes = [], []
    scale_name, zero_name = "act_scale", "act_zero"
    new_inits += [
        numpy_helper.from_array(np.array(_ACT_SCALE, np.float32), scale_name),
        numpy_helper.from_array(zero, zero_name),
    ]
    main = [n for n in graph.node if n.op_type not in ("Relu", "Clip")] or list(graph.node)
    op_node = main[-1]
    inputs = ["input"] + (["input_b"] if key.op == "Add" else [])
    fixed_inputs = [f"{name}_f" for name in inputs]
    for name, fixed in zip(inputs, fixed_inputs, strict=True):
        nodes.append(helper.make_node("DequantizeLinear", [name, scale_name, zero_name], [fixed]))
    op_inputs = list(fixed_inputs)
    if key.op in ("Conv", "Gemm"):
        weight = numpy_helper.to_array(inits[op_node.input[1]])
        channels = weight.shape[0]
        w_scale = np.maximum(np.abs(weight).reshape(channels, -1).max(1), 1e-6) / 127
        shape = (channels,) + (1,) * (weight.ndim - 1)
        wq = np.clip(np.round(weight / w_scale.reshape(shape)), -127, 127).astype(np.int8)
        bias = numpy_helper.to_array(inits[op_node.input[2]])
        b_scale = (w_scale * _ACT_SCALE).astype(np.float32)
        bq = np.round(bias / b_scale).astype(np.int32)
        new_inits += [
            numpy_helper.from_array(wq, "wq"),
            numpy_helper.from_array(w_scale.astype(np.float32), "wq_scale"),
            numpy_helper.from_array(np.zeros(channels, np.int8), "wq_zero"),
            numpy_helper.from_array(bq, "bq"),
            numpy_helper.from_array(b_scale, "bq_scale"),
            numpy_helper.from_array(np.zeros(channels, np.int32), "bq_zero"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "wq_scale", "wq_zero"], ["w_f"], axis=0))
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bq_scale", "bq_zero"], ["b_f"], axis=0))
        op_inputs = [fixed_inputs[0], "w_f", "b_f"]
    else:
        op_inputs += [n for n in op_node.input[len(op_inputs) :]]
        new_inits += [t for t in graph.initializer if t.name in op_node.input]
    attrs = {a.name: helper.get_attribute_value(a) for a in op_node.attribute}
    nodes.append(helper.make_node(op_node.op_type, op_inputs, ["y_f"], **attrs))
    nodes.append(helper.make_node("QuantizeLinear", ["y_f", scale_name, zero_name], ["y"]))
    in_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    graph_inputs = [helper.make_tensor_value_info(n, itype, in_dims) for n in inputs]
    out_dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    out = helper.make_graph(
        nodes,
        f"{graph.name}_q",
        graph_inputs,
        [helper.make_tensor_value_info("y", itype, out_dims)],
        new_inits,
    )
    result = helper.make_model(out, opset_imports=[helper.make_opsetid("", OPSET)])
    result.ir_version = IR_VERSION
    return result


def _qdq_boundary(key: LayerKey) -> Any:
    """A lone QuantizeLinear (fp32 -> int) or DequantizeLinear (int -> fp32) at a boundary."""
    from onnx import TensorProto, helper, numpy_helper

    signed = key.aprec == "int8"
    itype = TensorProto.INT8 if signed else TensorProto.UINT8
    zero = np.array(0 if signed else 128, np.int8 if signed else np.uint8)
    dims = [1, key.cin, key.size, key.size] if key.size > 1 else [1, key.cin]
    inits = [
        numpy_helper.from_array(np.array(_ACT_SCALE, np.float32), "s"),
        numpy_helper.from_array(zero, "z"),
    ]
    if key.op == "QuantizeLinear":
        ins, outs = TensorProto.FLOAT, itype
    else:
        ins, outs = itype, TensorProto.FLOAT
    node = helper.make_node(key.op, ["input", "s", "z"], ["y"])
    graph = helper.make_graph(
        [node],
        key.op,
        [helper.make_tensor_value_info("input", ins, dims)],
        [helper.make_tensor_value_info("y", outs, dims)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def layer_model(key: LayerKey, seed: int = 0) -> Any:
    """The single-layer graph for a table row, fp32 or int8 QDQ as the key says."""
    if key.op in ("QuantizeLinear", "DequantizeLinear"):
        return _qdq_boundary(key)
    if key.op == "Conv+Clip":
        g = GraphBuilder(f"clip_{key.cin}_{key.size}", key.cin, key.size, seed)
        return g.model(g.conv("input", key.cin, 3, 1, key.cin, act="relu6"))
    fp32 = _single(key, seed)
    if key.aprec == "fp32":
        return fp32
    return _quantize_single(fp32, key)


# ---------------------------------------------------------------- the suite


def _channels(multiple: int, largest: int, half_octaves: bool = False) -> list[int]:
    """Channel counts doubling from the channel multiple, and (half_octaves) the 1.5x
    steps between them, each a multiple of the channel multiple."""
    values, c = [], max(8, multiple)
    while c <= largest:
        values.append(c)
        between = c * 3 // 2
        if half_octaves and between <= largest and between % multiple == 0:
            values.append(between)
        c *= 2
    return values


def layer_keys(
    channel_multiple: int, precisions: Sequence[tuple[str, str]], quick: bool = False
) -> list[LayerKey]:
    """The table's rows: a grid over channels and feature sizes for each layer kind.

    Channels step by 1.5x and 2x from the SIMD channel multiple; dense convolutions stop where a
    single layer would exceed ~67 M multiply-adds (beyond, the table extrapolates in
    proportion). precisions: (weight, activation) pairs, e.g. ("fp32", "fp32"),
    ("int8", "uint8").
    """
    sizes = (16, 8) if quick else (32, 16, 8, 4, 2)
    largest_k3, largest_k1 = (64, 64) if quick else (512, 1024)
    k3 = _channels(channel_multiple, largest_k3, half_octaves=not quick)
    k1 = _channels(channel_multiple, largest_k1, half_octaves=not quick)
    max_macs = 1 << 26
    keys: list[LayerKey] = []
    for wprec, aprec in precisions:
        for size in sizes:
            for kernel, stride, channels in ((3, 1, k3), (3, 2, k3), (1, 1, k1)):
                if stride == 2 and size <= 2:
                    continue
                cins = ([3] if kernel == 3 else []) + channels
                for cin, cout in itertools.product(cins, channels):
                    key = LayerKey("Conv", wprec, aprec, cin, cout, size, kernel, stride, 1)
                    if key.macs <= max_macs:
                        keys.append(key)
            for stride in (1, 2) if size > 2 else (1,):
                for c in k1:
                    keys.append(LayerKey("Conv", wprec, aprec, c, c, size, 3, stride, c))
        gemm_in = k1[:2] if quick else k1 + [1280, 2048]
        for cin, cout in itertools.product(gemm_in, (10,) if quick else (10, 100, 1000)):
            keys.append(LayerKey("Gemm", wprec, aprec, cin, cout, 1))
        shapes = [(k1[0], 16), (k1[1], 8)] if quick else _elementwise_shapes(channel_multiple)
        ops = ["Add", "MaxPool", "GlobalAveragePool", "Slice", "Pad"]
        ops += ["Relu", "Clip"] if aprec == "fp32" else ["QuantizeLinear", "DequantizeLinear"]
        for op in ops:
            for c, size in shapes:
                cout = 2 * c if op == "Pad" else c
                kernel = 2 if op == "MaxPool" else 1
                keys.append(LayerKey(op, "none", aprec, c, cout, size, kernel, kernel, 1))
        for c in k1[:2] if quick else k1 + [1280]:
            keys.append(LayerKey("Flatten", "none", aprec, c, c, 1))
        if aprec == "fp32":
            # A fused ReLU6 over depthwise shapes that the table also holds with ReLU.
            for c, size in [(k1[0], sizes[0]), (k1[1], sizes[-1])] if quick else _clip_shapes(k1, sizes):
                keys.append(LayerKey("Conv+Clip", "none", aprec, c, c, size))
    return keys


# A single Relu over one value: its profiled "kernel time" is the profiler's own cost.
PROFILER_PROBE = LayerKey("Relu", "none", "fp32", 1, 1, 1)


def _clip_shapes(channels: list[int], sizes: Sequence[int]) -> list[tuple[int, int]]:
    return [(c, size) for size in sizes for c in channels[:: max(1, len(channels) // 4)]]


def clip_base(key: LayerKey) -> LayerKey:
    """The depthwise ReLU row a "Conv+Clip" row is measured against."""
    return LayerKey("Conv", "fp32", "fp32", key.cin, key.cin, key.size, 3, 1, key.cin)


def _elementwise_shapes(multiple: int) -> list[tuple[int, int]]:
    m = max(8, multiple)
    return [(m, 32), (4 * m, 32), (2 * m, 16), (8 * m, 16), (4 * m, 8), (16 * m, 8), (32 * m, 4), (64 * m, 2)]
