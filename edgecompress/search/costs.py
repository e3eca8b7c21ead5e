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
MAX_MARGIN = 0.10


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

    def with_activations(self, activation: str) -> Config:
        """Every layer's activations "float" or "int8", the rest as it is."""
        return replace(self, activation=(activation,) * len(self.activation))


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
    boundary_ms: float = 0.0  # latency of one change between int8 and float activations
    latency_weights: np.ndarray | None = None  # fitted (fixed, float, int8, per change)
    fits: dict[str, Fit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Units until anchors are measured: bytes -> KB and MB; table milliseconds as they are.
        self.fits.setdefault("size_kb", Fit(slope=1 / 1024))
        self.fits.setdefault("memory_mb", Fit(slope=1 / 2**20))
        self.fits.setdefault("latency_ms", Fit())

    def layer_latency_of(self, layer: LayerInfo, shape: Shape, bits: int, act: str) -> float:
        """Raw latency of one layer: the table's milliseconds, or FLOPs weighted by the
        int8 speed the fit has found (the prior until then)."""
        if self.layer_latency is not None:
            return self.layer_latency(layer, shape, bits, act)
        return shape.flops * (self.int8_speed if act == "int8" else 1.0)

    def raw_layer_latency(self, index: int, config: Config) -> float:
        layer = self.structure.layers[index]
        return self.layer_latency_of(
            layer, layer_shape(layer, config), config.bits[index], config.activation[index]
        )

    def raw(self, config: Config) -> dict[str, float]:
        """Uncalibrated figures: latency terms, weight bytes, arena bytes, FLOPs."""
        parts = {"float": 0.0, "int8": 0.0}
        weights = flops = 0.0
        activations = []
        for i, layer in enumerate(self.structure.layers):
            shape = layer_shape(layer, config)
            bits, act = config.bits[i], config.activation[i]
            term = shape.flops if self.layer_latency is None else self.layer_latency(layer, shape, bits, act)
            parts["int8" if act == "int8" else "float"] += term
            weights += self.weight_bytes(layer, shape, bits, config.clusters[i])
            flops += shape.flops
            scale = 1 if act == "int8" else 4
            activations.append(
                scale * (shape.in_channels * layer.in_size**2 + shape.out_channels * layer.out_size**2)
            )
        acts = config.activation
        changes = sum(a != b for a, b in zip(acts, acts[1:], strict=False))
        boundaries = changes + (acts[0] == "int8") + (acts[-1] == "int8")
        return {
            "latency_float": parts["float"],
            "latency_int8": parts["int8"],
            "boundaries": float(boundaries),
            "latency_ms": parts["float"] + self.int8_speed * parts["int8"],
            "memory_mb": weights + max(activations, default=0.0),
            "size_kb": weights,
            "flops": flops,
        }

    def _latency_features(self, raw: Mapping[str, float]) -> np.ndarray:
        return np.array([1.0, raw["latency_float"], raw["latency_int8"], raw["boundaries"]])

    def predict(self, config: Config) -> dict[str, float]:
        raw = self.raw(config)
        out = {key: self.fits.get(key, Fit())(raw[key]) for key in ("memory_mb", "size_kb")}
        if self.latency_weights is None:
            out["latency_ms"] = self.fits.get("latency_ms", Fit())(raw["latency_ms"])
        else:
            out["latency_ms"] = float(self._latency_features(raw) @ self.latency_weights)
        out["flops"] = raw["flops"]
        return out

    def calibrate(self, anchors: Sequence[tuple[Config, Mapping[str, float | None]]]) -> None:
        """Fit each figure to the measured anchors (None: not measured).

        Memory and size: an affine map of their raw figure. Latency: a fixed part, a
        weight for float layers, one for int8 layers, and one per change between int8
        and float activations along the network (Q/DQ nodes there), fitted by least
        squares in relative error with a light pull towards the prior (int8 at
        `int8_speed`, `boundary_ms` per change), so few anchors still give an answer.
        """
        raws = [self.raw(config) for config, _ in anchors]
        for key in ("memory_mb", "size_kb"):
            rows = [
                (r[key], float(m[key]))
                for r, (_, m) in zip(raws, anchors, strict=True)
                if m.get(key) is not None
            ]
            if rows:
                self.fits[key] = fit_affine([x for x, _ in rows], [y for _, y in rows])
        rows = [
            (self._latency_features(r), float(m["latency_ms"]))
            for r, (_, m) in zip(raws, anchors, strict=True)
            if m.get("latency_ms") is not None
        ]
        if not rows:
            return
        x = np.stack([f for f, _ in rows])
        y = np.asarray([v for _, v in rows])
        scale = float(y.sum() / max((x[:, 1] + self.int8_speed * x[:, 2]).sum(), 1e-12))
        prior = np.array([0.0, scale, scale * self.int8_speed, self.boundary_ms])
        typical = np.maximum(np.abs(x).mean(0), 1e-12)
        mean_y = float(y.mean())
        z = x / typical  # columns of order one
        d = mean_y / np.maximum(y, 1e-12)  # relative error: small models count as much
        u_prior = prior * typical / mean_y
        lam = 1e-2
        a = (z * d[:, None] ** 2).T @ z + lam * np.eye(4)
        b = (z * d[:, None] ** 2).T @ (y / mean_y) + lam * u_prior
        weights = np.linalg.solve(a, b) * mean_y / typical
        weights[1:] = np.maximum(weights[1:], 0.0)
        self.latency_weights = weights
        if weights[1] > 0:
            self.int8_speed = float(weights[2] / weights[1]) if weights[2] > 0 else self.int8_speed
        predicted = x @ weights
        error = float(np.max(np.abs(predicted - y) / np.maximum(y, 1e-12)))
        self.fits["latency_ms"] = Fit(error=error)

    def margins(self, floor: Mapping[str, float] | None = None, cap: float = MAX_MARGIN) -> dict[str, float]:
        """Relative headroom the budget wall keeps per figure: the fit's error, at least `floor`,
        at most `cap` (a noisier fit would wall off everything; verify repairs a real miss)."""
        floor = floor or {}
        return {k: min(cap, max(self.fits.get(k, Fit()).error, floor.get(k, 0.0))) for k in FIGURES}
