"""Honest size accounting of an .onnx file: its bytes on disk, and where they go per layer.

Every figure comes from the file itself: the size is `stat().st_size`; a tensor's bytes
are its serialized size in the file (sparse initializers included); each Conv/Gemm is
charged the constant tensors that only feed its weight and bias (through Cast, Gather,
Reshape, Mul, DequantizeLinear); what is left (activation scales, shapes, graph
structure, metadata) is reported as overhead. Nothing is taken from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edgecompress.errors import ModelError

LAYER_OPS = ("Conv", "Gemm", "MatMul", "QLinearConv", "ConvInteger", "MatMulInteger")


@dataclass(frozen=True)
class TensorSize:
    name: str
    dtype: str  # e.g. "float32", "int4", "uint4"
    elements: int
    bytes: int  # serialized bytes in the file
    sparse: bool


@dataclass(frozen=True)
class LayerSize:
    layer: str  # node name (the torch layer name for edgecompress exports)
    op: str
    params: int  # elements of the weight as the layer uses it (after decoding)
    bytes: int  # serialized bytes of the tensors that only this layer uses
    precision: str  # e.g. "float32", "int8", "int4 (x int8 acts)", "uint4 index -> 16 float32"
    tensors: tuple[TensorSize, ...]


@dataclass(frozen=True)
class SizeReport:
    path: Path
    file_bytes: int  # the file's size on disk: the only size we ever report as "size"
    tensor_bytes: int  # all initializers (dense and sparse) as serialized
    overhead_bytes: int  # file_bytes - the layers' bytes: activation scales, graph, metadata
    layers: tuple[LayerSize, ...]

    def as_rows(self) -> list[dict[str, object]]:
        return [
            {"layer": s.layer, "op": s.op, "params": s.params, "bytes": s.bytes, "precision": s.precision}
            for s in self.layers
        ]


def _dtype(data_type: int) -> str:
    name = helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def size_report(path: str | Path) -> SizeReport:
    """Per-layer bytes, parameters and precision of an .onnx file, and its size on disk."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist")
    model = onnx.load(str(path))
    graph = model.graph
    tensors: dict[str, TensorSize] = {}
    for t in graph.initializer:
        tensors[t.name] = TensorSize(t.name, _dtype(t.data_type), int(np.prod(t.dims)), t.ByteSize(), False)
    sparse = list(graph.sparse_initializer)
    sparse_names = [s.values.name for s in sparse]
    dense_constants = []
    for node in graph.node:  # Constant nodes hold tensors too (edgecompress puts sparse ones there)
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "sparse_value":
                sparse.append(attr.sparse_tensor)
                sparse_names.append(node.output[0])
            elif attr.name == "value":
                dense_constants.append((node.output[0], attr.t))
    for name, t in dense_constants:
        tensors[name] = TensorSize(name, _dtype(t.data_type), int(np.prod(t.dims)), t.ByteSize(), False)
    for name, s in zip(sparse_names, sparse, strict=True):
        tensors[name] = TensorSize(name, _dtype(s.values.data_type), int(np.prod(s.dims)), s.ByteSize(), True)
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1

    def constant_sources(name: str, seen: set[str]) -> set[str] | None:
        """Initializers a tensor is computed from, or None if it depends on the input."""
        if name in tensors:
            return {name}
        node = producer.get(name)
        if node is None or name in seen:
            return None
        seen.add(name)
        found: set[str] = set()
        for i in node.input:
            if not i:
                continue
            sub = constant_sources(i, seen)
            if sub is None:
                return None
            found |= sub
        return found

    layers: list[LayerSize] = []
    charged: set[str] = set()
    for node in graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        owned: set[str] = set()
        for i in node.input[1:3]:
            owned |= (constant_sources(i, set()) or set()) if i else set()
        owned = {t for t in owned if t not in charged and users.get(t, 0) <= 1}
        charged |= owned
        parts = tuple(tensors[t] for t in sorted(owned))
        weight = node.input[1] if len(node.input) > 1 else ""
        params = _elements(weight, tensors, producer)
        layers.append(
            LayerSize(node.name, node.op_type, params, sum(p.bytes for p in parts), _precision(parts), parts)
        )
    file_bytes = path.stat().st_size
    tensor_bytes = sum(t.bytes for t in tensors.values())
    return SizeReport(
        path, file_bytes, tensor_bytes, file_bytes - sum(s.bytes for s in layers), tuple(layers)
    )


def _elements(name: str, tensors: dict[str, TensorSize], producer: dict) -> int:
    """Elements of the weight the layer computes with, following Reshape/Gather/DQ back."""
    seen = 0
    while name not in tensors and name in producer and seen < 8:
        node = producer[name]
        if node.op_type == "Reshape":  # shared weights: one index per weight
            idx = node.input[0]
            while idx in producer and idx not in tensors:
                idx = producer[idx].input[1] if producer[idx].op_type == "Gather" else producer[idx].input[0]
            return tensors[idx].elements if idx in tensors else 0
        name = node.input[0]
        seen += 1
    return tensors[name].elements if name in tensors else 0


def _precision(parts: tuple[TensorSize, ...]) -> str:
    if not parts:
        return "-"
    big = max(parts, key=lambda p: p.elements)
    label = big.dtype + (" sparse" if big.sparse else "")
    codebooks = [p for p in parts if p is not big and p.elements > 1 and "codebook" in p.name]
    if codebooks:
        return f"{big.dtype} index -> {codebooks[0].elements} x {codebooks[0].dtype}"
    return label
