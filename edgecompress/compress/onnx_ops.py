"""The ONNX operators of a plain CNN export, evaluated with torch: one function per op type.

The compressed model is simulated by running its own plain (BatchNorm-folded) ONNX
graph in torch, so the simulation and the shipped file compute the same graph with
the same weights; quantization and sharing then act on the weights that ship. The
registry also folds constant subgraphs of the exporter's output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from edgecompress.errors import ExportError

Op = Callable[[list[Any], dict[str, Any]], Any]


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            value = torch.from_numpy(numpy_helper.to_array(value).copy())
        elif isinstance(value, bytes):
            value = value.decode()
        out[a.name] = value
    return out


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _pads2d(pads: list[int]) -> tuple[tuple[int, int], list[int] | None]:
    """ONNX pads [top, left, bottom, right] -> symmetric padding, or an explicit F.pad."""
    top, left, bottom, right = pads
    if top == bottom and left == right:
        return (top, left), None
    return (0, 0), [left, right, top, bottom]


def _conv(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, w = i[0], i[1]
    bias = i[2] if len(i) > 2 else None
    if w.dim() != 4:
        raise ExportError("only 2-D convolutions are supported in compressed export")
    pad, explicit = _pads2d(a.get("pads", [0, 0, 0, 0]))
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ExportError("Conv auto_pad SAME_* is not supported; export with explicit pads")
    if explicit is not None:
        x = F.pad(x, explicit)
    return F.conv2d(x, w, bias, a.get("strides", [1, 1]), pad, a.get("dilations", [1, 1]), a.get("group", 1))


def _gemm(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, w = i[0], i[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if len(i) > 2 and i[2] is not None:
        y = y + a.get("beta", 1.0) * i[2]
    return y


def _pool(kind: str) -> Op:
    def run(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
        pad, explicit = _pads2d(a.get("pads", [0, 0, 0, 0]))
        x = i[0]
        if explicit is not None:
            value = float("-inf") if kind == "max" else 0.0
            x, pad = F.pad(x, explicit, value=value), (0, 0)
        k, s = a["kernel_shape"], a.get("strides", [1, 1])
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            return F.max_pool2d(x, k, s, pad, a.get("dilations", [1, 1]), ceil_mode=ceil)
        return F.avg_pool2d(x, k, s, pad, ceil, bool(a.get("count_include_pad", 0)))

    return run


def _clip(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    lo = i[1] if len(i) > 1 and i[1] is not None else a.get("min")
    hi = i[2] if len(i) > 2 and i[2] is not None else a.get("max")
    return torch.clamp(i[0], None if lo is None else float(lo), None if hi is None else float(hi))


def _reshape(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, shape = i[0], _ints(i[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[k] if v == 0 else v for k, v in enumerate(shape)]
    return x.reshape(shape)


def _slice(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x = i[0]
    starts, ends = _ints(i[1]), _ints(i[2])
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
    steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        n = x.shape[ax]
        s, e = (s + n if s < 0 else s), (e + n if e < 0 else e)
        if st > 0:
            s, e = max(0, min(n, s)), max(0, min(n, e))
        else:  # ONNX clamps a reverse slice to [0, n-1] and [-1, n-1]
            s, e = max(0, min(n - 1, s)), max(-1, min(n - 1, e))
        x = torch.index_select(x, ax, torch.arange(s, e, st, dtype=torch.long))
    return x


def _pad(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x = i[0]
    pads = _ints(i[1]) if len(i) > 1 else list(a["pads"])
    value = float(i[2]) if len(i) > 2 and i[2] is not None and i[2].numel() else 0.0
    mode = a.get("mode", "constant")
    if mode != "constant":
        raise ExportError(f"Pad mode {mode!r} is not supported in compressed export")
    rank = x.dim()
    if len(i) > 3 and i[3] is not None:
        raise ExportError("Pad with an axes input is not supported")
    begins, ends = pads[:rank], pads[rank:]
    torch_pads: list[int] = []
    for ax in reversed(range(rank)):
        torch_pads += [begins[ax], ends[ax]]
    return F.pad(x, torch_pads, value=value)


def _gather(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, idx = i[0], i[1].long()
    axis = a.get("axis", 0)
    axis = axis + x.dim() if axis < 0 else axis
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _axes(i: list[Any], a: dict[str, Any]) -> list[int] | None:
    if len(i) > 1 and i[1] is not None:
        return _ints(i[1])
    return list(a["axes"]) if "axes" in a else None


def _reduce_mean(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    axes = _axes(i, a)
    keep = bool(a.get("keepdims", 1))
    if axes is None:
        return i[0].mean() if not keep else i[0].mean(dim=list(range(i[0].dim())), keepdim=True)
    return i[0].mean(dim=axes, keepdim=keep)


def _unsqueeze(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x = i[0]
    axes = sorted(ax + x.dim() + 1 if ax < 0 else ax for ax in _axes(i, a) or [])
    for ax in axes:
        x = x.unsqueeze(ax)
    return x


def _squeeze(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    axes = _axes(i, a)
    if axes is None:
        return i[0].squeeze()
    return i[0].squeeze(tuple(ax + i[0].dim() if ax < 0 else ax for ax in axes))


def _flatten(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    axis = a.get("axis", 1)
    x = i[0]
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _batchnorm(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    x, scale, bias, mean, var = i[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.BOOL: torch.bool,
}


def _cast(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    to = a["to"]
    if to not in _DTYPES:
        raise ExportError(f"Cast to ONNX type {to} is not supported in compressed export")
    return i[0].to(_DTYPES[to])


def _constant_of_shape(i: list[Any], a: dict[str, Any]) -> torch.Tensor:
    value = a.get("value", torch.zeros(1))
    return torch.full(_ints(i[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


OPS: dict[str, Op] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda i, a: torch.matmul(i[0], i[1]),
    "Add": lambda i, a: i[0] + i[1],
    "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1],
    "Div": lambda i, a: i[0] / i[1],
    "Relu": lambda i, a: F.relu(i[0]),
    "Clip": _clip,
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Sigmoid": lambda i, a: torch.sigmoid(i[0]),
    "Tanh": lambda i, a: torch.tanh(i[0]),
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda i, a: F.hardswish(i[0]),
    "Softmax": lambda i, a: torch.softmax(i[0], a.get("axis", -1)),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda i, a: i[0].mean(dim=(2, 3), keepdim=True),
    "GlobalMaxPool": lambda i, a: torch.amax(i[0], dim=(2, 3), keepdim=True),
    "ReduceMean": _reduce_mean,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Concat": lambda i, a: torch.cat(list(i), a["axis"]),
    "Slice": _slice,
    "Pad": _pad,
    "Gather": _gather,
    "Shape": lambda i, a: torch.tensor(i[0].shape, dtype=torch.int64),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Transpose": lambda i, a: (
        i[0].permute(*a["perm"]) if "perm" in a else i[0].permute(*reversed(range(i[0].dim())))
    ),
    "Identity": lambda i, a: i[0],
    "Dropout": lambda i, a: i[0],
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "BatchNormalization": _batchnorm,
}


def run_node(node: onnx.NodeProto, inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    op = OPS.get(node.op_type)
    if op is None:
        raise ExportError(
            f"ONNX op {node.op_type} (node {node.name}) is not supported by the compressed "
            f"export; supported: {', '.join(sorted(OPS))}"
        )
    if node.op_type == "Constant":
        raise AssertionError("Constant nodes are folded before execution")
    out = op(inputs, attrs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constant; drop Identity and Constant nodes.

    The TorchScript exporter lowers F.pad and shape arithmetic into small constant
    subgraphs; folding them leaves a graph of the real ops (Conv, Relu, Add, Pad, ...)
    with constant initializers, which the quantization rewrite can reason about.
    """
    graph = model.graph
    consts: dict[str, torch.Tensor] = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer
    }
    rename: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
        if node.op_type == "Constant":
            consts[node.output[0]] = attributes(node)["value"]
            continue
        if node.op_type in ("Identity", "Dropout") and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            continue
        if node.input and all(not n or n in consts for n in node.input):
            values = run_node(node, [consts.get(n) for n in node.input], attributes(node))
            for name, value in zip(node.output, values, strict=False):
                consts[name] = value
            continue
        kept.append(node)
    used = {n for node in kept for n in node.input}
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    for name in sorted(used & set(consts), key=list(consts).index):
        value = consts[name]
        array = value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return model
