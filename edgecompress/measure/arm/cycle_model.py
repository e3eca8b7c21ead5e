"""From instruction counts to an estimated latency on the profile's core, and back.

    ms = (sum over classes of count x cycles per instruction) / clock
         + memory_scale x bytes touched / memory bandwidth

A linear model on purpose: its per-class weights (and the memory scale) are what a
least-squares fit to board measurements (`edgecompress profile --remote`) replaces, and
a fitted model is used exactly like a declared one. The declared weights come from
cores.py (Arm's optimization guides; see there) or the profile's `calibration.arm`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from edgecompress.errors import ProfileError
from edgecompress.measure.arm.cores import CLASSES, core_for


@dataclass(frozen=True)
class LatencyEstimate:
    """An estimated latency and its two terms, in milliseconds."""

    ms: float
    compute_ms: float
    memory_ms: float
    cycles: float  # compute cycles


@dataclass(frozen=True)
class CycleModel:
    """Cycles per instruction class on one core, its clock and memory bandwidth."""

    core: str
    clock_ghz: float
    bandwidth_gbps: float
    cycles: Mapping[str, float]
    memory_scale: float = 1.0
    source: str = "declared"  # declared | measured
    note: str = ""

    def compute_cycles(self, by_class: Mapping[str, int]) -> float:
        return float(sum(by_class.get(c, 0) * self.cycles[c] for c in CLASSES))

    def estimate(self, by_class: Mapping[str, int], bytes_touched: int) -> LatencyEstimate:
        cycles = self.compute_cycles(by_class)
        compute_ms = cycles / (self.clock_ghz * 1e6)
        memory_ms = self.memory_scale * bytes_touched / (self.bandwidth_gbps * 1e6)
        return LatencyEstimate(compute_ms + memory_ms, compute_ms, memory_ms, cycles)

    def calibration_block(self) -> dict[str, Any]:
        """This model as the profile's `calibration.arm` mapping (YAML-ready)."""
        return {
            "source": self.source,
            "cycles": {c: round(float(self.cycles[c]), 4) for c in CLASSES},
            "memory_scale": round(float(self.memory_scale), 4),
            "note": self.note,
        }


def model_for(
    core: str,
    clock_ghz: float,
    bandwidth_gbps: float,
    calibration: Mapping[str, Any] | None = None,
) -> CycleModel:
    """The cycle model of a profile: the core's declared weights, overridden by the
    profile's `calibration.arm` (keys: cycles, memory_scale, source, note)."""
    spec = core_for(core)
    block = dict(calibration or {})
    unknown = set(block) - {"cycles", "memory_scale", "source", "note"}
    if unknown:
        raise ProfileError(
            f"calibration.arm has unknown keys {', '.join(sorted(unknown))}; "
            "allowed: cycles, memory_scale, source, note"
        )
    cycles = dict(spec.cycles)
    for name, value in dict(block.get("cycles") or {}).items():
        if name not in CLASSES:
            raise ProfileError(
                f"calibration.arm.cycles has unknown class {name!r}; choose from: " + ", ".join(CLASSES)
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ProfileError(f"calibration.arm.cycles.{name} must be a number >= 0, got {value!r}")
        cycles[name] = float(value)
    scale = block.get("memory_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        raise ProfileError(f"calibration.arm.memory_scale must be a number >= 0, got {scale!r}")
    source = block.get("source", "declared")
    if source not in ("declared", "measured"):
        raise ProfileError(f"calibration.arm.source must be declared or measured, got {source!r}")
    note = str(block.get("note") or f"declared cycles per instruction: {spec.source}")
    return CycleModel(
        core=spec.name,
        clock_ghz=float(clock_ghz),
        bandwidth_gbps=float(bandwidth_gbps),
        cycles=MappingProxyType(cycles),
        memory_scale=float(scale),
        source=source,
        note=note,
    )


@dataclass(frozen=True)
class Sample:
    """One reference graph: its counts on the core, bytes touched, and the board's ms."""

    by_class: Mapping[str, int]
    bytes_touched: int
    measured_ms: float


@dataclass(frozen=True)
class Fit:
    """A fitted cycle model and how well it explains the measurements it came from."""

    model: CycleModel
    relative_rms: float  # rms of (predicted - measured) / measured over the samples
    max_relative_error: float
    samples: int


def fit_cycle_weights(samples: Sequence[Sample], prior: CycleModel, *, ridge: float = 1e-3) -> Fit:
    """Least-squares per-class cycle weights (and memory scale) from board timings.

    Minimizes the relative error of predicted against measured ms, with every weight
    kept >= 0 and pulled gently (`ridge`) towards the prior's: a class the samples do
    not exercise (an instruction the core never ran) keeps its declared weight instead
    of an arbitrary one. The result is marked `measured`.
    """
    if not samples:
        raise ValueError("fitting cycle weights needs at least one (counts, ms) sample")
    if any(s.measured_ms <= 0 for s in samples):
        raise ValueError("measured latencies must be positive")
    hz_per_ms = prior.clock_ghz * 1e6  # cycles per millisecond
    # Unknowns: one weight per class, then the memory scale; target: measured cycles.
    columns = [[float(s.by_class.get(c, 0)) for c in CLASSES] for s in samples]
    memory = [s.bytes_touched / (prior.bandwidth_gbps * 1e6) * hz_per_ms for s in samples]
    design = np.array([row + [m] for row, m in zip(columns, memory, strict=True)])
    target = np.array([s.measured_ms * hz_per_ms for s in samples])
    # Relative errors: each sample's row divided by its own target.
    design_rel = design / target[:, None]
    prior_w = np.array([prior.cycles[c] for c in CLASSES] + [prior.memory_scale])
    scale = np.sqrt((design_rel**2).mean(axis=0))
    scale[scale == 0] = 1.0
    penalty = np.sqrt(ridge) * np.diag(scale)
    a = np.vstack([design_rel, penalty])
    b = np.concatenate([np.ones(len(samples)), penalty @ prior_w])
    weights = nnls(a, b)
    predicted = design @ weights
    errors = (predicted - target) / target
    model = CycleModel(
        core=prior.core,
        clock_ghz=prior.clock_ghz,
        bandwidth_gbps=prior.bandwidth_gbps,
        cycles=MappingProxyType({c: float(w) for c, w in zip(CLASSES, weights[:-1], strict=True)}),
        memory_scale=float(weights[-1]),
        source="measured",
        note=(
            f"least-squares fit to {len(samples)} board measurements "
            f"(relative rms error {float(np.sqrt((errors**2).mean())):.1%})"
        ),
    )
    return Fit(
        model=model,
        relative_rms=float(np.sqrt((errors**2).mean())),
        max_relative_error=float(np.abs(errors).max()),
        samples=len(samples),
    )


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares, min ||a x - b|| with x >= 0 (Lawson and Hanson).

    numpy has no NNLS and the measuring layer stays on numpy (no scipy on a board).
    """
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    gradient = a.T @ (b - a @ x)
    tolerance = 10 * np.finfo(float).eps * np.linalg.norm(a, 1) * max(m, n)
    for _ in range(max_iter or 3 * n):
        if passive.all() or (gradient[~passive] <= tolerance).all():
            break
        candidates = np.where(~passive, gradient, -np.inf)
        passive[int(np.argmax(candidates))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            # Step back to the boundary and drop the variables that hit zero.
            blocked = passive & (z <= 0)
            alpha = np.min(x[blocked] / (x[blocked] - z[blocked]))
            x = x + alpha * (z - x)
            passive &= x > tolerance
            x[~passive] = 0.0
        gradient = a.T @ (b - a @ x)
    return x
