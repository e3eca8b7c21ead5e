"""Pareto plots of every evaluated candidate, as self-contained SVG or PNG bytes.

Matplotlib with the Agg backend (no display needed); the figures are embedded into
report.html inline, so the report is one file that opens anywhere.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STAGE_COLOURS = {"prune": "#1f77b4", "quantize": "#ff7f0e", "repair": "#9467bd"}


def pareto_front(cost: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
    """Indices of the points no other point beats on both lower cost and higher accuracy."""
    c = np.asarray(cost, np.float64)
    a = np.asarray(accuracy, np.float64)
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(a))
    order = ok[np.lexsort((-a[ok], c[ok]))]  # by cost, best accuracy first among ties
    front, best = [], -np.inf
    for i in order:
        if a[i] > best:
            front.append(i)
            best = a[i]
    return np.asarray(front, np.int64)


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(10, 4.2), layout="constrained")


def _value(record: Mapping[str, Any], key: str) -> float:
    v = record.get(key)
    return float(v) if isinstance(v, (int, float)) else float("nan")


def pareto_figure(
    candidates: Sequence[Mapping[str, Any]],
    chosen: Mapping[str, Any] | None,
    baseline: Mapping[str, Any] | None,
    budgets: Mapping[str, Any],
    fmt: str = "svg",
) -> bytes:
    """Held-out accuracy against measured latency and against file size, one panel each."""
    fig = _figure()
    panels = (("latency_ms", "device latency (ms, per the measuring mode)"), ("size_kb", "file size (KB)"))
    for axis, (key, label) in zip(fig.subplots(1, 2), panels, strict=True):
        for stage, colour in STAGE_COLOURS.items():
            rows = [c for c in candidates if c.get("stage") == stage]
            if not rows:
                continue
            x = [_value(r, key) for r in rows]
            y = [_value(r, "accuracy") for r in rows]
            feasible = np.asarray([bool(r.get("feasible", True)) for r in rows])
            xs, ys = np.asarray(x), np.asarray(y)
            axis.scatter(xs[feasible], ys[feasible], s=14, c=colour, alpha=0.7, label=stage)
            if (~feasible).any():
                axis.scatter(
                    xs[~feasible],
                    ys[~feasible],
                    s=14,
                    facecolors="none",
                    edgecolors=colour,
                    alpha=0.7,
                    label=f"{stage} (over budget)",
                )
            front = pareto_front(np.where(feasible, xs, np.nan), ys)
            if len(front):
                axis.step(xs[front], ys[front], where="post", c=colour, lw=0.8, alpha=0.6)
        if baseline:
            axis.scatter(
                [_value(baseline, key)],
                [_value(baseline, "accuracy")],
                marker="s",
                s=50,
                c="black",
                label="baseline",
            )
        if chosen:
            axis.scatter(
                [_value(chosen, key)],
                [_value(chosen, "accuracy")],
                marker="*",
                s=220,
                c="#d62728",
                edgecolors="black",
                zorder=5,
                label="chosen",
            )
        budget = budgets.get(key)
        if isinstance(budget, (int, float)):
            axis.axvline(float(budget), ls="--", c="grey", lw=1, label="budget")
        axis.set_xlabel(label)
        axis.set_ylabel("held-out accuracy (%)")
        axis.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110)
    return buffer.getvalue()
