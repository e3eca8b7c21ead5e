"""Predicted latency, memory and size of a configuration, anchored to measured models.

The environments keep budgets by construction: before an action is applied they ask
what the whole model would cost if every later step went to its minimum. That needs a
prediction that is fast (thousands per episode) and monotone in each choice, so it is
computed from the traced `Structure`, not from an exported file:

- latency: the sum of per-layer device milliseconds, from the profile's per-layer
  latency table when there is one (`layer_latency`), otherwise FLOPs scaled by the
  activation precision's speed factor;
- size: bytes of the stored weights (`weight_bytes`: the honest accounting of how the
  transforms store a layer) plus the graph's fixed overhead;
- memory: stored weights plus the two largest activations, as onnxruntime's arena holds
  a layer's input and output at once.

Each raw prediction becomes a device figure through an affine fit to models that were
really measured (at least the baseline and the most reduced one), and the fit's worst
relative error becomes the margin the budget wall keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edgecompress.search.structure import LayerInfo, Structure

FLOAT_BITS = 32
FIGURES = ("latency_ms", "memory_mb", "size_kb")


@dataclass(frozen=True)
class Config:
    """One point of the search space: kept channels per group, precision per layer."""

    channels: tuple[int, ...]  # per group
    bits: tuple[int, ...]  # per layer; 32 = float weights
    activation: tuple[str, ...]  # per layer: "float" or "int8"
    clusters: tuple[int | None, ...]  # per layer; None = no sharing

    @classmethod
    def full(cls, structure: Structure) -> Config:
        n = len(structure.layers)
        return cls(
            tuple(g.channels for g in structure.groups),
            (FLOAT_BITS,) * n,
            ("float",) * n,
            (None,) * n,
        )

    def with_group(self, index: int, channels: int) -> Config:
        values = list(self.channels)
        values[index] = channels
        return replace(self, channels=tuple(values))

    def with_layer(self, index: int, **changes: object) -> Config:
        out = {}
        for key, value in changes.items():
            values = list(getattr(self, key))
            values[index] = value
            out[key] = tuple(values)
        return replace(self, **out)


@dataclass(frozen=True)
class Shape:
    """A layer's size under a configuration."""

    in_channels: int
    out_channels: int
    params: int
    flops: int


def layer_shape(layer: LayerInfo, config: Config) -> Shape:
    cin = (
        layer.in_repeat * sum(config.channels[g] if g is not None else size for g, size in layer.in_segments)
        if layer.in_segments
        else layer.in_channels
    )
    cout = config.channels[layer.out_group] if layer.out_group is not None else layer.out_channels
    if layer.op == "dwconv":
        cin, ratio = cout, cout / layer.out_channels
    else:
        ratio = (cin / layer.in_channels) * (cout / layer.out_channels)
    return Shape(cin, cout, round(layer.params * ratio), round(layer.flops * ratio))


def default_weight_bytes(layer: LayerInfo, shape: Shape, bits: int, clusters: int | None) -> float:
    """Stored bytes of a layer's weights: packed indices and codebook, or b-bit values."""
    if clusters:
        index_bits = max(1, int(np.ceil(np.log2(clusters))))
        return shape.params * index_bits / 8 + clusters * 4
    if bits >= FLOAT_BITS:
        return shape.params * 4.0
    return shape.params * bits / 8 + shape.out_channels * 4  # plus a scale per channel


LayerLatency = Callable[[LayerInfo, Shape, int, str], float]
WeightBytes = Callable[[LayerInfo, Shape, int, "int | None"], float]


@dataclass(frozen=True)
class Fit:
    """measured = offset + slope * raw, and the worst relative error on the anchors."""

    offset: float = 0.0
    slope: float = 1.0
    error: float = 0.0

    def __call__(self, raw: float) -> float:
        return self.offset + self.slope * raw


