"""Per-layer latency table: rows, interpolation, whole-model prediction, save and load.

A row maps a layer key (op, channels in/out, feature size, kernel, stride, groups,
weight and activation precision) to the milliseconds its kernels took on the device,
timed alone with onnxruntime's profiler so that layout conversions at a lone layer's
edges (NCHWc reorders, NHWC transposes) are left out. A model's latency is predicted as

    ms = scale x (a x (sum(rows of its layers) + streaming) + b x layers + c)

where streaming is what fetching the weights from memory costs once they no longer fit
the caches (measured with a probe of growing depth: a lone layer's weights stay cached
between runs, a big model's do not), and (a, b, c) are fitted per precision family on
reference models timed end to end: they carry what a sum of kernels misses (per-node
dispatch, the session's fixed cost, the layout conversions a whole model does need).
Between rows the table interpolates linearly in channels (after rounding up to the SIMD
channel multiple) and in pixels, and extrapolates in proportion beyond its largest rows.
Plain numpy and onnx, no session, no torch: the search calls `predict_latency` per
candidate.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import MeasureError
from edgecompress.measure.layers import Layer, LayerKey, describe

FORMAT = 1
# Nodes onnxruntime adds to convert layouts around a lone layer; not part of its cost.
LAYOUT_OPS = {"ReorderInput", "ReorderOutput", "Transpose"}
ELEMENTWISE_FALLBACK = "Relu"


@dataclass(frozen=True)
class Fit:
    """ms = a x sum(rows) + b x layers + c, for one precision family."""

    a: float
    b: float
    c: float
    models: int  # how many reference models it was fitted on

    def apply(self, table_ms: float, layers: int) -> float:
        return self.a * table_ms + self.b * layers + self.c


@dataclass(frozen=True)
class Check:
    """One model's predicted against measured latency (table units)."""

    name: str
    family: str
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms


