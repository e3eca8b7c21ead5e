"""Simulated quantization (straight-through QAT) and where an exported graph gets Q/DQ pairs.

Weights: per-output-channel symmetric integers of 8, 4 or 2 bits (the scale clips to
the mean-squared-error optimum for 4 and 2 bits, to the max for 8). Activations:
per-tensor affine 8-bit, ranges calibrated on images by one of `CALIBRATION_METHODS`
(min/max, a percentile, or the mean-squared-error optimum of a histogram). The rounding
is the one onnxruntime uses (half to even, saturate), so this straight-through
simulation and the QDQ file compute the same numbers up to ties: onnxruntime's fused
kernels (QLinearConv requantization, QLinearAdd's rescaling) order their float
operations differently, so a value within ~1e-5 of a rounding midpoint may land one step
apart (measured: ~1e-6 of QLinearConv outputs, ~3e-5 of QLinearAdd outputs). Training
uses this simulation (it has gradients); evaluation runs the kernels themselves, bit
for bit (compress/exact.py), because a random or barely trained network turns such
one-step differences into a different top-1.

What onnxruntime 1.32 does with them (measured on this x86 host, see
benchmarks/RESULTS.md): DQ(int8 weights) + Q/DQ activations around Conv fuse into
QLinearConv; INT4 or INT2 weights fed straight into DequantizeLinear do *not* fuse
(and INT2 even makes the fusion emit an invalid QLinearConv), so int4/int2 weights
are stored packed and widened by Cast(->INT8) before DequantizeLinear: the Cast is
constant-folded at session start and the Conv then runs as QLinearConv. Weight-only
layers (float activations) are stored as Cast(->FLOAT) * scale, which is folded into
a plain float initializer at load, so they cost nothing at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import torch
from torch import nn

from edgecompress.compress import exact

QMAX = {8: 127, 4: 7, 2: 1}
# 8-bit weights on a host whose onnxruntime clips pairs of int8 products (exact.pairs_saturate).
QMAX_PAIRS_SATURATE = 64
# Clip ratios tried for the MSE-optimal weight scale at low bit widths.
_CLIP_GRID = torch.linspace(0.3, 1.0, 36)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def qmax(bits: int) -> int:
    """The largest weight integer of `bits` bits: QMAX, except 8-bit weights on a host whose
    int8 kernels clip pairs of products (an x86 CPU without VNNI; compress/exact.py), where
    the file and its simulation keep within +-QMAX_PAIRS_SATURATE so that they agree."""
    return QMAX_PAIRS_SATURATE if bits == 8 and exact.pairs_saturate() else QMAX[bits]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return _RoundSTE.apply(x)


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale, shape (O,): max-abs for 8 bits, MSE-clipped below."""
    top = qmax(bits)
    flat = w.detach().reshape(w.shape[0], -1)
    amax = flat.abs().amax(1)
    if bits >= 8:
        best = amax
    else:
        ratios = _CLIP_GRID.to(w.device, w.dtype)
        scales = (amax[None, :] * ratios[:, None]) / top  # (R, O)
        s = scales.clamp_min(1e-12)[..., None]
        q = torch.clamp(torch.round(flat[None] / s), -top, top) * s
        err = ((q - flat[None]) ** 2).sum(2)  # (R, O)
        best = amax * ratios[err.argmin(0)]
    scale = best / top
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer values as float, per-channel scale) of a weight tensor."""
    scale = weight_scale(w, bits)
    shape = (-1,) + (1,) * (w.dim() - 1)
    top = qmax(bits)
    q = torch.clamp(torch.round(w.detach() / scale.reshape(shape)), -top, top)
    return q, scale


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """w on its per-channel integer grid, with straight-through gradients."""
    scale = weight_scale(w, bits).reshape((-1,) + (1,) * (w.dim() - 1))
    top = qmax(bits)
    return torch.clamp(round_ste(w / scale), -top, top) * scale


def codebook_scale(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor symmetric scale of a shared-weight codebook."""
    amax = codebook.detach().abs().max()
    return amax / qmax(bits) if amax > 0 else torch.ones((), dtype=codebook.dtype)