def fit_affine(raw: Sequence[float], measured: Sequence[float]) -> Fit:
    """Least-squares affine fit; a proportional one when the anchors cannot fix a line."""
    x, y = np.asarray(raw, np.float64), np.asarray(measured, np.float64)
    if len(x) == 0:
        return Fit()
    if len(x) >= 2 and np.ptp(x) > 1e-9 * max(1.0, abs(x).max()):
        slope, offset = np.polyfit(x, y, 1)
        if slope <= 0:  # noise made larger models look cheaper: fall back to proportional
            slope, offset = float(y.sum() / max(x.sum(), 1e-12)), 0.0
    else:
        slope, offset = float(y.mean() / max(x.mean(), 1e-12)), 0.0
    fit = Fit(float(offset), float(slope))
    errors = np.abs(np.array([fit(v) for v in x]) - y) / np.maximum(np.abs(y), 1e-12)
    return replace(fit, error=float(errors.max()))


@dataclass
class CostModel:
    """Predicted device figures of a configuration of one structure."""

    structure: Structure
    layer_latency: LayerLatency | None = None
    weight_bytes: WeightBytes = default_weight_bytes
    int8_speed: float = 1.0  # latency factor of int8 activations without a table
    fits: dict[str, Fit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Units until anchors are measured: bytes -> KB and MB; table milliseconds as they are.
        self.fits.setdefault("size_kb", Fit(slope=1 / 1024))
        self.fits.setdefault("memory_mb", Fit(slope=1 / 2**20))
        self.fits.setdefault("latency_ms", Fit())

    def layer_latency_of(self, layer: LayerInfo, shape: Shape, bits: int, act: str) -> float:
        """Raw latency of one layer: the table's milliseconds, or speed-weighted FLOPs."""
        if self.layer_latency is not None:
            return self.layer_latency(layer, shape, bits, act)
        return shape.flops * (self.int8_speed if act == "int8" else 1.0)

    def raw_layer_latency(self, index: int, config: Config) -> float:
        layer = self.structure.layers[index]
        return self.layer_latency_of(
            layer, layer_shape(layer, config), config.bits[index], config.activation[index]
        )

    def raw(self, config: Config) -> dict[str, float]:
        """Uncalibrated figures: table or FLOPs latency, weight bytes, arena bytes."""
        latency = weights = flops = 0.0
        activations = []
        for i, layer in enumerate(self.structure.layers):
            shape = layer_shape(layer, config)
            bits, act = config.bits[i], config.activation[i]
            latency += self.layer_latency_of(layer, shape, bits, act)
            weights += self.weight_bytes(layer, shape, bits, config.clusters[i])
            flops += shape.flops
            scale = 1 if act == "int8" else 4
            activations.append(
                scale * (shape.in_channels * layer.in_size**2 + shape.out_channels * layer.out_size**2)
            )
        return {
            "latency_ms": latency,
            "memory_mb": weights + max(activations, default=0.0),
            "size_kb": weights,
            "flops": flops,
        }

    def predict(self, config: Config) -> dict[str, float]:
        raw = self.raw(config)
        out = {key: self.fits.get(key, Fit())(raw[key]) for key in FIGURES}
        out["flops"] = raw["flops"]
        return out

    def calibrate(self, anchors: Sequence[tuple[Config, Mapping[str, float | None]]]) -> None:
        """Fit each figure's raw prediction to the measured anchors (None: not measured)."""
        raws = [self.raw(config) for config, _ in anchors]
        for key in FIGURES:
            pairs = [
                (r[key], float(m[key]))
                for r, (_, m) in zip(raws, anchors, strict=True)
                if m.get(key) is not None
            ]
            if pairs:
                self.fits[key] = fit_affine([p[0] for p in pairs], [p[1] for p in pairs])

    def margins(self, floor: Mapping[str, float] | None = None) -> dict[str, float]:
        """Relative headroom the budget wall keeps per figure: the fit's error, at least `floor`."""
        floor = floor or {}
        return {k: max(self.fits.get(k, Fit()).error, floor.get(k, 0.0)) for k in FIGURES}
