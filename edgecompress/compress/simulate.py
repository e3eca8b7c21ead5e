"""The compressed model in torch: its own plain ONNX graph run with simulated weights and Q/DQ.

`SimulatedModel` executes the BatchNorm-folded plain export of the pruned model
node by node (compress/onnx_ops.py). Each Conv/Gemm layer's weights live in a
`LayerWeights` module that applies the plan (kernel mask, shared codebook, integer
grid); activation tensors chosen by `quantization.quant_points` pass through
`ActQuant`. Because torch and the exported file run the very same graph, they agree;
and because it is an nn.Module it fine-tunes (QAT, codebook training) like any model.
In evaluation (eval mode, no gradients) the nodes that onnxruntime fuses into integer
kernels run those kernels' arithmetic (compress/exact.py, `integer_kernels`), so the
simulation's predictions are the x86 file's, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgecompress.compress import exact
from edgecompress.compress.onnx_ops import attributes, fold_constants, run_node
from edgecompress.compress.plan import LayerPlan
from edgecompress.compress.quantization import (
    CALIBRATION_METHODS,
    HISTOGRAM_BINS,
    LAYER_OPS,
    ActQuant,
    QuantPoints,
    bias_integers,
    codebook_scale,
    data_inputs,
    fake_quant_bias,
    fake_quant_codebook,
    fake_quant_weight,
    qmax,
    quant_points,
    quantize_weight,
    weight_scale,
)
from edgecompress.compress.sharing import share
from edgecompress.compress.sparse import kernel_mask
from edgecompress.errors import ExportError, PlanError


class _MeanGradient(torch.autograd.Function):
    """Identity forward; backward divides each codebook entry's gradient by its weight count."""

    @staticmethod
    def forward(ctx, codebook: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(counts)
        return codebook.view_as(codebook)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (counts,) = ctx.saved_tensors
        return grad / counts, None


class LayerWeights(nn.Module):
    """One layer's weight and bias as the plan stores them (mask, codebook, integer grid)."""

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None,
        plan: LayerPlan,
        seed: int,
        scores: np.ndarray | None = None,  # per-kernel importance (O, I); None: L2 norm
    ):
        super().__init__()
        self.plan = plan
        self.bits = plan.weight_bits
        self.int8 = plan.activations == "int8"
        mask = kernel_mask(weight, plan.kernel_sparsity, scores)
        self.register_buffer("mask", None if mask is None else torch.from_numpy(mask))
        self.zero_slot = False
        if plan.clusters:
            masked = weight if mask is None else weight * mask
            codebook, index = share(masked, plan.clusters, mask, seed)
            self.zero_slot = mask is not None
            trained = codebook[:-1] if self.zero_slot else codebook
            self.codebook = nn.Parameter(torch.from_numpy(trained.copy()))
            self.register_buffer("index", torch.from_numpy(index))
            # An entry's gradient is the sum over the thousands of weights sharing it (Han et
            # al.); divided by their count it moves like one weight, so the fine-tune's lr
            # stays meaningful (the raw sum sent ResNet-20's codebooks off to 10% top-1).
            counts = np.bincount(index.reshape(-1), minlength=len(codebook))[: len(trained)]
            self.register_buffer("shared_by", torch.from_numpy(np.maximum(counts, 1).astype(np.float32)))
            self.weight = None
        else:
            self.weight = nn.Parameter(torch.from_numpy(weight.copy()))
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(bias.copy()))

    def full_codebook(self) -> torch.Tensor:
        """Codebook entries as used (zero slot appended, on the integer grid if bits < 32)."""
        cb = _MeanGradient.apply(self.codebook, self.shared_by)
        if self.zero_slot:
            cb = torch.cat([cb, cb.new_zeros(1)])
        return fake_quant_codebook(cb, self.bits) if self.bits < 32 else cb

    def float_weight(self) -> torch.Tensor:
        """The weight before the integer grid: masked, or gathered from the codebook."""
        if self.weight is None:
            return self.full_codebook()[self.index]
        return self.weight if self.mask is None else self.weight * self.mask

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.float_weight()
        if self.weight is not None and self.bits < 32:
            w = fake_quant_weight(w, self.bits)
        scale = self._scale() if self.int8 else None
        return w, scale

    def _memo(self, slot: str, compute: Callable[[], Any]) -> Any:
        """`compute()`, reused in evaluation until a parameter changes (the search evaluates
        each candidate on many batches, and the 4/2-bit scale search costs)."""
        if self.training and torch.is_grad_enabled():
            return compute()
        key = tuple((p._version, p.data_ptr()) for p in self.parameters())
        memos = self.__dict__.setdefault("_memos", {})
        hit = memos.get(slot)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, compute())
            memos[slot] = hit
        return hit[1]

    def _cached(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._memo("weights", self._compute)

    def effective_weight(self) -> torch.Tensor:
        return self._cached()[0]

    def integer_codebook(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A shared layer's codebook as the integers the file stores (as float), and its scale."""
        scale = self.scale()[0]
        q = torch.round(self.full_codebook().detach() / scale)
        top = qmax(self.bits)
        return torch.clamp(q, -top, top), scale

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as the integers the file stores (as float), and the scale per output channel."""

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            if self.weight is None:
                q, scale = self.integer_codebook()
                return q[self.index], scale.expand(self.index.shape[0])
            return quantize_weight(self.float_weight(), self.bits)

        return self._memo("integers", compute)

    def _scale(self) -> torch.Tensor:
        """Per-output-channel weight scale (shape (O,)) of the stored integers."""
        if self.weight is None:
            cb = torch.cat([self.codebook, self.codebook.new_zeros(1)]) if self.zero_slot else self.codebook
            s = codebook_scale(cb, self.bits)
            return s.expand(self.index.shape[0]).to(self.index.device)
        return weight_scale(self.float_weight(), self.bits)

    def scale(self) -> torch.Tensor:
        scale = self._cached()[1]
        return scale if scale is not None else self._scale()

    def effective_bias(self, input_scale: torch.Tensor | None) -> torch.Tensor | None:
        if self.bias is None or not self.int8 or input_scale is None:
            return self.bias
        return fake_quant_bias(self.bias, input_scale * self.scale().detach())


def _weight_inputs(node: onnx.NodeProto) -> tuple[str, str | None]:
    return node.input[1], (node.input[2] if len(node.input) > 2 and node.input[2] else None)


def name_layers(model: onnx.ModelProto, layer_names: list[str]) -> None:
    """Name the Conv/Gemm nodes after the torch layers they come from (same call order)."""
    nodes = [n for n in model.graph.node if n.op_type in LAYER_OPS]
    if len(nodes) != len(layer_names):
        raise ExportError(
            f"the export has {len(nodes)} Conv/Gemm nodes but the model {len(layer_names)} "
            "Conv2d/Linear calls; compressed export needs each layer called once"
        )
    for k, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{k}"
    for node, name in zip(nodes, layer_names, strict=True):
        node.name = name


class SimulatedModel(nn.Module):
    """Runs a plain ONNX graph in torch with each layer's weights and activations as planned."""

    def __init__(
        self,
        base: onnx.ModelProto,
        plans: dict[str, LayerPlan],
        activation_dtype: str = "uint8",
        seed: int = 0,
        kernel_scores: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.base = fold_constants(copy.deepcopy(base))
        self.activation_dtype = activation_dtype
        graph = self.base.graph
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        self.layer_names: list[str] = []
        layers: dict[str, LayerWeights] = {}
        weight_tensors: set[str] = set()
        for node in graph.node:
            if node.op_type not in LAYER_OPS:
                continue
            w_name, b_name = _weight_inputs(node)
            if w_name not in inits or (b_name is not None and b_name not in inits):
                raise ExportError(f"layer {node.name} has weights computed in the graph")
            if node.op_type == "Gemm" and not attributes(node).get("transB", 0):
                raise ExportError(f"layer {node.name}: Gemm without transB is not supported")
            plan = plans.get(node.name, LayerPlan())
            bias = inits[b_name].astype(np.float32) if b_name else None
            scores = (kernel_scores or {}).get(node.name)
            weight = inits[w_name].astype(np.float32)
            layers[f"L{len(layers)}"] = LayerWeights(weight, bias, plan, seed, scores)
            self.layer_names.append(node.name)
            weight_tensors.update({w_name, b_name} - {None})
        self.layers = nn.ModuleDict(layers)
        self.const_names = [n for n in inits if n not in weight_tensors]
        for k, name in enumerate(self.const_names):
            self.register_buffer(f"c{k}", torch.from_numpy(np.array(inits[name])), persistent=False)
        constants = {n: torch.from_numpy(np.array(inits[n])) for n in self.const_names}
        int8_layers = {n for n, p in plans.items() if p.activations == "int8"}
        self.points = quant_points(graph, int8_layers, constants)
        own = [t for t in self.points.tensors if t not in self.points.tied]
        self.act_names = own
        self.acts = nn.ModuleDict({f"A{k}": ActQuant() for k in range(len(own))})
        self._act_index = {t: f"A{k}" for k, t in enumerate(own)}
        self._layer_index = {n: f"L{k}" for k, n in enumerate(self.layer_names)}
        self._nodes = [(n, attributes(n)) for n in graph.node]
        # Evaluation runs the fused integer kernels as onnxruntime does (compress/exact.py);
        # set False for the plain straight-through simulation.
        self.exact = True
        by_name = {n: self.layer(n) for n in self.layer_names}
        self._kernels = integer_kernels(graph, self.points, by_name, constants, activation_dtype == "int8")

    # -- lookups ---------------------------------------------------------------------

    def layer(self, name: str) -> LayerWeights:
        return self.layers[self._layer_index[name]]

    def act_quant(self, tensor: str) -> ActQuant | None:
        source = self.points.tied.get(tensor, tensor)
        key = self._act_index.get(source)
        return self.acts[key] if key is not None else None

    @property
    def needs_calibration(self) -> bool:
        return len(self.acts) > 0 and not all(bool(a.seen) for a in self.acts.values())

    # -- running ---------------------------------------------------------------------

    def _const(self, name: str) -> torch.Tensor:
        return getattr(self, f"c{self.const_names.index(name)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tensors(x)[self.output_name]

    def tensors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the graph as simulated (quantized ones on their grid), by name."""
        consts = {n: getattr(self, f"c{k}") for k, n in enumerate(self.const_names)}
        integer = (
            self.exact
            and not self.training
            and not torch.is_grad_enabled()
            and not any(a.observing for a in self.acts.values())
        )
        values: dict[str, torch.Tensor] = {self.input_name: self._quant(self.input_name, x, integer)}
        for (node, attrs), kernel in zip(self._nodes, self._kernels, strict=True):
            inputs = [values[n] if n in values else consts.get(n) if n else None for n in node.input]
            if integer and kernel is not None:
                outputs = [self._integer_kernel(node, attrs, kernel, inputs)]
            else:
                key = self._layer_index.get(node.name)
                if key is not None:
                    lw = self.layers[key]
                    inputs[1] = lw.effective_weight()
                    aq = self.act_quant(node.input[0])
                    if lw.bias is not None:
                        inputs[2] = lw.effective_bias(
                            aq.params()[0] if aq is not None and not aq.observing else None
                        )
                outputs = run_node(node, inputs, attrs)
            for name, value in zip(node.output, outputs, strict=False):
                values[name] = self._quant(name, value, integer)
        return values

    def _params(self, tensor: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.act_quant(tensor).params()  # type: ignore[union-attr]

    def _integer_kernel(
        self, node: onnx.NodeProto, attrs: dict, kernel: tuple[str, str], inputs: list
    ) -> torch.Tensor:
        kind, written = kernel
        out_scale, out_zero = self._params(written)
        if kind == "add":
            a, b = node.input[0], node.input[1]
            return exact.add(inputs[0], self._params(a), inputs[1], self._params(b), (out_scale, out_zero))
        in_scale, in_zero = self._params(node.input[0])
        if kind == "pool":
            return exact.global_average_pool(inputs[0], in_scale, out_scale, out_zero)
        lw = self.layer(node.name)
        weight, weight_scale = lw.integer_weight()
        bias = None if lw.bias is None else bias_integers(lw.bias, in_scale * weight_scale)

        def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return run_node(node, [x, w], attrs)[0]

        return exact.layer(run, inputs[0], in_scale, in_zero, weight, weight_scale, bias, out_scale, out_zero)

    def _quant(self, name: str, value: torch.Tensor, integer: bool = False) -> torch.Tensor:
        if name in self.points.tied:
            # Data movement of values already on the grid (slice, pad with the exact zero,
            # relu, max-pool, reshape) stays on it: the Q/DQ pair the file has is exact.
            return value
        key = self._act_index.get(name)
        if key is None:
            return value
        if integer:
            return exact.quantize(value, *self.acts[key].params())
        return self.acts[key](value)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor], method: str = "minmax") -> None:
        """Set each quantized tensor's range from the float values it takes on the batches.

        `method` (see quantization.CALIBRATION_METHODS): "minmax" keeps the whole observed
        range; "percentile" and "mse" make a second pass that histograms each tensor over
        that range and clip it (a percentile of the values; the least squared error).
        """
        if method not in CALIBRATION_METHODS:
            raise PlanError(
                f"unknown activation calibration {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}"
            )
        batches = list(batches)
        if not batches and len(self.acts):
            raise PlanError("int8 activations need calibration images; none were given")
        for aq in self.acts.values():
            aq.seen.fill_(False)
        self._observe(batches)
        choose = CALIBRATION_METHODS[method]
        if choose is None:
            return
        for aq in self.acts.values():
            aq.histogram = torch.zeros(HISTOGRAM_BINS, device=aq.lo.device)
        try:
            self._observe(batches)
            for aq in self.acts.values():
                lo, hi = float(aq.lo), float(aq.hi)
                if hi > lo:
                    a, b = choose(aq.histogram, lo, hi)
                    aq.lo.fill_(min(a, 0.0))
                    aq.hi.fill_(max(b, 0.0))
        finally:
            for aq in self.acts.values():
                aq.histogram = None

    def _observe(self, batches: list[torch.Tensor]) -> None:
        was_training = self.training
        self.eval()
        for aq in self.acts.values():
            aq.observing = True
        try:
            for batch in batches:
                self(batch)
        finally:
            for aq in self.acts.values():
                aq.observing = False
            self.train(was_training)


def integer_kernels(
    graph: onnx.GraphProto,
    points: QuantPoints,
    layers: dict[str, LayerWeights],
    constants: dict[str, torch.Tensor],
    signed: bool = False,
) -> list[tuple[str, str] | None]:
    """For each node, (kind, tensor whose grid it writes) where onnxruntime runs a fused
    integer kernel, else None: a Conv/Gemm with integer weights and int8 activations
    between quantized tensors ("layer"), an Add of two quantized tensors ("add"), and a
    GlobalAveragePool between quantized tensors ("pool"). The output counts as quantized
    when it is, or when its only consumer is a Relu/Clip from 0 whose output is (onnxruntime
    folds that activation into the kernel's output range), except with signed int8
    activations: onnxruntime (1.32, x86) then leaves such a Conv or Add in float between
    its DequantizeLinear and QuantizeLinear (measured on ResNet-20: 10 of 19 Conv and all
    9 Adds), so they run the float simulation."""
    quantized = set(points.tensors)
    const = set(constants)

    def written(node: onnx.NodeProto) -> str | None:
        out = node.output[0]
        if out in quantized:
            return out
        return None if signed else points.folded.get(out)

    kernels: list[tuple[str, str] | None] = []
    for node in graph.node:
        target = written(node) if node.output else None
        lw = layers.get(node.name)
        ins = [node.input[0]] if lw is not None else data_inputs(node, const)
        kind = None
        if target is None or not ins or not all(n in quantized for n in ins):
            kind = None
        elif lw is not None and lw.int8 and lw.bits < 32:
            kind = "layer"
        elif node.op_type == "Add" and len(ins) == 2:
            kind = "add"
        elif node.op_type == "GlobalAveragePool":
            kind = "pool"
        kernels.append((kind, target) if kind else None)
    return kernels


def layer_plans(plans: dict[str, LayerPlan]) -> dict[str, LayerPlan]:
    """Only the layers that change (the rest run as float)."""
    return {k: v for k, v in plans.items() if not v.is_identity}
