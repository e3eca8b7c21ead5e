"""A search stage wired to the real pieces: plans, compress.apply, export, accuracy, measure.

`StageContext` holds what every stage shares (device profile, measuring function,
held-out and calibration images, budgets); `build_stage` returns the environment of
one stage on one model, with its cost model anchored to measured models. The plan of a
candidate is the stage's template plan plus the environment's decisions.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.compress.api import analyze_model, apply, compressed_onnx
from edgecompress.compress.plan import CompressionPlan, GroupPlan, LayerPlan
from edgecompress.data import Dataset
from edgecompress.evaluate import evaluate
from edgecompress.export import save_onnx
from edgecompress.search.costs import FLOAT_BITS, Config, CostModel, Shape
from edgecompress.search.env import PruningEnv, QuantizationEnv, SearchEnv
from edgecompress.search.reward import Budgets
from edgecompress.search.scoring import CandidateScorer
from edgecompress.search.structure import LayerInfo, Structure, from_graph
from edgecompress.zoo import LoadedModel

log = logging.getLogger(__name__)

Measure = Callable[[Path], Any]
# Relative headroom the budget wall keeps at least, per figure: the spread of repeated
# measurements on this machine (latency), and the file overhead a plan cannot see (size).
BOUNDARY_HOST_MS = 0.003
MIN_MARGINS = {"latency_ms": 0.03, "memory_mb": 0.03, "size_kb": 0.01}


def index_bits(clusters: int) -> int:
    """Bits per stored index: the file packs them as UINT2, UINT4 or UINT8 (compress/sharing)."""
    return 2 if clusters <= 4 else 4 if clusters <= 16 else 8


def stored_weight_bytes(layer: LayerInfo, shape: Shape, bits: int, clusters: int | None) -> float:
    """Bytes a layer's weights take in the file, as compress/rewrite writes them."""
    bias = shape.out_channels * 4
    if clusters:
        return shape.params * index_bits(clusters) / 8 + clusters * 4 + bias
    if bits >= FLOAT_BITS:
        return shape.params * 4.0
    return shape.params * bits / 8 + shape.out_channels * 4 + bias  # packed ints, scales


def table_latency(table: Any, activation_dtype: str) -> Callable[[LayerInfo, Shape, int, str], float]:
    """Per-layer device ms from the profile's latency table (measure/latency_table)."""
    from edgecompress.measure.layers import LayerKey

    def latency(layer: LayerInfo, shape: Shape, bits: int, act: str) -> float:
        int8 = act == "int8" and bits < FLOAT_BITS
        key = LayerKey(
            op="Gemm" if layer.op == "linear" else "Conv",
            # Weight-only layers are folded to float at session start: they run as fp32.
            wprec="int8" if int8 else "fp32",
            aprec=activation_dtype if int8 else "fp32",
            cin=shape.in_channels,
            cout=shape.out_channels,
            size=layer.in_size,
            kernel=layer.kernel,
            stride=layer.stride,
            groups=shape.out_channels if layer.op == "dwconv" else 1,
        )
        return float(table.layer_ms(key)[0]) * float(table.latency_scale)

    return latency


@dataclass
class StageContext:
    """What every stage of one run shares."""

    profile: Any  # DeviceProfile
    measure: Measure
    heldout: Dataset
    calibration: np.ndarray  # uint8 training images: BN statistics and activation ranges
    budgets: Budgets
    workdir: Path
    mode: str = "measured"  # or "flops", the comparison mode
    criterion: str = "l1"
    min_keep: float = 0.2
    bits: tuple[int, ...] = (2, 4, 8)
    clusters: tuple[int, ...] = (4, 16, 256)
    classes: tuple[int, ...] | None = None
    seed: int = 0
    table: Any = None  # LatencyTable or None

    @property
    def activation_dtype(self) -> str:
        fast = self.profile.int8_activations
        return fast if fast in ("uint8", "int8") else "uint8"

    @property
    def int8_available(self) -> bool:
        return self.profile.int8_activations in ("uint8", "int8")

    def template(self, model: LoadedModel) -> CompressionPlan:
        """The plan every candidate starts from: float everywhere; decisions set each layer."""
        return CompressionPlan(
            default=LayerPlan(),
            criterion=self.criterion,
            channel_multiple=self.profile.channel_multiple,
            first_last="same",  # the search decides every layer; the env protects the ends
            activation_dtype=self.activation_dtype,
            classes=self.classes,
            model=model.name,
            seed=self.seed,
        )


