"""What actually runs in an ONNX graph: one description per costed layer.

The latency table is keyed by these descriptions and the predictor sums over them, so
this module decides, once, what onnxruntime will fold away (constant subgraphs, weight
DequantizeLinear, Identity), fuse (Conv + Relu/Clip/BatchNormalization), or run in int8
(an op between activation DequantizeLinear and QuantizeLinear), and what the feature
size, channels, kernel, stride, groups and precisions of every remaining op are.
Plain onnx and numpy, no onnxruntime session: the search calls it per candidate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import MeasureError

# Ops whose weights make them the compute layers of a CNN.
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# Folded or removed by onnxruntime's basic graph optimizations.
FREE_OPS = {"Identity", "Dropout", "Constant"}
# Activations onnxruntime fuses into a preceding fp32 Conv or Gemm.
FUSABLE_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid"}
# Fused at no measurable cost (inside the convolution kernels); the others, and Clip in
# particular (ReLU6), cost an extra pass over the output: rows "Conv+Clip" etc.
FREE_FUSED = {"Relu", "BatchNormalization"}
_DTYPE_NAMES = {1: "fp32", 2: "uint8", 3: "int8", 10: "fp16", 21: "uint4", 22: "int4"}
_SMALL = 4096  # constants this small are evaluated to learn shapes (pads, slice bounds)
_SHAPE_DTYPES = {6, 7}  # INT32, INT64


@dataclass(frozen=True)
class LayerKey:
    """A layer as the latency table sees it (the table's row key)."""

    op: str  # ONNX op type: Conv, Gemm, MatMul, Add, MaxPool, Pad, ...
    wprec: str  # weight precision: fp32 | int8 | uint8 | none (no weights)
    aprec: str  # activation precision it runs in: fp32 | uint8 | int8
    cin: int  # input channels (K for Gemm/MatMul)
    cout: int  # output channels (N for Gemm/MatMul)
    size: int  # input feature size (height; sqrt of pixels if not square; 1 for Gemm)
    kernel: int = 1
    stride: int = 1
    groups: int = 1

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.groups > 1 and self.groups == self.cin == self.cout

    @property
    def out_size(self) -> int:
        return max(1, -(-self.size // self.stride))

    @property
    def macs(self) -> int:
        if self.op == "Conv":
            return (self.cin // max(1, self.groups)) * self.cout * self.kernel**2 * self.out_size**2
        if self.op in ("Gemm", "MatMul"):
            return self.cin * self.cout * self.size**2
        return 0

    @property
    def elements(self) -> int:
        """Activation elements it touches (the larger of input and output)."""
        return max(self.cin * self.size**2, self.cout * self.out_size**2)


@dataclass(frozen=True)
class Layer:
    """One costed node: its name, key, and what the search may want to know about it."""

    name: str
    key: LayerKey
    params: int
    macs: int


# ---------------------------------------------------------------- loading and shapes


def load_model(model_or_path: Any) -> Any:
    """An onnx.ModelProto from a path or a ModelProto (weights' data is not needed)."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    if not path.is_file():
        raise MeasureError(f"model file {path} does not exist; give the path of an .onnx file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise MeasureError(f"{path} is not a readable ONNX model: {err}") from None


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _evaluate(node: Any, values: dict[str, np.ndarray], shapes: dict) -> list | None:
    """Evaluate the small shape-computing ops of exported graphs (pads, slice bounds)."""
    from onnx import numpy_helper

    op, attrs = node.op_type, _attrs(node)
    ins = [values.get(name) if name else None for name in node.input]
    try:
        if op == "Constant":
            if "value" in attrs:
                return [numpy_helper.to_array(attrs["value"])]
            for key in ("value_int", "value_float"):
                if key in attrs:
                    return [np.array(attrs[key])]
            if "value_ints" in attrs:
                return [np.array(attrs["value_ints"], dtype=np.int64)]
            return None
        if op == "Shape":
            shape = shapes.get(node.input[0])
            if shape is None or any(d is None for d in shape):
                return None
            return [np.array(shape, dtype=np.int64)]
        if any(v is None for v, name in zip(ins, node.input, strict=False) if name):
            return None
        if op == "Identity":
            return [ins[0]]
        if op == "ConstantOfShape":
            fill = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1)
            return [np.full(tuple(int(d) for d in ins[0]), fill.flat[0], dtype=fill.dtype)]
        if op == "Concat":
            return [np.concatenate(ins, axis=attrs.get("axis", 0))]
        if op == "Reshape":
            shape = [int(d) for d in ins[1]]
            shape = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return [ins[0].reshape(shape)]
        if op == "Transpose":
            return [np.transpose(ins[0], attrs.get("perm"))]
        if op == "Cast":
            from onnx import helper

            return [ins[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))]
        if op == "Slice":
            data, starts, ends = ins[0], ins[1], ins[2]
            axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
            steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
            index = [slice(None)] * data.ndim
            for s, e, a, st in zip(starts, ends, axes, steps, strict=False):
                index[int(a)] = slice(int(s), int(e), int(st))
            return [data[tuple(index)]]
        if op in ("Unsqueeze", "Squeeze"):
            axes = attrs.get("axes")
            if axes is None and len(ins) > 1 and ins[1] is not None:
                axes = [int(a) for a in ins[1]]
            if op == "Unsqueeze":
                return [np.expand_dims(ins[0], tuple(axes or ()))]
            return [np.squeeze(ins[0], tuple(axes) if axes else None)]
        if op == "Gather":
            return [np.take(ins[0], ins[1], axis=attrs.get("axis", 0))]
        if op in ("Add", "Sub", "Mul", "Div"):
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}
            return [fn[op](ins[0], ins[1])]
    except (ValueError, IndexError, TypeError, KeyError):
        return None
    return None


@dataclass(frozen=True)
class GraphInfo:
    """Static facts about a graph: shapes, dtypes, constants, producers and consumers."""

    model: Any
    shapes: dict[str, tuple]
    dtypes: dict[str, int]
    constant: frozenset[str]
    producer: dict[str, Any]
    consumers: dict[str, list]
    initializer_dims: dict[str, tuple]


def analyze(model: Any) -> GraphInfo:
    """Shapes with batch 1, and which tensors onnxruntime will treat as constants."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    init_dims = {t.name: tuple(t.dims) for t in graph.initializer}
    dtypes = {t.name: t.data_type for t in graph.initializer}
    values: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        # Only integer tensors can carry shapes (pads, slice bounds, reshape targets).
        if t.data_type in _SHAPE_DTYPES and math.prod(t.dims) <= _SMALL and not t.external_data:
            values[t.name] = numpy_helper.to_array(t)
    constant = set(init_dims)
    shapes: dict[str, tuple] = {name: dims for name, dims in init_dims.items()}
    inputs = [i for i in graph.input if i.name not in init_dims]
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
        dtypes[value.name] = value.type.tensor_type.elem_type
    # Fold what onnxruntime folds, evaluating the small parts to learn shapes from them.
    for node in graph.node:
        ins = [name for name in node.input if name]
        if node.op_type == "Constant" or (ins and all(name in constant for name in ins)):
            constant.update(node.output)
            result = _evaluate(node, values, shapes)
            if result is not None:
                for name, value in zip(node.output, result, strict=False):
                    if value is not None and value.size <= _SMALL:
                        values[name] = value
                        shapes[name] = tuple(value.shape)
        elif node.op_type == "Shape":
            result = _evaluate(node, values, shapes)
            if result is not None:
                constant.update(node.output)
                values[node.output[0]] = result[0]
    # Shape inference on a light copy: big weights become typed inputs (no data copied).
    light_inits = [numpy_helper.from_array(v, name) for name, v in values.items()]
    light_inputs = [
        helper.make_tensor_value_info(name, dtypes.get(name, 1), list(shapes[name]))
        for name in init_dims
        if name not in values
    ]
    for value in inputs:
        light_inputs.append(
            helper.make_tensor_value_info(
                value.name, value.type.tensor_type.elem_type, list(shapes[value.name])
            )
        )
    light = helper.make_model(
        helper.make_graph(
            [n for n in graph.node if not all(o in values for o in n.output)],
            "light",
            light_inputs,
            list(graph.output),
            light_inits,
        ),
        opset_imports=list(model.opset_import),
    )
    light.ir_version = model.ir_version
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        entries = list(inferred.graph.value_info) + list(inferred.graph.output)
    except Exception:  # a graph onnx cannot infer: fall back to what we know
        entries = []
    for entry in entries:
        kind = entry.type.tensor_type
        dims = tuple(d.dim_value if d.dim_value > 0 else None for d in kind.shape.dim)
        if entry.name not in shapes or None not in dims:
            shapes[entry.name] = dims
        if kind.elem_type:
            dtypes[entry.name] = kind.elem_type
    producer = {}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.output:
            producer[name] = node
        for name in node.input:
            if name:
                consumers[name].append(node)
    return GraphInfo(model, shapes, dtypes, frozenset(constant), producer, dict(consumers), init_dims)


# ---------------------------------------------------------------- layers


def _precision(code: int | None) -> str:
    return _DTYPE_NAMES.get(code or 1, "fp32")


def _spatial(shape: tuple | None) -> tuple[int, int]:
    """(channels, size) of an NCHW (or NC) tensor shape; unknown dims count as 1."""
    if not shape:
        return 1, 1
    dims = [d or 1 for d in shape]
    channels = dims[1] if len(dims) > 1 else dims[0]
    pixels = math.prod(dims[2:]) if len(dims) > 2 else 1
    return int(channels), max(1, int(round(pixels**0.5)))


def _is_activation_dq(info: GraphInfo, node: Any) -> bool:
    return node.op_type == "DequantizeLinear" and node.input[0] not in info.constant


def _quantized(info: GraphInfo, node: Any) -> str | None:
    """The activation precision if node sits between activation DQs and a Q, else None."""
    activations = [n for n in node.input if n and n not in info.constant]
    if not activations:
        return None
    producers = [info.producer.get(n) for n in activations]
    if not all(p is not None and _is_activation_dq(info, p) for p in producers):
        return None
    after = info.consumers.get(node.output[0], [])
    if not after or not all(c.op_type == "QuantizeLinear" for c in after):
        return None
    return _precision(info.dtypes.get(producers[0].input[0]))


def _weight_precision(info: GraphInfo, node: Any) -> tuple[str, tuple | None]:
    """Precision and dims of a Conv/Gemm/MatMul's weight (through a weight DQ if any)."""
    name = node.input[1] if len(node.input) > 1 else ""
    source = info.producer.get(name)
    if source is not None and source.op_type == "DequantizeLinear":
        raw = source.input[0]
        return _precision(info.dtypes.get(raw)), info.initializer_dims.get(raw)
    if source is not None and source.op_type == "Transpose":
        return "fp32", tuple(reversed(info.shapes.get(source.input[0]) or ())) or None
    return _precision(info.dtypes.get(name)), info.initializer_dims.get(name) or info.shapes.get(name)


def _layer_key(info: GraphInfo, node: Any, aprec: str) -> tuple[LayerKey, int]:
    op = node.op_type
    in_shape = info.shapes.get(node.input[0]) if node.input else None
    out_shape = info.shapes.get(node.output[0])
    cin, size = _spatial(in_shape)
    cout, _ = _spatial(out_shape) if out_shape else (cin, size)
    if op == "Conv":
        attrs = _attrs(node)
        wprec, wdims = _weight_precision(info, node)
        if wdims:
            cout = int(wdims[0])
        kernel = int((attrs.get("kernel_shape") or (wdims or (0, 0, 1))[2:] or [1])[0])
        stride = int((attrs.get("strides") or [1])[0])
        groups = int(attrs.get("group", 1))
        params = int(np.prod(wdims)) if wdims else 0
        return LayerKey(op, wprec, aprec, cin, cout, size, kernel, stride, groups), params
    if op in ("Gemm", "MatMul"):
        wprec, wdims = _weight_precision(info, node)
        attrs = _attrs(node)
        k = int(in_shape[-1]) if in_shape and in_shape[-1] else 1
        if wdims and len(wdims) == 2:
            n = int(wdims[0] if attrs.get("transB", 0) else wdims[1])
        else:
            n = int(out_shape[-1]) if out_shape and out_shape[-1] else 1
        rows = int(np.prod([d or 1 for d in in_shape[:-1]])) if in_shape else 1
        params = int(np.prod(wdims)) if wdims else 0
        return LayerKey(op, wprec, aprec, k, n, max(1, int(round(rows**0.5)))), params
    attrs = _attrs(node)
    kernel = int((attrs.get("kernel_shape") or [1])[0])
    stride = int((attrs.get("strides") or [1])[0])
    if op in ("MaxPool", "AveragePool") and not attrs.get("strides"):
        stride = 1
    return LayerKey(op, "none", aprec, cin, cout, size, kernel, stride, 1), 0


def describe(model_or_path: Any) -> list[Layer]:
    """The layers onnxruntime will actually run, in graph order, each with its table key."""
    model = load_model(model_or_path)
    info = analyze(model)
    absorbed: set[str] = set()
    layers: list[Layer] = []
    int8_nodes: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type in FREE_OPS:
            continue
        if all(o in info.constant for o in node.output):
            continue
        aprec = _quantized(info, node)
        if aprec is not None:
            int8_nodes[node.output[0]] = aprec
    for node in model.graph.node:
        op = node.op_type
        if op in FREE_OPS or all(o in info.constant for o in node.output) or node.name in absorbed:
            continue
        if op == "DequantizeLinear":
            users = info.consumers.get(node.output[0], [])
            if users and all(u.output and u.output[0] in int8_nodes for u in users):
                continue  # part of an int8 op
            aprec = _precision(info.dtypes.get(node.input[0]))
        elif op == "QuantizeLinear":
            source = info.producer.get(node.input[0])
            if source is not None and source.output[0] in int8_nodes:
                continue
            aprec = _precision(info.dtypes.get(node.output[0]) or 2)
        elif node.output[0] in int8_nodes:
            aprec = int8_nodes[node.output[0]]
        else:
            aprec = "fp32"
            source = info.producer.get(node.input[0]) if node.input else None
            if op in FUSABLE_ACTIVATIONS | {"BatchNormalization"} and _fuses(info, source):
                if op in FREE_FUSED:
                    continue  # onnxruntime fuses it into the Conv/Gemm before it, for free
                # Fused too, but applied as a pass over the output: its own row.
                channels, size = _spatial(info.shapes.get(node.output[0]))
                key = LayerKey(f"{source.op_type}+{op}", "none", "fp32", channels, channels, size)
                layers.append(Layer(node.name or node.output[0], key, 0, 0))
                continue
            if op == "Add" and source is not None and _bias_add(info, node, source):
                continue
        key, params = _layer_key(info, node, aprec)
        layers.append(Layer(node.name or node.output[0], key, params, key.macs))
    return layers


def main_precision(layers: list[Layer]) -> str:
    """The activation precision most of a model's multiply-accumulates (its describe()
    layers) run in: fp32, or uint8 / int8 where int8 kernels do most of its work."""
    macs: dict[str, int] = defaultdict(int)
    for layer in layers:
        if layer.key.op in WEIGHTED_OPS:
            macs[layer.key.aprec] += layer.macs
    return max(macs, key=macs.__getitem__) if macs else "fp32"


def _fuses(info: GraphInfo, source: Any) -> bool:
    return (
        source is not None
        and source.op_type in ("Conv", "Gemm", "MatMul")
        and len(info.consumers.get(source.output[0], [])) == 1
        and source.output[0] not in {o.name for o in info.model.graph.output}
    )


def _bias_add(info: GraphInfo, node: Any, source: Any) -> bool:
    """MatMul + constant Add is one Gemm after onnxruntime's fusion."""
    return (
        source.op_type == "MatMul"
        and any(name in info.constant for name in node.input)
        and len(info.consumers.get(source.output[0], [])) == 1
    )
