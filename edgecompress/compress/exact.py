"""onnxruntime's fused int8 kernels on x86, to the bit, for evaluating a simulated model.

The straight-through simulation (quantization.py) computes `round(conv(x, w) / s)` in
float; onnxruntime's QLinearConv accumulates integers and multiplies by one float32
scale, and its QLinearAdd multiplies with fused multiply-adds. Both give the same
integers except at values within ~1e-5 of a rounding midpoint, which is enough for a
random or barely trained network (near-tie logits) to change its top-1 on a few percent
of images. In evaluation the simulated model therefore runs these kernels as the
shipped file does, so its accuracy is the file's (on x86; ARM's NEON kernels round
QLinearAdd and the average pool in fixed point and are not reproduced here).

What each kernel computes (onnxruntime's MLAS, uint8 activations; a signed int8 file
is turned into uint8 by onnxruntime on x86 first):

  QuantizeLinear   clamp(round_half_even(x / s) + z)          (a division, not x * (1/s))
  QLinearConv      acc = sum((qx - zx) * qw) + qbias           (exact integers)
                   clamp(round(float32(acc) * float32(sx * sw[o] / sy)) + zy)
  QLinearGlobalAveragePool
                   acc = sum(qx) - zx * N;  clamp(round(float32(acc) * (sx / (sy * N))) + zy)
  QLinearAdd       fixed = zc - fma(ra, za, rb * zb),  ra = sa / sc, rb = sb / sc
                   clamp(round(fma(qa, ra, fma(qb, rb, fixed))))

Everything is float32 as in the kernels; a fused multiply-add is one product and sum in
float64 (exact here: 8-bit times 24-bit) rounded once to float32. Integer sums run in
float32 when no partial sum can reach 2**24 (then every one is exact), else in float64.
Values are passed around dequantized, (q - z) * s, as in the rest of the simulation.

"Exact integers" needs kernels that add int8 products in 32 bits: VNNI on x86, and ARM's.
An x86 CPU without VNNI (AVX2, or AVX-512 without it) adds each pair of uint8 x int8
products into int16 first, with saturation (VPMADDUBSW), so a pair over 32767 is clipped:
with full-range weights that changed 89% of a random QLinearConv's outputs on such a host.
Where `pairs_saturate()` finds that, 8-bit weights are kept within +-64
(quantization.qmax), which no pair can push past 32767 (2 x 255 x 64 = 32640).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

EXACT_FLOAT32 = 2.0**24  # integers below this add exactly in float32


@functools.cache
def pairs_saturate() -> bool:
    """Whether this host's onnxruntime clips a pair of uint8 x int8 products to int16:
    one QLinearConv of two 255 x 127 products (64770) tells."""
    import numpy as np

    pair = qlinear_conv(np.full((1, 2, 1, 1), 255, np.uint8), np.full((1, 2, 1, 1), 127, np.int8), 1000.0)
    return int(pair.flat[0]) != 65  # round(64770 / 1000); clipped: round(32767 / 1000) = 33


def qlinear_conv(x: Any, weights: Any, out_scale: float, out_zero: int = 0, pads: int = 0) -> Any:
    """onnxruntime's QLinearConv (CPU) on uint8 `x` and int8 `weights`, both with scale 1 and
    zero point 0: round(conv(x, weights) / out_scale) + out_zero, as this host computes it."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: object, dtype: object) -> object:
        return numpy_helper.from_array(np.array(value, dtype=dtype), name)

    inputs = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    graph = helper.make_graph(
        [helper.make_node("QLinearConv", inputs, ["y"], pads=[pads] * 4)],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        [
            const("xs", 1.0, np.float32),
            const("xz", 0, np.uint8),
            const("w", weights, np.int8),
            const("ws", 1.0, np.float32),
            const("wz", 0, np.int8),
            const("ys", out_scale, np.float32),
            const("yz", out_zero, np.uint8),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def integers(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integers q - z of a tensor already on its grid ((q - z) * s in float32)."""
    return torch.round(x / scale)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear, as onnxruntime computes them (uint8 grid)."""
    return torch.clamp(torch.round(x / scale), -zero, 255 - zero) * scale


def _requantize(acc: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integers acc (float64, exact) -> output integers q - z, as MLAS requantizes."""
    return torch.clamp(torch.round(acc.float() * scale), -zero, 255 - zero)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a * b + c with one rounding (exact in float64 for 8-bit a, float32 b and c)."""
    return (a.double() * b.double() + c.double()).float()


def layer(
    run: object,
    x: torch.Tensor,
    in_scale: torch.Tensor,
    in_zero: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
    out_zero: torch.Tensor,
) -> torch.Tensor:
    """QLinearConv (or a Gemm's QGemm with a quantized output).

    `run(x, w)` is the layer's float op without bias (Conv or Gemm with its attributes),
    applied here to integers; `weight` holds integers and `bias` the int32 bias.
    """
    n = integers(x, in_scale)
    reach = float(weight.abs().reshape(weight.shape[0], -1).sum(1).max()) * float(max(in_zero, 255 - in_zero))
    dtype = torch.float32 if reach < EXACT_FLOAT32 else torch.float64
    acc = run(n.to(dtype), weight.to(dtype)).double()  # type: ignore[operator]
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    if bias is not None:
        acc = acc + bias.double().reshape(shape)
    scale = (in_scale * weight_scale) / out_scale  # float32, in this order, as onnxruntime
    return _requantize(acc, scale.reshape(shape), out_zero) * out_scale


def global_average_pool(
    x: torch.Tensor, in_scale: torch.Tensor, out_scale: torch.Tensor, out_zero: torch.Tensor
) -> torch.Tensor:
    """QLinearGlobalAveragePool: an integer sum, one float32 scale."""
    n = integers(x, in_scale).double()
    count = n.shape[2] * n.shape[3]
    scale = in_scale / (out_scale * float(count))
    return _requantize(n.sum(dim=(2, 3), keepdim=True), scale, out_zero) * out_scale


def add(
    a: torch.Tensor,
    a_params: tuple[torch.Tensor, torch.Tensor],
    b: torch.Tensor,
    b_params: tuple[torch.Tensor, torch.Tensor],
    out_params: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """QLinearAdd (AVX2 kernel): raw uint8 inputs, fused multiply-adds, B's term first."""
    (sa, za), (sb, zb), (sc, zc) = a_params, b_params, out_params
    ra, rb = sa / sc, sb / sc
    # The compiler contracts the kernel's scalar `ra * za + rb * zb` into fma(ra, za, rb * zb);
    # rounding rb * zb + ra * za in two steps instead differs on a few values in a million.
    fixed = zc - _fma(ra, za, rb * zb)
    qa = integers(a, sa) + za
    qb = integers(b, sb) + zb
    c = _fma(qa, ra, _fma(qb, rb, fixed))
    return (torch.clamp(torch.round(c), 0, 255) - zc) * sc