@dataclass(frozen=True)
class LatencyTable:
    """The per-layer table of one device, with its fits and how well it predicts."""

    device: str
    mode: str  # how the rows were timed: emulated-on-host | measured-on-device | ...
    runtime: str  # onnxruntime version (and machine) that timed them
    machine: str
    latency_scale: float  # device ms per table ms (1 when timed on the device)
    calibration: str  # declared | measured | none
    channel_multiple: int
    rows: tuple[tuple[LayerKey, float], ...]
    fits: dict[str, Fit] = field(default_factory=dict, hash=False)
    held_out: tuple[Check, ...] = ()  # models the fit never saw
    created: str = ""
    # (total weight MB of a model, extra ms per MB of its weights): the streaming probe.
    streaming: tuple[tuple[float, float], ...] = ()
    profiler_overhead_us: float = 0.0  # subtracted from every node's profiled time

    @property
    def mape(self) -> float | None:
        """Mean absolute percentage error on the held-out reference models."""
        if not self.held_out:
            return None
        return float(np.mean([abs(c.error) for c in self.held_out]) * 100)

    @functools.cached_property
    def _index(self) -> _Index:
        return _Index(self.rows, self.channel_multiple)

    def layer_ms(self, key: LayerKey) -> tuple[float, str | None]:
        """One layer's table time in the table's own ms (as timed, before latency_scale),
        interpolated between rows, and a note when its precision or shape was approximated."""
        return self._index.lookup(key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "device": self.device,
            "mode": self.mode,
            "runtime": self.runtime,
            "machine": self.machine,
            "latency_scale": self.latency_scale,
            "calibration": self.calibration,
            "channel_multiple": self.channel_multiple,
            "created": self.created,
            "fits": {k: dataclasses.asdict(v) for k, v in self.fits.items()},
            "held_out": [dataclasses.asdict(c) for c in self.held_out],
            "mape_percent": self.mape,
            "streaming": [list(p) for p in self.streaming],
            "profiler_overhead_us": self.profiler_overhead_us,
            "rows": [{**dataclasses.asdict(k), "ms": ms} for k, ms in self.rows],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if data.get("format") != FORMAT:
            raise MeasureError(
                f"latency table format {data.get('format')!r} is not {FORMAT}; "
                "run `edgecompress profile` again to rebuild it"
            )
        key_fields = {f.name for f in dataclasses.fields(LayerKey)}
        rows = tuple(
            (LayerKey(**{k: v for k, v in row.items() if k in key_fields}), float(row["ms"]))
            for row in data["rows"]
        )
        return cls(
            device=data["device"],
            mode=data["mode"],
            runtime=data["runtime"],
            machine=data["machine"],
            latency_scale=float(data["latency_scale"]),
            calibration=data["calibration"],
            channel_multiple=int(data["channel_multiple"]),
            rows=rows,
            fits={k: Fit(**v) for k, v in data.get("fits", {}).items()},
            held_out=tuple(Check(**c) for c in data.get("held_out", [])),
            created=data.get("created", ""),
            streaming=tuple((float(a), float(b)) for a, b in data.get("streaming", [])),
            profiler_overhead_us=float(data.get("profiler_overhead_us", 0.0)),
        )


def save_table(table: LatencyTable, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(table.to_dict(), indent=1))
    os.replace(tmp, path)
    return path


def load_table(path: str | Path) -> LatencyTable:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise MeasureError(f"cannot read latency table {path}: {err.strerror}") from None
    except json.JSONDecodeError:
        raise MeasureError(f"latency table {path} is not valid JSON; rebuild it") from None
    try:
        return LatencyTable.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise MeasureError(f"latency table {path} is malformed ({err}); rebuild it") from None


def row_ms(key: LayerKey, nodes: Sequence[Sequence[Any]], overhead_us: float = 0.0) -> float:
    """A row's milliseconds from a lone layer's per-node times (us): layout nodes left
    out, and from each node what the profiler itself adds to a kernel's time."""
    keep = [t for _name, op, t in nodes if op not in LAYOUT_OPS or key.op == "Transpose"]
    # The overhead is itself a noisy timing: never let it take a real kernel to zero (a
    # zero row would make that layer free to the search); keep at least 5% of its time.
    return float(sum(max(0.05 * t, t - overhead_us) for t in keep)) / 1000.0


# ---------------------------------------------------------------- interpolation


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear; flat below the first point, proportional beyond the last."""
    if len(xs) == 1:
        return ys[0] * (x / xs[0] if x > xs[0] else 1.0)
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    i = bisect.bisect_right(xs, x) - 1
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


def _interp_rows(rows: dict[float, Callable[[], float]], x: float) -> float:
    """Interpolate between the two rows bracketing x (each row evaluated lazily)."""
    xs = sorted(rows)
    if len(xs) == 1 or x <= xs[0]:
        return rows[xs[0]]() * (x / xs[0] if len(xs) == 1 and x > xs[0] else 1.0)
    if x >= xs[-1]:
        return rows[xs[-1]]() * x / xs[-1]
    i = bisect.bisect_right(xs, x) - 1
    lo, hi = rows[xs[i]](), rows[xs[i + 1]]()
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return lo + t * (hi - lo)


def _pad(channels: int, multiple: int) -> int:
    """Channels as SIMD kernels see them: rounded up to the channel multiple."""
    if channels <= multiple:
        return channels
    return -(-channels // multiple) * multiple


Curve = tuple[list[float], list[float]]  # xs ascending, ys


def _curve(points: list[tuple[float, float]]) -> Curve:
    """Sorted by x; repeated x averaged."""
    grouped: dict[float, list[float]] = defaultdict(list)
    for x, y in points:
        grouped[float(x)].append(y)
    xs = sorted(grouped)
    return xs, [sum(grouped[x]) / len(grouped[x]) for x in xs]


def _at(curve: Curve, x: float) -> float:
    return _interp(curve[0], curve[1], x)


def _rows_at(rows: dict[float, Curve], x: float, y: float) -> float:
    """Interpolate in x between row curves, each evaluated at y."""
    return _interp_rows({k: functools.partial(_at, curve, y) for k, curve in rows.items()}, x)


class _Index:
    """Rows grouped into interpolation curves; built once per table."""

    def __init__(self, rows: Sequence[tuple[LayerKey, float]], multiple: int) -> None:
        self.multiple = multiple
        dense: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        depthwise: dict = defaultdict(lambda: defaultdict(list))
        gemm: dict = defaultdict(lambda: defaultdict(list))
        other: dict = defaultdict(list)
        for key, ms in rows:
            if key.op == "Conv" and key.depthwise:
                depthwise[(key.wprec, key.aprec, key.kernel, key.stride)][key.size].append((key.cin, ms))
            elif key.op == "Conv":
                category = (key.wprec, key.aprec, key.kernel, key.stride)
                dense[category][key.size][key.cin].append((key.cout, ms))
            elif key.op in ("Gemm", "MatMul"):
                gemm[(key.wprec, key.aprec)][key.cin].append((key.cout, ms))
            else:
                other[(key.op, key.aprec, key.kernel, key.stride)].append((key.elements, ms))
        # dense conv: (wprec, aprec, kernel, stride) -> pixels -> cin -> curve over cout
        self.dense = {
            cat: {
                float(size * size): {float(c): _curve(p) for c, p in by_cin.items()}
                for size, by_cin in v.items()
            }
            for cat, v in dense.items()
        }
        # depthwise conv: (wprec, aprec, kernel, stride) -> pixels -> curve over channels
        self.depthwise = {
            cat: {float(size * size): _curve(p) for size, p in v.items()} for cat, v in depthwise.items()
        }
        # gemm: (wprec, aprec) -> cin -> curve over cout
        self.gemm = {cat: {float(c): _curve(p) for c, p in v.items()} for cat, v in gemm.items()}
        # others: (op, aprec, kernel, stride) -> curve over elements
        self.other = {cat: _curve(p) for cat, p in other.items()}

    # Each lookup returns (ms, note) where note says what was approximated, or None.

    def lookup(self, key: LayerKey) -> tuple[float, str | None]:
        if key.op == "Conv":
            return self._conv(key)
        if key.op in ("Gemm", "MatMul"):
            return self._gemm(key)
        return self._other(key)

    def _category(self, table: dict, key: LayerKey, extra: tuple = ()) -> tuple[tuple, str | None] | None:
        """The precision category to use: the key's own, else the nearest one, said."""
        wanted = (key.wprec, key.aprec, *extra)
        if wanted in table:
            return wanted, None
        quantized = key.aprec != "fp32"
        candidates = [k for k in table if (k[1] != "fp32") == quantized and k[2:] == extra]
        candidates = candidates or [k for k in table if k[2:] == extra]
        if not candidates:
            return None
        k = candidates[0]
        return k, f"{key.op} {key.wprec}/{key.aprec} not in the table; used {k[0]}/{k[1]}"

    def _conv(self, key: LayerKey) -> tuple[float, str | None]:
        table = self.depthwise if key.depthwise else self.dense
        found = self._category(table, key, (key.kernel, key.stride))
        if found is not None:
            category, note = found
            return self._conv_at(table[category], key), note
        # Another kernel or stride: the nearest shape this table has, scaled by work.
        shapes = [k for k in table if (k[1] != "fp32") == (key.aprec != "fp32")] or list(table)
        if not shapes:
            return self._unknown(key)
        best = min(shapes, key=lambda k: (abs(k[2] - key.kernel), abs(k[3] - key.stride)))
        proxy = dataclasses.replace(key, kernel=best[2], stride=best[3])
        ms = self._conv_at(table[best], proxy) * _work(key) / _work(proxy)
        return ms, f"Conv k{key.kernel}/s{key.stride} scaled from k{best[2]}/s{best[3]} rows"

    def _conv_at(self, by_pixels: dict, key: LayerKey) -> float:
        pixels = float(key.size * key.size)
        if key.depthwise:
            c = _pad(key.cin, self.multiple)
            return _interp_rows(
                {px: functools.partial(_at, curve, c) for px, curve in by_pixels.items()}, pixels
            )
        groups = max(1, key.groups)
        cin, cout = _pad(key.cin // groups, self.multiple), _pad(key.cout // groups, self.multiple)
        per_size = {px: functools.partial(_rows_at, rows, cin, cout) for px, rows in by_pixels.items()}
        return _interp_rows(per_size, pixels) * groups

    def _gemm(self, key: LayerKey) -> tuple[float, str | None]:
        found = self._category(self.gemm, key)
        if found is None:
            return self._unknown(key)
        category, note = found
        # Several rows (a MatMul over pixels) cost like that many single-row products.
        ms = _rows_at(self.gemm[category], _pad(key.cin, self.multiple), key.cout)
        return ms * key.size**2, note

    def _other(self, key: LayerKey) -> tuple[float, str | None]:
        wanted = (key.op, key.aprec, key.kernel, key.stride)
        if wanted in self.other:
            return _at(self.other[wanted], key.elements), None
        same_op = [k for k in self.other if k[0] == key.op and k[1] == key.aprec]
        same_op = same_op or [k for k in self.other if k[0] == key.op]
        if not same_op:
            return self._unknown(key)
        best = min(same_op, key=lambda k: (abs(k[2] - key.kernel), abs(k[3] - key.stride)))
        note = None if best[1] == key.aprec else f"{key.op} {key.aprec} from {best[1]} rows"
        return _at(self.other[best], key.elements), note

    def _unknown(self, key: LayerKey) -> tuple[float, str | None]:
        """An op the table lacks costs like an elementwise op over its tensor."""
        fallback = [k for k in self.other if k[0] == ELEMENTWISE_FALLBACK]
        if not fallback:
            return 0.0, f"{key.op}: no table row and no fallback; counted as 0"
        ms = _at(self.other[fallback[0]], key.elements)
        return ms, f"{key.op} not in the table; costed as an elementwise op"


def _work(key: LayerKey) -> float:
    return float(key.macs + key.elements)


# ---------------------------------------------------------------- prediction


_WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "uint8": 1, "int4": 0.5, "uint4": 0.5}


def weight_mb(layers: Sequence[Layer]) -> float:
    """Megabytes of weights the layers read per inference, in their stored precision."""
    total = sum(layer.params * _WEIGHT_BYTES.get(layer.key.wprec, 4) for layer in layers)
    return total / 2**20


def streaming_ms(layers: Sequence[Layer], table: LatencyTable) -> float:
    """What streaming the model's weights from memory adds, from the table's probe."""
    if not table.streaming:
        return 0.0
    mb = weight_mb(layers)
    # Below the smallest probe the cost per MB falls off linearly to nothing at 0 MB
    # (rather than jumping from 0 to the first probe's figure).
    points = [(0.0, 0.0), *sorted(table.streaming)]
    per_mb = _interp([p[0] for p in points], [p[1] for p in points], mb)
    if mb > points[-1][0]:
        per_mb = points[-1][1]  # fully streamed: no more per MB beyond the probe
    return max(per_mb, 0.0) * mb


def node_count(layers: Sequence[Layer]) -> int:
    """Layers that are nodes of their own (a fused activation's pass, "Conv+Clip", is not)."""
    return sum(1 for layer in layers if "+" not in layer.key.op)


def family(layers: Sequence[Layer]) -> str:
    """fp32 or int8: which fit applies (int8 when any weighted layer runs in int8)."""
    weighted = [layer for layer in layers if layer.key.op in ("Conv", "Gemm", "MatMul")]
    return "int8" if any(layer.key.aprec != "fp32" for layer in weighted) else "fp32"


@dataclass(frozen=True)
class Prediction:
    """A predicted latency with its per-layer breakdown (device ms)."""

    ms: float
    family: str
    layers: tuple[tuple[Layer, float], ...]
    approximations: tuple[str, ...]


def explain_latency(model_or_path: Any, table: LatencyTable) -> Prediction:
    """Predicted device latency of a whole model and what each layer contributes."""
    layers = describe(model_or_path)
    index = table._index
    parts, notes = [], []
    for layer in layers:
        ms, note = index.lookup(layer.key)
        parts.append((layer, ms))
        if note and note not in notes:
            notes.append(note)
    name = family(layers)
    fit = table.fits.get(name) or table.fits.get("fp32") or Fit(1.0, 0.0, 0.0, 0)
    total = sum(ms for _layer, ms in parts) + streaming_ms(layers, table)
    predicted = max(fit.apply(total, node_count(layers)), 0.0)
    # Per-layer shares scaled so that they add up to the prediction.
    share = predicted / total if total > 0 else 0.0
    scale = table.latency_scale
    return Prediction(
        ms=predicted * scale,
        family=name,
        layers=tuple((layer, ms * share * scale) for layer, ms in parts),
        approximations=tuple(notes),
    )


def predict_latency(model_or_path: Any, table: LatencyTable | str | Path) -> float:
    """Predicted device latency (ms) of an ONNX model (path or ModelProto) from the table."""
    if not isinstance(table, LatencyTable):
        table = load_table(table)
    return explain_latency(model_or_path, table).ms


# ---------------------------------------------------------------- fitting


def fit_family(sums: Sequence[float], counts: Sequence[int], measured: Sequence[float]) -> Fit:
    """Fit ms = a x sum + b x layers + c by least squares in relative error.

    a near 1 means the lone-layer kernel times hold inside a model; b is per-layer
    dispatch less what the profiler adds to each kernel's time; c the session's fixed
    cost. With fewer than four models, or when the full fit leaves 0.5 <= a <= 2 (timing
    noise in a few reference models), a is held at 1 and only b and c are fitted.
    """
    s = np.asarray(sums, float)
    n = np.asarray(counts, float)
    y = np.asarray(measured, float)
    weights = 1.0 / np.maximum(y, 1e-9)  # relative error: small models count as much

    def solve(design: np.ndarray, target: np.ndarray) -> np.ndarray:
        return np.linalg.lstsq(design * weights[:, None], target * weights, rcond=None)[0]

    if len(y) >= 4:
        a, b, c = solve(np.column_stack([s, n, np.ones_like(n)]), y)
        if 0.5 <= a <= 2.0:
            return Fit(float(a), float(b), float(c), len(y))
    if len(y) >= 3:
        b, c = solve(np.column_stack([n, np.ones_like(n)]), y - s)
        return Fit(1.0, float(b), float(c), len(y))
    if len(y) == 2:
        return Fit(1.0, 0.0, float(np.mean(y - s)), 2)
    if len(y) == 1 and s[0] > 0:
        return Fit(float(y[0] / s[0]), 0.0, 0.0, 1)
    return Fit(1.0, 0.0, 0.0, len(y))


def table_sum(model_or_path: Any, table: LatencyTable) -> tuple[float, int, str]:
    """(sum of the rows of its layers, number of layers, family) in table units."""
    layers = describe(model_or_path)
    index = table._index
    total = sum(index.lookup(layer.key)[0] for layer in layers) + streaming_ms(layers, table)
    return total, node_count(layers), family(layers)


def mape(checks: Sequence[Check]) -> float:
    return float(np.mean([abs(c.error) for c in checks]) * 100) if checks else float("nan")