def fake_quant_codebook(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    scale = codebook_scale(codebook, bits)
    top = qmax(bits)
    return torch.clamp(round_ste(codebook / scale), -top, top) * scale


_INT32_LIMIT = 2.0**31 - 1


def fake_quant_bias(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bias on the int32 grid of input scale x weight scale, as QLinearConv adds it."""
    return torch.clamp(round_ste(bias / scale), -_INT32_LIMIT, _INT32_LIMIT) * scale


def bias_integers(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int32 values (as float) the file stores for a bias on the grid `scale`."""
    return torch.clamp(torch.round(bias.detach() / scale), -_INT32_LIMIT, _INT32_LIMIT)


class ActQuant(nn.Module):
    """Per-tensor affine 8-bit quantization of one activation tensor, calibrated on images.

    In `observe` mode it records the range (or, once `histogram` is set, a histogram over
    that range) and passes values through; afterwards it rounds onto the grid (zero
    exactly representable, as ONNX requires).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))
        self.observing = False
        self.histogram: torch.Tensor | None = None  # counts over [lo, hi] while calibrating

    def observe(self, x: torch.Tensor) -> None:
        if self.histogram is not None:
            if self.hi > self.lo:
                self.histogram += torch.histc(
                    x.detach().float(), len(self.histogram), float(self.lo), float(self.hi)
                )
            return
        lo, hi = x.detach().min(), x.detach().max()
        if bool(self.seen):
            lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
        self.lo.copy_(torch.clamp(lo, max=0.0))
        self.hi.copy_(torch.clamp(hi, min=0.0))
        self.seen.fill_(True)

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point in 0..255) for the uint8 grid; int8 is the same grid - 128."""
        span = self.hi - self.lo
        scale = torch.where(span > 0, span / 255.0, torch.ones_like(span))
        zero = torch.clamp(torch.round(-self.lo / scale), 0, 255)
        return scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not bool(self.seen):
            raise RuntimeError("activation ranges are not calibrated; call calibrate() first")
        scale, zero = self.params()
        # torch's fused kernel: round half to even, saturate, straight-through inside the
        # range; 5x faster than composing the ops, which matters for calibration and parity.
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zero.reshape(1).int(), 0, 255)


# -- choosing an activation range from a histogram ----------------------------------------

HISTOGRAM_BINS = 2048
PERCENTILE = 99.99  # of the values kept inside the range, on each side
_RANGE_STEPS = 200  # candidate ends lo*k/200, hi*k/200 for the MSE search


def _centers(hist: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    width = (hi - lo) / len(hist)
    return lo + width * (torch.arange(len(hist), dtype=torch.float64) + 0.5)


def percentile_range(hist: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """Cut PERCENTILE's complement of the mass off each tail (never past zero)."""
    cdf = torch.cumsum(hist.double(), 0)
    total = float(cdf[-1])
    if total <= 0:
        return lo, hi
    edges = torch.linspace(lo, hi, len(hist) + 1, dtype=torch.float64)
    tail = total * (1.0 - PERCENTILE / 100.0)
    first = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64), right=True))
    last = int(torch.searchsorted(cdf, torch.tensor(total - tail, dtype=torch.float64)))
    return min(float(edges[first]), 0.0), max(float(edges[min(last + 1, len(hist))]), 0.0)


