"""Write a SimulatedModel as a plain ONNX file: its graph plus weight encodings and Q/DQ pairs.

One encoder per way a layer's weight is stored (`WEIGHT_ENCODERS`), chosen by the
layer's plan; every encoder emits standard ONNX ops only (no custom or contrib ops):

  float      FLOAT initializer (sparse initializer where measured smaller)
  weight-only INTn  -> Cast(FLOAT) -> Mul(scale)           folded at session start
  int8 act    INTn  -> [Cast(INT8)] -> DequantizeLinear    fuses into QLinearConv
  shared      UINTk indices -> Cast(INT32) -> Gather(codebook) -> Reshape
              [-> DequantizeLinear with an int8 codebook, for int8 activations]

INT4/UINT4 need opset 21, INT2/UINT2 opset 25; the file gets the lowest opset that
holds its types (the float graph is converted with onnx's version converter).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter

from edgecompress.compress.quantization import bias_integers
from edgecompress.compress.sharing import index_type
from edgecompress.compress.simulate import LayerWeights, SimulatedModel
from edgecompress.compress.sparse import smaller_encoding

INT_TYPES = {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2}
OPSET_FOR_TYPE = {
    TensorProto.INT4: 21,
    TensorProto.UINT4: 21,
    TensorProto.INT2: 25,
    TensorProto.UINT2: 25,
}
BASE_OPSET = 17


class _Builder:
    """Collects new initializers and nodes; names them uniquely after their layer."""

    def __init__(self) -> None:
        self.initializers: list[onnx.TensorProto] = []
        self.sparse: list[onnx.SparseTensorProto] = []
        self.types: set[int] = set()

    def tensor(self, name: str, dtype: int, array: np.ndarray, sparse_ok: bool = False) -> str:
        # helper.tensor_dtype_to_np_dtype gives ml_dtypes' int4/uint4/int2/uint2 for the
        # packed types, which numpy_helper writes as packed raw bytes (2 or 4 per byte).
        np_type = helper.tensor_dtype_to_np_dtype(dtype)
        t = numpy_helper.from_array(np.asarray(array).astype(np_type), name)
        self.types.add(dtype)
        encoded = smaller_encoding(t) if sparse_ok else None
        if encoded is not None:
            self.sparse.append(encoded)
        else:
            self.initializers.append(t)
        return name


Encoder = Callable[[_Builder, str, LayerWeights, "torch.Tensor | None", list[onnx.NodeProto]], str]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _encode_float(b: _Builder, name: str, lw: LayerWeights, _: object, nodes: list) -> str:
    return b.tensor(
        f"{name}.weight", TensorProto.FLOAT, _np(lw.float_weight()), sparse_ok=lw.mask is not None
    )


def _encode_weight_only(b: _Builder, name: str, lw: LayerWeights, _: object, nodes: list) -> str:
    q, scale = lw.integer_weight()
    dtype = INT_TYPES[lw.bits]
    stored = b.tensor(f"{name}.weight_q", dtype, _np(q).astype(np.int8), sparse_ok=lw.mask is not None)
    shape = (-1,) + (1,) * (q.dim() - 1)
    s = b.tensor(f"{name}.weight_scale", TensorProto.FLOAT, _np(scale).reshape(shape))
    nodes.append(
        helper.make_node("Cast", [stored], [f"{name}.weight_f"], to=TensorProto.FLOAT, name=f"{name}.cast")
    )
    nodes.append(helper.make_node("Mul", [f"{name}.weight_f", s], [f"{name}.weight"], name=f"{name}.scale"))
    return f"{name}.weight"


def _encode_int8_act(b: _Builder, name: str, lw: LayerWeights, _: object, nodes: list) -> str:
    q, scale = lw.integer_weight()
    dtype = INT_TYPES[lw.bits]
    stored = b.tensor(f"{name}.weight_q", dtype, _np(q).astype(np.int8), sparse_ok=lw.mask is not None)
    if lw.bits < 8:
        # Widened at session start by constant folding, so the Conv still fuses to QLinearConv.
        nodes.append(
            helper.make_node(
                "Cast", [stored], [f"{name}.weight_q8"], to=TensorProto.INT8, name=f"{name}.widen"
            )
        )
        stored = f"{name}.weight_q8"
    s = b.tensor(f"{name}.weight_scale", TensorProto.FLOAT, _np(scale))
    nodes.append(
        helper.make_node(
            "DequantizeLinear", [stored, s], [f"{name}.weight"], axis=0, name=f"{name}.weight_dq"
        )
    )
    return f"{name}.weight"


def _encode_shared(b: _Builder, name: str, lw: LayerWeights, _: object, nodes: list) -> str:
    codebook = _np(lw.full_codebook())
    index = _np(lw.index)
    idx = b.tensor(f"{name}.weight_index", index_type(len(codebook)), index.reshape(-1))
    shape = b.tensor(f"{name}.weight_shape", TensorProto.INT64, np.asarray(index.shape, np.int64))
    nodes.append(
        helper.make_node(
            "Cast", [idx], [f"{name}.weight_index32"], to=TensorProto.INT32, name=f"{name}.index"
        )
    )
    integer = lw.int8 and lw.bits < 32
    if integer:
        q, scale = lw.integer_codebook()
        cb = b.tensor(f"{name}.codebook_q", TensorProto.INT8, _np(q).astype(np.int8))
    else:
        cb = b.tensor(f"{name}.codebook", TensorProto.FLOAT, codebook.astype(np.float32))
    nodes.append(
        helper.make_node(
            "Gather", [cb, f"{name}.weight_index32"], [f"{name}.weight_flat"], axis=0, name=f"{name}.gather"
        )
    )
    out = f"{name}.weight_q" if integer else f"{name}.weight"
    nodes.append(helper.make_node("Reshape", [f"{name}.weight_flat", shape], [out], name=f"{name}.reshape"))
    if integer:
        s = b.tensor(f"{name}.weight_scale", TensorProto.FLOAT, _np(scale).astype(np.float32))
        nodes.append(
            helper.make_node("DequantizeLinear", [out, s], [f"{name}.weight"], name=f"{name}.weight_dq")
        )
    return f"{name}.weight"


WEIGHT_ENCODERS: dict[str, Encoder] = {
    "float": _encode_float,
    "weight_only": _encode_weight_only,
    "int8_act": _encode_int8_act,
    "shared": _encode_shared,
}


def encoding_of(lw: LayerWeights) -> str:
    if lw.plan.clusters:
        return "shared"
    if lw.bits == 32:
        return "float"
    return "int8_act" if lw.int8 else "weight_only"


def _encode_bias(
    b: _Builder, name: str, lw: LayerWeights, input_scale: torch.Tensor | None, nodes: list
) -> str | None:
    if lw.bias is None:
        return None
    if not lw.int8 or input_scale is None:
        return b.tensor(f"{name}.bias", TensorProto.FLOAT, _np(lw.bias))
    scale = (input_scale * lw.scale()).detach()
    q = bias_integers(lw.bias, scale)
    stored = b.tensor(f"{name}.bias_q", TensorProto.INT32, _np(q).astype(np.int32))
    s = b.tensor(f"{name}.bias_scale", TensorProto.FLOAT, _np(scale).astype(np.float32))
    nodes.append(
        helper.make_node("DequantizeLinear", [stored, s], [f"{name}.bias"], axis=0, name=f"{name}.bias_dq")
    )
    return f"{name}.bias"


def _opset_for(types: set[int]) -> int:
    return max([BASE_OPSET, *(OPSET_FOR_TYPE.get(t, BASE_OPSET) for t in types)])


@torch.no_grad()
def to_onnx(
    sim: SimulatedModel, metadata: dict[str, str] | None = None, compact: bool = True
) -> onnx.ModelProto:
    """The simulated model as an ONNX ModelProto that computes what `sim` computes.

    compact=False keeps the graph's tensor names (an activation's Q/DQ outputs are
    "<tensor>_q"/"<tensor>_dq"), so a tensor can be compared with the simulation's.
    """
    sim = sim.cpu().eval()
    b = _Builder()
    act_type = TensorProto.UINT8 if sim.activation_dtype == "uint8" else TensorProto.INT8
    shift = 0 if act_type == TensorProto.UINT8 else 128
    qparams: dict[str, tuple[str, str]] = {}

    def act_params(tensor: str) -> tuple[str, str] | None:
        aq = sim.act_quant(tensor)
        if aq is None:
            return None
        source = sim.points.tied.get(tensor, tensor)
        if source not in qparams:
            scale, zero = aq.params()
            s = b.tensor(f"{source}.act_scale", TensorProto.FLOAT, np.asarray(float(scale), np.float32))
            z = b.tensor(f"{source}.act_zero", act_type, np.asarray(int(zero) - shift))
            qparams[source] = (s, z)
        return qparams[source]

    # Encode weights first so the needed opset is known before the float graph is converted.
    preludes: dict[str, list[onnx.NodeProto]] = {}
    weight_inputs: dict[str, tuple[str, str | None]] = {}
    for name in sim.layer_names:
        lw = sim.layer(name)
        nodes: list[onnx.NodeProto] = []
        w = WEIGHT_ENCODERS[encoding_of(lw)](b, name, lw, None, nodes)
        node = next(n for n in sim.base.graph.node if n.name == name)
        aq = sim.act_quant(node.input[0])
        bias = _encode_bias(b, name, lw, aq.params()[0] if aq is not None else None, nodes)
        preludes[name] = nodes
        weight_inputs[name] = (w, bias)

    opset = _opset_for(b.types)
    model = copy.deepcopy(sim.base)
    if opset != BASE_OPSET:
        model = version_converter.convert_version(model, opset)
    graph = model.graph
    replaced = {n for name in sim.layer_names for n in _old_weights(sim, name)}
    kept_inits = [t for t in graph.initializer if t.name not in replaced]

    quantized = set(sim.points.tensors)
    new_nodes: list[onnx.NodeProto] = []

    def emit_qdq(tensor: str) -> None:
        s, z = act_params(tensor)  # type: ignore[misc]
        new_nodes.append(
            helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tensor}_q"], name=f"{tensor}_Q")
        )
        new_nodes.append(
            helper.make_node("DequantizeLinear", [f"{tensor}_q", s, z], [f"{tensor}_dq"], name=f"{tensor}_DQ")
        )

    def reads(name: str) -> str:
        return f"{name}_dq" if name in quantized else name

    float_reads: set[str] = set()

    def reads_as_float(name: str) -> str:
        """A quantized tensor as the input of a Conv/Gemm that keeps float weights.
        onnxruntime's WeightBiasQuantization turns a Conv/Gemm whose input comes straight
        from a DequantizeLinear into an int8 one (symmetric per-tensor weights, +-127, which
        the simulation does not do and x86 kernels without VNNI saturate). Max(x, x), which
        no optimizer removes, stands between them, so the layer stays float as planned."""
        if name not in float_reads:
            float_reads.add(name)
            new_nodes.append(
                helper.make_node("Max", [f"{name}_dq", f"{name}_dq"], [f"{name}_f"], name=f"{name}_float")
            )
        return f"{name}_f"

    if sim.input_name in quantized:
        emit_qdq(sim.input_name)
    for node in graph.node:
        node = copy.deepcopy(node)
        source = node.input[0] if node.input else ""
        for k, name in enumerate(node.input):
            if name:
                node.input[k] = reads(name)
        int8_layer = node.name in weight_inputs and sim.layer(node.name).int8
        if node.op_type in ("Conv", "Gemm") and not int8_layer and source in quantized:
            node.input[0] = reads_as_float(source)
        if node.name in weight_inputs:
            new_nodes.extend(preludes[node.name])
            w, bias = weight_inputs[node.name]
            node.input[1] = w
            if bias is not None:
                node.input[2] = bias
        new_nodes.append(node)
        for out in node.output:
            if out in quantized:
                emit_qdq(out)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + b.initializers)
    # Sparse weights ride in Constant(sparse_value) nodes: the same SparseTensorProto as a
    # graph sparse_initializer, but typed as the dense tensor Conv expects, so the file
    # passes onnx.checker's full check (a sparse_initializer feeding Conv's W does not).
    constants = [
        helper.make_node("Constant", [], [t.values.name], sparse_value=t, name=f"{t.values.name}.sparse")
        for t in b.sparse
    ]
    if constants:
        rest = list(graph.node)
        del graph.node[:]
        graph.node.extend(constants + rest)
    del graph.value_info[:]
    model.opset_import[0].version = opset
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(metadata or {})
    props["edgecompress.opset"] = str(opset)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if compact:
        compact_names(model, set(sim.layer_names))
    return model


def compact_names(model: onnx.ModelProto, layers: set[str]) -> None:
    """Short names for intermediate tensors and helper nodes: the exporter's scope paths
    ("/layer1/layer1.0/Relu_output_0") cost ~40% of a 4-bit ResNet-20 file. Layer nodes
    and the weight initializers named after them keep their names (size reports use them).
    """
    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    init_names = [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]
    rename: dict[str, str] = {}

    def owner(name: str) -> str:
        return name.split(".weight")[0].split(".bias")[0].split(".codebook")[0]

    for name in init_names:
        if owner(name) not in layers:
            rename[name] = f"c{len(rename)}"
    count = 0
    for node in graph.node:
        if node.op_type == "Constant" and owner(node.output[0]) in layers:
            continue
        for out in node.output:
            if out and out not in keep and out not in rename:
                rename[out] = f"v{count}"
                count += 1
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for t in graph.sparse_initializer:
        t.values.name = rename.get(t.values.name, t.values.name)
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
        if node.name not in layers and node.op_type != "Constant":
            node.name = ""
        node.doc_string = ""


def _old_weights(sim: SimulatedModel, name: str) -> list[str]:
    node = next(n for n in sim.base.graph.node if n.name == name)
    return [n for n in node.input[1:3] if n]
