"""gymnasium environments of the two search stages: pruning, quantization, weight sharing.

One step per coupled channel group (pruning) or per weight layer (quantization,
sharing); the action is a vector in [0, 1] that each knob maps onto its choices, listed
from the most reduced to the least. Before an action is applied it is bounded so the
budgets stay reachable if every later step went to its minimum (AMC's action wall; for
bits it is HAQ's bit lowering done step by step), using the cost model's predictions
with its measured margin. At the last step the candidate is handed to the injected
scorer (apply the plan, recalibrate BN, export, evaluate held-out accuracy, measure on
the device profile) and the reward comes from what was measured (search/reward.py), or
from FLOPs in the comparison mode.

The heavy collaborators are injected, so unit tests run real ones on tiny models.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from edgecompress.search.costs import FIGURES, Config, CostModel, layer_shape
from edgecompress.search.record import Outcome, digest
from edgecompress.search.reward import MODES, TIMED, Budgets, all_met, over_budget, reward
from edgecompress.search.structure import OPS, Structure, channel_choices

Scorer = Callable[[Mapping[str, Any], bool], Outcome]  # (decisions, measure) -> outcome
STATIC_FEATURES = 12
BIT_CHOICES = (2, 3, 4, 5, 6, 7, 8)
CLUSTER_CHOICES = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Knob:
    """One decision per step: which Config field it sets and its choices, most reduced first."""

    field: str  # "channels", "bits", "activation" or "clusters"
    choices: tuple[Any, ...]


class SearchEnv(gym.Env):
    """Shared mechanics of the stage environments: steps, wall, state, scoring, reward."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    stage: ClassVar[str] = "search"

    def __init__(
        self,
        structure: Structure,
        cost: CostModel,
        scorer: Scorer,
        budgets: Budgets,
        baseline: Mapping[str, Any],
        *,
        start: Config | None = None,
        mode: str = "measured",
        margins: Mapping[str, float] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.structure, self.cost, self.scorer = structure, cost, scorer
        self.budgets, self.baseline, self.mode = budgets, dict(baseline), mode
        self.start = start or Config.full(structure)
        self.units = self._units()
        if not self.units:
            raise ValueError(f"the model has nothing for the {self.stage} stage to decide")
        self.knobs = [self._knobs(u) for u in self.units]
        self.action_dim = len(self.knobs[0])
        self.floor = self._at_floor(self.start, 0)
        self.margins = {k: 0.0 for k in FIGURES} | dict(margins or {})
        self.limits = self._limits(self.margins)
        self.memo: dict[str, Outcome] = {}
        self.last_scored: str | None = None  # digest of the candidate the scorer exported last
        # Measured models the cost model is fitted to: the anchors, then each candidate
        # the first time it is met (so a replayed run refits exactly as the original did).
        self.anchor_points: list[tuple[Config, dict[str, Any]]] = []
        self.observed: dict[str, tuple[Config, dict[str, Any]]] = {}
        self.refit = True
        self.scores_source: Callable[[], Mapping[str, Sequence[float]]] | None = None
        self.action_space = gym.spaces.Box(0.0, 1.0, (self.action_dim,), np.float32)
        dim = STATIC_FEATURES + 2 + self.action_dim
        self.observation_space = gym.spaces.Box(0.0, 1.0, (dim,), np.float32)
        self._static = self._static_features()
        self._base_cost = max(self._cost_figure(self.start), 1e-12)
        self._reset_episode()

    # --- what a stage decides ---------------------------------------------------------
    def _units(self) -> list[int]:
        raise NotImplementedError

    def _knobs(self, unit: int) -> list[Knob]:
        raise NotImplementedError

    def _layers_of(self, unit: int) -> list[int]:
        """Indices of the layers a unit's decision changes."""
        raise NotImplementedError

    def _set(self, config: Config, unit: int, knob: Knob, value: Any) -> Config:
        if knob.field == "channels":
            return config.with_group(unit, int(value))
        return config.with_layer(unit, **{knob.field: value})

    # --- gymnasium --------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._reset_episode()
        return self._observation(), {"step": 0}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._t >= len(self.units):
            raise RuntimeError("episode is over; call reset()")
        desired = np.clip(np.asarray(action, np.float64).reshape(-1), 0.0, 1.0)
        unit, applied = self.units[self._t], np.zeros(self.action_dim)
        for j, knob in enumerate(self.knobs[self._t]):
            top = len(knob.choices) - 1
            index = self._wall(unit, j, int(round(desired[j] * top)))
            self._config = self._set(self._config, unit, knob, knob.choices[index])
            applied[j] = index / top if top else 1.0
        self._prev, self._t = applied, self._t + 1
        info: dict[str, Any] = {"applied_action": applied.astype(np.float32)}
        if self._t < len(self.units):
            return self._observation(), 0.0, False, False, info
        record = self.evaluate(self._config)
        info["candidate"] = record
        return self._observation(), float(record["reward"]), True, False, info

    # --- scoring ------------------------------------------------------------------------
    def decisions(self, config: Config) -> dict[str, Any]:
        """The candidate as plain data: kept channels per group, precision per layer."""
        layers = {}
        for i, layer in enumerate(self.structure.layers):
            bits, act, k = config.bits[i], config.activation[i], config.clusters[i]
            if bits < 32 or k or act != "float":
                layers[layer.name] = {"bits": bits, "activation": act, "clusters": k}
        channels = {g.name: config.channels[i] for i, g in enumerate(self.structure.groups)}
        out: dict[str, Any] = {"stage": self.stage, "channels": channels, "layers": layers}
        if self.scores_source is not None:  # learned (DECORE) channel scores pick the channels
            out["scores"] = {k: [round(float(v), 4) for v in s] for k, s in self.scores_source().items()}
        return out

    def rescore(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A record's reward and feasibility under this environment's current baseline and budgets."""
        figures = {k: record.get(k) for k in ("accuracy", "latency_ms", "memory_mb", "size_kb", "flops")}
        return {
            **record,
            "reward": reward(figures, self.baseline, self.budgets, self.mode),
            "feasible": self._feasible(figures, record.get("predicted")),
        }

    def _feasible(self, figures: Mapping[str, Any], predicted: Mapping[str, Any] | None) -> bool:
        """Every budget kept, judged as this mode sees it: FLOPs mode by FLOPs and file
        size only; the measured mode by the measured figures (by prediction until then)."""
        if self.mode == "flops" and self.baseline:
            return over_budget(figures, self.baseline, self.budgets, self.mode) == 0.0
        measured = figures.get("latency_ms") is not None
        return all_met(self.budgets, figures if measured else predicted or figures)

    def config_of(self, decisions: Mapping[str, Any]) -> Config:
        """The configuration a decisions record describes (the inverse of `decisions`)."""
        channels = decisions.get("channels", {})
        layers = decisions.get("layers", {})
        config = self.start
        full = Config.full(self.structure)
        for i, g in enumerate(self.structure.groups):
            config = config.with_group(i, int(channels.get(g.name, g.channels)))
        for i, layer in enumerate(self.structure.layers):
            setting = layers.get(layer.name)
            if setting is None:
                config = config.with_layer(i, bits=full.bits[i], activation="float", clusters=None)
            else:
                config = config.with_layer(
                    i,
                    bits=int(setting["bits"]),
                    activation=setting["activation"],
                    clusters=setting.get("clusters"),
                )
        return config

    def evaluate(self, config: Config, measure: bool | None = None) -> dict[str, Any]:
        """Score a configuration (once: repeats come from the memo) and build its record.

        `measure` overrides the mode (reference models are measured even in FLOPs mode).
        """
        decisions = self.decisions(config)
        key = digest(decisions)
        cached = key in self.memo
        if not cached:
            self.last_scored = key
            started = time.perf_counter()
            outcome = self.scorer(decisions, self.mode == "measured" if measure is None else measure)
            if not outcome.seconds:
                outcome = dataclasses.replace(outcome, seconds=time.perf_counter() - started)
            self.memo[key] = outcome
        predicted = self.cost.predict(config)
        outcome = self.memo[key]
        if outcome.flops is None or not np.isfinite(outcome.flops):
            outcome = dataclasses.replace(outcome, flops=predicted["flops"])
        figures = outcome.figures()
        if key not in self.observed and outcome.latency_ms is not None:
            self.observed[key] = (config, figures)
            if self.refit:
                self.cost.calibrate(self.anchor_points + list(self.observed.values()))
        return {
            "stage": self.stage,
            "digest": key,
            "cached": cached,
            "decisions": decisions,
            **outcome.as_dict(),
            "predicted": {k: round(v, 6) for k, v in predicted.items()},
            "reward": reward(figures, self.baseline, self.budgets, self.mode) if self.baseline else None,
            "feasible": self._feasible(figures, predicted),
        }

    # --- the budget wall -----------------------------------------------------------------
    def _limits(self, margins: Mapping[str, float]) -> dict[str, float]:
        """What the wall holds predictions to: each budget less its margin, and never below
        the predicted floor. AMC's rule assumes the smallest model fits; when the prediction
        says it does not (the anchors measured otherwise), pushing every step to its minimum
        would only make the model worse, so the floor then marks the limit."""
        limits = {}
        floor = self.cost.predict(self.floor) if hasattr(self, "floor") else {}
        for key, value in self.budgets.resources().items():
            if self.mode == "flops" and key in TIMED:
                if not self.baseline.get(key):
                    continue  # no measured baseline yet to turn the budget into FLOPs
                share = value / float(self.baseline[key])
                limits["flops"] = min(limits.get("flops", np.inf), share * self.baseline["flops"])
            else:
                limits[key] = max(value * (1.0 - margins.get(key, 0.0)), floor.get(key, 0.0))
        return limits

    def calibrate(
        self,
        points: Sequence[tuple[Config, Mapping[str, Any]]],
        min_margins: Mapping[str, float] | None = None,
    ) -> None:
        """Fit the cost model to measured models and set the wall's margins from its error."""
        self.anchor_points = [(c, dict(f)) for c, f in points]
        self.cost.calibrate(self.anchor_points)
        # The fit may reorder choices (int8 or float activations: which is faster here).
        self.knobs = [self._knobs(u) for u in self.units]
        self.floor = self._at_floor(self.start, 0)
        self.margins = self.cost.margins(min_margins)
        self.limits = self._limits(self.margins)
        self._base_cost = max(self._cost_figure(self.start), 1e-12)

    def set_budgets(self, budgets: Budgets) -> None:
        """Budgets for this stage's wall and reward (stage 1 may leave part to stage 2)."""
        self.budgets = budgets
        self.limits = self._limits(self.margins)

    def fits(self, config: Config) -> bool:
        """Whether the predicted figures of a configuration keep every budget."""
        if not self.limits:
            return True
        predicted = self.cost.predict(config)
        return all(predicted[k] <= limit for k, limit in self.limits.items())

    def _at_floor(self, config: Config, first: int) -> Config:
        """The configuration with steps from `first` on at their most reduced choices."""
        for t in range(first, len(self.units)):
            for knob in self.knobs[t]:
                config = self._set(config, self.units[t], knob, knob.choices[0])
        return config

    def _wall(self, unit: int, j: int, desired: int) -> int:
        """The largest choice index <= desired that keeps the budgets reachable."""
        if not self.limits:
            return desired
        knobs = self.knobs[self._t]

        def trial(index: int) -> Config:
            config = self._set(self._config, unit, knobs[j], knobs[j].choices[index])
            for later in knobs[j + 1 :]:
                config = self._set(config, unit, later, later.choices[0])
            return self._at_floor(config, self._t + 1)

        if self.fits(trial(desired)):
            return desired
        low, high = 0, desired  # fits(low) is assumed (the floor); high does not fit
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.fits(trial(middle)) else (low, middle)
        return low

    def floor_config(self) -> Config:
        """Every step at its most reduced choice: the smallest candidate this stage can make."""
        return self.floor

    # --- state -----------------------------------------------------------------------
    def _reset_episode(self) -> None:
        self._t = 0
        self._config = self.start
        self._prev = np.ones(self.action_dim)

    def _cost_figure(self, config: Config) -> float:
        if self.mode == "flops":
            return self.cost.predict(config)["flops"]
        return self.cost.predict(config)["latency_ms"]

    def _static_features(self) -> np.ndarray:
        s = self.structure
        raw = []
        layer_cost = [self.cost.raw_layer_latency(i, self.start) for i in range(len(s.layers))]
        total_cost = max(sum(layer_cost), 1e-12)
        total_params, total_flops = max(s.params, 1), max(s.flops, 1)
        for t, unit in enumerate(self.units):
            idx = self._layers_of(unit)
            layers = [s.layers[i] for i in idx]
            ops = [sum(la.op == op for la in layers) / len(layers) for op in OPS]
            raw.append(
                [
                    t / max(1, len(self.units) - 1),
                    *ops,
                    max(la.in_channels for la in layers),
                    max(la.out_channels for la in layers),
                    max(la.kernel for la in layers) / 7.0,
                    max(la.stride for la in layers) / 2.0,
                    max(la.out_size for la in layers),
                    sum(la.params for la in layers) / total_params,
                    sum(la.flops for la in layers) / total_flops,
                    sum(layer_cost[i] for i in idx) / total_cost,
                ]
            )
        table = np.asarray(raw, np.float64)
        for column in (4, 5, 8):  # channels and feature size: relative to the largest
            table[:, column] /= max(table[:, column].max(), 1e-12)
        return np.clip(table, 0.0, 1.0)

    def _observation(self) -> np.ndarray:
        t = min(self._t, len(self.units) - 1)
        reduced = 1.0 - self._cost_figure(self._config) / self._base_cost
        remaining = float(self._static[t + 1 :, 11].sum()) if self._t < len(self.units) else 0.0
        state = np.concatenate([self._static[t], [reduced, remaining], self._prev])
        return np.clip(state, 0.0, 1.0).astype(np.float32)


class PruningEnv(SearchEnv):
    """Stage 1: one step per coupled channel group; the action is its keep ratio."""

    stage = "prune"

    def __init__(
        self,
        structure: Structure,
        cost: CostModel,
        scorer: Scorer,
        budgets: Budgets,
        baseline: Mapping[str, Any],
        *,
        channel_multiple: int = 1,
        min_keep: float = 0.2,
        **kwargs: Any,
    ) -> None:
        self.channel_multiple, self.min_keep = channel_multiple, min_keep
        super().__init__(structure, cost, scorer, budgets, baseline, **kwargs)

    def _units(self) -> list[int]:
        return list(range(len(self.structure.groups)))

    def _knobs(self, unit: int) -> list[Knob]:
        channels = self.structure.groups[unit].channels
        return [Knob("channels", channel_choices(channels, self.channel_multiple, self.min_keep))]

    def _layers_of(self, unit: int) -> list[int]:
        return [
            i
            for i, la in enumerate(self.structure.layers)
            if la.out_group == unit or any(g == unit for g, _ in la.in_segments)
        ]


class QuantizationEnv(SearchEnv):
    """Stage 2: per weight layer, weight bits and activation precision (and clusters)."""

    stage = "quantize"

    def __init__(
        self,
        structure: Structure,
        cost: CostModel,
        scorer: Scorer,
        budgets: Budgets,
        baseline: Mapping[str, Any],
        *,
        bits: Sequence[int] = BIT_CHOICES,
        activations: Sequence[str] = ("float", "int8"),
        clusters: Sequence[int] | None = None,
        protect: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        self.protect = {structure.index(name) for name in protect}
        self.bit_choices = tuple(sorted(bits))
        self.activation_choices = tuple(activations)
        self.cluster_choices = tuple(sorted(clusters)) + (None,) if clusters else None
        super().__init__(structure, cost, scorer, budgets, baseline, **kwargs)

    def _units(self) -> list[int]:
        return list(range(len(self.structure.layers)))

    def _knobs(self, unit: int) -> list[Knob]:
        protected = unit in self.protect  # first/last layer: 8 bits or more, no sharing
        knobs = []
        if self.bit_choices:
            bits = tuple(b for b in self.bit_choices if b >= 8) if protected else self.bit_choices
            knobs.append(Knob("bits", bits or self.bit_choices[-1:]))
        if len(self.activation_choices) > 1:
            knobs.append(Knob("activation", self._activation_order(unit)))
        if self.cluster_choices:
            knobs.append(Knob("clusters", (None,) if protected else self.cluster_choices))
        return knobs

    def _activation_order(self, unit: int) -> tuple[str, ...]:
        """Activation precisions of a layer from the fastest (most reduced) to the slowest."""
        layer = self.structure.layers[unit]
        shape = layer_shape(layer, self.start)
        cost = self.cost
        return tuple(
            sorted(
                self.activation_choices,
                key=lambda act: (cost.layer_latency_of(layer, shape, 8, act), act != "int8"),
            )
        )

    def _layers_of(self, unit: int) -> list[int]:
        return [unit]


class SharingEnv(QuantizationEnv):
    """Weight sharing alone: k-means clusters per layer (weights stay as the plan had them)."""

    stage = "share"

    def __init__(
        self,
        structure: Structure,
        cost: CostModel,
        scorer: Scorer,
        budgets: Budgets,
        baseline: Mapping[str, Any],
        *,
        clusters: Sequence[int] = CLUSTER_CHOICES,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            structure,
            cost,
            scorer,
            budgets,
            baseline,
            bits=(),
            activations=("float",),
            clusters=clusters,
            **kwargs,
        )


ENVIRONMENTS: dict[str, type[SearchEnv]] = {
    "prune": PruningEnv,
    "quantize": QuantizationEnv,
    "share": SharingEnv,
}