def _grid_error(n: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared error of each candidate range [a_k, b_k] on a histogram (counts n at centers c),
    each value quantized as the activation grid does (uint8, zero exactly representable)."""
    scale = ((b - a) / 255.0).clamp_min(1e-30)[:, None]
    zero = torch.clamp(torch.round(-a[:, None] / scale), 0, 255)
    q = (torch.clamp(torch.round(c[None, :] / scale) + zero, 0, 255) - zero) * scale
    return ((q - c[None, :]) ** 2 * n[None, :]).sum(1)


def mse_range(hist: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """The range with the least squared quantization error (clipping plus rounding) over the
    histogram: each end searched on lo*k/200, hi*k/200 in turn, twice (coordinate descent)."""
    n = hist.double()
    c = _centers(hist, lo, hi)
    ratios = torch.arange(1, _RANGE_STEPS + 1, dtype=torch.float64) / _RANGE_STEPS
    a, b = lo, hi
    for _ in range(2):
        ends = hi * ratios
        b = float(ends[torch.argmin(_grid_error(n, c, torch.full_like(ends, a), ends))])
        if lo < 0:
            ends = lo * ratios
            a = float(ends[torch.argmin(_grid_error(n, c, ends, torch.full_like(ends, b)))])
    return a, b


# Method name -> range chooser over a histogram of the tensor's values (None: min/max).
CALIBRATION_METHODS = {"minmax": None, "percentile": percentile_range, "mse": mse_range}


# -- where Q/DQ pairs go in the exported graph ------------------------------------------

LAYER_OPS = ("Conv", "Gemm")
# Ops that pass quantized values on: their output is quantized when all inputs are.
_CONNECTORS = {
    "Add", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "Pad", "Slice",
    "Gather", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Relu", "Clip",
}  # fmt: skip
# Data movement: the output shares the input's scale and zero point exactly.
TIED = {"MaxPool", "Pad", "Slice", "Gather", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
        "Transpose", "Relu"}  # fmt: skip
_DATA_INPUTS = {"Pad": 1, "Slice": 1, "Gather": 1, "Reshape": 1, "Squeeze": 1, "Unsqueeze": 1,
                "Clip": 1}  # fmt: skip


@dataclass(frozen=True)
class QuantPoints:
    """Activation tensors that carry Q/DQ, and which share another tensor's parameters."""

    tensors: tuple[str, ...]  # in graph order
    tied: dict[str, str]  # tensor -> tensor whose scale/zero point it reuses
    # pre-activation tensor left float -> its Relu/Clip output, quantized in its place
    folded: dict[str, str] = field(default_factory=dict)


def data_inputs(node: onnx.NodeProto, constants: set[str]) -> list[str]:
    n = _DATA_INPUTS.get(node.op_type)
    names = list(node.input[:n]) if n else list(node.input)
    return [x for x in names if x and x not in constants]


def _relu_like(node: onnx.NodeProto, constants: dict[str, torch.Tensor]) -> bool:
    if node.op_type == "Relu":
        return True
    if node.op_type == "Clip" and len(node.input) > 1 and node.input[1] in constants:
        return float(constants[node.input[1]]) == 0.0
    return False


def quant_points(
    graph: onnx.GraphProto, int8_layers: set[str], constants: dict[str, torch.Tensor]
) -> QuantPoints:
    """Which activation tensors get Q/DQ so that onnxruntime runs int8 layers on int8 kernels.

    An int8 layer's input and (effective) output are quantized; so is the output of a
    connector op whose data inputs all are. A Conv/Gemm/Add whose only consumer is a
    Relu (or Clip from 0) is quantized after the activation, which onnxruntime folds
    into the QuantizeLinear (ReluQuantFusion). The model output stays float.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    const = set(constants)
    quantized: list[str] = []
    tied: dict[str, str] = {}
    absorbed: set[str] = set()  # pre-activation tensors left float

    def feeds_int8(name: str) -> bool:
        return any(n.name in int8_layers for n in consumers.get(name, []))

    for inp in graph.input:
        if feeds_int8(inp.name):
            quantized.append(inp.name)
    for node in graph.node:
        out = node.output[0]
        users = consumers.get(out, [])
        if (
            node.op_type in (*LAYER_OPS, "Add")
            and len(users) == 1
            and _relu_like(users[0], constants)
            and out not in outputs
        ):
            absorbed.add(out)
            continue
        ins = data_inputs(node, const)
        if node.op_type in ("Relu", "Clip") and ins and ins[0] in absorbed:
            producer_int8 = any(
                n.name in int8_layers for n in graph.node if n.output and n.output[0] == ins[0]
            )
            source_q = producer_int8 or _all_in(_producer_inputs(graph, ins[0], const), quantized)
        else:
            producer_int8 = node.name in int8_layers
            source_q = node.op_type in _CONNECTORS and ins and _all_in(ins, quantized)
        if out in outputs:
            continue
        if producer_int8 or source_q or feeds_int8(out):
            quantized.append(out)
            if node.op_type in TIED and ins and ins[0] in quantized and ins[0] not in absorbed:
                tied[out] = tied.get(ins[0], ins[0])
    folded = {}
    for tensor in absorbed:
        activation = consumers[tensor][0].output[0]
        if activation in quantized:
            folded[tensor] = activation
    return QuantPoints(tuple(quantized), tied, folded)


def _all_in(names: list[str], pool: list[str]) -> bool:
    return bool(names) and all(n in pool for n in names)


def _producer_inputs(graph: onnx.GraphProto, tensor: str, const: set[str]) -> list[str]:
    for node in graph.node:
        if node.output and node.output[0] == tensor:
            return data_inputs(node, const) if node.op_type not in LAYER_OPS else []
    return []
