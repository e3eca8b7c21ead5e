"""Scoring one candidate: plan -> apply (with BN recalibration) -> export -> accuracy -> measure.

`CandidateScorer` is the environments' scorer. Each heavy step is a callable it is
given, so the pipeline wires in compress/, export, evaluate and measure, and a test can
wire the same real functions on a tiny model. Accuracy is read from the exported ONNX
file in onnxruntime, on the held-out split: the reward is about the file that ships.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.search.record import Outcome

log = logging.getLogger(__name__)

ToPlan = Callable[[Mapping[str, Any]], Any]  # decisions -> CompressionPlan
Apply = Callable[[Any, Any], Any]  # (torch module, plan) -> new torch module
Export = Callable[[Any, Any, Path], Path]  # (module, plan, path) -> written .onnx
Accuracy = Callable[[Path], float]  # .onnx -> held-out top-1 (%)
Measure = Callable[[Path], Any]  # .onnx -> edgecompress.measure.Measurement


def measurement_record(m: Any) -> dict[str, Any]:
    """The provenance and spread of a Measurement, as the candidate and the report keep it."""
    latency = getattr(m, "latency", None)
    raw = getattr(m, "raw", None)
    return {
        "device": m.device,
        "mode": m.mode,
        "calibration_source": m.calibration,
        "latency_scale": m.latency_scale,
        "statistic": m.statistic,
        "status": m.status,
        "latency_p90_ms": latency.p90 if latency is not None else None,
        "latency_cv": latency.cv if latency is not None else None,
        "raw_latency_ms": raw.pick(m.statistic) if raw is not None else None,
        "fits_memory": m.fits_memory,
        "cores_used": m.cores_used,
        "cached": bool(getattr(m, "cached", False)),
        "notes": list(m.notes),
    }


def figures_of(m: Any) -> dict[str, float | None]:
    """Device latency (ms), peak memory (MB) and file size (KB) of a Measurement."""
    return {
        "latency_ms": m.latency_ms,
        "memory_mb": m.peak_memory_mb,
        "size_kb": m.file_bytes / 1024,
    }


@dataclass
class CandidateScorer:
    """Evaluates decisions into an Outcome; the exported file is left at `last_onnx`."""

    base: Any  # the torch module every plan applies to (never modified)
    to_plan: ToPlan
    apply: Apply
    export: Export
    accuracy: Accuracy
    measure: Measure
    workdir: Path

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.last_plan: Any = None

    @property
    def last_onnx(self) -> Path:
        return self.workdir / "candidate.onnx"

    def build(self, decisions: Mapping[str, Any]) -> tuple[Any, Any]:
        """The plan and the compressed model of a candidate (`apply` recalibrates BatchNorm)."""
        plan = self.to_plan(decisions)
        return plan, self.apply(self.base, plan)

    def __call__(self, decisions: Mapping[str, Any], measure: bool = True) -> Outcome:
        started = time.perf_counter()
        plan, module = self.build(decisions)
        path = self.export(module, plan, self.last_onnx)
        self.last_plan = plan
        accuracy = float(self.accuracy(path))
        size_kb = path.stat().st_size / 1024
        if not measure:
            return Outcome(accuracy, math.nan, size_kb=size_kb, seconds=time.perf_counter() - started)
        m = self.measure(path)
        return Outcome(
            accuracy=accuracy,
            flops=math.nan,  # the environment counts FLOPs from the structure
            **figures_of(m),
            measurement=measurement_record(m),
            seconds=time.perf_counter() - started,
        )
