"""The search side of a compress run: data, device, candidate log, anchors, the two stages.

A `Session` lives in the run folder. Each stage is built on its model (search/stages),
its cost model is fitted to a few measured reference models (anchors: the given model,
the stage's start and its smallest model), a budget that even the smallest model
cannot meet stops the run before any search, and the stage's agent searches with
every candidate logged. The pipeline (edgecompress/pipeline.py) adds fine-tuning,
export, verification and the report around it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecompress.errors import InfeasibleBudgetError, UsageError
from edgecompress.search.options import RunOptions
from edgecompress.search.record import CandidateLog

Progress = Callable[[str, "float | None"], None]
CANDIDATES = "candidates.jsonl"


FIGURE_KEYS = ("accuracy", "latency_ms", "memory_mb", "size_kb", "flops")


def _figures(record: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: record.get(k) for k in FIGURE_KEYS}
    out["measurement"] = record.get("measurement") or {}
    return out


def stage_one_share(
    budgets: Mapping[str, float], start: Mapping[str, Any], floor: Mapping[str, Any], reach: Mapping[str, Any]
) -> dict[str, float]:
    """Stage 1's part of each budget when stage 2 follows.

    With S the model as stage 1 starts it, F its pruning floor and R the floor of both
    stages (all measured), stage 1 can reduce a figure by S/F and stage 2 by about F/R
    more. The reduction the budget B asks for, S/B, is split between them in the same
    proportion in log terms: stage 1 aims at S / (S/B)^w with w = log(S/F) / log(S/R).
    Stage 2 gets the whole budget if pruning cannot help (w = 0), stage 1 does if lower
    precision cannot (w = 1). Latency is shared only when pruning alone cannot meet it:
    whether lower precision runs faster depends on the device's kernels and the model's
    size (the floors can mislead), while fewer bytes per weight are always fewer bytes.
    """
    share = {}
    for key, budget in budgets.items():
        s, f, r = start.get(key), floor.get(key), reach.get(key)
        if not s or not f or not r or s <= budget or s <= r or (key == "latency_ms" and f <= budget):
            share[key] = budget
            continue
        w = min(1.0, max(0.0, math.log(s / min(f, s)) / math.log(s / r)))
        share[key] = max(budget, s / (s / budget) ** w)
    return share


@dataclass
class StageRun:
    """A finished search stage: its environment (for plans and repair) and its best record."""

    stage: Any  # search.stages.Stage
    best: dict[str, Any]
    budgets: Any  # the Budgets its wall kept


class Session:
    """The search side of one compress run in its folder: data, device, candidate log, stages."""

    def __init__(self, out: Path, options: RunOptions, model: Any, token: str | None,
                 progress: Progress | None) -> None:  # fmt: skip
        from edgecompress.compress.plan import LayerPlan
        from edgecompress.data import load_dataset
        from edgecompress.errors import DataError
        from edgecompress.measure import measure
        from edgecompress.profiles import load_profile
        from edgecompress.search.stages import StageContext

        self.out, self.options, self.model, self.progress = out, options, model, progress
        self.profile = load_profile(options.device)
        classes = options.classes
        self.train = load_dataset(options.data, "train", classes)
        self.heldout = load_dataset(options.data, "heldout", classes).take(
            options.heldout_images, options.seed
        )
        try:
            self.test = load_dataset(options.data, "test", classes).take(options.test_images, options.seed)
        except DataError:
            self.test = None
        self.calibration = self.train.take(options.calibration_images, options.seed).x
        self.log = CandidateLog(out / CANDIDATES)
        self.table = None
        if self.profile.latency_table:  # written by `edgecompress profile` beside the profile
            from edgecompress.measure.calibrate import load_latency_table

            self.table = load_latency_table(self.profile)

        def measuring(profile: Any) -> Callable[..., Any]:
            def measure_file(path: Path, use_cache: bool = True) -> Any:
                return measure(path, profile, mode=options.mode, remote=options.remote, token=token,
                               use_cache=use_cache)  # fmt: skip

            return measure_file

        # Candidates are timed over a shorter window than the profile's protocol asks, never
        # extended (the quiet statistic still leaves out disturbed stretches inside it).
        window = min(self.profile.protocol.min_time_s, options.screen_time_s)
        protocol = dataclasses.replace(self.profile.protocol, min_time_s=window, max_time_s=window)
        measure_candidate = measuring(dataclasses.replace(self.profile, protocol=protocol))
        self.measure = measuring(self.profile)
        fast_int8 = self.profile.int8_activations in ("uint8", "int8")
        quantize = "quantize" in options.stages
        # Stage 1 measures its candidates as they would ship after stage 2's default.
        self.precision = LayerPlan(8, "int8" if fast_int8 else "float") if quantize else LayerPlan()
        self.ctx = StageContext(
            profile=self.profile, measure=measure_candidate, heldout=self.heldout,
            calibration=self.calibration,
            budgets=options.budgets(), workdir=out / "work", mode=options.reward, criterion=options.criterion,
            min_keep=options.min_keep, bits=tuple(options.bits), clusters=tuple(options.clusters),
            classes=tuple(classes) if classes else None, seed=options.seed, table=self.table,
        )  # fmt: skip
        self.baseline: dict[str, Any] = {}
        self.stage_budgets: dict[str, dict[str, float]] = {}
        self.notes: list[str] = []
        self.finetunes: dict[str, dict[str, Any]] = {}
        self.best: dict[str, dict[str, Any]] = {}

    # -- helpers ------------------------------------------------------------------------

    def report(self, stage: str, fraction: float | None) -> None:
        if self.progress is not None:
            self.progress(stage, fraction)

    def anchor(self, stage: Any, name: str, config: Any) -> dict[str, Any]:
        """Evaluate (or recall) one reference model of a stage and log it once."""
        record = stage.env.evaluate(config, measure=True)
        # Anchors are measured before the cost model is fitted: their predictions mean nothing.
        record = {
            "id": f"{stage.env.stage}-{name}",
            "episode": -1,
            "anchor": name,
            **record,
            "predicted": None,
        }
        if all(r.get("id") != record["id"] for r in self.log.records):
            self.log.append(record)
        return record

    def compete(self, stage: Any, record: dict[str, Any]) -> None:
        """A reference model is a candidate of its stage too: the search must beat it."""
        from edgecompress.search.loop import better

        name = stage.env.stage
        record = stage.env.rescore(record)
        if better(record, self.best.get(name)):
            self.best[name] = record
            self.keeper(stage)(record, record)

    def keeper(self, stage: Any) -> Callable[[dict[str, Any], dict[str, Any] | None], None]:
        """Keep the best candidate of a stage on disk (its record, plan and ONNX file) as it improves."""
        name = stage.env.stage

        def keep(record: dict[str, Any], best: dict[str, Any] | None) -> None:
            if best is not record or (record["cached"] and record.get("anchor") is None):
                return  # not better, or replayed: the killed run kept it already
            onnx = self.out / f"best-{name}.onnx"
            if record["digest"] == stage.env.last_scored and stage.scorer.last_onnx.exists():
                shutil.copyfile(stage.scorer.last_onnx, self.out / f".best-{name}.onnx")
                (self.out / f".best-{name}.onnx").replace(onnx)
            else:
                onnx.unlink(missing_ok=True)  # an older candidate's file must not pass for this one
            plan = stage.scorer.to_plan(record["decisions"]).to_dict()
            text = json.dumps({"record": record, "plan": plan}, indent=1, default=str)
            (self.out / f".best-{name}.json").write_text(text)
            (self.out / f".best-{name}.json").replace(self.out / f"best-{name}.json")

        return keep

    def search(self, stage: Any, label: str) -> dict[str, Any]:
        from edgecompress.search.loop import make_agent, run_episodes

        options = self.options
        extra: dict[str, Any] = {}
        if options.agent == "decore":
            if stage.env.stage != "prune":
                raise UsageError("the decore agent prunes channels; use ddpg, random or uniform for stage 2")
            extra["context"] = self._decore_context(stage)
        agent = make_agent(options.agent, stage.env, options.episodes, options.seed, **extra)
        if options.agent == "decore":
            stage.env.scores_source = lambda: dict(zip([g.name for g in stage.structure.groups],
                                                       agent.scores(), strict=True))  # fmt: skip
        result = run_episodes(
            stage.env, agent, options.episodes, log_file=self.log, on_record=self.keeper(stage),
            progress=self.progress, label=label, best=self.best.get(stage.env.stage),
        )  # fmt: skip
        return result.best

    def _decore_context(self, stage: Any) -> Any:
        import torch

        from edgecompress.search.agents import DecoreContext

        spec, train = stage.model.spec, self.train

        def batches(rng: np.random.Generator) -> Any:
            order = rng.permutation(len(train))[: min(len(train), 4096)]
            for start in range(0, len(order), 64):
                index = np.sort(order[start : start + 64])
                yield torch.from_numpy(spec.normalize(train.x[index])), torch.from_numpy(train.y[index])

        groups = [g.layers for g in stage.structure.groups]
        return DecoreContext(
            stage.model.module, groups, [g.channels for g in stage.structure.groups], batches
        )

    def check_reachable(self, reach: Mapping[str, Any], how: str) -> None:
        """Stop early, saying what is reachable, when even the smallest model misses a budget."""
        from edgecompress.search.reward import LABELS, UNITS

        missed = {k: v for k, v in self.options.budgets().resources().items()
                  if reach.get(k) is None or reach[k] > v}  # fmt: skip
        if not missed:
            return
        smallest = ", ".join(
            f"{LABELS[k]} {reach[k]:.3g} {UNITS[k]}"
            if reach.get(k) is not None
            else f"{LABELS[k]} (does not fit)"
            for k in ("latency_ms", "memory_mb", "size_kb")
        )
        asks = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in missed.items())
        raise InfeasibleBudgetError(
            f"the budget cannot be met on {self.profile.name}: {asks} is below what the smallest "
            f"model reaches ({how}): {smallest}; raise the budget to at least that",
            {k: reach.get(k) for k in ("latency_ms", "memory_mb", "size_kb")},
        )

    # -- stage 1 ------------------------------------------------------------------------

    def stage_one(self) -> StageRun:
        from edgecompress.compress.plan import LayerPlan
        from edgecompress.search.stages import build_stage, start_config

        ctx, options = self.ctx, self.options
        stage = build_stage(ctx, "prune", self.model, precision=self.precision, baseline={})
        env = stage.env
        env.memo.update(self.log.memo("prune"))
        fp32 = start_config(stage.structure, LayerPlan())
        base = self.anchor(stage, "baseline", fp32)
        self.baseline = _figures(base)
        env.baseline = {k: v for k, v in self.baseline.items() if k != "measurement"}
        start = self.anchor(stage, "start", env.start) if env.start != fp32 else base
        floor = self.anchor(stage, "floor", env.floor_config())
        points = [(fp32, base), (env.start, start), (env.floor_config(), floor)]
        reach = floor
        how = f"every channel group at {options.min_keep:.0%}"
        if "quantize" in options.stages:  # the smallest model of both stages
            probe = build_stage(ctx, "quantize", self.model, precision=self.precision, baseline={})
            smallest = dataclasses.replace(probe.env.floor_config(), channels=env.floor_config().channels)
            reached, reach = self.reachable(stage, smallest)
            points += reached
            how += f", {min(options.bits)}-bit weights, {min(options.clusters or [0]) or 'no'} clusters"
        self.check_reachable(reach, how)
        env.calibrate(points, self.min_margins())
        budgets = options.budgets()
        if "quantize" in options.stages and budgets.resources():
            budgets = dataclasses.replace(
                budgets, **stage_one_share(budgets.resources(), start, floor, reach)
            )
            env.set_budgets(budgets)
        self.stage_budgets["prune"] = budgets.resources()
        for _, record in points:
            self.compete(stage, record)
        best = self.search(
            stage, "stage 1/2: pruning search" if len(options.stages) > 1 else "pruning search"
        )
        return StageRun(stage, best, budgets)

    def min_margins(self) -> dict[str, float]:
        """The least headroom the wall keeps: measurement spread, or the latency table's
        published error on its held-out reference models when the profile has a table."""
        from edgecompress.search.stages import MIN_MARGINS

        margins = dict(MIN_MARGINS)
        mape = getattr(self.table, "mape", None)
        if mape is not None:
            margins["latency_ms"] = max(margins["latency_ms"], mape / 100.0)
        return margins

    def reachable(self, stage: Any, smallest: Any) -> tuple[list[tuple[Any, dict[str, Any]]], dict[str, Any]]:
        """The smallest model with int8 and with float activations (which is faster depends
        on the device and the model's size), measured; and the least of each figure."""
        acts = ("int8", "float") if self.ctx.int8_available else ("float",)
        points = []
        for act in acts:
            config = smallest.with_activations(act)
            points.append((config, self.anchor(stage, f"reachable-{act}", config)))
        least: dict[str, Any] = {}
        for key in ("latency_ms", "memory_mb", "size_kb"):
            values = [r[key] for _, r in points if r.get(key) is not None]
            least[key] = min(values) if values else None
        return points, least

    def _renamed(self, label: str) -> Progress | None:
        if self.progress is None:
            return None
        return lambda _stage, fraction: self.report(label, fraction)

    # -- stage 2 ------------------------------------------------------------------------

    def stage_two(self, model: Any, after_pruning: bool) -> StageRun:
        from edgecompress.compress.plan import LayerPlan
        from edgecompress.search.stages import build_stage, start_config

        ctx = dataclasses.replace(self.ctx, classes=None) if after_pruning else self.ctx
        stage = build_stage(ctx, "quantize", model, precision=self.precision, baseline={})
        env = stage.env
        env.memo.update(self.log.memo("quantize"))
        fp32 = start_config(stage.structure, LayerPlan())
        points = []
        if not after_pruning:
            base = self.anchor(stage, "baseline", fp32)
            self.baseline = _figures(base)
            points.append((fp32, base))
        env.baseline = {k: v for k, v in self.baseline.items() if k != "measurement"}
        start = self.anchor(stage, "start", env.start)
        if after_pruning and env.start != fp32:
            points.append((fp32, self.anchor(stage, "float", fp32)))
        points.append((env.start, start))
        if "int8" in env.start.activation:
            # The start's 8-bit weights on float activations: ~4x smaller than float and near
            # its accuracy. Where int8 activations are slow (narrow layers, a CPU without fast
            # int8 kernels) it can be the best model that meets the budgets, and random
            # episodes rarely land on it (a demo run chose clusters and 4-bit weights at 90%
            # held-out over it at 94%).
            weights_only = env.start.with_activations("float")
            points.append((weights_only, self.anchor(stage, "weights-only", weights_only)))
        reached, reach = self.reachable(stage, env.floor_config())
        points += reached
        if not after_pruning:
            self.check_reachable(reach, f"{min(self.options.bits)}-bit weights")
        env.calibrate(points, self.min_margins())
        self.stage_budgets["quantize"] = env.budgets.resources()
        for _, record in points:
            self.compete(stage, record)
        label = "stage 2/2: bits and clusters search" if after_pruning else "bits and clusters search"
        return StageRun(stage, self.search(stage, label), env.budgets)

    def tune(self, model: Any, teacher: Any, teacher_classes: Any, tag: str, lr: float, label: str) -> None:
        """Fine-tune with distillation (checkpointed per epoch); keep it only if held-out accuracy gains.

        The search scored the model before fine-tuning; a fine-tune that loses accuracy
        (a learning rate too high for a codebook, augmentation wrong for the data) must
        not make the shipped model worse than the one the search chose.
        """
        import copy

        from edgecompress.compress.finetune import FinetuneConfig, finetune
        from edgecompress.evaluate import evaluate

        options = self.options
        if options.finetune_epochs <= 0:
            return
        config = FinetuneConfig(
            epochs=options.finetune_epochs, lr=lr, seed=options.seed, max_images=options.finetune_images,
            augment=options.augment, checkpoint=self.out / f"finetune-{tag}.ckpt",
        )  # fmt: skip
        before = evaluate(model, self.heldout).top1
        state = copy.deepcopy(model.module.state_dict())
        finetune(model.module, model.spec, self.train, teacher=teacher, teacher_classes=teacher_classes,
                 config=config, progress=self._renamed(label))  # fmt: skip
        model.module.eval()
        after = evaluate(model, self.heldout).top1
        self.finetunes[tag] = {"before": round(before, 3), "after": round(after, 3), "kept": after >= before}
        if after < before:
            model.module.load_state_dict(state)
            self.notes.append(
                f"{label}: held-out accuracy fell from {before:.2f}% to {after:.2f}%, so the weights "
                "from before fine-tuning were kept"
            )
