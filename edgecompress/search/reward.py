"""Budgets, their checks, and the search reward from measured figures and held-out accuracy.

The reward follows AMC's resource-constrained form: with budgets kept by construction
the agent is paid for accuracy (as a fraction), and a measured figure that still misses
its budget (the prediction was off) costs in proportion to how far it misses. With only
a maximum accuracy drop, it is paid for speed (-log of the measured latency relative to
the baseline) and charged per point of drop beyond the allowance. With neither, it is
AMC's -error * log(cost). The FLOPs-only mode, for comparison, puts FLOPs where the
measured latency and memory go (their budgets become FLOPs budgets in proportion to the
baseline); the file size is exact without measuring and stays as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from edgecompress.errors import UsageError

UNITS = {"latency_ms": "ms", "memory_mb": "MB", "size_kb": "KB"}
LABELS = {"latency_ms": "latency", "memory_mb": "peak memory", "size_kb": "file size"}
MODES = ("measured", "flops")
TIMED = ("latency_ms", "memory_mb")  # what FLOPs mode replaces by FLOPs (file size is known exactly)
OVER_BUDGET_WEIGHT = 2.0
ACCURACY_DROP_WEIGHT = 1.0  # per point of top-1 beyond the allowed drop


@dataclass(frozen=True)
class Budgets:
    """Limits on the compressed model; any combination, None where there is none."""

    latency_ms: float | None = None
    memory_mb: float | None = None
    size_kb: float | None = None
    max_accuracy_drop: float | None = None  # points of top-1 against the given model

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is not None and (not math.isfinite(value) or value < 0):
                raise UsageError(f"--{key.replace('_', '-')} must be a positive number, got {value}")
            if value is not None and value == 0 and key != "max_accuracy_drop":
                raise UsageError(f"--{key.replace('_', '-')} must be above zero")

    def resources(self) -> dict[str, float]:
        """The resource budgets that are set (latency, memory, size)."""
        return {k: v for k, v in asdict(self).items() if k in UNITS and v is not None}

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def check(
    budgets: Budgets,
    figures: Mapping[str, Any],
    baseline_accuracy: float | None = None,
    estimate: bool = False,
) -> list[dict[str, Any]]:
    """One record per set budget: the limit, the figure, and whether it is met."""
    rows = []
    for key, limit in budgets.resources().items():
        value = figures.get(key)
        rows.append(
            {
                "name": LABELS[key],
                "key": key,
                "budget": limit,
                "measured": value,
                "unit": UNITS[key],
                "met": value is not None and value <= limit,
                "estimate": estimate and key != "size_kb",
            }
        )
    if budgets.max_accuracy_drop is not None and baseline_accuracy is not None:
        drop = baseline_accuracy - float(figures.get("accuracy", 0.0))
        rows.append(
            {
                "name": "accuracy drop",
                "key": "max_accuracy_drop",
                "budget": budgets.max_accuracy_drop,
                "measured": round(drop, 4),
                "unit": "points",
                "met": drop <= budgets.max_accuracy_drop,
                "estimate": False,
            }
        )
    return rows


def all_met(budgets: Budgets, figures: Mapping[str, Any]) -> bool:
    """Whether every resource budget is met by these figures."""
    return all(row["met"] for row in check(budgets, figures))


def _excess(value: Any, limit: float) -> float:
    """How far a figure is over its limit, relatively; a figure that could not be taken
    (the model did not fit the device's memory) counts as twice the limit."""
    if value is None or not math.isfinite(float(value)):
        return 1.0
    return max(0.0, float(value) / limit - 1.0)


def over_budget(
    figures: Mapping[str, Any], baseline: Mapping[str, Any], budgets: Budgets, mode: str = "measured"
) -> float:
    """How far the figures are over their budgets, summed relatively (0: every budget kept).

    In FLOPs mode latency and memory budgets become FLOPs budgets in proportion to the
    baseline: that mode never looks at a measured latency.
    """
    total = 0.0
    for key, limit in budgets.resources().items():
        if mode == "flops" and key in TIMED:
            if not baseline.get(key):
                continue
            key, limit = "flops", float(baseline["flops"]) * limit / float(baseline[key])
        total += _excess(figures.get(key), limit)
    return total


def reward(
    figures: Mapping[str, Any],
    baseline: Mapping[str, Any],
    budgets: Budgets,
    mode: str = "measured",
) -> float:
    """The episode's reward: accuracy, less penalties for missed budgets (see module doc)."""
    if mode not in MODES:
        raise UsageError(f"unknown reward mode {mode!r}; choose one of: {', '.join(MODES)}")
    accuracy = float(figures["accuracy"]) / 100.0
    drop = float(baseline["accuracy"]) - float(figures["accuracy"])
    resources = budgets.resources()
    cost_key = "flops" if mode == "flops" else "latency_ms"
    if resources:
        value = accuracy - OVER_BUDGET_WEIGHT * over_budget(figures, baseline, budgets, mode)
    elif budgets.max_accuracy_drop is not None:
        # Fastest model within the allowed drop: pay for every halving of the cost.
        value = -math.log(max(float(figures[cost_key]) / float(baseline[cost_key]), 1e-9))
    else:
        # AMC's unconstrained trade-off, -error * log(cost); cost in microseconds or FLOPs.
        cost = float(figures[cost_key]) * (1000.0 if cost_key == "latency_ms" else 1.0)
        value = -(1.0 - accuracy) * math.log(max(cost, 1.0) + 1.0)
    if budgets.max_accuracy_drop is not None:
        value -= ACCURACY_DROP_WEIGHT * max(0.0, drop - budgets.max_accuracy_drop)
    return float(value)