def to_plan(decisions: Mapping[str, Any], template: CompressionPlan, structure: Structure) -> CompressionPlan:
    """The CompressionPlan of a candidate: kept channels per group, settings per layer."""
    groups = {}
    scores = decisions.get("scores") or {}
    for g in structure.groups:
        n = int(decisions.get("channels", {}).get(g.name, g.channels))
        if g.name in scores:
            groups[g.name] = GroupPlan(keep_count=n, scores=tuple(float(s) for s in scores[g.name]))
        elif n < g.channels:
            groups[g.name] = GroupPlan(keep_count=n)
    layers = {}
    for name, setting in decisions.get("layers", {}).items():
        bits = int(setting["bits"])
        act = setting["activation"] if bits < FLOAT_BITS else "float"
        layers[name] = LayerPlan(
            weight_bits=bits, activations=act, clusters=int(setting.get("clusters") or 0)
        )
    return replace(template, groups=groups, layers=layers)


def start_config(structure: Structure, precision: LayerPlan) -> Config:
    """Every layer at one precision, every channel kept."""
    n = len(structure.layers)
    return dataclasses.replace(
        Config.full(structure),
        bits=(precision.weight_bits,) * n,
        activation=(precision.activations,) * n,
        clusters=(precision.clusters or None,) * n,
    )


@dataclass
class Stage:
    """One stage ready to search: its environment and what built it."""

    env: SearchEnv
    scorer: CandidateScorer
    structure: Structure
    template: CompressionPlan
    model: LoadedModel


def protected_layers(model: LoadedModel) -> tuple[str, ...]:
    """First and last layer: kept at 8 bits or more and unshared (HAQ's convention)."""
    graph = analyze_model(model)
    return tuple(n for n in (graph.first_layer, graph.output_layer) if n is not None)


def make_scorer(
    ctx: StageContext, model: LoadedModel, template: CompressionPlan, structure: Structure, name: str
) -> CandidateScorer:
    """The scorer of one stage on one model: apply, export, held-out accuracy, measure."""
    spec = model.spec

    def export(compressed: LoadedModel, plan: CompressionPlan, path: Path) -> Path:
        return save_onnx(compressed_onnx(compressed, plan, {}), path, force=True)

    def accuracy(path: Path) -> float:
        return evaluate(path, ctx.heldout, input_spec=spec).top1

    return CandidateScorer(
        base=model,
        to_plan=lambda decisions: to_plan(decisions, template, structure),
        apply=lambda base, plan: apply(base, plan, calibration=ctx.calibration),
        export=export,
        accuracy=accuracy,
        measure=ctx.measure,
        workdir=ctx.workdir / name,
    )


def build_stage(
    ctx: StageContext,
    stage: str,
    model: LoadedModel,
    *,
    precision: LayerPlan,
    baseline: Mapping[str, Any],
    budgets: Budgets | None = None,
) -> Stage:
    """The environment of one stage on `model` (calibrate it with measured anchors next).

    `precision` is every layer's setting at the start (stage 1 measures its candidates
    as they would ship after stage 2's default); `budgets` overrides the run's (stage 1
    may leave part of a reduction to stage 2).
    """
    graph = analyze_model(model)
    structure = from_graph(graph)
    template = ctx.template(model)
    cost = CostModel(
        structure,
        layer_latency=table_latency(ctx.table, ctx.activation_dtype) if ctx.table is not None else None,
        weight_bytes=stored_weight_bytes,
        int8_speed=1.0 if ctx.table is not None else 0.5,  # prior: VNNI/NEON int8 about 2x fp32
        # A Q/DQ pair costs a few microseconds on the host (per-node dispatch dominates
        # at batch 1); the fit replaces this prior once candidates disagree on the count.
        boundary_ms=BOUNDARY_HOST_MS * float(ctx.profile.calibration.latency_scale),
    )
    scorer = make_scorer(ctx, model, template, structure, stage)
    common: dict[str, Any] = {"start": start_config(structure, precision), "mode": ctx.mode}
    budgets = budgets or ctx.budgets
    if stage == "prune":
        env: SearchEnv = PruningEnv(
            structure, cost, scorer, budgets, baseline,
            channel_multiple=ctx.profile.channel_multiple, min_keep=ctx.min_keep, **common,
        )  # fmt: skip
    else:
        env = QuantizationEnv(
            structure, cost, scorer, budgets, baseline, bits=ctx.bits,
            activations=("float", "int8") if ctx.int8_available else ("float",),
            clusters=ctx.clusters or None, protect=protected_layers(model), **common,
        )  # fmt: skip
    return Stage(env, scorer, structure, template, model)
